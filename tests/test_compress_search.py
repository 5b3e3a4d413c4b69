"""Compressing the search cross-encoder, technique by technique, on a tiny BERT (MiniLM's
tokenizer, 4 layers of width 32): layers kept by the student, FFN channels really removed by
pruning, ONNX matching PyTorch, int8 formats served through the same ``predict``, and a student
that learns a planted teacher's ranking in the one training loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from search import compress as c
from served_model import search as sv

TOKENS = 32
PAIRS = [
    ["red dress", "Dresses: red floral summer dress"],
    ["jeans", "Jeans: blue skinny jeans, stretchy denim and more words to pad the pair"],
    ["warm sweater", "Sweaters: wool"],
    ["denim jacket blue", "Jackets: denim jacket, blue and cropped"],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer cross-encoder directory (random weights, seeded) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from search.train import base_model_path

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_ce")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, num_labels=1,
                        max_position_embeddings=64)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def onnx_dir(tiny, tmp_path_factory) -> tuple[Path, float]:
    """The tiny model exported once (the dynamo exporter takes seconds); its max abs diff."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "o"
    return out, c.export_onnx(tiny, out, TOKENS, PAIRS[:2])


def logits(model, pairs=PAIRS) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(model.predict(pairs, activation_fn=torch.nn.Identity())).reshape(-1)


def test_the_student_keeps_evenly_spaced_teacher_layers(tiny, tmp_path):
    teacher = sv.load_cross_encoder(tiny, TOKENS)
    c.student_from_teacher(tiny, tmp_path / "s", layers=2, max_tokens=TOKENS)
    student = sv.load_cross_encoder(tmp_path / "s", TOKENS)
    kept = student.model.base_model.encoder.layer
    assert len(kept) == 2 and student.model.config.num_hidden_layers == 2
    for mine, theirs in zip(kept, (0, 3), strict=True):  # first and last
        want = teacher.model.base_model.encoder.layer[theirs].output.dense.weight
        assert torch.equal(mine.output.dense.weight, want)
    assert c.parameters(student.model) < c.parameters(teacher.model)
    assert logits(student).shape == (len(PAIRS),)


def test_pruning_removes_ffn_channels_and_keeps_the_output_shape(tiny, tmp_path):
    c.prune_ffn(tiny, tmp_path / "p", ratio=0.5, max_tokens=TOKENS)
    pruned = sv.load_cross_encoder(tmp_path / "p", TOKENS)  # reloads: the config shrank too
    for layer in pruned.model.base_model.encoder.layer:
        assert layer.intermediate.dense.out_features == 32
        assert layer.output.dense.in_features == 32
    teacher = sv.load_cross_encoder(tiny, TOKENS)
    assert c.parameters(pruned.model) < c.parameters(teacher.model)
    assert logits(pruned).shape == logits(teacher).shape
    assert c.size_bytes(tmp_path / "p") < c.size_bytes(tiny)


def test_onnx_export_matches_torch_and_serves_through_predict(tiny, onnx_dir):
    path, diff = onnx_dir
    assert diff < 1e-4
    onnx = sv.load_cross_encoder(path)
    assert isinstance(onnx, sv.OnnxCrossEncoder)
    # other batch sizes and lengths than the export's example: the axes are dynamic
    np.testing.assert_allclose(logits(onnx), logits(sv.load_cross_encoder(tiny, TOKENS)),
                               atol=1e-4)  # fmt: skip
    assert sv.reranker_info(path)["format"] == "onnx"


def test_int8_formats_are_smaller_and_rank_like_the_float_model(tiny, onnx_dir, tmp_path):
    onnx = onnx_dir[0]
    reference = logits(sv.load_cross_encoder(tiny, TOKENS))
    made = {
        "onnx_int8": c.quantize_onnx(onnx, tmp_path / "d"),
        "onnx_int8_static": c.quantize_onnx(onnx, tmp_path / "s", PAIRS * 3),
        "torch_int8": c.quantize_torch(tiny, tmp_path / "t", TOKENS),
    }
    for fmt, path in made.items():
        assert sv.reranker_info(path)["format"] == fmt
        model = sv.load_cross_encoder(path)
        got = logits(model)
        assert got.shape == reference.shape and np.isfinite(got).all()
        assert np.abs(got - reference).max() < 0.5 * np.abs(reference).max() + 0.05, fmt
    assert c.size_bytes(tmp_path / "d") < c.size_bytes(onnx)
    assert c.size_bytes(tmp_path / "s") < c.size_bytes(onnx)


def test_an_unknown_reranker_format_is_refused_with_the_fix(tmp_path):
    (tmp_path / sv.RERANKER_INFO).write_text(json.dumps({"format": "tensorrt"}))
    with pytest.raises(RuntimeError, match="unknown to this code.*upgrade shopml"):
        sv.load_cross_encoder(tmp_path)


def test_a_bundle_serves_an_onnx_reranker_after_save_and_load(onnx_dir, tmp_path):
    from tests.test_search import tiny_products

    products = tiny_products()
    bundle = sv.SearchBundle(
        products=products,
        lexical=sv.Lexical.build(products[sv.TEXT].tolist()),
        config=sv.QueryConfig(candidates=10, rerank_depth=5, rerank_weight=1.0),
        cross_encoder=sv.load_cross_encoder(onnx_dir[0]),
    )
    loaded = sv.SearchBundle.load(bundle.save(tmp_path / "bundle"), rerank_threads=3)
    assert isinstance(loaded.cross_encoder, sv.OnnxCrossEncoder)
    # serving's search.rerank_threads reaches ONNX Runtime's session
    assert loaded.cross_encoder.session.get_session_options().intra_op_num_threads == 3
    result = sv.SearchEngine(loaded).search("dress", k=3)
    assert result.items and "rerank" in result.stages
    assert "rerank" not in (result.fallback or "")  # no bi-encoder here: dense is off


def test_a_distilled_student_learns_the_teachers_ranking(tiny, tmp_path):
    """Planted teacher: +2 for products in "Dresses", -2 otherwise. A 1-layer student trained
    on those logits in the one loop ranks held-out pairs as the teacher does."""
    from mlkit.launch import train
    from mlkit.loop import LoopConfig
    from search.train import DistilTask

    rng = np.random.default_rng(0)
    words = ["red", "blue", "floral", "wool", "long", "summer", "cozy", "denim"]
    cats = ["Dresses", "Jeans", "Sweaters", "Jackets"]

    def rows(n: int) -> pd.DataFrame:
        cat = rng.choice(cats, n)
        text = [f"{k}: {' '.join(rng.choice(words, 3))}" for k in cat]
        query = [" ".join(rng.choice(words, 2)) for _ in range(n)]
        return pd.DataFrame({"query": query, "text": text,
                             "teacher": np.where(cat == "Dresses", 2.0, -2.0)})  # fmt: skip

    rows(256).to_parquet(tmp_path / "scores.parquet")
    held = rows(40)
    c.student_from_teacher(tiny, tmp_path / "init", layers=1, max_tokens=TOKENS)
    task = DistilTask(tmp_path / "scores.parquet", tmp_path / "init", budget=256,
                      max_tokens=TOKENS)  # fmt: skip
    net, curve = train(task, LoopConfig(epochs=8, batch_size=16, lr=3e-3, seed=0,
                                        name="distil_test"), workers=1)  # fmt: skip
    assert curve[-1]["loss"] < 0.25 * curve[0]["loss"]
    net.eval()
    got = logits(net, held[["query", "text"]].values.tolist())
    is_dress = held["teacher"].to_numpy() > 0
    assert got[is_dress].min() > got[~is_dress].max()  # the teacher's order, exactly

"""The search pipeline's stages after the data (``dags/search_retrain.py``, ``shopml search-*``).

* :func:`train_bi_encoder`, :func:`train_cross_encoder`: MiniLM fine-tuned in the one Horovod
  loop (``search.train``) on the ``ds`` pairs, on their step budgets;
* :func:`build_index`: the bundle serving loads (``served_model.search``): BM25 (``bm25s``) over
  the products' text, a faiss index of the fine-tuned bi-encoder's product vectors, both
  encoders; and the zero-shot MiniLM's index beside it, for the benchmark row;
* :func:`evaluate_search`: every configuration of the table, **chosen on validation queries**
  (popularity weight, rerank depth and the cross-encoder's weight), then measured once on the
  test queries, per view (product-overlapping / product-disjoint) and on cold products, with
  bootstrap CIs;
* :func:`promote_search`: ``shopml-search`` registered (bundle, encoders, indexes and query
  config in the version) and ``champion`` moved by the same paired-bootstrap gate as the
  recommender's (``training.gate``): it must beat the champion and be non-inferior (within
  ``segment_tolerance``) to BM25 + popularity, so the first version, which replaces nothing,
  is promoted when it is no worse than the cheap peer.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from mlkit.bootstrap import bootstrap_ci
from mlkit.metrics import graded_per_query
from shopml import schema as S
from shopml.config import Settings, service_environment
from training import gate, ledger, registry, report

EXPERIMENT = "shopml-search"
SERVED = "hybrid_cross_encoder"
BASELINE = "bm25_popularity"
METRIC = "ndcg_at_10"
POP_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
RERANK_DEPTHS = (10, 20)
RERANK_WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _tables(settings: Settings, ds: date) -> dict[str, Path]:
    return {t: settings.paths.search_table_for(t, ds) for t in ("corpus", "queries", "pairs")}


# --- training ---------------------------------------------------------------------------------
def _train(
    settings: Settings, ds: date, name: str, task, budget: int, inputs: list[Path] | None = None
) -> dict[str, object]:
    """``task`` trained on ``budget`` pairs by the one Horovod launcher; saved as
    ``<search run>/<name>`` with its loss curve and a summary. ``inputs``: the files its data
    comes from (default: the pairs and corpus), whose version keys the checkpoint."""
    import torch

    from mlkit.launch import train as launch
    from mlkit.loop import LoopConfig
    from training.train import data_version

    cfg, tables = settings.search, _tables(settings, ds)
    files = inputs or sorted(f for t in ("pairs", "corpus") for f in tables[t].glob("*.parquet"))
    run_dir = settings.paths.search_run(ds)
    run_dir.mkdir(parents=True, exist_ok=True)
    loop = LoopConfig(
        epochs=1,  # one pass over exactly `budget` pairs (search.train._budgeted)
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=settings.train.seed,
        name=name,
        checkpoint=str(run_dir / "checkpoints" / f"{name}.pt"),
        data_version=f"{data_version(*files)}-{budget}",  # rebuilt pairs: a new checkpoint
    )
    started = time.perf_counter()
    net, curve = launch(task, loop, cfg.workers, env=service_environment(settings))
    seconds = time.perf_counter() - started
    net.save(str(run_dir / name))
    torch.save(curve, run_dir / f"{name}_curve.pt")
    summary = {"model": name, "pairs": budget, "workers": cfg.workers, "seconds": seconds,
               "pairs_per_second": budget / seconds, "loss": curve[-1]["loss"]}  # fmt: skip
    (run_dir / f"{name}_training.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_bi_encoder(settings: Settings, ds: date) -> dict[str, object]:
    from search.train import BiEncoderTask, base_model_path

    cfg, t = settings.search, _tables(settings, ds)
    task = BiEncoderTask(t["pairs"], t["corpus"], base_model_path(), cfg.bi_encoder_pairs,
                         cfg.product_max_tokens, settings.train.seed)  # fmt: skip
    return _train(settings, ds, "bi_encoder", task, cfg.bi_encoder_pairs)


def train_cross_encoder(settings: Settings, ds: date) -> dict[str, object]:
    from search.train import CrossEncoderTask, base_model_path

    cfg, t = settings.search, _tables(settings, ds)
    task = CrossEncoderTask(t["pairs"], t["corpus"], base_model_path(), cfg.cross_encoder_pairs,
                            cfg.query_max_tokens + cfg.product_max_tokens,
                            settings.train.seed)  # fmt: skip
    return _train(settings, ds, "cross_encoder", task, cfg.cross_encoder_pairs)


# --- index ------------------------------------------------------------------------------------
def neutral_config(settings: Settings, rerank: bool = True):
    """The query config every evaluated row starts from, and a bundle's until it is tuned."""
    from served_model.search import QueryConfig

    cfg = settings.search
    return QueryConfig(candidates=cfg.candidates, rrf_k=cfg.rrf_k,
                       rerank_depth=cfg.rerank_depth if rerank else 0)  # fmt: skip


def _products(settings: Settings, ds: date) -> pd.DataFrame:
    from served_model import search as sv

    corpus = pd.read_parquet(_tables(settings, ds)["corpus"])
    return corpus.rename(columns={S.CATEGORY: sv.CATEGORY})[
        [sv.ITEM_ID, sv.CATEGORY, sv.DEPARTMENT, sv.SHORT_TEXT, sv.TEXT, sv.POPULARITY, "cold"]
    ].sort_values(sv.ITEM_ID, key=lambda c: c.str.zfill(12), ignore_index=True)


def build_index(settings: Settings, ds: date) -> dict[str, object]:
    """The fine-tuned bundle (``bundle/``) and the zero-shot one (``zero_shot/``)."""
    from search.compress import parameters
    from search.train import base_model_path
    from served_model import search as sv

    cfg = settings.search
    run_dir = settings.paths.search_run(ds)
    products = _products(settings, ds)
    lexical = sv.Lexical.build(products[sv.TEXT].tolist())
    out = {}
    for name, encoder_dir, reranker in (
        ("bundle", run_dir / "bi_encoder", run_dir / "cross_encoder"),
        ("zero_shot", base_model_path(), None),
    ):
        encoder = sv.load_bi_encoder(encoder_dir, cfg.product_max_tokens)
        tokens = cfg.query_max_tokens + cfg.product_max_tokens
        cross = sv.load_cross_encoder(reranker, tokens) if reranker else None
        started = time.perf_counter()
        vectors = sv.encode(encoder, products[sv.SHORT_TEXT].tolist())
        bundle = sv.SearchBundle(
            products=products,
            lexical=lexical,
            config=neutral_config(settings, rerank=reranker is not None),
            bi_encoder=encoder,
            cross_encoder=cross,
            dense=sv.dense_index(vectors),
            manifest={"ds": ds.isoformat(), "encoded_seconds": time.perf_counter() - started,
                      "reranker": _reranker_summary(reranker, "teacher", parameters(cross.model))
                      if cross else None},
        )  # fmt: skip
        bundle.save(run_dir / name)
        out[name] = {"products": len(products), "dim": int(vectors.shape[1])}
    return out


def _reranker_summary(path: Path, candidate: str, params: int) -> dict[str, object]:
    """What ``/readyz`` and the metrics say of the served reranker: format, size, parameters
    (counted by the caller, which has the model loaded already)."""
    from search.compress import size_bytes
    from served_model.search import reranker_info

    return {"candidate": candidate, "format": reranker_info(path)["format"],
            "bytes": size_bytes(path), "params": int(params)}  # fmt: skip


# --- evaluation -------------------------------------------------------------------------------
class _CachedReranker:
    """The cross-encoder with its scores memoised per (query, product text): tuning tries
    several depths and priors over the same candidates without scoring them again."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: dict[tuple[str, str], float] = {}

    def predict(self, pairs, **kwargs):
        missing = [p for p in dict.fromkeys(map(tuple, pairs)) if p not in self.cache]
        if missing:
            scores = self.model.predict([list(p) for p in missing], **kwargs)
            self.cache.update(zip(missing, np.asarray(scores).reshape(-1).tolist(), strict=True))
        return np.array([self.cache[tuple(p)] for p in pairs])


def grades_of(queries: pd.DataFrame, products: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Graded relevance per query: the reviewed product 2, the rest of its class 1."""
    members = products.groupby("category")["item_id"].apply(list).to_dict()
    grades = {}
    for q in queries.itertuples(index=False):
        graded = dict.fromkeys(members.get(q.category, []), 1)
        graded[q.item_id] = 2
        grades[q.query_id] = graded
    return grades


def _split(settings: Settings, ds: date, split: str, budget: int | None = None) -> pd.DataFrame:
    """The split's queries within the query budget (default ``eval_queries``; a seeded sample
    when over it)."""
    queries = pd.read_parquet(_tables(settings, ds)["queries"])
    queries = queries[queries["split"] == split].sort_values("query_id", ignore_index=True)
    budget = budget or settings.search.eval_queries
    if len(queries) > budget:
        queries = queries.sample(n=budget, random_state=0).sort_values("query_id")
    return queries.reset_index(drop=True)


def run_queries(engine, queries: pd.DataFrame, config=None) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-query metrics of ``engine`` (under ``config``) and each query's latency (ms)."""
    rankings, latency = {}, []
    for q in queries.itertuples(index=False):
        started = time.perf_counter()
        result = engine.search(q.query, k=100, config=config)
        latency.append((time.perf_counter() - started) * 1000)
        rankings[q.query_id] = [item for item, _ in result.items]
    grades = grades_of(queries, engine.bundle.products)
    frame = graded_per_query(rankings, grades, k=10, recall_k=100)
    frame = frame.merge(queries[["query_id", "view", "cold"]], on="query_id")
    return frame, np.asarray(latency)


def _tune(
    engine, queries: pd.DataFrame, base, grid: list[dict]
) -> tuple[object, list[dict], float]:
    """The configuration of ``grid`` with the best validation NDCG@10 (first on a tie), what
    was tried, and that best NDCG@10."""
    tried = []
    for changes in grid:
        config = replace(base, **changes)
        frame, _ = run_queries(engine, queries, config)
        tried.append({**changes, METRIC: float(frame[METRIC].mean())})
    best = max(range(len(tried)), key=lambda i: (tried[i][METRIC], -i))
    return replace(base, **grid[best]), tried, tried[best][METRIC]


def configurations(
    engine, zero_shot, validation: pd.DataFrame, settings: Settings
) -> tuple[dict, dict]:
    """Each table row's engine and config, tuned on ``validation``; and what was tried.

    Every row starts from the same neutral config of the settings (never from a bundle's
    stored one, which is itself a tuning result)."""
    base = neutral_config(settings)
    lexical = replace(base, use_dense=False, rerank_depth=0)
    dense = replace(base, use_bm25=False, rerank_depth=0, typo_tolerance=False,
                    min_dense_score=-1.0)  # fmt: skip
    hybrid = replace(base, rerank_depth=0)
    pop = [{"pop_weight": w} for w in POP_WEIGHTS]
    bm25_pop, tried_bm25, bm25_pop_ndcg = _tune(engine, validation, lexical, pop)
    hybrid, tried_hybrid, hybrid_ndcg = _tune(engine, validation, hybrid, pop)
    rerank = [{"rerank_depth": d, "rerank_weight": w}
              for d in RERANK_DEPTHS for w in RERANK_WEIGHTS]  # fmt: skip
    # the served stack starts from the better retrieval on validation (it may be the lexical
    # one) and may leave the reranker off: it can only add to what validation measured
    retrieval = bm25_pop if bm25_pop_ndcg >= hybrid_ndcg else hybrid  # a tie: the cheaper
    rerank = [{"rerank_depth": 0}, *rerank]
    served, tried_rerank, _ = _tune(engine, validation, retrieval, rerank)
    rows = {
        "bm25": (engine, lexical, "baseline"),
        BASELINE: (engine, bm25_pop, "baseline"),
        "minilm_zero_shot": (zero_shot, dense, "baseline"),
        "bi_encoder": (engine, dense, "retrieval"),
        "hybrid": (engine, hybrid, "retrieval"),
        SERVED: (engine, served, "served"),
    }
    tried = {BASELINE: tried_bm25, "hybrid": tried_hybrid, SERVED: tried_rerank}
    return rows, tried


def _row(name: str, role: str, frame: pd.DataFrame, latency: np.ndarray) -> dict[str, object]:
    ci = bootstrap_ci(frame[METRIC].to_numpy())
    row: dict[str, object] = {
        "model": name, "role": role, METRIC: ci.mean, f"{METRIC}_ci_low": ci.low,
        f"{METRIC}_ci_high": ci.high, "mrr_at_10": float(frame["mrr_at_10"].mean()),
        "recall_at_100": float(frame["recall_at_100"].mean()), "queries": len(frame),
        "latency_ms": float(np.percentile(latency, 50)),
        "latency_p99_ms": float(np.percentile(latency, 99)),
    }  # fmt: skip
    for seg, part in segments(frame).items():
        if seg != "all":
            row[f"{seg}.{METRIC}"] = float(part[METRIC].mean()) if len(part) else float("nan")
    return row


def segments(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``all``, the two views and the cold products' queries (the gate's protected one)."""
    return {
        "all": frame,
        "overlapping": frame[frame["view"] == "overlapping"],
        "disjoint": frame[frame["view"] == "disjoint"],
        "cold": frame[frame["cold"]],
    }


def _engine(path: Path):
    """The bundle's engine, its cross-encoder scores memoised for the tuning grid."""
    from served_model.search import SearchBundle, SearchEngine

    bundle = SearchBundle.load(path)
    if bundle.cross_encoder is not None:
        bundle.cross_encoder = _CachedReranker(bundle.cross_encoder)
    return SearchEngine(bundle)


def evaluate_search(settings: Settings, ds: date) -> pd.DataFrame:
    """The benchmark table of ``ds`` (configs chosen on validation, measured on test); the
    served configuration is written into the bundle's manifest."""
    from served_model.search import MANIFEST

    run_dir = settings.paths.search_run(ds)
    engine, zero_shot = _engine(run_dir / "bundle"), _engine(run_dir / "zero_shot")
    validation, test = _split(settings, ds, "validation"), _split(settings, ds, "test")
    if validation.empty or test.empty:
        raise ValueError(
            f"no {'validation' if validation.empty else 'test'} queries in the {ds} data: the "
            "slice is too small to evaluate (raise max_products, or query_share)"
        )
    rows, tried = configurations(engine, zero_shot, validation, settings)
    table, per_query = [], []
    for name, (eng, config, role) in rows.items():
        frame, latency = run_queries(eng, test, config)
        table.append(_row(name, role, frame, latency))
        per_query.append(frame.assign(model=name))
    served = rows[SERVED][1]
    manifest_path = run_dir / "bundle" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["query_config"] = served.to_dict()
    manifest["tuned_on"] = f"{len(validation)} validation queries"
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    result = pd.DataFrame(table).sort_values(METRIC, ascending=False, ignore_index=True)
    result.to_json(run_dir / "evaluation.json", orient="records", indent=2)
    pd.concat(per_query).to_parquet(run_dir / "per_query.parquet", index=False)
    (run_dir / "tuning.json").write_text(json.dumps(
        {"configs": {n: c.to_dict() for n, (_, c, _) in rows.items()}, "tried": tried,
         "validation_queries": len(validation), "test_queries": len(test)}, indent=2))  # fmt: skip
    print(report.compact_table(result, 10).to_string(index=False))
    return result


# --- compression ------------------------------------------------------------------------------
TEACHER = "teacher"
COMPRESSION = "compression"  # <search run>/compression/<candidate>/ and its tables


def rerank_config(settings: Settings, ds: date):
    """The config candidates are measured under: the served one, or, when validation left the
    reranker off, the best reranking config tried on validation (so a reranker is measured at
    all); and which of the two it is."""
    from served_model.search import QueryConfig

    tuning = json.loads((settings.paths.search_run(ds) / "tuning.json").read_text())
    served = QueryConfig.from_dict(tuning["configs"][SERVED])
    if served.rerank_depth > 0:
        return served, "the served config"
    tried = [t for t in tuning["tried"][SERVED] if t.get("rerank_depth", 0) > 0]
    best = max(tried, key=lambda t: t[METRIC])
    config = replace(served, rerank_depth=best["rerank_depth"], rerank_weight=best["rerank_weight"])
    return config, "the best reranking config on validation (the served one reranks nothing)"


def _rerank_lists(engine, queries: pd.DataFrame, config) -> list[list[list[str]]]:
    """Per query, the (query, product text) pairs the reranker scores at serving: the top
    ``rerank_depth`` fused candidates (the serving shape: 1 query x the rerank depth)."""
    from served_model.search import SHORT_TEXT, normalize

    text = dict(zip(engine.bundle.products["item_id"], engine.bundle.products[SHORT_TEXT],
                    strict=True))  # fmt: skip
    retrieval = replace(config, rerank_depth=0)
    lists = []
    for q in queries.itertuples(index=False):
        result = engine.search(q.query, k=config.rerank_depth, config=retrieval)
        query = normalize(q.query)
        lists.append([[query, text[item]] for item, _ in result.items])
    return [pairs for pairs in lists if pairs]


def _teacher_scores(settings: Settings, ds: date, engine, config, out: Path) -> list[list[str]]:
    """The teacher's logits on training queries' rerank candidates (what the students learn,
    ``search.train.DistilTask``), as Parquet; returns the pairs (calibration reuses them)."""
    queries = pd.read_parquet(_tables(settings, ds)["queries"])
    train = queries[queries["split"] == "train"].sort_values("query_id")
    per_query = max(config.rerank_depth, 1)
    wanted = -(-settings.search.distil_pairs // per_query)
    train = train.sample(n=min(wanted, len(train)), random_state=settings.train.seed)
    pairs = [p for lst in _rerank_lists(engine, train, config) for p in lst]
    teacher = engine.bundle.cross_encoder
    logits = teacher.predict(pairs, batch_size=64)
    frame = pd.DataFrame({"query": [p[0] for p in pairs], "text": [p[1] for p in pairs],
                          "teacher": np.asarray(logits, dtype=np.float32).reshape(-1)})  # fmt: skip
    frame.to_parquet(out, index=False)
    return pairs


def _distil(settings: Settings, ds: date, name: str, init: Path, scores: Path, budget: int):
    from search.train import DistilTask

    cfg = settings.search
    task = DistilTask(scores, init, budget, cfg.query_max_tokens + cfg.product_max_tokens,
                      settings.train.seed)  # fmt: skip
    files = [scores, *sorted(p for p in init.rglob("*") if p.is_file())]
    return _train(settings, ds, name, task, budget, inputs=files)


def make_candidates(settings: Settings, ds: date, engine, config) -> dict[str, dict]:
    """Every compressed reranker of the teacher, as served directories, and how each was made
    (ONNX exports carry their max abs difference to PyTorch)."""
    from search import compress as c

    cfg = settings.search
    tokens = cfg.query_max_tokens + cfg.product_max_tokens
    run_dir = settings.paths.search_run(ds)
    teacher, out = run_dir / "cross_encoder", run_dir / COMPRESSION
    if out.exists():  # a rerun of the date rebuilds every candidate
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    pairs = _teacher_scores(settings, ds, engine, config, out / "teacher_scores.parquet")
    check, calibration = pairs[:32], pairs[: cfg.calibration_pairs]
    made: dict[str, dict] = {TEACHER: {"path": teacher, "made": "fine-tuned cross-encoder"}}

    def onnx_family(prefix: str, source: Path, static: bool = False) -> None:
        diff = c.export_onnx(source, out / f"{prefix}_onnx", tokens, check)
        made[f"{prefix}_onnx"] = {"path": out / f"{prefix}_onnx", "max_abs_diff": diff,
                                  "made": f"{prefix} exported to ONNX"}  # fmt: skip
        c.quantize_onnx(out / f"{prefix}_onnx", out / f"{prefix}_onnx_int8")
        made[f"{prefix}_onnx_int8"] = {"path": out / f"{prefix}_onnx_int8",
                                       "made": f"{prefix}, ONNX Runtime dynamic int8"}  # fmt: skip
        if static:
            c.quantize_onnx(out / f"{prefix}_onnx", out / f"{prefix}_onnx_int8_static", calibration)
            made[f"{prefix}_onnx_int8_static"] = {
                "path": out / f"{prefix}_onnx_int8_static",
                "made": f"{prefix}, ONNX Runtime static int8, {len(calibration)} pairs calibrate",
            }

    c.quantize_torch(teacher, out / "teacher_torch_int8", tokens)
    made["teacher_torch_int8"] = {"path": out / "teacher_torch_int8",
                                  "made": "teacher, PyTorch dynamic int8"}  # fmt: skip
    onnx_family(TEACHER, teacher, static=True)
    scores = out / "teacher_scores.parquet"
    c.student_from_teacher(teacher, out / "student_init", cfg.student_layers, tokens)
    summary = _distil(settings, ds, "student", out / "student_init", scores, cfg.distil_pairs)
    made["student"] = {
        "path": run_dir / "student",
        "made": f"{cfg.student_layers}-layer student distilled on {cfg.distil_pairs} pairs",
        "training": summary,
    }
    onnx_family("student", run_dir / "student")
    c.prune_ffn(teacher, out / "pruned_init", cfg.prune_ratio, tokens)
    finetune = max(cfg.distil_pairs // 2, 8)
    summary = _distil(settings, ds, "pruned", out / "pruned_init", scores, finetune)
    made["pruned"] = {"path": run_dir / "pruned", "made": f"{cfg.prune_ratio:.0%} of FFN "
                      f"channels removed, fine-tuned on {finetune} pairs",
                      "training": summary}  # fmt: skip
    onnx_family("pruned", run_dir / "pruned")
    for intermediate in ("student_onnx", "pruned_onnx"):  # steps to int8, not candidates
        made.pop(intermediate)
    return made


def latency_ms(
    models: dict[str, object], lists: list[list[list[str]]], rounds: int = 1
) -> dict[str, np.ndarray]:
    """Each model's ``predict`` times (ms) on each query's rerank pairs, ``rounds`` passes,
    interleaved model by model (``training.compress.interleaved_times``)."""
    import torch

    from training.compress import interleaved_times

    runs = {name: (lambda i, m=model: m.predict(lists[i % len(lists)], batch_size=64))
            for name, model in models.items()}  # fmt: skip
    with torch.inference_mode():
        return interleaved_times(runs, rounds * len(lists))


def measure_candidates(
    settings: Settings, ds: date, made: dict[str, dict], engine, config
) -> pd.DataFrame:
    """Size, parameters, p50/p99 at the serving shape and NDCG@10 on validation and test of
    every candidate, in one process, with the paired-bootstrap CI of each split's difference
    to the teacher (same queries)."""
    from search.compress import size_bytes
    from served_model.search import load_cross_encoder, reranker_info
    from training.compress import latency_summary

    cfg = settings.search
    run_dir = settings.paths.search_run(ds)
    budget = min(cfg.compression_queries, cfg.eval_queries)
    splits = {s: _split(settings, ds, name, budget)
              for s, name in (("val", "validation"), ("test", "test"))}  # fmt: skip
    models = {n: load_cross_encoder(m["path"]) for n, m in made.items()}
    lists = _rerank_lists(engine, splits["val"].head(60), config)
    latency = {n: latency_summary(t) for n, t in latency_ms(models, lists).items()}
    per_query: dict[str, dict[str, pd.Series]] = {s: {} for s in splits}
    for name, model in models.items():
        engine.bundle.cross_encoder = model
        for split, queries in splits.items():
            frame, _ = run_queries(engine, queries, config)
            per_query[split][name] = frame.set_index("query_id")[METRIC]
    rows = []
    for name, model in models.items():
        path = made[name]["path"]
        info = reranker_info(path)
        row = {"candidate": name, "format": info["format"], "bytes": size_bytes(path),
               "params": int(info.get("params") or sum(
                   p.numel() for p in model.model.parameters())),
               **latency[name], "path": str(path.relative_to(run_dir)),
               "max_abs_diff": made[name].get("max_abs_diff", float("nan")),
               "made": made[name]["made"]}  # fmt: skip
        for split, scores in per_query.items():
            base = scores[TEACHER]
            ci = bootstrap_ci((scores[name] - base).loc[base.index].to_numpy())
            row |= {f"{split}_ndcg": float(scores[name].mean()), f"{split}_diff": ci.mean,
                    f"{split}_diff_low": ci.low, f"{split}_diff_high": ci.high}  # fmt: skip
        rows.append(row)
    table = pd.DataFrame(rows)
    t = table.set_index("candidate").loc[TEACHER]
    table["size_ratio"] = t["bytes"] / table["bytes"]
    table["speed_ratio"] = t["p50_ms"] / table["p50_ms"]
    table["val_queries"], table["test_queries"] = len(splits["val"]), len(splits["test"])
    return table


def compress_search(settings: Settings, ds: date) -> dict[str, object]:
    """Distil, prune, quantize and export the cross-encoder; measure every candidate; the
    fastest within ``compression_tolerance`` of the teacher's validation NDCG@10 becomes the
    bundle's reranker (``gate.choose_compressed``); the served row of the evaluation is then
    re-measured with it, so the promotion gate judges what will be served."""
    import shutil

    from served_model.search import CROSS_ENCODER, MANIFEST, load_cross_encoder

    cfg = settings.search
    run_dir = settings.paths.search_run(ds)
    engine = _engine(run_dir / "bundle")
    # the fine-tuned teacher (a rerun finds the bundle already holding an earlier choice)
    engine.bundle.cross_encoder = load_cross_encoder(
        run_dir / "cross_encoder", cfg.query_max_tokens + cfg.product_max_tokens
    )
    config, config_reason = rerank_config(settings, ds)
    started = time.perf_counter()
    made = make_candidates(settings, ds, engine, config)
    built = time.perf_counter() - started
    table = measure_candidates(settings, ds, made, engine, config)
    choice = gate.choose_compressed(
        [{"name": r.candidate, METRIC: r.val_ndcg, "p50_ms": r.p50_ms}
         for r in table.itertuples()], TEACHER, METRIC, cfg.compression_tolerance,
    )  # fmt: skip
    table["chosen"] = table["candidate"] == choice.chosen
    table["why"] = [("chosen: the fastest within tolerance" if n == choice.chosen
                     else choice.reasons.get(n, "")) for n in table["candidate"]]  # fmt: skip
    out = run_dir / COMPRESSION
    table.to_json(out / "candidates.json", orient="records", indent=2)
    record = {"chosen": choice.chosen, "choice": choice.to_dict(), "config": config.to_dict(),
              "config_is": config_reason, "build_seconds": built}  # fmt: skip
    (out / "choice.json").write_text(json.dumps(record, indent=2, default=str))
    # the bundle serves the chosen reranker
    bundle_dir = run_dir / "bundle"
    shutil.rmtree(bundle_dir / CROSS_ENCODER)
    shutil.copytree(made[choice.chosen]["path"], bundle_dir / CROSS_ENCODER)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    rows = table.set_index("candidate")
    manifest["reranker"] = _reranker_summary(
        bundle_dir / CROSS_ENCODER, choice.chosen, rows.loc[choice.chosen, "params"]
    )
    manifest["reranker"]["teacher_bytes"] = int(rows.loc[TEACHER, "bytes"])
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    _served_with(settings, ds, bundle_dir, compressed=choice.chosen != TEACHER)
    print(table[["candidate", "format", "bytes", "p50_ms", "p99_ms", "val_ndcg", "test_ndcg",
                 "chosen"]].round(4).to_string(index=False))  # fmt: skip
    return {"chosen": choice.chosen, "reasons": choice.reasons,
            "speed_ratio": float(table.loc[table["chosen"], "speed_ratio"].iloc[0]),
            "size_ratio": float(table.loc[table["chosen"], "size_ratio"].iloc[0])}  # fmt: skip


def _served_with(settings: Settings, ds: date, bundle_dir: Path, compressed: bool) -> None:
    """The evaluation's served row made true to the bundle: with a compressed reranker it is
    measured again (same test queries) and the teacher's row stays beside it, renamed; with
    the teacher it is the teacher's row. Reruns start from what ``evaluate_search`` wrote."""
    run_dir = settings.paths.search_run(ds)
    table = pd.read_json(run_dir / "evaluation.json")
    per_query = pd.read_parquet(run_dir / "per_query.parquet")
    teacher_row = f"{SERVED}_teacher"
    if (table["model"] == teacher_row).any():  # an earlier compression's rows: undo them
        table = table[table["model"] != SERVED]
        per_query = per_query[per_query["model"] != SERVED]
        table.loc[table["model"] == teacher_row, ["model", "role"]] = [SERVED, "served"]
        per_query.loc[per_query["model"] == teacher_row, "model"] = SERVED
    if compressed:
        table.loc[table["model"] == SERVED, ["model", "role"]] = [teacher_row, "retrieval"]
        per_query.loc[per_query["model"] == SERVED, "model"] = teacher_row
        frame, latency = run_queries(_engine(bundle_dir), _split(settings, ds, "test"))
        table = pd.concat([table, pd.DataFrame([_row(SERVED, "served", frame, latency)])])
        per_query = pd.concat([per_query, frame.assign(model=SERVED)])
    table = table.sort_values(METRIC, ascending=False, ignore_index=True)
    table.to_json(run_dir / "evaluation.json", orient="records", indent=2)
    per_query.to_parquet(run_dir / "per_query.parquet", index=False)


def _log_compression(out: Path) -> None:
    """The reranker's candidate table, the choice and the quality/latency plot, into the run."""
    import mlflow

    if not (out / "candidates.json").exists():
        return
    table = pd.read_json(out / "candidates.json")
    record = json.loads((out / "choice.json").read_text())
    mlflow.log_table(table, "compression/reranker_candidates.json")
    mlflow.log_dict(record, "compression/reranker_choice.json")
    mlflow.log_figure(report.compression_pareto(table, record["chosen"], 10, teacher=TEACHER),
                      f"{report.PLOTS}/reranker_compression.png")  # fmt: skip
    row = table.set_index("candidate").loc[record["chosen"]]
    mlflow.log_metrics(
        {
            f"reranker.{k}": float(row[k])
            for k in (
                "p50_ms",
                "p99_ms",
                "bytes",
                "speed_ratio",
                "size_ratio",
                "val_ndcg",
                "test_ndcg",
            )
        }
    )
    mlflow.set_tag("reranker_compressed", record["chosen"])


# --- registry and gate ------------------------------------------------------------------------
def _champion_rows(settings: Settings, ds: date, version: str, dst: Path) -> pd.DataFrame:
    """The search champion re-evaluated, with its own query config, on today's test queries."""
    local = registry.download_version(registry.search_settings(settings), version, dst)
    frame, _ = run_queries(_engine(local / "artifacts" / "bundle"), _split(settings, ds, "test"))
    return frame


def promote_search(settings: Settings, ds: date) -> dict[str, object]:
    """Register the bundle as a ``shopml-search`` version; move ``champion`` only if the gate
    says so (paired bootstrap over test queries, cold products protected)."""
    import tempfile

    import mlflow
    import torch

    ss = registry.search_settings(settings)
    cfg = settings.search
    run_dir = settings.paths.search_run(ds)
    table = pd.read_json(run_dir / "evaluation.json")
    per_query = pd.read_parquet(run_dir / "per_query.parquet")
    of = lambda m: segments(per_query[per_query["model"] == m])  # noqa: E731
    current = registry.champion_version(ss)
    champion = None
    if current:
        with tempfile.TemporaryDirectory(dir=settings.paths.home) as tmp:
            champion = segments(_champion_rows(settings, ds, current, Path(tmp)))
    verdict = gate.decide(
        of(SERVED), champion=champion, baseline=of(BASELINE), metric=METRIC,
        margin=cfg.promotion_margin, segments=("cold",), tolerance=cfg.segment_tolerance,
        user_col="query_id", baseline_non_inferiority=cfg.segment_tolerance,
    )  # fmt: skip
    registry.use_tracking(ss)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:  # under the profile's artifact root
        mlflow.create_experiment(EXPERIMENT, artifact_location=settings.artifact_root)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"search-{ds}", tags={"ds": ds.isoformat()}) as run:
        mlflow.log_params({f"search.{k}": v for k, v in cfg.model_dump().items()})
        mlflow.log_params({f"served.{k}": v for k, v in json.loads(
            (run_dir / "tuning.json").read_text())["configs"][SERVED].items()})  # fmt: skip
        curves = {
            m: torch.load(run_dir / f"{m}_curve.pt")
            for m in ("bi_encoder", "cross_encoder")
            if (run_dir / f"{m}_curve.pt").exists()
        }
        report.log_evaluation(table, 10, ds.isoformat(), SERVED, {}, curves)  # fmt: skip
        row = table.set_index("model").loc[SERVED]
        _log_compression(run_dir / COMPRESSION)
        for f in ("tuning.json", "bi_encoder_training.json", "cross_encoder_training.json",
                  "student_training.json", "pruned_training.json"):  # fmt: skip
            if (run_dir / f).exists():
                mlflow.log_artifact(str(run_dir / f))
        from served_model.search_pyfunc import log_search_model

        uri = log_search_model(run_dir / "bundle", test_example=_split(settings, ds, "test"))
    version = registry.register(ss, uri, run.info.run_id, {"ds": ds.isoformat()})
    with ledger.alias_lock(ss):
        now = registry.champion_version(ss)
        promoted = verdict.promote and now == current
        if promoted:
            registry.set_champion(ss, version)
        reason = ("promoted: " if promoted else "NOT promoted: ") + "; ".join(verdict.reasons)
        ledger.record(ss, ledger.Entry(
            action="gate", model=ss.model_name, champion_before=now,
            champion_after=version if promoted else now, reason=reason, ds=ds.isoformat(),
            challenger=version, promoted=promoted, metrics=ledger.metrics_of(verdict.numbers),
        ))  # fmt: skip
    description = report.decision_markdown(
        verdict, table, 10, ds.isoformat(), SERVED, version, promoted
    )
    registry.describe_version(ss, version, description)
    mlflow.set_experiment(EXPERIMENT)  # the registry calls above set the nightly one
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_metric("promoted", float(promoted))
        mlflow.set_tags(
            {
                "promotion": "promoted" if promoted else "not promoted",
                "model_version": version,
                "mlflow.note.content": description,
            }
        )
        mlflow.log_dict(verdict.to_dict(), "promotion.json")
        mlflow.log_figure(report.gate_difference(verdict.numbers, promoted, METRIC),
                          f"{report.PLOTS}/gate_difference.png")  # fmt: skip
    decision = {"version": version, "promoted": promoted, "reason": reason,
                METRIC: float(row[METRIC]), "gate": verdict.to_dict()}  # fmt: skip
    (run_dir / "promotion.json").write_text(json.dumps(decision, indent=2, default=str))
    print(f"search model version {version}: {reason}")
    return decision

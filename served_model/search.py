"""Product search as it is served: the bundle a search version carries and the engine over it.

One engine, used three ways, so what is evaluated is what is served:

* the search pipeline builds a :class:`SearchBundle` and evaluates every configuration of the
  benchmark table through :meth:`SearchEngine.search` (``training.search``);
* ``GET /search`` answers with the champion version's engine (``serving``);
* the BM25 of the bundle mines hard negatives for training (``spark_jobs.search_data``).

The query path (:meth:`SearchEngine.search`):

1. **normalise** (:func:`normalize`): Unicode NFKC, accents stripped, case folded, punctuation
   to spaces; then **typo tolerance**: a word the catalog does not contain is replaced by the
   most frequent catalog word within edit distance 1 (2 from 8 letters on; a swap of two
   neighbouring letters counts 1: optimal string alignment);
2. **retrieve**: BM25 (``bm25s``, stemmed, English stop words) and dense (the bi-encoder's
   normalised vectors in a faiss inner-product index), ``candidates`` each;
3. **fuse** by reciprocal rank (``1 / (rrf_k + rank)``), plus a popularity prior
   (``pop_weight x log1p(popularity) / log1p(max popularity)``);
4. **rerank** the top ``rerank_depth`` with the cross-encoder (the fused score of step 3 plus
   ``rerank_weight x`` its logit and, for a known user, ``user_weight x`` the user's affinity
   for the product's category: the share of their purchases in it, also added in step 3);
5. **facets**: category counts over the fused candidates; a ``category`` filter applies after;
6. **zero results** (no lexical match, and no product within ``min_dense_score`` cosine): the query
   relaxed (a looser typo distance, a word's prefix), then the popular products of the category
   the query names or its dense neighbours suggest; the answer says which (``fallback``).

A bundle without a dense index or a cross-encoder, or one whose models fail at query time,
degrades to BM25 (plus the prior) and says so in ``fallback``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import bm25s

log = logging.getLogger(__name__)

SEARCH_FORMAT_VERSION = 1
MANIFEST = "search_manifest.json"
PRODUCTS = "products.parquet"
BM25_DIR = "bm25"
WORDS = "words.json"  # surface words and counts: the typo-tolerance dictionary
DENSE = "dense.faiss"
BI_ENCODER = "bi_encoder"
CROSS_ENCODER = "cross_encoder"
QUERY_CACHE = 10_000  # query vectors kept (about 1.5 KB each)

# products.parquet columns
ITEM_ID = "item_id"
CATEGORY = "category"
DEPARTMENT = "department"
SHORT_TEXT = "short_text"  # what the encoders read: category words + a few titles
TEXT = "text"  # what BM25 indexes: everything searchable
POPULARITY = "popularity"

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_WORD = re.compile(r"(?u)\b\w\w+\b")


def normalize(query: str) -> str:
    """Case, Unicode and punctuation folded: ``"Robe  d'ÉTÉ!"`` -> ``"robe d ete"``."""
    text = unicodedata.normalize("NFKC", query)
    text = "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    ).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def words(text: str) -> list[str]:
    """The words BM25 and the typo dictionary see (two characters or more)."""
    return _WORD.findall(normalize(text))


@dataclass(frozen=True)
class QueryConfig:
    """How a query is answered; chosen on validation queries by the search pipeline and
    stored in the version's manifest, so serving answers as the evaluation measured."""

    candidates: int = 100
    use_bm25: bool = True
    use_dense: bool = True
    rrf_k: int = 60
    pop_weight: float = 0.0
    rerank_depth: int = 20
    rerank_weight: float = 0.1
    user_weight: float = 0.5
    min_dense_score: float = 0.35
    typo_tolerance: bool = True
    facet_depth: int = 100

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QueryConfig:
        """A manifest's config; settings this code does not know are ignored (logged), so a
        version written by other code still serves."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            log.warning("search bundle: ignoring unknown query settings %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class SearchResult:
    query: str  # as normalised (and corrected) for retrieval
    items: list[tuple[str, float]]
    facets: dict[str, int]
    fallback: str | None = None
    corrected: dict[str, str] = field(default_factory=dict)  # typo -> catalog word
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    candidates: dict[str, int] = field(default_factory=dict)


class Tokenizer:
    """BM25's analyser: words, English stop words removed, Snowball-stemmed (the same on
    products and queries)."""

    def __init__(self) -> None:
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        self._stem = Stemmer.Stemmer("english").stemWord
        self._stop = frozenset(STOPWORDS_EN)

    def __call__(self, text: str) -> list[str]:
        return [self._stem(w) for w in words(text) if w not in self._stop]

    def stem(self, word: str) -> str:
        return self._stem(word)

    def is_stop(self, word: str) -> bool:
        return word in self._stop


class Lexical:
    """BM25 over the products' text (``bm25s``) and the catalog's surface words."""

    def __init__(self, index: bm25s.BM25, word_counts: dict[str, int]) -> None:
        self.index = index
        self.tokenizer = Tokenizer()
        self.word_counts = word_counts
        # correction targets: catalog words BM25 can match, most frequent first (ties go to
        # the first, so the more common word wins)
        self._targets = [
            w for w in sorted(word_counts, key=lambda w: -word_counts[w])
            if len(w) >= 3 and not self.tokenizer.is_stop(w) and self.known(self.tokenizer.stem(w))
        ]  # fmt: skip

    @classmethod
    def build(cls, texts: list[str]) -> Lexical:
        import bm25s

        tok = Tokenizer()
        tokens = [tok(t) or ["__empty__"] for t in texts]
        index = bm25s.BM25()
        index.index(tokens, show_progress=False)
        counts = Counter(w for t in texts for w in words(t))
        return cls(index, dict(counts))

    def save(self, root: Path) -> None:
        self.index.save(str(root / BM25_DIR), show_progress=False)
        (root / WORDS).write_text(json.dumps(self.word_counts))

    @classmethod
    def load(cls, root: Path) -> Lexical:
        import bm25s

        index = bm25s.BM25.load(str(root / BM25_DIR), show_progress=False)
        return cls(index, json.loads((root / WORDS).read_text()))

    def known(self, token: str) -> bool:
        return token in self.index.vocab_dict

    def scores(self, query: str) -> np.ndarray:
        """BM25 of every product (0 where nothing matches)."""
        tokens = [t for t in self.tokenizer(query) if self.known(t)]
        if not tokens:
            return np.zeros(self.index.scores["num_docs"], dtype=np.float32)
        return np.asarray(self.index.get_scores(tokens), dtype=np.float32)

    def top(self, query: str, n: int) -> np.ndarray:
        """The (at most ``n``) products matching ``query``, best BM25 first."""
        scores = self.scores(query)
        top = np.argsort(-scores, kind="stable")[:n]
        return top[scores[top] > 0]

    def correct(self, query: str, loose: bool = False) -> tuple[str, dict[str, str]]:
        """Unknown words replaced by the most frequent catalog word within edit distance
        1 (2 from 8 letters on; one more when ``loose``)."""
        from rapidfuzz import process
        from rapidfuzz.distance import OSA

        out, fixed = [], {}
        for w in query.split():
            if len(w) < 4 or self.tokenizer.is_stop(w) or self.known(self.tokenizer.stem(w)):
                out.append(w)
                continue
            limit = (2 if len(w) >= 8 else 1) + int(loose)
            match = process.extractOne(w, self._targets, scorer=OSA.distance, score_cutoff=limit)
            if match is not None:
                fixed[w] = match[0]
            out.append(match[0] if match else w)
        return " ".join(out), fixed


@dataclass
class SearchBundle:
    """What a ``shopml-search`` version serves with (a directory; see the module docstring)."""

    products: pd.DataFrame
    lexical: Lexical
    config: QueryConfig
    bi_encoder: Any | None = None  # sentence_transformers.SentenceTransformer
    cross_encoder: Any | None = None  # sentence_transformers.CrossEncoder
    dense: Any | None = None  # faiss.Index over the bi-encoder's normalised product vectors
    manifest: dict[str, Any] = field(default_factory=dict)

    def save(self, root: Path) -> Path:
        import faiss

        root.mkdir(parents=True, exist_ok=True)
        self.products.to_parquet(root / PRODUCTS, index=False)
        self.lexical.save(root)
        if self.bi_encoder is not None:
            self.bi_encoder.save(str(root / BI_ENCODER))
        if self.cross_encoder is not None:
            self.cross_encoder.save(str(root / CROSS_ENCODER))
        if self.dense is not None:
            faiss.write_index(self.dense, str(root / DENSE))
        manifest = {
            **self.manifest,
            "format_version": SEARCH_FORMAT_VERSION,
            "products": len(self.products),
            "query_config": self.config.to_dict(),
        }
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        return root

    @classmethod
    def load(
        cls, root: Path, models: bool = True, rerank_threads: int | None = None
    ) -> SearchBundle:
        """Read a bundle; a dense index or model that fails to load is left out (logged), so
        the engine degrades to BM25 instead of refusing the version. ``rerank_threads``: of
        an ONNX reranker (:class:`OnnxCrossEncoder`; default: torch's)."""
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format_version", 0) > SEARCH_FORMAT_VERSION:
            raise RuntimeError(
                f"search bundle format {manifest['format_version']} is newer than this code "
                f"({SEARCH_FORMAT_VERSION}): upgrade shopml to serve it"
            )
        bundle = cls(
            products=pd.read_parquet(root / PRODUCTS),
            lexical=Lexical.load(root),
            config=QueryConfig.from_dict(manifest["query_config"]),
            manifest=manifest,
        )
        if not models:
            return bundle

        def cross_encoder(path: Path) -> Any:
            return load_cross_encoder(path, threads=rerank_threads)

        for name, loader in ((DENSE, _read_faiss), (BI_ENCODER, load_bi_encoder),
                             (CROSS_ENCODER, cross_encoder)):  # fmt: skip
            path = root / name
            if not path.exists():
                continue
            try:
                value = loader(path)
            except Exception:
                log.exception("search bundle: %s failed to load; serving without it", name)
                continue
            setattr(bundle, {DENSE: "dense", BI_ENCODER: "bi_encoder",
                             CROSS_ENCODER: "cross_encoder"}[name], value)  # fmt: skip
        return bundle


def _read_faiss(path: Path) -> Any:
    import faiss

    return faiss.read_index(str(path))


def load_bi_encoder(path: Path | str, max_tokens: int | None = None) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    if max_tokens:
        model.max_seq_length = max_tokens
    return model.eval()


def load_cross_encoder(
    path: Path | str, max_tokens: int | None = None, threads: int | None = None
) -> Any:
    """The reranker in the format its directory holds (:data:`RERANKER_FORMATS`): a
    sentence-transformers ``CrossEncoder`` (no ``reranker.json``), or a compressed one.
    ``threads``: ONNX Runtime's, for an ONNX one (torch formats use torch's global setting)."""
    path = Path(path)
    info = reranker_info(path)
    if info["format"] in ("onnx", "onnx_int8", "onnx_int8_static"):
        return OnnxCrossEncoder(path, threads)
    if info["format"] == "torch_int8":
        return QuantizedCrossEncoder.load(path)
    from sentence_transformers import CrossEncoder

    return CrossEncoder(
        str(path), device="cpu", local_files_only=True, num_labels=1, max_length=max_tokens
    ).eval()


# --- compressed rerankers (made by ``search.compress``; chosen by ``training.search``) ------
RERANKER_INFO = "reranker.json"  # format, weights file, max_length, params
RERANKER_FORMATS = ("torch", "torch_int8", "onnx", "onnx_int8", "onnx_int8_static")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.onnx")


def weights_file(path: Path) -> Path:
    """The file that holds a reranker directory's weights (what "size" means in the tables)."""
    for name in _WEIGHTS:
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no reranker weights ({', '.join(_WEIGHTS)}) in {path}")


def reranker_info(path: Path) -> dict[str, Any]:
    """``reranker.json`` of a compressed reranker; a plain sentence-transformers directory is
    ``{"format": "torch"}``."""
    info_path = Path(path) / RERANKER_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {"format": "torch"}
    if info["format"] not in RERANKER_FORMATS:
        raise RuntimeError(
            f"reranker format {info['format']!r} in {path} is unknown to this code "
            f"(known: {', '.join(RERANKER_FORMATS)}): upgrade shopml to serve it"
        )
    return info


def _pair_batches(pairs: list, batch_size: int) -> Any:
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        yield [p[0] for p in chunk], [p[1] for p in chunk]


class OnnxCrossEncoder:
    """A cross-encoder exported to ONNX (fp32 or int8), run by ONNX Runtime.

    ``predict`` takes and returns what ``CrossEncoder.predict`` does (pairs in, one logit per
    pair out), so the engine and the evaluation use either without knowing which. Threads: as
    many as torch uses unless ``threads`` says (a comparison with the torch model is then
    like for like). Serving passes ``threads`` (``search.rerank_threads``), and then the
    pool's idle threads sleep instead of spinning, so a rerank does not take CPU from the
    requests answered beside it.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort
        import torch
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.info = reranker_info(self.path)
        self.max_length = int(self.info["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        if threads:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def predict(self, pairs: list, batch_size: int = 64, **_: Any) -> np.ndarray:
        out = []
        for queries, texts in _pair_batches(list(pairs), batch_size):
            enc = self.tokenizer(queries, texts, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")  # fmt: skip
            feed = {k: v.astype(np.int64) for k, v in enc.items() if k in self.inputs}
            out.append(self.session.run(None, feed)[0].reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def save(self, path: str) -> None:
        import shutil

        if Path(path).resolve() != self.path.resolve():
            shutil.copytree(self.path, path, dirs_exist_ok=True)


class QuantizedCrossEncoder:
    """A sentence-transformers ``CrossEncoder`` whose Linear layers are PyTorch dynamic int8
    (``torch.ao``): saved whole with ``torch.save``, as quantized modules have no other
    portable form."""

    def __init__(self, model: Any, path: Path | None = None) -> None:
        self.model = model
        self.path = path

    @classmethod
    def load(cls, path: Path) -> QuantizedCrossEncoder:
        import torch

        return cls(torch.load(path / "model.pt", weights_only=False).eval(), path)

    def predict(self, pairs: list, **kwargs: Any) -> np.ndarray:
        return self.model.predict(pairs, **kwargs)

    def save(self, path: str) -> None:
        import shutil

        if self.path is None:
            raise RuntimeError("a quantized cross-encoder is saved by search.compress")
        if Path(path).resolve() != self.path.resolve():
            shutil.copytree(self.path, path, dirs_exist_ok=True)


def encode(bi_encoder: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 vectors (inner product = cosine)."""
    import torch

    with torch.inference_mode():
        vectors = bi_encoder.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )  # fmt: skip
    return np.ascontiguousarray(vectors, dtype=np.float32)


def dense_index(vectors: np.ndarray) -> Any:
    """Exact inner-product search: a catalog of thousands needs no approximation."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class SearchEngine:
    """Answers queries over one bundle (thread-safe: only the query-vector cache changes, under
    a lock)."""

    def __init__(self, bundle: SearchBundle, config: QueryConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config or bundle.config
        p = bundle.products
        self.item_ids = p[ITEM_ID].astype(str).to_numpy()
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._pos = {item: i for i, item in enumerate(self.item_ids)}
        self.categories = p[CATEGORY].fillna("").astype(str).to_numpy()
        # as a ``category`` filter or a query names them (normalised once, not per request)
        self._category_keys = np.array([normalize(c) for c in self.categories], dtype=object)
        self.short_text = p[SHORT_TEXT].fillna("").astype(str).tolist()
        pop = np.log1p(p[POPULARITY].fillna(0).to_numpy(dtype=np.float64))
        self.prior = pop / pop.max() if pop.max() > 0 else pop
        self.by_category: dict[str, np.ndarray] = {
            key: np.flatnonzero(self._category_keys == key)[
                np.argsort(-self.prior[self._category_keys == key], kind="stable")
            ]
            for key in np.unique(self._category_keys)
            if key
        }

    def affinity(self, purchases: dict[str, float]) -> dict[str, float]:
        """A known user's affinity per category: the share of their purchases (of products in
        this catalog) in it, the personalization feature of the rerank."""
        pos = self._pos
        counts: Counter[str] = Counter()
        for item, n in purchases.items():
            if (i := pos.get(item)) is not None:
                counts[self.categories[i]] += n
        total = sum(counts.values())
        return {c: n / total for c, n in counts.items()} if total else {}

    def _affinity_of(self, ids: np.ndarray, affinity: dict[str, float]) -> np.ndarray:
        return np.array([affinity.get(c, 0.0) for c in self.categories[ids]], dtype=np.float64)

    def category_of(self, item_id: str) -> str:
        return str(self.categories[self._pos[item_id]])

    def with_config(self, **changes: Any) -> SearchEngine:
        return SearchEngine(self.bundle, replace(self.config, **changes))

    # --- the stages -------------------------------------------------------------------------
    def _query_vector(self, query: str) -> np.ndarray:
        """The query's vector, memoised (popular queries repeat; a bounded LRU)."""
        with self._lock:
            vec = self._vectors.get(query)
            if vec is not None:
                self._vectors.move_to_end(query)
                return vec
        vec = encode(self.bundle.bi_encoder, [query])
        with self._lock:
            self._vectors[query] = vec
            while len(self._vectors) > QUERY_CACHE:
                self._vectors.popitem(last=False)
        return vec

    def _dense(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        vec = self._query_vector(query)
        scores, idx = self.bundle.dense.search(vec, min(n, len(self.item_ids)))
        keep = idx[0] >= 0
        return idx[0][keep], scores[0][keep]

    def _rerank(self, query: str, idx: np.ndarray) -> np.ndarray:
        import torch

        pairs = [[query, self.short_text[i]] for i in idx]
        with torch.inference_mode():
            logits = self.bundle.cross_encoder.predict(
                pairs, activation_fn=torch.nn.Identity(), show_progress_bar=False,
                convert_to_numpy=True, batch_size=64,
            )  # fmt: skip
        return np.asarray(logits, dtype=np.float64).reshape(-1)

    def search(
        self,
        query: str,
        k: int = 10,
        category: str | None = None,
        user_affinity: dict[str, float] | None = None,
        config: QueryConfig | None = None,
    ) -> SearchResult:
        """Up to ``k`` products for ``query`` (see the module docstring for the stages)."""
        cfg = config or self.config
        stages: dict[str, float] = {}
        fallback: list[str] = []
        t = time.perf_counter()
        text = normalize(query)
        corrected: dict[str, str] = {}
        if cfg.typo_tolerance and cfg.use_bm25:
            text, corrected = self.bundle.lexical.correct(text)
        stages["normalize"] = time.perf_counter() - t

        t = time.perf_counter()
        fused: dict[int, float] = {}
        n_lexical = n_dense = 0
        if cfg.use_bm25:
            top = self.bundle.lexical.top(text, cfg.candidates)
            n_lexical = len(top)
            _fuse(fused, top, cfg.rrf_k)
        stages["bm25"] = time.perf_counter() - t
        t = time.perf_counter()
        dense_ok = (
            cfg.use_dense and self.bundle.dense is not None and self.bundle.bi_encoder is not None
        )
        if cfg.use_dense and not dense_ok:
            fallback.append("dense_unavailable")
        if dense_ok:
            try:
                idx, sim = self._dense(text or normalize(query), cfg.candidates)
                # dense always finds neighbours: they count as matches when the nearest is
                # close enough, or when the lexical side matched too
                if fused or (len(sim) and sim[0] >= cfg.min_dense_score):
                    n_dense = len(idx)
                    _fuse(fused, idx, cfg.rrf_k)
            except Exception:
                log.exception("dense retrieval failed; answering from BM25")
                fallback.append("dense_unavailable")
        stages["dense"] = time.perf_counter() - t

        if not fused:  # zero results: relax, then popular in the inferred category
            relaxed = self._relaxed(text, cfg)
            if relaxed is not None:
                fallback.append("relaxed_query")
                text, fused = relaxed
            else:
                fallback.append("popular_in_category")
                fused = {int(i): 1.0 - r / 1e4 for r, i in enumerate(self._popular_for(text))}

        t = time.perf_counter()
        ids = np.fromiter(fused, dtype=np.int64, count=len(fused))
        score = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
        score = score / score.max() + cfg.pop_weight * self.prior[ids]
        if user_affinity:
            score = score + cfg.user_weight * self._affinity_of(ids, user_affinity)
        order = np.argsort(-score, kind="stable")
        ids, score = ids[order], score[order]
        facets = Counter(self.categories[ids[: cfg.facet_depth]].tolist())
        if category is not None:
            keep = self._category_keys[ids] == normalize(category)
            ids, score = ids[keep], score[keep]
        stages["fuse"] = time.perf_counter() - t

        t = time.perf_counter()
        depth = min(cfg.rerank_depth, len(ids))
        if depth and "popular_in_category" not in fallback:
            if self.bundle.cross_encoder is None:
                fallback.append("reranker_unavailable")
            else:
                try:
                    # the fused score (with its prior) plus the weighted cross-encoder logit:
                    # with a small weight the reranker only breaks near-ties of the retrievers
                    head = score[:depth] + cfg.rerank_weight * self._rerank(text, ids[:depth])
                    if user_affinity:
                        head = head + cfg.user_weight * self._affinity_of(
                            ids[:depth], user_affinity
                        )
                    order = np.argsort(-head, kind="stable")
                    # the reranked head stays above the tail it was chosen from
                    tail_top = score[depth] if depth < len(score) else 0.0
                    head_scores = head[order] - head.min() + tail_top + 1.0
                    ids = np.concatenate([ids[:depth][order], ids[depth:]])
                    score = np.concatenate([head_scores, score[depth:]])
                except Exception:
                    log.exception("reranking failed; answering with the fused order")
                    fallback.append("reranker_unavailable")
        stages["rerank"] = time.perf_counter() - t
        items = [(str(self.item_ids[i]), float(s)) for i, s in zip(ids[:k], score[:k], strict=True)]
        return SearchResult(
            query=text,
            items=items,
            facets=dict(facets.most_common()),
            fallback=",".join(dict.fromkeys(fallback)) or None,
            corrected=corrected,
            stages=stages,
            candidates={"bm25": n_lexical, "dense": n_dense, "fused": len(fused)},
        )

    def _relaxed(self, text: str, cfg: QueryConfig) -> tuple[str, dict[int, float]] | None:
        """A looser typo distance, then each word's catalog words sharing its first 4 letters."""
        lexical = self.bundle.lexical
        loose, _ = lexical.correct(text, loose=True)
        candidates = [loose]
        prefixes = [w[:4] for w in text.split() if len(w) >= 5]
        if prefixes:
            extra = [
                max((c for c in lexical.word_counts if c.startswith(p)),
                    key=lexical.word_counts.get, default=None)
                for p in prefixes
            ]  # fmt: skip
            candidates.append(" ".join(w for w in extra if w))
        for cand in candidates:
            if len(top := lexical.top(cand, cfg.candidates)):
                return cand, _fuse({}, top, cfg.rrf_k)
        return None

    def _popular_for(self, text: str) -> np.ndarray:
        """The popular products of the category the query names (a category word in it), else
        of its nearest category by the dense model, else of the whole catalog."""
        for name, members in self.by_category.items():
            if any(w in name.split() or name.startswith(w) for w in text.split() if len(w) >= 3):
                return members[:100]
        if self.bundle.dense is not None and self.bundle.bi_encoder is not None and text:
            try:
                idx, _ = self._dense(text, 5)
                if len(idx):
                    return self.by_category[self._category_keys[idx[0]]][:100]
            except Exception:
                log.exception("dense category inference failed")
        return np.argsort(-self.prior, kind="stable")[:100]


def _fuse(fused: dict[int, float], ranked: np.ndarray, rrf_k: int) -> dict[int, float]:
    """Add one ranked list to ``fused`` by reciprocal rank, ``1 / (rrf_k + rank)``."""
    for rank, i in enumerate(ranked, start=1):
        fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (rrf_k + rank)
    return fused

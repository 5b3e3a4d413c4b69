"""Which registry versions serve, the A/B split between them, and hot reload.

The registry's aliases decide: ``champion`` serves everyone, ``challenger`` (when it exists and
``serving.challenger_share`` > 0) serves that share of users, chosen by a stable hash of the
user id so a shopper always sees the same arm. A background thread checks the aliases every
``serving.reload_interval_s``; when one moved it loads the new version completely (download,
index, item features, a warm-up answer) and then swaps one reference. A request holds the arm
it started with, so requests in flight finish on the old version and none fails.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from served_model.engine import TwoStage
from served_model.explain import prepare as prepare_explanations
from served_model.features import FeaturesUnavailable, OnlineFeatures
from served_model.search import SearchBundle, SearchEngine
from serving.observability import Metrics
from shopml.config import Settings
from training import registry

log = logging.getLogger("serving.models")
ALIASES = (registry.CHAMPION, registry.CHALLENGER)
# A version that failed to load is tried again after this, doubling up to RETRY_MAX_S: a
# registry or artifact store that was briefly unreachable is retried soon after it is back; a
# broken version costs one load attempt every ten minutes at most.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 600.0
_now = time.monotonic  # the retry clock (tests move it)


@dataclass(frozen=True)
class Arm:
    alias: str
    version: str
    engine: TwoStage


def arm_of(user_id: str, challenger_share: float) -> str:
    """The alias that serves ``user_id``: a stable hash in [0, 1) against the share."""
    if challenger_share <= 0:
        return registry.CHAMPION
    digest = hashlib.sha256(user_id.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return registry.CHALLENGER if bucket < challenger_share else registry.CHAMPION


def load_arm(
    settings: Settings, alias: str, version: str, features: OnlineFeatures | None = None
) -> Arm:
    """Download ``version``, load the model and its serving artifacts, read item features.

    Feast unreachable at this moment does not refuse the version: it serves the popularity
    fallback (reason ``item_features_unavailable``) until a background refresh succeeds.
    """
    from served_model.bundle import TABLES_FILE, load_bundle, load_model_dir, ranker_file

    # Everything is read into memory, so the download lives only as long as the load.
    settings.paths.home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.paths.home, prefix=f"serving-v{version}-") as tmp:
        local = registry.download_version(settings, version, Path(tmp))
        files = local / "extra_files"
        missing = [p.name for p in (ranker_file(files), files / TABLES_FILE) if not p.exists()]
        if missing:
            raise RuntimeError(
                f"version {version} of '{settings.model_name}' lacks its serving artifacts "
                f"({', '.join(missing)}): it was registered before two-stage serving; rerun "
                "the nightly pipeline to register a servable version"
            )
        model = load_model_dir(local)
        bundle = load_bundle(version, model, files)
    engine = TwoStage(bundle, features or online_features(settings), settings.serving)
    try:
        engine.refresh_item_features()
    except FeaturesUnavailable:
        log.exception("item features unavailable while loading version %s", version)
    # warm-up, explained: the first request is not slow, nor the first ?explain=true (its
    # attribution library takes seconds to import, which would stall every request behind it)
    prepare_explanations()
    engine.recommend(next(iter(model.user_index), ""), 10, explain=True)
    return Arm(alias, version, engine)


@dataclass(frozen=True)
class SearchArm:
    """The ``shopml-search`` version ``/search`` answers with."""

    version: str
    engine: SearchEngine


def load_search(settings: Settings, version: str) -> SearchArm:
    """Download a ``shopml-search`` version and open its bundle (indexes and encoders in
    memory; a part that fails to load leaves the engine on BM25, see served_model.search)."""
    settings.paths.home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.paths.home, prefix=f"search-v{version}-") as tmp:
        local = registry.download_version(registry.search_settings(settings), version, Path(tmp))
        bundle = SearchBundle.load(
            local / "artifacts" / "bundle", rerank_threads=settings.search.rerank_threads
        )
    engine = SearchEngine(bundle)
    if not settings.search.serve_rerank:
        engine = engine.with_config(rerank_depth=0)
    engine.search("dress", k=10)  # warm-up: the first request is not slow
    return SearchArm(version, engine)


def online_features(settings: Settings) -> OnlineFeatures:
    """The service's Feast client: on Redis, one that fails fast (see
    ``shopml.feast_store.fail_fast``): a request waits ``serving.online_timeout_ms`` at most
    for its features, then gets the fallback."""
    from shopml.feast_store import fail_fast, open_store

    store = open_store(settings)
    fail_fast(store, settings, settings.serving.online_timeout_ms / 1000)
    return OnlineFeatures(store)


class ModelHolder:
    """The arms being served; replaced as a whole, never mutated in place."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._arms: dict[str, Arm] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        self._features: OnlineFeatures | None = None  # one Feast client for every arm
        # alias -> (version that failed to load, when to try it again, failures so far)
        self._failed: dict[str, tuple[str, float, int]] = {}
        self._search: SearchArm | None = None  # search's champion, when one is registered
        self._info_labels: set[tuple[str, str]] = set()  # shopml_model_info's label sets

    @property
    def arms(self) -> dict[str, Arm]:
        return self._arms

    @property
    def search(self) -> SearchArm | None:
        return self._search

    def for_user(self, user_id: str) -> Arm | None:
        """The arm that serves ``user_id`` (the champion when there is no challenger)."""
        arms = self._arms
        arm = arms.get(arm_of(user_id, self.settings.serving.challenger_share))
        return arm or arms.get(registry.CHAMPION)

    def sync(self) -> list[str]:
        """Load every alias whose version changed; returns what changed. Failures keep the
        version already served (and are logged and counted)."""
        changed = []
        with self._sync_lock:
            wanted = ALIASES if self.settings.serving.challenger_share > 0 else ALIASES[:1]
            arms = dict(self._arms)
            for alias in wanted:
                version = registry.alias_version(self.settings, alias)
                current = arms.get(alias)
                if version is None:
                    if alias != registry.CHAMPION and current is not None:
                        arms.pop(alias)  # challenger alias removed: its users go to champion
                        self.metrics.model_version.remove(alias)
                        changed.append(f"{alias}: removed")
                    continue
                if current is not None and current.version == version:
                    continue
                if self._waiting(alias, version):
                    continue  # tried and failed: wait for the retry (or the alias to move)
                started = time.perf_counter()
                try:
                    if self._features is None:
                        self._features = online_features(self.settings)
                    arms[alias] = load_arm(self.settings, alias, version, self._features)
                except Exception:
                    self._note_failure(alias, version)
                    self.metrics.reloads.labels(alias, "failed").inc()
                    log.exception("loading %s version %s failed", alias, version,
                                  extra={"alias": alias, "version": version})  # fmt: skip
                    continue
                self.metrics.reloads.labels(alias, "loaded").inc()
                self.metrics.model_version.labels(alias).set(float(version))
                log.info("serving %s version %s", alias, version, extra={
                    "alias": alias, "version": version,
                    "load_seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
                changed.append(f"{alias}: {current.version if current else None} -> {version}")
            self._arms = arms  # the atomic switch
            changed += self._sync_search()
            if changed:
                self._publish_model_info()
        return changed

    def _waiting(self, alias: str, version: str) -> bool:
        """``version`` of ``alias`` failed to load and its next try is not due yet."""
        failed = self._failed.get(alias)
        return failed is not None and failed[0] == version and _now() < failed[1]

    def _note_failure(self, alias: str, version: str) -> None:
        failed = self._failed.get(alias)
        n = failed[2] + 1 if failed is not None and failed[0] == version else 1
        wait = min(RETRY_FIRST_S * 2 ** (n - 1), RETRY_MAX_S)
        self._failed[alias] = (version, _now() + wait, n)

    def served_models(self) -> dict[str, dict[str, object]]:
        """Each served model part with its version, format, bytes and parameters (what
        ``/readyz`` shows and ``shopml_model_info`` carries): every arm's ranker and, when
        search serves and its manifest says, its reranker."""
        out: dict[str, dict[str, object]] = {}
        for alias, arm in self._arms.items():
            info = arm.engine.bundle.ranker_info or {}
            out[f"{alias}.ranker"] = {"version": arm.version, **info}
        search = self._search
        if search is not None:
            reranker = getattr(search.engine.bundle, "manifest", {}).get("reranker")
            if reranker:
                out["search.reranker"] = {"version": search.version, **reranker}
        return out

    def _publish_model_info(self) -> None:
        gauge = self.metrics.model_info
        now = {
            (model, str(info["format"])): float(info.get("bytes", 0))
            for model, info in self.served_models().items()
            if "format" in info
        }
        for stale in self._info_labels - set(now):  # a part that changed format or left
            gauge.remove(*stale)
        for labels, size in now.items():
            gauge.labels(*labels).set(size)
        self._info_labels = set(now)

    def _sync_search(self) -> list[str]:
        """Load search's champion when it moved (same rules: a failure keeps the old one)."""
        ss = registry.search_settings(self.settings)
        version = registry.alias_version(ss, registry.CHAMPION)
        current = self._search
        if version is None or (current is not None and current.version == version):
            return []
        if self._waiting("search", version):
            return []
        try:
            arm = load_search(self.settings, version)
        except Exception:
            self._note_failure("search", version)
            self.metrics.reloads.labels("search", "failed").inc()
            log.exception("loading search version %s failed", version)
            return []
        self._search = arm  # the atomic switch
        self.metrics.reloads.labels("search", "loaded").inc()
        self.metrics.model_version.labels("search").set(float(version))
        log.info("serving search version %s", version, extra={"version": version})
        return [f"search: {current.version if current else None} -> {version}"]

    def refresh_item_features(self) -> None:
        for arm in self._arms.values():
            try:
                arm.engine.refresh_item_features()
                self.metrics.feature_refreshes.labels("ok").inc()
            except Exception:
                self.metrics.feature_refreshes.labels("failed").inc()
                log.exception("item feature refresh failed; keeping the previous values")

    # --- background -----------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.settings.serving
        if not (cfg.reload_interval_s or cfg.item_feature_refresh_s):
            return
        self._thread = threading.Thread(target=self._loop, name="model-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        cfg = self.settings.serving
        next_reload = next_refresh = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if cfg.reload_interval_s and now >= next_reload + cfg.reload_interval_s:
                next_reload = now
                try:
                    self.sync()
                except Exception:  # the registry itself unreachable: keep serving, try again
                    self.metrics.reloads.labels("any", "registry_unreachable").inc()
                    log.exception("alias check failed")
            if cfg.item_feature_refresh_s and now >= next_refresh + cfg.item_feature_refresh_s:
                next_refresh = now
                self.refresh_item_features()
            self._stop.wait(min(x for x in (cfg.reload_interval_s, cfg.item_feature_refresh_s,
                                             1.0) if x))  # fmt: skip

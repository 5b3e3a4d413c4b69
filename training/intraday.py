"""Intraday updates: the champion's two-tower warm-started on the purchases streamed since its
data ended, judged on the most recent hours, registered as the ``challenger``.

The hourly ``intraday_update`` DAG runs the three steps below; ``shopml intraday`` runs them
in one process. Every step reads and writes ``runs/intraday/until=<end>/``, so a rerun of an
hour recomputes it from the same archived events.

1. :func:`stream_window`: drain the event stream into the lake (the archive ``land`` reads,
   exactly once) and cut the events stamped from the end of the champion's nightly date to
   ``until``. Three windows follow (``window.json``), each a pure function of the champion
   and ``until``:

   * *known*: ``[end of the champion's ds, split)``: with the champion's clean events, what
     the update's tables (history, item-kNN, zoo scorers) know;
   * *train*: ``[the champion's data end, split)``: the purchases the update learns from (a
     nightly champion's data ends with its ds; an intraday one's where it stopped learning);
   * *judge*: ``[split, until)``, ``split = until - intraday.eval_hours``: held out.

2. :func:`warm_start`: the champion's two-tower, loaded as it serves, trained a few epochs
   (``intraday.epochs`` at ``intraday.lr_scale`` x ``train.lr``) by the one Horovod loop on the
   training window's purchases with point-in-time Feast features, as the nightly trains.
   Purchases by users or of items the champion does not know are not learnt from (their ids
   have no embedding to move; the nightly run adds them) and are counted.

3. :func:`register_challenger`: the served path (``training.pipeline.served_path``: retrieval,
   the champion's ranker and quotas, point-in-time features) with the champion's two-tower
   and with the update, on the judged hours' purchases of known users; the promotion gate
   (``training.gate.decide``) compares them. The update is registered as a version (tags
   ``intraday_until``, ``warm_start_of``, ``data_end``, ``intraday_gate``) with a serving
   bundle whose tables know the known window; the ``challenger`` alias moves to it unless
   the judged hours say it is worse than the champion (the CI of the difference below 0)
   or nothing could be judged. Serving then sends ``serving.challenger_share`` of users to
   it (``serving.models``).

The nightly ``promote`` settles the challenger (:func:`settle_challenger`): when the nightly
model is promoted the challenger is retired (it was warm-started from the champion it
replaced); otherwise a challenger of the current champion whose intraday gate said
``promote`` becomes the champion, and any other is retired. Every move is in the ledger.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mlkit.loop import Curve
from shopml import schema as S
from shopml.config import Settings, service_environment
from shopml.paths import end_of_day
from training import ledger, registry
from training.train import TwoTowerTask, data_version

WINDOW = "window.json"
EVENTS = "events"  # the Parquet directory of the window's archived events
CHAMPION_MODEL = "champion.pt"
UPDATE_MODEL = "model.pt"
JUDGED = "judged.json"


class NoChampion(RuntimeError):
    """There is no champion to update: the nightly run makes the first one."""


class NothingToLearn(RuntimeError):
    """Too few new purchases to update from (``intraday.min_examples``)."""


@dataclass(frozen=True)
class Window:
    """The windows of one update (module doc), ISO-8601 UTC strings for ``window.json``."""

    champion: str
    champion_ds: str
    known_start: str
    train_start: str
    split: str
    until: str

    def t(self, name: str) -> datetime:
        return datetime.fromisoformat(getattr(self, name))


def utc(value: datetime | str) -> datetime:
    """``value`` as a plain, aware UTC datetime (naive ones are taken as UTC)."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t
    # a plain datetime: Airflow's logical date is pendulum's, whose arithmetic drops the zone
    return datetime.fromtimestamp(t.timestamp(), tz=UTC)


def data_end(tags: dict[str, str]) -> datetime:
    """Where a version's training data ends: an intraday update's ``data_end``, else the
    end of its nightly ``ds``."""
    if tags.get("data_end"):
        return utc(tags["data_end"])
    return end_of_day(date.fromisoformat(tags["ds"]))


def plan(settings: Settings, until: datetime) -> Window:
    """The windows of the update ending at ``until``, from the current champion."""
    champion = registry.champion_version(settings)
    if champion is None:
        raise NoChampion("no champion to update yet: run nightly_retrain first")
    tags = registry.version_tags(settings, champion)
    if "ds" not in tags:
        raise NoChampion(f"champion v{champion} has no 'ds' tag: it was not made by a nightly run")
    until = utc(until)
    known_start = end_of_day(date.fromisoformat(tags["ds"]))
    train_start = data_end(tags)
    split = until - timedelta(hours=settings.intraday.eval_hours)
    if split <= train_start:
        raise NothingToLearn(
            f"the window ends at {until:%Y-%m-%dT%H:%M}Z and its last "
            f"{settings.intraday.eval_hours:g} hours are held out: nothing is left after "
            f"champion v{champion}'s data end ({train_start:%Y-%m-%dT%H:%M}Z)"
        )
    iso = {n: t.isoformat() for n, t in
           (("known_start", known_start), ("train_start", train_start), ("split", split),
            ("until", until))}  # fmt: skip
    return Window(champion=champion, champion_ds=tags["ds"], **iso)


def _run_dir(settings: Settings, until: datetime) -> Path:
    return settings.paths.intraday_run(utc(until))


def read_window(settings: Settings, until: datetime) -> tuple[Window, pd.DataFrame]:
    """The window and its archived events (timestamps UTC), as :func:`stream_window` left them."""
    run_dir = _run_dir(settings, until)
    window = Window(**json.loads((run_dir / WINDOW).read_text())["window"])
    path = run_dir / EVENTS
    events = (
        pd.read_parquet(path)
        if path.exists()
        else pd.DataFrame({c: pd.Series(dtype=object) for c in S.EVENT_COLUMNS})
    )
    events[S.TIMESTAMP] = pd.to_datetime(events[S.TIMESTAMP], utc=True)
    return window, events


def stream_window(settings: Settings, until: datetime) -> dict[str, Any]:
    """Step 1 (module doc): the windows and the events stamped in them."""
    from spark_jobs.streaming import streamed_between

    window = plan(settings, until)
    run_dir = _run_dir(settings, until)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = streamed_between(settings, window.t("known_start"), window.t("until"),
                              run_dir / EVENTS)  # fmt: skip
    record = {"window": asdict(window), "events": events}
    (run_dir / WINDOW).write_text(json.dumps(record, indent=2))
    return record


@dataclass(frozen=True)
class WarmStartTask(TwoTowerTask):
    """The nightly two-tower task, starting from the champion's weights (``init``)."""

    init: str = ""

    def build(self):
        return torch.load(self.init, weights_only=False)


def _purchases(events: pd.DataFrame, start: datetime, end: datetime) -> pd.DataFrame:
    t = events[S.TIMESTAMP]
    return events[(events[S.EVENT_TYPE] == S.PURCHASE) & (t >= start) & (t < end)]


def warm_start(settings: Settings, until: datetime) -> dict[str, Any]:
    """Step 2 (module doc): the update's two-tower and its loss curve."""
    window, events = read_window(settings, until)
    run_dir = _run_dir(settings, until)
    champion, _, _ = registry.load_servable(settings, window.champion, run_dir / "champion")
    new = _purchases(events, window.t("train_start"), window.t("split"))
    model, curve, counts = warm_started(
        settings, run_dir, champion, new, f"since {window.train_start}"
    )
    torch.save(model, run_dir / UPDATE_MODEL)
    (run_dir / "loss_curve.json").write_text(json.dumps(curve))
    out = {**counts, "epochs": len(curve), "final_loss": curve[-1]["loss"]}
    (run_dir / "warm_start.json").write_text(json.dumps(out, indent=2))
    return out


def warm_started(
    settings: Settings,
    run_dir: Path,
    champion: torch.nn.Module,
    purchases: pd.DataFrame,
    since: str = "",
) -> tuple[torch.nn.Module, Curve, dict[str, int]]:
    """The two-tower ``champion`` (saved as ``run_dir/champion.pt``, where the training
    workers start from) trained on ``purchases`` (events with user, item and time) by the one
    Horovod loop, with point-in-time Feast features at each purchase: (model, loss curve,
    counts). Purchases by users or of items it does not know are counted and not learnt
    from. ``benchmarks.session_replay`` warm-starts through here too, so its intraday row is
    this update. Raises :class:`NothingToLearn` below ``intraday.min_examples`` known
    purchases (``since``: for the message)."""
    from mlkit.launch import train as launch
    from mlkit.loop import LoopConfig
    from shopml.feast_store import point_in_time_features

    torch.save(champion, run_dir / CHAMPION_MODEL)
    known = purchases[purchases[S.USER_ID].astype(str).isin(champion.user_index)
                      & purchases[S.ITEM_ID].astype(str).isin(set(champion.item_ids))]  # fmt: skip
    counts = {"purchases": len(purchases), "examples": len(known),
              "unknown_user_or_item": len(purchases) - len(known)}  # fmt: skip
    if len(known) < settings.intraday.min_examples:
        raise NothingToLearn(
            f"{len(known)} purchases by known users of known items {since} (fewer than "
            f"intraday.min_examples={settings.intraday.min_examples}): the champion stays as "
            f"it is; {counts}"
        )
    entity = (
        known[[S.USER_ID, S.ITEM_ID]]
        .astype(str)
        .assign(**{S.ENTITY_TIMESTAMP: known[S.TIMESTAMP].to_numpy()})
    )
    point_in_time_features(settings, entity).to_parquet(run_dir / "train.parquet", index=False)
    cfg, day = settings.train, settings.intraday
    loop = LoopConfig(
        epochs=day.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr * day.lr_scale,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        name="intraday",
        checkpoint=str(run_dir / "checkpoints" / "intraday.pt"),
        data_version=data_version(run_dir / "train.parquet", run_dir / CHAMPION_MODEL),
    )
    task = WarmStartTask(run_dir, cfg.dim, cfg.negatives, init=str(run_dir / CHAMPION_MODEL))
    model, curve = launch(task, loop, cfg.workers, env=service_environment(settings))
    # the checkpoint served a retry of this task; a later rerun of the hour trains afresh
    Path(loop.checkpoint).unlink(missing_ok=True)
    return model, curve, counts


def known_events(settings: Settings, window: Window, events: pd.DataFrame):
    """(events, catalog) the update's tables know: the champion's clean events and catalog,
    and the archived events of the known window."""
    from training.data import load_clean

    clean, items = load_clean(settings, date.fromisoformat(window.champion_ds))
    t = events[S.TIMESTAMP]
    streamed = events[(t >= window.t("known_start")) & (t < window.t("split"))]
    merged = pd.concat([clean[list(S.EVENT_COLUMNS)], streamed[list(S.EVENT_COLUMNS)]],
                       ignore_index=True)  # fmt: skip
    return merged, items


def zoo_scores(settings: Settings, model, ranker, purchases: pd.DataFrame):
    """The zoo scorers' tables fitted once on ``purchases`` (both models of a judgement share
    the vocabularies, and the bundle the same tables), or None when the ranker reads none
    (``training.ranking.served_zoo_sources``)."""
    from training.ranking import served_zoo_sources

    fit = served_zoo_sources(settings, model, ranker)
    return fit(purchases) if fit is not None else None


def judge(
    settings: Settings,
    purchases: pd.DataFrame,
    items: pd.DataFrame,
    judged: pd.DataFrame,
    at: datetime,
    models: dict[str, torch.nn.Module],
    ranker: torch.nn.Module,
    retrieval: dict[str, int],
    scores,
):
    """Each model's served path (retrieval with the version's quotas, the ranker, Feast's
    features at ``at``, point in time; tables and ``scores`` knowing ``purchases``) on the
    ``judged`` purchases of users ``purchases`` has: one ``EvaluationResult`` per model, the
    same users; None when there are none."""
    from functools import partial

    from mlkit.interactions import from_events, index_like
    from mlkit.metrics import evaluate
    from mlkit.two_stage import offline_engine, scorer
    from served_model.engine import version_config
    from shopml.feast_store import point_in_time_features
    from training.data import PROTOCOL

    train = from_events(purchases, pd.DataFrame({S.ITEM_ID: items[S.ITEM_ID].astype(str)}))
    test = index_like(train, judged)
    if test.matrix.nnz == 0:
        return None
    users = [str(u) for u in test.user_ids[test.matrix.getnnz(axis=1) > 0]]
    moments = pd.DataFrame({S.USER_ID: users, S.ITEM_ID: "", S.ENTITY_TIMESTAMP: at})
    features = point_in_time_features(settings, moments).set_index(S.USER_ID)
    cfg, k = version_config(settings.serving, retrieval), settings.eval.k
    results = {}
    for name, model in models.items():
        fixed = None if scores is None else (lambda _, users=None: scores)  # the night's tables
        engine = offline_engine(purchases, model, ranker.eval(), cfg, fixed)
        score = scorer(engine, train, features, partial(point_in_time_features, settings))
        results[name] = evaluate(score, train, test, k, exclude_seen=False, split=PROTOCOL)
    return results


def register_challenger(settings: Settings, until: datetime) -> dict[str, Any]:
    """Step 3 (module doc): judge, register, and move the ``challenger`` alias or say why not."""
    import mlflow

    from served_model.bundle import write_artifacts
    from training import gate

    window, events = read_window(settings, until)
    run_dir = _run_dir(settings, until)
    update = torch.load(run_dir / UPDATE_MODEL, weights_only=False)
    champion, ranker, retrieval = registry.load_servable(settings, window.champion,
                                                         run_dir / "champion")  # fmt: skip
    if ranker is None:
        raise NoChampion(f"champion v{window.champion} has no ranker: it cannot be served here")
    known, items = known_events(settings, window, events)
    purchases = known[known[S.EVENT_TYPE] == S.PURCHASE]
    scores = zoo_scores(settings, update, ranker, purchases)
    judged = _purchases(events, window.t("split"), window.t("until"))
    models = {"champion": champion, "update": update}
    results = judge(settings, purchases, items, judged, window.t("split"), models, ranker,
                    retrieval, scores)  # fmt: skip
    k = settings.eval.k
    if results is None:
        verdict, numbers = None, {}
        why = f"not judged: no purchase by a known user in [{window.split}, {window.until})"
    else:
        verdict = gate.decide(
            results["update"], champion=results["champion"], metric="ndcg",
            margin=settings.eval.promotion_margin, tolerance=settings.eval.segment_tolerance,
            seed=settings.train.seed,
        )  # fmt: skip
        numbers = verdict.numbers
        why = "; ".join(verdict.reasons)
    worse = results is not None and numbers["diff_vs_champion_ci_high"] < 0
    gate_says = "promote" if verdict is not None and verdict.promote else "reject"

    artifacts = write_artifacts(run_dir / "serving", update, ranker.eval(), purchases, items,
                                scores, retrieval)  # fmt: skip
    registry.use_tracking(settings)
    stamp = utc(until).strftime("%Y-%m-%dT%H:%MZ")
    curve = json.loads((run_dir / "loss_curve.json").read_text())
    with mlflow.start_run(run_name=f"intraday-{stamp}", tags={"ds": window.champion_ds,
                          "intraday_until": window.until}) as run:  # fmt: skip
        mlflow.log_params({"intraday.epochs": settings.intraday.epochs,
                           "intraday.lr_scale": settings.intraday.lr_scale,
                           "intraday.eval_hours": settings.intraday.eval_hours,
                           "warm_start_of": window.champion})  # fmt: skip
        for point in curve:
            mlflow.log_metric("train_loss", point["loss"], step=int(point["epoch"]))
        if results is not None:
            for name, result in results.items():
                mlflow.log_metric(f"{name}.ndcg_at_{k}", result.means()[f"ndcg_at_{k}"])
            mlflow.log_metrics(ledger.metrics_of(numbers))
        mlflow.log_dict({"window": asdict(window), "gate": verdict.to_dict() if verdict else None,
                         "reason": why}, JUDGED)  # fmt: skip
        mlflow.set_tag("mlflow.note.content", why)
    example = pd.DataFrame({S.USER_ID: list(update.user_index)[:2]})
    for f in update.feature_names:
        example[f] = 0.0
    uri = registry.log_model(settings, run.info.run_id, update, "model", artifacts, example)
    tags = {"ds": window.champion_ds, "intraday_until": window.until, "data_end": window.split,
            "warm_start_of": window.champion, "intraday_gate": gate_says}  # fmt: skip
    version = registry.register(settings, uri, run.info.run_id, tags)
    moved = results is not None and not worse
    reason = (
        f"intraday update v{version} of champion v{window.champion}, trained on "
        f"[{window.train_start}, {window.split}): "
        + ("challenger" if moved else "NOT challenger (" + ("worse than the champion on the "
           "judged hours" if worse else "nothing to judge it on") + ")")
        + f"; gate on the judged hours: {gate_says}; {why}"
    )  # fmt: skip
    with ledger.alias_lock(settings):
        current = registry.champion_version(settings)
        if moved and current != window.champion:
            moved = False
            reason += f"; the champion moved to v{current} meanwhile: not challenger"
        if moved:
            registry.set_alias(settings, registry.CHALLENGER, version)
        ledger.record(settings, ledger.Entry(
            action="challenger", model=settings.model_name, champion_before=current,
            champion_after=current, reason=reason, ds=window.champion_ds, challenger=version,
            promoted=False, metrics=ledger.metrics_of(numbers)))  # fmt: skip
    registry.describe_version(settings, version, reason)
    out = {"version": version, "challenger": moved, "intraday_gate": gate_says,
           "judged_users": int(numbers.get("users", 0)), "reason": reason}  # fmt: skip
    (run_dir / "challenger.json").write_text(json.dumps(out, indent=2))
    return out


def settle_challenger(settings: Settings, ds: date, promoted: str | None) -> str | None:
    """The nightly gate's word on the intraday challenger (module doc); returns the ledger's
    reason, or None when there was no challenger. Call under ``ledger.alias_lock``."""
    challenger = registry.alias_version(settings, registry.CHALLENGER)
    if challenger is None:
        return None
    tags = registry.version_tags(settings, challenger)
    if "warm_start_of" not in tags:
        return None  # a challenger set by hand, not an intraday update: not ours to settle
    current = registry.champion_version(settings)
    if promoted is not None:
        action, after = "retire", current
        reason = (f"challenger v{challenger} retired: the nightly run of {ds} promoted "
                  f"v{promoted}, and v{challenger} was warm-started from "
                  f"v{tags['warm_start_of']}")  # fmt: skip
    elif tags["warm_start_of"] != current:
        action, after = "retire", current
        reason = (f"challenger v{challenger} retired: warm-started from v{tags['warm_start_of']}, "
                  f"not from the champion v{current}")  # fmt: skip
    elif tags.get("intraday_gate") == "promote":
        action, after = "gate", challenger
        reason = (f"challenger v{challenger} promoted by the nightly run of {ds}: the gate on its "
                  f"judged hours (to {tags.get('intraday_until')}) said promote, and the nightly "
                  "model was not promoted")  # fmt: skip
    else:
        action, after = "retire", current
        reason = (f"challenger v{challenger} retired: the gate on its judged hours said "
                  f"{tags.get('intraday_gate', 'nothing')}")  # fmt: skip
    if after != current:
        registry.set_champion(settings, challenger)
    registry.delete_alias(settings, registry.CHALLENGER)
    ledger.record(settings, ledger.Entry(
        action=action, model=settings.model_name, champion_before=current, champion_after=after,
        reason=reason, ds=ds.isoformat(), challenger=challenger,
        promoted=after != current))  # fmt: skip
    return reason


def run(settings: Settings, until: datetime) -> dict[str, Any]:
    """The three steps in one process (``shopml intraday``)."""
    return {"window": stream_window(settings, until),
            "warm_start": warm_start(settings, until),
            "challenger": register_challenger(settings, until)}  # fmt: skip

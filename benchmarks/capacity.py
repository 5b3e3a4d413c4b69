"""A capacity model of the nightly pipeline, generated from measured per-event costs.

Inputs, each measured, never typed in:

* **Per-event cost of every stage**, from ``python -m benchmarks.scale --json FILE``: a
  straight line ``seconds = fixed + cost x events`` through the two largest sizes that ran
  (the fixed part is process start-up, Spark's JVM, imports), so the per-event cost excludes
  start-up. A stage that ran at one size only gets ``seconds / events`` (an upper bound).
* **Redis bytes per entity**, measured here: Feast's own Redis online store
  (``RedisOnlineStore.online_write_batch``) writes ``--redis-sample`` users with their
  features, top-k and session, and items with theirs, into a database of the local Redis;
  ``MEMORY USAGE`` of each key is summed and the keys are deleted.

Assumptions, each a flag printed beside the result: how many days of history the nightly
reads (its features are cumulative over all history, so a night reads the whole retained
lake), the nightly window and each stage group's share of it, the node size, Spark's
efficiency per added core, users and items per event (the synthetic retailer's ratios), and
the GPU's speed-up over this machine's 2 CPU cores for the two-tower (no GPU was lent, so
that one is not measured: say so beside any GPU count).

``python -m benchmarks.capacity --scale var/scale.json --out docs/capacity.md``
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Where each nightly stage runs in production: on Spark's executors, on the GPU training Job,
# or in one Airflow task process (whose node must hold it).
SPARK = ("land", "validate-raw", "clean", "features", "validate-features", "training-set")
TRAIN = ("train",)
SINGLE = ("feast-sync", "train-ranker", "compress", "evaluate", "promote")


@dataclass(frozen=True)
class StageCost:
    """One stage's fitted cost: fixed seconds, seconds per event (on ``cores`` cores) and
    peak memory per event, from the sizes it ran at."""

    stage: str
    fixed_s: float
    per_event_s: float
    peak_gib: float
    largest: int
    sizes: tuple[int, ...]

    def seconds(self, events: float) -> float:
        return self.fixed_s + self.per_event_s * events


def fit(records: list[dict], stage: str) -> StageCost | None:
    """The stage's line through its two largest successful sizes (see the module doc)."""
    ok = sorted(
        (r["events"], r["seconds"], r["peak_gib"])
        for r in records
        if r["stage"] == stage and r["exit"] == 0
    )
    if not ok:
        return None
    sizes = tuple(n for n, _, _ in ok)
    (n2, t2, g2) = ok[-1]
    if len(ok) == 1:
        return StageCost(stage, 0.0, t2 / n2, g2, n2, sizes)
    n1, t1, _ = ok[-2]
    per_event = max((t2 - t1) / (n2 - n1), 0.0)
    fixed = max(t2 - per_event * n2, 0.0)
    return StageCost(stage, fixed, per_event, g2, n2, sizes)


def redis_bytes_per_entity(sample: int, connection: str) -> dict[str, float]:
    """Bytes of Redis memory per user and per item, as Feast's Redis store writes them."""
    import random
    import runpy
    from datetime import timedelta

    from feast import RepoConfig
    from feast.infra.online_stores.helpers import _redis_key
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import (
        FloatList,
        StringList,
        Value,
    )

    from shopml.feast_store import FEATURE_REPO

    defs = runpy.run_path(str(FEATURE_REPO / "definitions.py"))
    project = f"capacity{random.randrange(10**6)}"
    config = RepoConfig(  # the online store alone is used: the registry is never opened
        project=project,
        provider="local",
        registry="unused-registry.db",
        online_store={"type": "redis", "connection_string": connection},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    store = RedisOnlineStore()
    client = store._get_client(config.online_store)  # Feast's parsing of the connection
    rng = random.Random(0)
    now = datetime.now(UTC)
    top_k = 20

    def value(field) -> Value:
        kind = str(field.dtype)
        if "Array(String)" in kind:
            return Value(string_list_val=StringList(val=[f"item{rng.randrange(10**6)}"
                                                         for _ in range(top_k)]))  # fmt: skip
        if "Array(Float32)" in kind:
            return Value(float_list_val=FloatList(val=[rng.random() for _ in range(top_k)]))
        if "String" in kind:
            return Value(string_val=f"v{rng.randrange(10**9)}")
        if "Float" in kind:
            return Value(float_val=rng.random())
        return Value(int64_val=rng.randrange(10**4))

    def write(join_key: str, views: list, ids: list[str]) -> float:
        keys = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=i)]) for i in ids]
        for view in views:
            rows = [(k, {f.name: value(f) for f in view.schema}, now - timedelta(hours=1), None)
                    for k in keys]  # fmt: skip
            store.online_write_batch(config, view, rows, None)
        names = [_redis_key(project, k, entity_key_serialization_version=3) for k in keys]
        used = sum(client.memory_usage(n, samples=0) or 0 for n in names)
        client.delete(*names)
        return used / len(ids)

    users = [f"user{10**9 + i}" for i in range(sample)]
    items = [f"item{10**9 + i}" for i in range(sample)]
    user_views = [defs["user_features"], defs["user_recommendations"], defs["session_features"]]
    return {
        "user": write("user_id", user_views, users),
        "item": write("item_id", [defs["item_features"]], items),
        "top_k": top_k,
    }


def plan(costs: dict[str, StageCost], redis: dict[str, float], args) -> list[dict[str, object]]:
    """Nodes, GPUs, Redis and PostgreSQL for each events/day."""
    window = args.window_hours * 3600
    rows = []
    for per_day in args.events_per_day:
        events = per_day * args.history_days
        spark_core_s = sum(
            costs[s].per_event_s * args.measured_cores * events for s in SPARK if s in costs
        )
        spark_cores = spark_core_s / (args.spark_share * window * args.spark_efficiency)
        spark_nodes = max(1, math.ceil(spark_cores / args.node_cores))
        train = costs.get("train")
        train_cpu_s = train.per_event_s * events if train else math.nan
        gpus = max(1, math.ceil(train_cpu_s / args.gpu_speedup / (args.train_share * window)))
        single_s = sum(costs[s].seconds(events) for s in SINGLE if s in costs)
        users = events * args.users_per_event
        items = min(events * args.items_per_event, args.max_items)
        redis_gib = (users * redis["user"] + items * redis["item"]) * args.redis_headroom / 2**30
        rows.append({
            "events_per_day": per_day, "events_per_night": events,
            "spark_cores": spark_cores, "spark_nodes": spark_nodes, "gpus": gpus,
            "train_cpu_hours": train_cpu_s / 3600, "single_task_hours": single_s / 3600,
            "users": users, "items": items,
            "redis_gib": redis_gib,
        })  # fmt: skip
    return rows


def render(costs: dict[str, StageCost], redis: dict[str, float], rows: list[dict], args,
           settings: dict[str, dict]) -> str:  # fmt: skip
    """docs/capacity.md; ``settings``: each ``--scale`` file's lowered settings, by name (the
    merged records come from several runs)."""
    cores = args.measured_cores
    lowered = "; ".join(f"{name}: `{json.dumps(s)}`" for name, s in settings.items())
    lines = [
        "# Capacity model",
        "",
        f"Generated by `python -m benchmarks.capacity --scale "
        f"{' '.join(str(f) for f in args.scale)}` on "
        f"{datetime.now(UTC):%Y-%m-%d} from the per-event costs that `python -m "
        f"benchmarks.scale` measured on this {cores}-core machine (a later file's stage and "
        f"size replace an earlier one's; the settings each run lowered: {lowered}) and Redis "
        "bytes measured through "
        "Feast's Redis online store. Do not edit by hand: rerun both commands.",
        "",
        "## Headline",
        "",
        f"A nightly window of {args.window_hours:g} h, reading {args.history_days} days of "
        f"history (features are cumulative over the retained lake), nodes of "
        f"{args.node_cores} cores:",
        "",
        "| events/day | events/night | Spark cores (nodes) | GPUs (ASSUMED speed-up) | "
        "one-process stages (linear) | Redis | users / items |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['events_per_day']:.0e} | {r['events_per_night']:.1e} | "
            f"{r['spark_cores']:,.0f} ({r['spark_nodes']}) | {r['gpus']} | "
            f"{r['single_task_hours']:,.0f} h on one node | "
            f"{r['redis_gib']:,.1f} GiB | {r['users']:.1e} / {r['items']:.1e} |"
        )
    lines += [
        "",
        "**Read the one-process column as what does not scale out today**: feast-sync, the "
        "ranker, compression, evaluation and promotion each run in one Airflow task process, "
        "so their time is extrapolated linearly from the largest size they ran "
        "at, on one node. Where that exceeds the window or a node, the stage needs what the "
        "Spark stages have (work split over executors) or a stated sample (evaluated users, "
        "the ranker's replayed users); the Spark and GPU columns assume those stages were "
        "fixed. The training set's split (`mlkit.splits`) also runs in one process before "
        "its Spark join.",
        "",
        "## Measured per-event costs",
        "",
        f"`seconds = fixed + cost x events`, through the two largest sizes each stage ran at "
        f"({cores} cores).",
        "",
        "| stage | where | sizes | fixed s | µs per event | peak GiB at largest |",
        "|---|---|---|---|---|---|",
    ]
    largest = max(c.largest for c in costs.values())
    short = []
    for name, c in costs.items():
        where = "Spark" if name in SPARK else "GPU Job" if name in TRAIN else "one process"
        sizes = ", ".join(f"{n:.0e}" for n in c.sizes)
        lines.append(f"| {name} | {where} | {sizes} | {c.fixed_s:.1f} | "
                     f"{c.per_event_s * 1e6:.2f} | {c.peak_gib:.2f} |")  # fmt: skip
        if c.largest < largest:
            short.append(name)
    if short:
        lines += [
            "",
            f"**Fitted below {largest:.0e} events** (did not finish or did not run there): "
            f"{', '.join(short)}. Their costs are only as good as the smaller sizes; a stage "
            "that grows faster than linearly is under-counted (see the README's Scale "
            "section for what is known of each).",
        ]
    lines += [
        "",
        "## Redis (measured)",
        "",
        f"Feast's Redis store keeps one hash per entity. Per user (features, top-{redis['top_k']}"
        f" recommendations, current session): **{redis['user']:.0f} bytes**; per item: "
        f"**{redis['item']:.0f} bytes** (`MEMORY USAGE`, mean of {args.redis_sample} each). "
        f"Sized with {args.redis_headroom:g}x headroom for fragmentation and replication "
        "buffers.",
        "",
        "## PostgreSQL",
        "",
        "It holds metadata only: the MLflow tracking and registry store, Feast's SQL "
        "registry and Airflow's database. Their rows grow with runs, tasks and registered "
        "versions, not with events, so 10^8 and 10^9 events/day need the same database; "
        "size it by retention of runs (the Airflow chart's cleanup and MLflow's `gc`).",
        "",
        "## Assumptions (flags of the command)",
        "",
        f"- history read each night: {args.history_days} days; window {args.window_hours:g} h; "
        f"shares: Spark {args.spark_share:g}, training {args.train_share:g}",
        f"- Spark's efficiency on a cluster: {args.spark_efficiency:g} of its local-mode "
        "speed per core (the standalone cluster of 2 workers x 1 core ran the feature job in "
        "30.3 s against 28.9 s on local[2], 0.95x, on the same cores: `python -m "
        "benchmarks.spark_features --master spark://127.0.0.1:7077`, 2026-12-05)",
        f"- users per event {args.users_per_event:g}, items per event "
        f"{args.items_per_event:g} up to {args.max_items:.0e} (the synthetic retailer)",
        f"- **GPU speed-up over {cores} CPU cores: {args.gpu_speedup:g}x, assumed, not "
        "measured** (no GPU was lent); the GPU column scales inversely with it",
        "",
        "## Helm values",
        "",
        "What the 10^9 row asks of `helm/shopml/values.yaml` (merge into your values file):",
        "",
        "```yaml",
    ]
    big = rows[-1]
    executors = max(2, math.ceil(big["spark_cores"] / args.executor_cores))
    lines += [
        "shopml:",
        "  feastOfflineStore: spark",
        "spark:",
        f"  shufflePartitions: {max(64, 3 * executors * args.executor_cores)}",
        "  executor:",
        f"    instances: {executors}",
        f"    cores: {args.executor_cores}",
        f"    memory: {args.executor_memory_gib_per_core * args.executor_cores}g",
        "training:",
        f"  gpus: {min(big['gpus'], 8)}",
        f"  workers: {min(big['gpus'], 8)}",
        "```",
        "",
        f"Redis: {math.ceil(big['redis_gib'])} GiB of `maxmemory` in all: a Redis Cluster "
        f"of {math.ceil(big['redis_gib'] / args.redis_shard_gib)} primaries of "
        f"{args.redis_shard_gib} GiB (Feast's Redis store: `redis_type: redis_cluster`), "
        "each with a replica.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=Path, nargs="+", required=True,
                   help="JSON of benchmarks.scale --json (a later file's stage and size "
                   "replace an earlier's)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the Markdown here (docs/capacity.md)")
    p.add_argument("--events-per-day", type=float, nargs="+", default=[1e8, 1e9])
    p.add_argument("--history-days", type=int, default=30)
    p.add_argument("--window-hours", type=float, default=6.0)
    p.add_argument("--spark-share", type=float, default=0.5)
    p.add_argument("--train-share", type=float, default=0.4)
    p.add_argument("--spark-efficiency", type=float, default=0.9)
    p.add_argument("--node-cores", type=int, default=16)
    p.add_argument("--executor-cores", type=int, default=4)
    p.add_argument("--executor-memory-gib-per-core", type=int, default=4)
    p.add_argument("--gpu-speedup", type=float, default=25.0)
    p.add_argument("--users-per-event", type=float, default=0.01)
    p.add_argument("--items-per-event", type=float, default=0.005)
    p.add_argument("--max-items", type=float, default=5e6)
    p.add_argument("--redis-headroom", type=float, default=1.5)
    p.add_argument("--redis-sample", type=int, default=2000)
    p.add_argument("--redis-shard-gib", type=int, default=64, help="memory of one primary")
    p.add_argument("--redis", default="127.0.0.1:6379,db=14", help="Feast connection string")
    args = p.parse_args()
    from benchmarks.scale import merged_records

    runs = {f.name: json.loads(f.read_text()) for f in args.scale}
    records = merged_records(args.scale)
    args.measured_cores = runs[args.scale[-1].name].get("cores", 2)
    stages = dict.fromkeys(r["stage"] for r in records if r["stage"] != "synth")
    costs = {s: c for s in stages if (c := fit(records, s))}
    redis = redis_bytes_per_entity(args.redis_sample, args.redis)
    rows = plan(costs, redis, args)
    settings = {name: run.get("settings", {}) for name, run in runs.items()}
    text = render(costs, redis, rows, args, settings)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Offline recommendation benchmarks: every model of the zoo on a public protocol, one table.

    python -m benchmarks.recsys --dataset movielens-100k            # tuned configs from JSON
    python -m benchmarks.recsys --dataset movielens-100k-item       # stratified per item
    python -m benchmarks.recsys --dataset instacart
    python -m benchmarks.recsys --dataset instacart --tune 20       # re-tune, rewrite JSON

On MovieLens, peer libraries run in the same process on the same split, judged by the same
evaluation library (``benchmarks.peers``: Cornac's BPR, BiVAE and EASE; ``--no-peers`` skips
them).

``--tune N`` runs an Optuna search (N trials; fewer for the slow deep models) per model on a
validation split carved from the training part, then writes the best configs to
``benchmarks/configs/<dataset>.json``; without it those committed configs are used. Either
way the reported numbers come from the untouched test split. Published reference numbers are
printed beside ours where the protocol is theirs (MovieLens stratified per item: Microsoft
Recommenders' benchmark notebook). Every row has a bootstrap CI over users, and the best
model's paired-bootstrap difference to each other row says whether its lead is real.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from zoo.compare import PROTOCOLS, compare, format_table, protocol_split, validation_split
from zoo.tune import tune

CONFIGS = Path(__file__).parent / "configs"

MODELS: dict[str, list[str]] = {
    "movielens-100k": [
        "popularity", "recent_popularity", "item_knn", "user_knn", "ease", "als",
        "content_tfidf", "two_tower", "sasrec", "hybrid",
    ],
    "movielens-100k-item": [
        "popularity", "recent_popularity", "item_knn", "user_knn", "ease", "als",
        "content_tfidf", "two_tower", "sasrec", "hybrid",
    ],
    # Instacart's sample has no product text, so content_tfidf has nothing to read there.
    "instacart": [
        "popularity", "recent_popularity", "personal_top_frequency", "item_knn", "user_knn",
        "ease", "als", "two_tower", "sasrec", "hybrid",
    ],
}  # fmt: skip
SLOW = {"als", "two_tower", "sasrec"}  # tuned with fewer trials
UNTUNED = {"popularity", "personal_top_frequency", "hybrid"}  # nothing to tune / built from tuned

# Microsoft Recommenders, MovieLens-100K, stratified 75/25 split (the notebook's
# python_stratified_split(..., filter_by="item")), k=10, seen items removed
# (examples/06_benchmarks/movielens.ipynb). Their MAP is the |relevant| denominator variant,
# our map_full.
PUBLISHED = {
    "movielens-100k-item": pd.DataFrame(
        [
            ("BiVAE (Recommenders)", 0.475, 0.146),
            ("BPR (Recommenders)", 0.442, None),
            ("LightGCN (Recommenders)", 0.420, None),
            ("NCF (Recommenders)", 0.396, None),
            ("SAR (Recommenders)", 0.382, None),
        ],
        columns=["model", "ndcg@10", "map_full@10"],
    )
}


def tuned_configs(dataset: str, trials: int, split, protocol) -> dict[str, dict]:
    """Search each model's config on the validation split; the hybrid reuses the tuned two-tower."""
    val = validation_split(protocol, split)
    configs: dict[str, dict] = {}
    for name in MODELS[dataset]:
        if name in UNTUNED:
            continue
        n = max(2, trials // 5) if name in SLOW else trials
        started = time.perf_counter()
        best, score, _ = tune(name, val, n, protocol.k, protocol.exclude_seen, log_to_mlflow=False)
        print(f"tuned {name}: val ndcg@{protocol.k}={score:.4f} in {n} trials "
              f"({time.perf_counter() - started:.0f}s): {best}", flush=True)  # fmt: skip
        configs[name] = best
    configs["hybrid"] = {"two_tower": configs.get("two_tower", {})}
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(PROTOCOLS), required=True)
    parser.add_argument("--tune", type=int, default=0, help="Optuna trials per model (0: reuse)")
    parser.add_argument("--models", help="comma-separated subset of the dataset's models")
    parser.add_argument("--out", type=Path, default=Path("var/benchmarks"))
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Cornac's models beside ours (default: on MovieLens)",
    )
    args = parser.parse_args()

    protocol = PROTOCOLS[args.dataset]
    started = time.perf_counter()
    split = protocol_split(protocol)
    path = CONFIGS / f"{args.dataset}.json"
    if args.tune:
        configs = tuned_configs(args.dataset, args.tune, split, protocol)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(configs, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
    else:
        configs = json.loads(path.read_text()) if path.exists() else {}
    names = args.models.split(",") if args.models else MODELS[args.dataset]
    table, fitted = compare({n: (n, configs.get(n, {})) for n in names}, split, protocol.k,
                            protocol.exclude_seen)  # fmt: skip
    if args.peers if args.peers is not None else args.dataset.startswith("movielens"):
        from benchmarks.peers import fit_peer, peer_configs

        for label, (model, config) in peer_configs(configs).items():
            fitted[label] = fit_peer(label, model, config, split, protocol.k,
                                     protocol.exclude_seen)  # fmt: skip
            print(f"peer {label}: fitted in {fitted[label].fit_seconds:.0f}s", flush=True)
        attrs = table.attrs
        table = pd.concat([table, pd.DataFrame([fitted[p].row() for p in peer_configs(configs)])],
                          ignore_index=True)  # fmt: skip
        table.attrs = attrs  # concat drops them; the protocol line reads them

    k = protocol.k
    cols = ["model", f"ndcg@{k}", f"ndcg@{k} 95% CI", f"recall@{k}", f"precision@{k}",
            f"hr@{k}", f"mrr@{k}", f"map@{k}", f"map_full@{k}", "coverage", "diversity",
            "novelty", "ndcg cold", "ndcg heavy", "ndcg long_tail", "size_mb", "fit_s"]  # fmt: skip
    print(f"\n## {args.dataset}: {table.attrs['protocol']}")
    print(f"split: {split.description}\n")
    print(format_table(table.sort_values(f"ndcg@{k}", ascending=False), cols))
    if args.dataset in PUBLISHED:
        print("\nPublished (same protocol):\n")
        print(format_table(PUBLISHED[args.dataset]))
        best = table.loc[table[f"ndcg@{k}"].idxmax()]
        print(f"\nbest ours: {best['model']} ndcg@{k}={best[f'ndcg@{k}']:.4f} "
              f"vs BiVAE 0.475 -> {best[f'ndcg@{k}'] / 0.475:.3f}x")  # fmt: skip
    print(f"\n{lead_table(fitted, k)}")
    if "personal_top_frequency" in set(table["model"]):
        ref = float(table.set_index("model").loc["personal_top_frequency", f"ndcg@{k}"])
        ratios = (table.set_index("model")[f"ndcg@{k}"] / ref).sort_values(ascending=False)
        print(f"\nndcg@{k} ratio to personal_top_frequency (target >= 1.05 for the best):")
        print("\n".join(f"  {m}: {r:.3f}" for m, r in ratios.items()))
    seconds = time.perf_counter() - started
    print(f"\nwall time {seconds:.0f}s (this machine: {os_cores()} cores)")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_json(args.out / f"{args.dataset}.json", orient="records", indent=2)


def lead_table(fitted: dict, k: int, n_boot: int = 1000) -> str:
    """The best model's per-user NDCG@k difference to every other row, with its paired
    bootstrap 95% CI (the same users, resampled together): a lead inside the CI is a tie."""
    from mlkit.bootstrap import paired_ci

    per_user = {name: f.result.user_values() for name, f in fitted.items()}
    best = max(per_user, key=lambda n: per_user[n].mean())
    rows = []
    for name, scores in per_user.items():
        if name == best:
            continue
        ci = paired_ci(per_user[best], scores, n_boot=n_boot, seed=0)
        ratio = per_user[best].mean() / max(scores.mean(), 1e-12)
        rows.append((name, f"{ratio:.3f}x", f"{ci.mean:+.4f}", f"[{ci.low:+.4f}, {ci.high:+.4f}]",
                     "yes" if ci.low > 0 else "no"))  # fmt: skip
    frame = pd.DataFrame(rows, columns=["vs", "ratio", f"ndcg@{k} diff", "95% CI", "lead real"])
    return f"best: {best}; its lead over every other row (paired bootstrap over users):\n\n" + \
        format_table(frame)  # fmt: skip


def os_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()

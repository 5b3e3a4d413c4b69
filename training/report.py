"""What a person sees of a nightly run in MLflow: runs built to be compared, and plots.

Layout (one parent run per logical date, ``nightly-<ds>``):

- every model and baseline evaluated on the run's holdout is a **nested run** named after its
  evaluation row, tagged ``role`` (served, baseline, zoo, retrieval, compressed, champion) and
  ``ds``, with the **same metric names** for all (``ndcg_at_10``, ``recall_at_10``, …, the CI
  bounds, ``cold.ndcg_at_10`` and the other segments, ``size_mb``, ``latency_ms``), so MLflow's
  compare view and charts line up across models and, through the tags, across nights;
- the parent logs the served path's metrics under those same names (night-to-night charts of
  the experiment), the evaluation table rounded to 4 decimals, and plots as images under
  ``plots/``: NDCG@10 with its CI per model, segments per model, the loss curves, and (at
  promotion) the gate's paired difference with its CI.

Plots are built by pure functions returning matplotlib figures (Agg backend: no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Every evaluation row has one role; the colours make them recognisable across plots.
ROLE_COLOURS = {
    "served": "#1b7837",
    "champion": "#762a83",
    "retrieval": "#5aae61",
    "compressed": "#a6dba0",
    "zoo": "#2166ac",
    "baseline": "#969696",
}
SEGMENTS = ("cold", "heavy", "long_tail")
PLOTS = "plots"


def _figure(height: float, width: float = 8.0) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The numeric columns every model's nested run logs, in a stable order."""
    skip = {"model", "role", "protocol"}
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]


def compact_table(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """The comparison a person reads: one row per model, 4 decimals, no sideways scrolling."""
    cols = ["model", "role", f"ndcg_at_{k}", f"ndcg_at_{k}_ci_low", f"ndcg_at_{k}_ci_high",
            f"recall_at_{k}", *(f"{s}.ndcg_at_{k}" for s in SEGMENTS), "size_mb",
            "latency_ms"]  # fmt: skip
    out = table[[c for c in cols if c in table]].copy()
    out = out.sort_values(f"ndcg_at_{k}", ascending=False)
    return out.round(4).reset_index(drop=True)


def ndcg_by_model(table: pd.DataFrame, k: int) -> Figure:
    """Horizontal bars of NDCG@k with the bootstrap 95% CI, best first, coloured by role."""
    t = table.sort_values(f"ndcg_at_{k}")
    fig = _figure(0.45 * len(t) + 1.2)
    ax = fig.subplots()
    mean = t[f"ndcg_at_{k}"].to_numpy(float)
    err = [mean - t[f"ndcg_at_{k}_ci_low"].to_numpy(float),
           t[f"ndcg_at_{k}_ci_high"].to_numpy(float) - mean]  # fmt: skip
    colours = [ROLE_COLOURS.get(r, "#000000") for r in t.get("role", [""] * len(t))]
    ax.barh(t["model"], mean, xerr=err, color=colours, capsize=3)
    for y, v in enumerate(mean):
        ax.annotate(f"{v:.4f}", (v, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"NDCG@{k} on the holdout (bars: 95% bootstrap CI over users)")
    ax.set_title("Models on the same holdout")
    _role_legend(ax, t)
    return fig


def segments_by_model(table: pd.DataFrame, k: int) -> Figure:
    """NDCG@k of every model in each user/item segment (grouped bars)."""
    cols = [f"ndcg_at_{k}", *(f"{s}.ndcg_at_{k}" for s in SEGMENTS)]
    cols = [c for c in cols if c in table]
    t = table.sort_values(f"ndcg_at_{k}")
    fig = _figure(0.6 * len(t) + 1.2)
    ax = fig.subplots()
    height = 0.8 / len(cols)
    for i, col in enumerate(cols):
        ys = [y + (i - (len(cols) - 1) / 2) * height for y in range(len(t))]
        label = "all" if col == f"ndcg_at_{k}" else col.split(".")[0]
        ax.barh(ys, pd.to_numeric(t[col]).fillna(0.0).to_numpy(float), height=height, label=label)
    ax.set_yticks(range(len(t)), t["model"])
    ax.set_xlabel(f"NDCG@{k} per segment")
    ax.set_title("Segments per model (cold users, heavy users, long-tail items)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def loss_curves(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """One panel per trained model: loss per epoch (and validation loss where there is one)."""
    fig = _figure(3.2, 4.0 * max(1, len(curves)))
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (name, curve) in zip(axes, curves.items(), strict=False):
        frame = pd.DataFrame(list(curve))
        for col in ("loss", "val_loss"):
            if col in frame:
                ax.plot(frame["epoch"], frame[col], marker="o", label=col.replace("_", " "))
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return fig


def gate_difference(numbers: Mapping[str, float], promoted: bool, metric: str) -> Figure:
    """The gate's paired difference (challenger − reference) with its CI and the threshold it
    had to clear, per reference; and the relative change in each protected segment."""
    refs = [n.removeprefix("diff_vs_").removesuffix("_mean") for n in numbers
            if n.startswith("diff_vs_") and n.endswith("_mean")]  # fmt: skip
    segs = [s for s in SEGMENTS if f"segment_{s}_relative_drop" in numbers]
    fig = _figure(2.6 + 0.4 * len(refs), 10.0)
    left, right = fig.subplots(1, 2)
    for y, ref in enumerate(refs):
        mean = numbers[f"diff_vs_{ref}_mean"]
        low, high = numbers[f"diff_vs_{ref}_ci_low"], numbers[f"diff_vs_{ref}_ci_high"]
        left.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                      color=ROLE_COLOURS["served"])  # fmt: skip
        left.plot([numbers[f"threshold_vs_{ref}"]] * 2, [y - 0.3, y + 0.3], color="#d6604d")
    left.axvline(0.0, color="#888888", linewidth=0.8)
    left.set_yticks(range(len(refs)), [f"vs {r}" for r in refs])
    left.set_ylim(-0.7, len(refs) - 0.3)
    left.set_xlabel(f"paired {metric} difference, 95% CI (red: the margin to clear)")
    left.set_title(f"Gate: {'PROMOTED' if promoted else 'not promoted'}")
    changes = [-numbers[f"segment_{s}_relative_drop"] * 100 for s in segs]
    right.barh(segs, changes, color=["#1b7837" if c >= 0 else "#d6604d" for c in changes])
    right.axvline(0.0, color="#888888", linewidth=0.8)
    right.set_xlabel("relative change per protected segment, %")
    right.set_title("Segments")
    return fig


def _role_legend(ax: Any, table: pd.DataFrame) -> None:
    from matplotlib.patches import Patch

    roles = [r for r in ROLE_COLOURS if "role" in table and r in set(table["role"])]
    if roles:
        ax.legend(handles=[Patch(color=ROLE_COLOURS[r], label=r) for r in roles],
                  loc="lower right", fontsize=8)  # fmt: skip


def log_model_runs(
    table: pd.DataFrame, ds: str, configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """One nested run per evaluation row (the active run is the parent); returns name -> id."""
    import mlflow

    ids = {}
    columns = metric_columns(table)
    for row in table.to_dict("records"):
        name = row["model"]
        tags = {"role": row.get("role", ""), "ds": ds, "model": name,
                "protocol": str(row.get("protocol", ""))}  # fmt: skip
        with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
            metrics = {c: float(row[c]) for c in columns if pd.notna(row.get(c))}
            mlflow.log_metrics(metrics)
            if config := configs.get(name):
                mlflow.log_params({f"config.{p}": v for p, v in config.items()})
        ids[name] = run.info.run_id
    return ids


def log_evaluation(
    table: pd.DataFrame,
    k: int,
    ds: str,
    served: str,
    configs: Mapping[str, Mapping[str, Any]],
    curves: Mapping[str, Sequence[Mapping[str, float]]],
) -> None:
    """Everything of the evaluation a person looks at, into the active (parent) run."""
    import mlflow

    log_model_runs(table, ds, configs)
    row = table.set_index("model").loc[served]
    mlflow.log_metrics({c: float(row[c]) for c in metric_columns(table) if pd.notna(row[c])})
    mlflow.log_table(compact_table(table, k), "evaluation.json")
    mlflow.log_figure(ndcg_by_model(table, k), f"{PLOTS}/ndcg_by_model.png")
    mlflow.log_figure(segments_by_model(table, k), f"{PLOTS}/segments_by_model.png")
    if curves:
        mlflow.log_figure(loss_curves(curves), f"{PLOTS}/loss_curves.png")


def served_study_trials(record: Mapping[str, Any], k: int) -> Figure:
    """Validation NDCG@k of each trial of the served study, the settings' configuration
    (trial 0) and the chosen one marked."""
    key = f"val_ndcg_at_{k}"
    trials = record["trials"]
    fig = _figure(3.2)
    ax = fig.subplots()
    ax.plot([t["trial"] for t in trials], [t[key] for t in trials], "o", color="#2166ac",
            label="trial")  # fmt: skip
    ax.axhline(record[f"default_{key}"], color="#969696", ls="--", label="settings (trial 0)")
    ax.plot([record["chosen_trial"]], [record[key]], "*", ms=14, color="#1b7837", label="served")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation NDCG@{k}")
    ax.set_title("served configuration: study on validation")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def log_served_study(record: Mapping[str, Any], k: int) -> None:
    """The served study (``training.served_study``) into the active (parent) run: the chosen
    configuration and the study's decision as ``served.*`` tags (tags, not params: a retried
    ``train_ranker`` may log into the same run, and MLflow refuses to change a param), its
    validation NDCG@k beside the settings' and the best trial's, every trial as a table and
    the trials plot."""
    import mlflow

    key = f"val_ndcg_at_{k}"
    chosen = {**record["retrieval"], **{f"ranker.{p}": v for p, v in record["ranker"].items()}}
    mlflow.set_tags({f"served.{p}": str(v)[:5000] for p, v in chosen.items()}
                    | {"served.decision": record["decision"]})  # fmt: skip
    mlflow.log_metrics({f"served_study.{key}": record[key],
                        f"served_study.default_{key}": record[f"default_{key}"],
                        f"served_study.best_{key}": record[f"best_{key}"],
                        "served_study.trials": len(record["trials"])})  # fmt: skip
    mlflow.log_dict(dict(record), "served_study.json")
    trials = pd.DataFrame(
        [{"trial": t["trial"], key: round(t[key], 4), "train_rows": t["train_rows"],
          **t["retrieval"], "cross_layers": t["ranker"]["cross_layers"],
          "hidden": t["ranker"]["hidden"], "features": len(t["ranker"]["features"])}
         for t in record["trials"]]
    )  # fmt: skip
    mlflow.log_table(trials, "served_study_trials.json")
    mlflow.log_figure(served_study_trials(record, k), f"{PLOTS}/served_study.png")


def decision_markdown(
    verdict: Any,
    table: pd.DataFrame,
    k: int,
    ds: str,
    candidate: str,
    version: str,
    promoted: bool | None = None,
) -> str:
    """The gate's decision as a reviewer reads it on the registry version and the run page:
    the logical date, the verdict, the headline numbers with CIs, and every reason in full."""
    n = verdict.numbers
    promoted = verdict.promote if promoted is None else promoted
    row = table.set_index("model").loc[candidate]
    lines = [
        f"**{'Promoted to `champion`' if promoted else 'Not promoted'}** — nightly run "
        f"of logical date **{ds}**, version {version}, evaluated as `{candidate}`.",
        "",
        f"NDCG@{k} {row[f'ndcg_at_{k}']:.4f} (95% CI [{row[f'ndcg_at_{k}_ci_low']:.4f}, "
        f"{row[f'ndcg_at_{k}_ci_high']:.4f}])"
        + (f", recall@{k} {row[f'recall_at_{k}']:.4f}." if f"recall_at_{k}" in row else "."),
        "",
        "| reference | paired difference | 95% CI | threshold |",
        "|---|---:|---|---:|",
    ]
    for key in n:
        if key.startswith("diff_vs_") and key.endswith("_mean"):
            ref = key.removeprefix("diff_vs_").removesuffix("_mean")
            lines.append(
                f"| {ref} | {n[key]:+.4f} | [{n[f'diff_vs_{ref}_ci_low']:+.4f}, "
                f"{n[f'diff_vs_{ref}_ci_high']:+.4f}] | {n[f'threshold_vs_{ref}']:.4f} |"
            )
    lines += ["", "Reasons:", *(f"- {r}" for r in verdict.reasons)]
    return "\n".join(lines)


def compression_pareto(
    table: pd.DataFrame,
    chosen: str,
    k: int,
    quality: str = "test_ndcg",
    name: str = "candidate",
    teacher: str | None = None,
) -> Figure:
    """Quality against p50 latency of a model's compressed candidates (one point each, the
    chosen one marked, the Pareto front joined): where the speed is bought and at what price.
    Shared by every compression stage (``name`` column, ``quality`` column, ``p50_ms``)."""
    fig = _figure(4.2, 7.0)
    ax = fig.subplots()
    points = table.sort_values("p50_ms")
    front, best = [], -float("inf")
    for _, row in points.iterrows():
        if row[quality] > best:
            front.append(row)
            best = row[quality]
    ax.plot([r["p50_ms"] for r in front], [r[quality] for r in front], color="#bbbbbb",
            zorder=1, label="Pareto front")  # fmt: skip
    for _, row in points.iterrows():
        is_chosen = row[name] == chosen
        colour = ROLE_COLOURS["served"] if is_chosen else ROLE_COLOURS["compressed"]
        if teacher is not None and row[name] == teacher:
            colour = ROLE_COLOURS["champion"]
        ax.scatter(row["p50_ms"], row[quality], s=90 if is_chosen else 40, color=colour,
                   edgecolor="black" if is_chosen else "none", zorder=2)  # fmt: skip
        ax.annotate(f" {row[name]}" + (" (chosen)" if is_chosen else ""),
                    (row["p50_ms"], row[quality]), fontsize=8)  # fmt: skip
    ax.set_xlabel("p50 latency of the ranking stage, ms (lower is better)")
    ax.set_ylabel(f"{quality.replace('_ndcg', '')} NDCG@{k}")
    ax.set_title("Compression: quality vs latency")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def log_compression(table: pd.DataFrame, record: Mapping[str, Any], k: int) -> None:
    """The served ranker's compression table, choice and Pareto plot, into the active run."""
    import mlflow

    chosen = str(record["chosen"])
    teacher = str(record["choice"]["teacher"])
    shown = table.drop(columns=["file"], errors="ignore").round(4)
    mlflow.log_table(shown, "compression/ranker_candidates.json")
    mlflow.log_dict(dict(record["choice"]), "compression/ranker_choice.json")
    mlflow.log_figure(
        compression_pareto(table, chosen, k, teacher=teacher), f"{PLOTS}/ranker_compression.png"
    )
    row = table.set_index("candidate").loc[chosen]
    mlflow.log_metrics({
        "ranker.p50_ms": float(row["p50_ms"]),
        "ranker.p99_ms": float(row["p99_ms"]),
        "ranker.bytes": float(row["bytes"]),
        "ranker.speed_ratio": float(row["speed_ratio"]),
        "ranker.size_ratio": float(row["size_ratio"]),
    })  # fmt: skip
    mlflow.set_tag("ranker_compressed", chosen)

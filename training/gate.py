"""The promotion gate: does a challenger replace the champion?

Why a statistical gate: a nightly retrain on a few hundred users moves NDCG by noise alone, so
"higher mean" would promote (and roll back) models at random. The gate compares challenger and
reference on the *same split and the same users*, resamples users (paired bootstrap of the
per-user metric difference) and promotes only when the lower bound of that difference clears
the margin, and no protected segment (cold users, heavy users, long-tail items) got worse by
more than a tolerance: an average gain bought by failing new customers is not a gain.

Rules (``decide``):

1. Reference: the champion; on the first run (no champion) the baseline (popularity).
2. Headline: paired per-user differences d_u = challenger_u - reference_u over the users both
   were evaluated on (they must be the same set). Promote only if the lower end of the
   percentile bootstrap CI of mean(d) is strictly above ``margin * mean(reference)``. The
   margin (default ``EvalConfig.promotion_margin``: one default) is *relative*: 0.01 asks
   for at least 1% of the reference's mean with confidence ``1 - alpha``; margin 0 asks for
   a gain whose CI excludes zero (a tie never promotes).
3. Segments (against the reference of rule 1): for each protected segment, relative drop =
   (mean_ref - mean_challenger) / mean_ref over its paired users; a drop above ``tolerance``
   rejects, with the segment named in the reasons. An empty segment is reported and skipped;
   a segment asked for but absent from the inputs is an error (protection must not silently
   vanish).
4. When both a champion and a baseline are given, the challenger must also clear the margin
   against the baseline (rule 2), so a champion that itself fell below popularity cannot let
   a weak challenger through.
5. ``baseline_non_inferiority`` (optional, search's rule): against the *baseline* the
   challenger need only be non-inferior: the CI's lower bound above ``-value x`` the
   baseline's mean. The first version of a service that serves nothing yet is then promoted
   when it is no worse than the cheap peer, while every later version must still beat the
   champion (rule 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlkit.bootstrap import bootstrap_ci
from mlkit.interactions import USER_IDX
from mlkit.metrics import EvaluationResult
from shopml.config import EvalConfig

DEFAULT_SEGMENTS: tuple[str, ...] = ("cold", "heavy", "long_tail")

Evaluated = EvaluationResult | Mapping[str, pd.DataFrame] | pd.DataFrame


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict, every number it used and why, ready for JSON and MLflow tags."""

    promote: bool
    reference: str  # "champion" or "baseline"
    metric: str
    margin: float
    tolerance: float
    reasons: list[str]
    numbers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _segments(x: Evaluated, who: str) -> tuple[dict[str, pd.DataFrame], str | None]:
    if isinstance(x, EvaluationResult):
        return dict(x.segments), x.protocol
    if isinstance(x, pd.DataFrame):
        return {"all": x}, None
    if isinstance(x, Mapping):
        if "all" not in x:
            raise ValueError(f"{who}: segment frames need an 'all' entry (got {sorted(x)})")
        return dict(x), None
    raise ValueError(
        f"{who}: expected an EvaluationResult, a per-user DataFrame or a mapping "
        f"of segment name -> DataFrame, got {type(x).__name__}"
    )


def _check_frame(frame: pd.DataFrame, who: str, metric: str, user_col: str) -> pd.Series:
    """The per-user metric indexed by user, with readable errors for every bad input."""
    if user_col not in frame.columns:
        raise ValueError(f"{who}: no user column '{user_col}' (columns: {list(frame.columns)})")
    if metric not in frame.columns:
        raise ValueError(f"{who}: no metric column '{metric}' (columns: {list(frame.columns)})")
    if frame[user_col].duplicated().any():
        raise ValueError(f"{who}: duplicate users in '{user_col}': one row per user expected")
    values = frame.set_index(user_col)[metric].astype(float)
    if values.isna().any():
        raise ValueError(f"{who}: NaN in '{metric}'")
    return values


def _paired(
    ch: pd.DataFrame, ref: pd.DataFrame, metric: str, user_col: str, names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    a = _check_frame(ch, names[0], metric, user_col)
    b = _check_frame(ref, names[1], metric, user_col)
    joined = pd.concat([a.rename("ch"), b.rename("ref")], axis=1, join="inner").sort_index()
    return joined["ch"].to_numpy(), joined["ref"].to_numpy()


def _headline(
    ch: pd.DataFrame,
    ref: pd.DataFrame,
    name: str,
    metric: str,
    margin: float,
    user_col: str,
    n_boot: int,
    alpha: float,
    seed: int,
) -> tuple[bool, str, dict[str, float]]:
    a = _check_frame(ch, "challenger", metric, user_col)
    b = _check_frame(ref, name, metric, user_col)
    if a.empty:
        raise ValueError("challenger: no users evaluated (empty per-user frame)")
    if set(a.index) != set(b.index):
        only_ch, only_ref = len(set(a.index) - set(b.index)), len(set(b.index) - set(a.index))
        raise ValueError(
            f"challenger and {name} were evaluated on different users ({only_ch} only in the "
            f"challenger, {only_ref} only in the {name}): compare them on the same split"
        )
    ch_v, ref_v = _paired(ch, ref, metric, user_col, ("challenger", name))
    ci = bootstrap_ci(ch_v - ref_v, n_boot=n_boot, alpha=alpha, seed=seed)
    ref_mean = float(ref_v.mean())
    threshold = margin * ref_mean
    ok = ci.low > threshold
    numbers = {
        f"{name}_mean": ref_mean,
        "challenger_mean": float(ch_v.mean()),
        f"diff_vs_{name}_mean": ci.mean,
        f"diff_vs_{name}_ci_low": ci.low,
        f"diff_vs_{name}_ci_high": ci.high,
        f"threshold_vs_{name}": threshold,
        "users": float(len(ch_v)),
    }
    verdict = "clears" if ok else "does not clear"
    reason = (
        f"{metric}: challenger {ch_v.mean():.4f} vs {name} {ref_mean:.4f}, mean difference "
        f"{ci.mean:+.4f} with {1 - alpha:.0%} CI [{ci.low:+.4f}, {ci.high:+.4f}] over "
        f"{len(ch_v)} users; lower bound {verdict} the margin {margin:g} x {ref_mean:.4f} = "
        f"{threshold:.4f}"
    )
    return ok, reason, numbers


def decide(
    challenger: Evaluated,
    champion: Evaluated | None = None,
    baseline: Evaluated | None = None,
    *,
    metric: str = "ndcg",
    margin: float = EvalConfig.model_fields["promotion_margin"].default,
    segments: Sequence[str] = DEFAULT_SEGMENTS,
    tolerance: float = EvalConfig.model_fields["segment_tolerance"].default,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    user_col: str = USER_IDX,
    baseline_non_inferiority: float | None = None,
) -> GateDecision:
    """Promote the challenger or not (module docstring: the rules), with reasons and numbers.

    Inputs are ``EvaluationResult``s of the same split, or per-user frames (one row per user,
    ``user_col`` and ``metric`` columns), or mappings ``segment -> per-user frame`` with an
    ``all`` entry. Plain frames carry no segments: pass ``segments=()`` for them.
    """
    if not margin >= 0 or math.isinf(margin):
        raise ValueError(f"margin must be a finite number >= 0 (relative), got {margin}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (relative), got {tolerance}")
    if champion is None and baseline is None:
        raise ValueError(
            "nothing to compare with: give the champion or, on a first run, the "
            "baseline (popularity) evaluated on the same split"
        )
    ch_segments, ch_protocol = _segments(challenger, "challenger")
    references: list[tuple[str, dict[str, pd.DataFrame]]] = []
    for name, evaluated in (("champion", champion), ("baseline", baseline)):
        if evaluated is None:
            continue
        ref_segments, ref_protocol = _segments(evaluated, name)
        if ch_protocol and ref_protocol and ch_protocol != ref_protocol:
            raise ValueError(
                f"challenger and {name} were evaluated under different protocols: "
                f"{ch_protocol!r} vs {ref_protocol!r}"
            )
        references.append((name, ref_segments))
    primary_name, primary = references[0]

    promote = True
    reasons: list[str] = []
    numbers: dict[str, float] = {}
    if baseline_non_inferiority is not None and not 0 <= baseline_non_inferiority < 1:
        raise ValueError(
            f"baseline_non_inferiority must be in [0, 1), got {baseline_non_inferiority}"
        )
    for name, ref_segments in references:
        non_inferior = name == "baseline" and baseline_non_inferiority is not None
        ok, reason, nums = _headline(
            ch_segments["all"],
            ref_segments["all"],
            name,
            metric,
            -baseline_non_inferiority if non_inferior else margin,
            user_col,
            n_boot,
            alpha,
            seed,
        )
        promote &= ok
        reasons.append(reason)
        numbers |= nums

    for seg in segments:
        missing = [
            who
            for who, segs in (("challenger", ch_segments), (primary_name, primary))
            if seg not in segs
        ]
        if missing:
            raise ValueError(
                f"protected segment '{seg}' is missing from the {' and '.join(missing)}"
                f" evaluation (available: {sorted(ch_segments)}); pass segments=() "
                "to gate on plain per-user frames"
            )
        ch_v, ref_v = _paired(
            ch_segments[seg],
            primary[seg],
            metric,
            user_col,
            (f"challenger[{seg}]", f"{primary_name}[{seg}]"),
        )
        numbers[f"segment_{seg}_users"] = float(len(ch_v))
        if len(ch_v) == 0:
            reasons.append(f"segment '{seg}': no users, not checked")
            continue
        ch_mean, ref_mean = float(ch_v.mean()), float(ref_v.mean())
        drop = (ref_mean - ch_mean) / ref_mean if ref_mean > 0 else 0.0
        numbers |= {
            f"segment_{seg}_challenger": ch_mean,
            f"segment_{seg}_{primary_name}": ref_mean,
            f"segment_{seg}_relative_drop": drop,
        }
        if drop > tolerance:
            promote = False
            reasons.append(
                f"segment '{seg}' regresses: {metric} {ch_mean:.4f} vs {primary_name} "
                f"{ref_mean:.4f} over {len(ch_v)} users, a relative drop of "
                f"{drop:.1%} > tolerance {tolerance:.1%}"
            )
        else:
            reasons.append(
                f"segment '{seg}' ok: {metric} {ch_mean:.4f} vs {primary_name} "
                f"{ref_mean:.4f} (relative change {-drop:+.1%}, allowed drop {tolerance:.1%})"
            )

    reasons.insert(0, ("PROMOTE" if promote else "REJECT") + f" against the {primary_name}")
    return GateDecision(promote, primary_name, metric, margin, tolerance, reasons, numbers)


@dataclass(frozen=True)
class CompressionChoice:
    """Which compressed candidate serves, and why each other candidate did not.

    ``numbers`` has, per candidate, the validation metric, the latency and the relative
    change of the metric against the teacher, so the decision can be re-read from the run.
    """

    chosen: str
    teacher: str
    metric: str
    tolerance: float
    latency: str
    reasons: dict[str, str]
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_compressed(
    candidates: Sequence[Mapping[str, Any]],
    teacher: str,
    metric: str,
    tolerance: float,
    latency: str = "p50_ms",
) -> CompressionChoice:
    """The fastest candidate whose validation ``metric`` is within ``tolerance`` of the teacher.

    ``candidates``: dicts with ``name``, ``metric`` (higher is better, measured on the
    validation split) and ``latency`` (lower is better), the teacher among them. A candidate
    qualifies when ``metric >= teacher_metric * (1 - tolerance)`` (relative, on the point
    estimate); the teacher always qualifies, so when nothing else does the teacher is chosen.
    Ties on latency go to the better metric, then to the teacher, then by name. Every other
    candidate gets a reason: why it did not qualify, or which faster qualifying one beat it.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1) (relative), got {tolerance}")
    rows: dict[str, tuple[float, float]] = {}
    for c in candidates:
        for key in ("name", metric, latency):
            if key not in c:
                raise ValueError(f"candidate {c.get('name', c)!r} has no '{key}'")
        name = str(c["name"])
        if name in rows:
            raise ValueError(f"candidate '{name}' is given twice")
        value, lat = float(c[metric]), float(c[latency])
        if not math.isfinite(value) or not math.isfinite(lat) or lat < 0:
            raise ValueError(f"candidate '{name}': {metric}={value}, {latency}={lat} not usable")
        rows[name] = (value, lat)
    if teacher not in rows:
        raise ValueError(f"teacher '{teacher}' is not among the candidates {sorted(rows)}")
    t_value = rows[teacher][0]
    floor = t_value * (1 - tolerance)

    def change(name: str) -> float:
        return (rows[name][0] - t_value) / t_value if t_value > 0 else 0.0

    qualified = [n for n, (v, _) in rows.items() if n == teacher or v >= floor]
    chosen = min(qualified, key=lambda n: (rows[n][1], -rows[n][0], n != teacher, n))
    reasons: dict[str, str] = {}
    for name, (value, lat) in rows.items():
        if name == chosen:
            continue
        if name not in qualified:
            reasons[name] = (
                f"{metric} {change(name):+.1%} vs {teacher} ({value:.4f} vs {t_value:.4f}) "
                f"beyond {tolerance:.0%} tolerance"
            )
        else:
            reasons[name] = (
                f"slower than {chosen} ({latency} {lat:.3f} vs {rows[chosen][1]:.3f})"
                if lat > rows[chosen][1]
                else f"ties {chosen} on {latency} ({lat:.3f}) with a lower {metric}"
            )
    numbers = {
        n: {metric: v, latency: lat, "relative_change": change(n)} for n, (v, lat) in rows.items()
    }
    return CompressionChoice(chosen, teacher, metric, tolerance, latency, reasons, numbers)

"""Task streams: continual-learning metrics over the accuracy matrix, and per-stage curve normalisation.

The first section (metrics) is pure and has no dependency on the engine; stage scheduling lives below it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------
# Continual-learning metrics and per-stage normalisation (pure functions, used by analysis and report)
# ---------------------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def continual_metrics(matrix: Sequence[Sequence[float]], base: Sequence[float] | None = None) -> dict:
    """ACC, BWT, FWT and max-based forgetting from the accuracy matrix, as defined in DESIGN.md.

    `matrix[i][j]` is the reward on task j after stage i (rows = stages, column j = the task of stage j).
    `base[j]` is the base model's reward on task j; without it FWT is None. With 0-based indices and
    L = T-1 the last stage:
      ACC = mean_j R[L][j];  BWT = mean_{j<L} (R[L][j] - R[j][j]);
      forgetting_j = max_{l<L} R[l][j] - R[L][j], averaged over j<L;
      FWT = mean_{1<=j<=L} (R[j-1][j] - b_j).
    Metrics without any term (e.g. BWT with a single stage) are None rather than a misleading 0.
    Returns {"acc", "bwt", "fwt", "forgetting", "forgetting_per_task"}.
    """
    rows = [list(map(float, r)) for r in matrix]
    if not rows or not rows[-1]:
        return {"acc": None, "bwt": None, "fwt": None, "forgetting": None, "forgetting_per_task": []}
    last = len(rows) - 1
    final = rows[last]
    ncols = len(final)
    # Only tasks that own a stage before the last one can be forgotten / transferred to.
    earlier = range(min(last, ncols))
    bwt = _mean([final[j] - rows[j][j] for j in earlier])
    per_task = [max(rows[k][j] for k in range(last)) - final[j] for j in earlier]
    fwt = None
    if base is not None:
        terms = [rows[j - 1][j] - float(base[j]) for j in range(1, min(last + 1, ncols, len(base)))]
        fwt = _mean(terms)
    return {
        "acc": _mean(final),
        "bwt": bwt,
        "fwt": fwt,
        "forgetting": _mean(per_task),
        "forgetting_per_task": per_task,
    }


def stage_spans(stages: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Step spans (start, end] of each stage from `[{task, steps}, ...]`; stage 0 also owns step 0."""
    spans, start = [], 0
    for st in stages:
        end = start + int(st.get("steps", 0))
        spans.append((start, end))
        start = end
    return spans


def stage_of(step: float, spans: Sequence[tuple[int, int]]) -> int | None:
    """Index of the stage a step belongs to: the eval at a stage's last step counts for that stage."""
    for i, (start, end) in enumerate(spans):
        if start < step <= end or (i == 0 and step == start):
            return i
    return None


Curve = list[tuple[float, float]]


def normalise_stage_curves(
    curves: Mapping[str, Mapping[str, Curve]], spans: Sequence[tuple[int, int]]
) -> dict[str, dict[str, list[tuple[float, float | None]]]]:
    """Normalise per-task eval curves to the peak reached by any method within each stage (paper sec. 5).

    `curves[method][task]` is a list of (step, reward). Each point is divided by the maximum reward on that
    task over all methods' points in the same stage, so 1.0 means "as good as the best method got in this
    stage". Points outside every stage, or in a stage whose peak is <= 0, map to None (nothing to compare).
    """
    peaks: dict[tuple[str, int], float] = {}
    for per_task in curves.values():
        for task, pts in per_task.items():
            for step, reward in pts:
                s = stage_of(step, spans)
                if s is not None:
                    key = (task, s)
                    peaks[key] = max(peaks.get(key, float("-inf")), reward)
    out: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
    for method, per_task in curves.items():
        out[method] = {}
        for task, pts in per_task.items():
            norm: list[tuple[float, float | None]] = []
            for step, reward in pts:
                s = stage_of(step, spans)
                peak = peaks.get((task, s)) if s is not None else None
                norm.append((step, reward / peak if peak is not None and peak > 0 else None))
            out[method][task] = norm
    return out


# ---------------------------------------------------------------------------------------------------------
# Task streams (stage scheduling)
# ---------------------------------------------------------------------------------------------------------

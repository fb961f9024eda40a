"""Task streams: the stage schedule, the accuracy matrix's continual-learning metrics, per-stage normalisation.

A stream is a list of stages ``{task, steps}`` run back to back; a task may appear in several stages.
The accuracy matrix has one row per stage (every task evaluated at the stage's end) and one column per
unique task in order of first appearance; the base model's rewards are the row before stage 0.
Everything here is pure (no model, no engine).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------
# Continual-learning metrics and per-stage normalisation (pure functions, used by analysis and report)
# ---------------------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def stream_columns(stage_tasks: Sequence[str]) -> list[str]:
    """Columns of the accuracy matrix: the unique tasks of the stream in order of first appearance."""
    return list(dict.fromkeys(stage_tasks))


def continual_metrics(
    matrix: Sequence[Sequence[float]], stage_tasks: Sequence[str], base: Mapping[str, float] | None = None
) -> dict:
    """ACC, BWT, forgetting and FWT of a task stream, as defined in DESIGN.md.

    ``matrix[s][j]``: reward on task j (a column of :func:`stream_columns`) evaluated at the end of stage s;
    ``stage_tasks[s]``: the task stage s trains (a stream may revisit a task, so stages != columns);
    ``base[name]``: the base model's reward (the row before stage 0); without it FWT is None.
    With L the final stage, first_j / last_j the first / last stage training task j, J = {j : last_j < L}:

        ACC          = mean_j R[L][j]
        BWT          = mean_{j in J} (R[L][j] - R[last_j][j])
        forgetting_j = max_{first_j <= s < L} R[s][j] - R[L][j]   for j in J;  forgetting = their mean
        FWT          = mean_{j : first_j > 0} (R[first_j - 1][j] - base_j)

    A metric with no terms is None (never a misleading 0). ``per_task[name]`` holds each task's terms
    (``first``, ``last``, ``final``, ``bwt``, ``forgetting``, ``fwt``; None where the task has no term).
    """
    columns = stream_columns(stage_tasks)
    rows = [list(map(float, r)) for r in matrix]
    empty = {"acc": None, "bwt": None, "fwt": None, "forgetting": None, "per_task": {}}
    if not rows:
        return empty
    if len(rows) != len(stage_tasks) or any(len(r) != len(columns) for r in rows):
        raise ValueError(
            f"accuracy matrix is {len(rows)}x{len(rows[0])} but the stream has {len(stage_tasks)} stages "
            f"and {len(columns)} unique tasks"
        )
    last_stage = len(rows) - 1
    per_task: dict[str, dict] = {}
    for j, name in enumerate(columns):
        trained = [s for s, t in enumerate(stage_tasks) if t == name]
        first, last = trained[0], trained[-1]
        final = rows[last_stage][j]
        term: dict = {"first": first, "last": last, "final": final, "bwt": None, "forgetting": None, "fwt": None}
        if last < last_stage:
            term["bwt"] = final - rows[last][j]
            term["forgetting"] = max(rows[s][j] for s in range(first, last_stage)) - final
        if first > 0 and base is not None and base.get(name) is not None:
            term["fwt"] = rows[first - 1][j] - float(base[name])
        per_task[name] = term
    pick = lambda key: [t[key] for t in per_task.values() if t[key] is not None]  # noqa: E731
    return {
        "acc": _mean(rows[last_stage]),
        "bwt": _mean(pick("bwt")),
        "fwt": _mean(pick("fwt")) if base is not None else None,
        "forgetting": _mean(pick("forgetting")),
        "per_task": per_task,
    }


def stage_spans(stages: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Step spans ``[start, end)`` of each stage from ``[{task, steps}, ...]``, in 0-based loop steps."""
    spans, start = [], 0
    for st in stages:
        end = start + int(st.get("steps", 0))
        spans.append((start, end))
        start = end
    return spans


def stage_at(step: int, spans: Sequence[tuple[int, int]]) -> int | None:
    """The one boundary rule: the stage that trains 0-based loop step ``step`` (``start <= step < end``)."""
    for i, (start, end) in enumerate(spans):
        if start <= step < end:
            return i
    return None


def stage_of(step: float, spans: Sequence[tuple[int, int]]) -> int | None:
    """Stage of a metrics row: row ``step`` = loop steps completed, so it belongs to the stage that trained
    step ``step - 1`` (the eval at a stage's last step counts for that stage); row 0 belongs to stage 0."""
    if step == 0:
        return 0 if spans else None
    return stage_at(int(math.ceil(step)) - 1, spans)


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

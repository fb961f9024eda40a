"""Learning-curve analysis across runs: sample efficiency, KL at matched reward, ScaleRL sigmoid fits.

Everything here reads the run-directory contract (metrics.jsonl + summary.json) and returns plain,
JSON-serialisable values so the report, the CLI and benchmarks can share it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastslow.stream import continual_metrics

XAxis = str  # "rollouts" (slow only) | "total_rollouts" (slow + fast) | "step"
_X_AXES = ("rollouts", "total_rollouts", "step")


@dataclass
class Run:
    """One run directory: its summary and its metric rows merged by step (later keys win)."""

    path: Path
    summary: dict
    rows: list[dict]

    @property
    def method(self) -> str:
        """The method, with what its fast channel holds when that is not the method's own (``fst+memory``)."""
        method = str(self.summary.get("method") or self.path.name)
        kind = self.summary.get("fast_kind")
        return f"{method}+{kind}" if method == "fst" and kind not in (None, "gepa") else method

    @property
    def seed(self) -> int | None:
        return self.summary.get("seed")

    @property
    def tasks(self) -> list[str]:
        """The run's tasks: stream order from the summary first, then any other task seen in eval keys."""
        ordered: list[str] = [t for t in self.summary.get("tasks") or [] if isinstance(t, str)]
        for st in self.summary.get("stages") or []:
            if st.get("task") is not None and st["task"] not in ordered:
                ordered.append(st["task"])
        for t in self.summary.get("final") or {}:
            if t not in ordered:
                ordered.append(t)
        for row in self.rows:
            for key in row:
                if key.startswith("eval/") and key.endswith("/reward"):
                    t = key[len("eval/") : -len("/reward")]
                    if t not in ordered:
                        ordered.append(t)
        return ordered


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows merged per step; unreadable lines are skipped (a run may be cut mid-write)."""
    by_step: dict[float, dict] = {}
    order: list[float] = []
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():  # a damaged byte spoils its line, not the report
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step", len(order))
        if step not in by_step:
            by_step[step] = {}
            order.append(step)
        by_step[step].update(row)
    rows = [by_step[s] for s in sorted(order)]
    # Rollout counters are cumulative: carry the last value forward where a row omits them.
    last = {"rollouts": 0, "fast_rollouts": 0}
    for row in rows:
        for k in last:
            if row.get(k) is None:
                row[k] = last[k]
            last[k] = row[k]
    return rows


def load_run(path: str | Path) -> Run:
    """Load a run directory; a missing summary.json or metrics.jsonl gives an empty dict / list."""
    path = Path(path)
    summary: dict = {}
    sp = path / "summary.json"
    if sp.exists():
        try:
            summary = json.loads(sp.read_text(errors="replace"))
        except json.JSONDecodeError:
            summary = {}
    if not isinstance(summary, dict):
        summary = {}
    return Run(path=path, summary=summary, rows=_read_rows(path / "metrics.jsonl"))


@dataclass
class EvalCurve:
    """Mean eval reward over the run's tasks per eval row, and its running maximum."""

    x: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)
    kl: list[float | None] = field(default_factory=list)  # drift/kl_rev at the same step, if logged


def _x_of(row: dict, x: XAxis) -> float:
    if x == "rollouts":
        return float(row.get("rollouts") or 0)
    if x == "total_rollouts":
        return float(row.get("rollouts") or 0) + float(row.get("fast_rollouts") or 0)
    if x == "step":
        return float(row.get("step") or 0)
    raise ValueError(f"x must be one of {_X_AXES}, got {x!r}")


def eval_curve(run: Run, x: XAxis = "rollouts", prompt: str = "best") -> EvalCurve:
    """Eval reward (best prompt, or `prompt="seed"`) averaged over the run's tasks, against `x`.

    Rows that evaluate every task are used; if no row does, rows with any eval key are averaged over the
    tasks they have (so a partial log still gives a curve).
    """
    suffix = "/reward" if prompt == "best" else "/reward_seed_prompt"
    tasks = run.tasks
    keys = [f"eval/{t}{suffix}" for t in tasks]
    full = [r for r in run.rows if keys and all(r.get(k) is not None for k in keys)]
    rows = full or [r for r in run.rows if any(r.get(k) is not None for k in keys)]
    curve = EvalCurve()
    best = -math.inf
    for r in rows:
        vals = [float(r[k]) for k in keys if r.get(k) is not None]
        mean = sum(vals) / len(vals)
        best = max(best, mean)
        curve.x.append(_x_of(r, x))
        curve.step.append(float(r.get("step") or 0))
        curve.reward.append(mean)
        curve.peak.append(best)
        kl = r.get("drift/kl_rev")
        curve.kl.append(float(kl) if kl is not None else None)
    return curve


def _first_reach(curve: EvalCurve, target: float) -> int | None:
    """Index of the first eval row whose running max reaches `target` (tolerant to float noise)."""
    for i, p in enumerate(curve.peak):
        if p >= target - 1e-12:
            return i
    return None


def sample_efficiency(rl: Run, fst: Run) -> dict:
    """How much sooner `fst` reaches RL's running-peak eval reward R* (DESIGN.md, "Sample efficiency").

    Returns {"target": R*, "reached": bool, "note": str, and per count "slow" (slow rollouts only),
    "total" (slow + fast rollouts), "steps": {"rl", "fst", "ratio"}} where rl/fst are the counts at which
    each first reaches R* and ratio = rl / fst (None when not reached, or when fst needed 0 of that count).
    """
    counts = {"slow": "rollouts", "total": "total_rollouts", "steps": "step"}
    rl_curve = eval_curve(rl, "step")
    if not rl_curve.reward:
        return {"target": None, "reached": False, "note": "RL run has no eval rows",
                **{k: {"rl": None, "fst": None, "ratio": None} for k in counts}}
    target = rl_curve.peak[-1]
    i_rl = _first_reach(rl_curve, target)
    fst_curve = eval_curve(fst, "step")
    i_fst = _first_reach(fst_curve, target) if fst_curve.reward else None
    out: dict = {"target": target, "reached": i_fst is not None}
    for name, axis in counts.items():
        rl_x = eval_curve(rl, axis).x[i_rl]
        fst_x = eval_curve(fst, axis).x[i_fst] if i_fst is not None else None
        ratio = rl_x / fst_x if fst_x else None
        out[name] = {"rl": rl_x, "fst": fst_x, "ratio": ratio}
    if i_fst is None:
        best = max(fst_curve.reward) if fst_curve.reward else None
        out["note"] = (f"never reached RL's peak {target:.3f} (best {best:.3f})" if best is not None
                       else "no eval rows")
    elif out["slow"]["fst"] == 0:
        out["note"] = "reached RL's peak with 0 slow rollouts (slow-only ratio undefined)"
    else:
        out["note"] = ""
    return out


def _kl_trajectory(run: Run) -> tuple[list[float], list[float]]:
    """(running-max eval reward, kl_rev) at steps that log both."""
    c = eval_curve(run, "step")
    pairs = [(p, k) for p, k in zip(c.peak, c.kl, strict=True) if k is not None]
    return [p for p, _ in pairs], [k for _, k in pairs]


def _kl_at(rewards: Sequence[float], kls: Sequence[float], level: float) -> float:
    """KL where the (non-decreasing) running-max reward first reaches `level`, linearly interpolated."""
    for i, r in enumerate(rewards):
        if r >= level - 1e-12:
            if i == 0 or rewards[i] == rewards[i - 1]:
                return float(kls[i])
            f = (level - rewards[i - 1]) / (rewards[i] - rewards[i - 1])
            return float(kls[i - 1] + f * (kls[i] - kls[i - 1]))
    return float(kls[-1])


def kl_at_matched_reward(rl: Run, fst: Run) -> dict:
    """KL(pi||base) of each run at the highest reward level both reach; ratio = fst / rl.

    Returns {"reward", "kl_rl", "kl_fst", "ratio", "note"}; values are None when either run lacks rows
    with both an eval and drift/kl_rev at the same step.
    """
    r_rl, k_rl = _kl_trajectory(rl)
    r_fst, k_fst = _kl_trajectory(fst)
    if not r_rl or not r_fst:
        return {"reward": None, "kl_rl": None, "kl_fst": None, "ratio": None,
                "note": "no rows with both eval reward and drift/kl_rev"}
    level = min(r_rl[-1], r_fst[-1])
    kl_rl, kl_fst = _kl_at(r_rl, k_rl, level), _kl_at(r_fst, k_fst, level)
    ratio = kl_fst / kl_rl if kl_rl > 0 else None
    return {"reward": level, "kl_rl": kl_rl, "kl_fst": kl_fst, "ratio": ratio,
            "note": "" if ratio is not None else "RL's KL is 0 at that level (ratio undefined)"}


@dataclass
class SigmoidFit:
    """ScaleRL curve R - R0 = (A - R0) / (1 + (C_mid / C)^B)."""

    A: float
    B: float
    C_mid: float
    R0: float
    success: bool
    rmse: float
    extrapolated: bool  # C_mid beyond the data: the asymptote is a guess, not a fit of the bend

    def predict(self, C: Sequence[float] | np.ndarray) -> np.ndarray:
        logc = np.log(np.asarray(C, dtype=float))
        return _sigmoid_logc(logc, self.A, self.B, math.log(self.C_mid), self.R0)


def _sigmoid_logc(logc: np.ndarray, A: float, B: float, log_cmid: float, R0: float) -> np.ndarray:
    # In log C the curve is a logistic; fitting log(C_mid) keeps the problem well scaled whatever C's units.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = np.clip(B * (log_cmid - logc), -60.0, 60.0)
        return R0 + (A - R0) / (1.0 + np.exp(z))


def _sigmoid_logc_jac(logc: np.ndarray, A: float, B: float, log_cmid: float, R0: float) -> np.ndarray:
    """d/d(A, B, log_cmid, R0) of :func:`_sigmoid_logc`: with s = 1/(1+e^z), ds/dz = -s(1-s)."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = B * (log_cmid - logc)
        s = 1.0 / (1.0 + np.exp(np.clip(z, -60.0, 60.0)))
    dz = -(A - R0) * s * (1.0 - s) * (np.abs(z) < 60.0)  # flat where the curve is clipped
    return np.stack([s, dz * (log_cmid - logc), dz * B, 1.0 - s], axis=1)


def fit_sigmoid(C: Sequence[float], R: Sequence[float]) -> SigmoidFit | None:
    """Fit the ScaleRL sigmoid to (compute C, reward R) points; None when it cannot be fit.

    Points with C <= 0 are dropped (the curve is R0 there by definition). Needs at least 4 distinct C
    values (4 parameters). Bounds: A, R0 in [0, 1], B in [0.05, 20], C_mid within 1e-3x..1e3x the data.
    Several starting midpoints are tried and the best least-squares fit is kept.
    """
    from scipy.optimize import curve_fit  # local import: scipy is slow to import and rarely needed

    c = np.asarray(C, dtype=float)
    r = np.asarray(R, dtype=float)
    ok = np.isfinite(c) & np.isfinite(r) & (c > 0)
    c, r = c[ok], r[ok]
    if len(np.unique(c)) < 4:
        return None
    logc = np.log(c)
    lo_c, hi_c = float(logc.min()), float(logc.max())
    lower = [0.0, 0.05, lo_c - math.log(1e3), 0.0]
    upper = [1.0, 20.0, hi_c + math.log(1e3), 1.0]
    r_lo, r_hi = float(np.clip(r.min(), 0, 1)), float(np.clip(r.max(), 0, 1))
    best = None
    for q in (0.25, 0.5, 0.75):
        p0 = [r_hi, 1.5, float(np.quantile(logc, q)), r_lo]
        p0 = [min(max(v, lo + 1e-9), hi - 1e-9) for v, lo, hi in zip(p0, lower, upper, strict=True)]
        try:
            with warnings.catch_warnings():
                # The covariance is unused; a flat curve makes scipy warn about it.
                warnings.simplefilter("ignore")
                # dogbox: a curve that rises and dips (an fst run's) kept trf cycling to maxfev (24 s per run in
                # the report, then no fit); dogbox converges in ~20-45 evaluations on the demo's curves, to the same
                # optimum where trf converged.
                params, _ = curve_fit(_sigmoid_logc, logc, r, p0=p0, bounds=(lower, upper), jac=_sigmoid_logc_jac,
                                      method="dogbox", maxfev=2000)
        except (RuntimeError, ValueError):
            continue
        rmse = float(np.sqrt(np.mean((_sigmoid_logc(logc, *params) - r) ** 2)))
        if best is None or rmse < best[1]:
            best = (params, rmse)
    if best is None:
        return None
    (A, B, log_cmid, R0), rmse = best
    finite = all(math.isfinite(v) for v in (A, B, log_cmid, R0))
    return SigmoidFit(A=float(A), B=float(B), C_mid=float(math.exp(log_cmid)), R0=float(R0),
                      success=finite, rmse=rmse, extrapolated=bool(log_cmid > hi_c))


# ---- intervals: what the data can carry -------------------------------------------------------------------
Z95 = 1.959963984540054


def eval_n(run: Run) -> int | None:
    """Problems per task of each evaluation: the summary's ``eval_n``, else the run's config.yaml ``eval.n``."""
    if isinstance(run.summary.get("eval_n"), int):
        return run.summary["eval_n"]
    cfg = run.path / "config.yaml"
    if cfg.exists():
        import yaml

        try:
            n = ((yaml.safe_load(cfg.read_text()) or {}).get("eval") or {}).get("n")
        except yaml.YAMLError:
            return None
        return int(n) if isinstance(n, int) else None
    return None


def reward_halfwidth(p: float, n: int | None, tasks: int = 1) -> float | None:
    """95% half-width of a mean reward in [0, 1] over ``n`` x ``tasks`` problems (Bernoulli variance p(1-p), the
    largest a [0, 1] reward with mean p can have, with Wilson's z^2/4N term so that 0 and 1 get a width too)."""
    if not n:
        return None
    big_n = n * max(tasks, 1)
    p = min(max(p, 0.0), 1.0)
    return Z95 * math.sqrt((p * (1 - p) + Z95**2 / (4 * big_n)) / big_n)


def _reach_x(curve: EvalCurve, level: float) -> float | None:
    i = _first_reach(curve, level)
    return None if i is None else curve.x[i]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return math.inf if b == 0 and a > 0 else (a / b if b else None)


def efficiency_interval(rl: Run, other: Run) -> dict:
    """The slow-rollout ratio's range when RL's peak R* is known only to +-h (eval n): from RL reaching R* - h and
    ``other`` needing R* + h (0 when it never gets there: the ratio could be any small value) to RL needing R* and
    ``other`` reaching R* - h. ``enough``: the range excludes 1."""
    c_rl, c_o = eval_curve(rl, "rollouts"), eval_curve(other, "rollouts")
    if not c_rl.reward or not c_o.reward:
        return {"interval": None, "halfwidth": None, "enough": False}
    target = c_rl.peak[-1]
    h = max(reward_halfwidth(target, eval_n(rl), len(rl.tasks)) or 0.0,
            reward_halfwidth(target, eval_n(other), len(other.tasks)) or 0.0) if eval_n(rl) or eval_n(other) else None
    if h is None:
        return {"interval": None, "halfwidth": None, "enough": False}
    slow_o = _reach_x(c_o, target + h)
    lo = 0.0 if slow_o is None else _ratio(_reach_x(c_rl, target - h), slow_o)
    hi = _ratio(_reach_x(c_rl, target), _reach_x(c_o, target - h))
    lo = 0.0 if lo is None else lo
    hi = math.inf if hi is None else hi
    return {"interval": [lo, hi], "halfwidth": h, "enough": not (lo <= 1.0 <= hi)}


def matched_kl_interval(rl: Run, other: Run, level: float | None) -> dict:
    """KL ratio other/RL when the matched reward ``level`` is known only to +-h: both trajectories read at
    level -+ h. ``enough``: the range excludes 1. Final KLs are given beside it (never interpolated)."""
    final = {"kl_rl": (rl.summary.get("drift") or {}).get("kl_rev"),
             "kl_other": (other.summary.get("drift") or {}).get("kl_rev")}
    r_rl, k_rl = _kl_trajectory(rl)
    r_o, k_o = _kl_trajectory(other)
    final["kl_rl"] = final["kl_rl"] if final["kl_rl"] is not None else (k_rl[-1] if k_rl else None)
    final["kl_other"] = final["kl_other"] if final["kl_other"] is not None else (k_o[-1] if k_o else None)
    final["ratio"] = _ratio(final["kl_other"], final["kl_rl"])
    n_rl, n_o = eval_n(rl), eval_n(other)
    if level is None or not r_rl or not r_o or not (n_rl or n_o):
        return {"interval": None, "halfwidth": None, "enough": False, "final": final}
    h = max(reward_halfwidth(level, n_rl, len(rl.tasks)) or 0.0, reward_halfwidth(level, n_o, len(other.tasks)) or 0.0)
    lo = _ratio(_kl_at(r_o, k_o, level - h), _kl_at(r_rl, k_rl, level + h))
    hi = _ratio(_kl_at(r_o, k_o, level + h), _kl_at(r_rl, k_rl, level - h))
    lo = 0.0 if lo is None else lo
    hi = math.inf if hi is None else hi
    return {"interval": [lo, hi], "halfwidth": h, "enough": not (lo <= 1.0 <= hi), "final": final}


def seed_interval(values: Sequence[float]) -> dict:
    """Mean over seeds and its 95% Student-t interval (None below two seeds)."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None]
    out: dict = {"mean": sum(xs) / len(xs) if xs else None, "seeds": len(xs), "ci": None}
    if len(xs) >= 2:
        sd = float(np.std(xs, ddof=1))
        half = float(t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def run_label(run: Run, runs: Sequence[Run]) -> str:
    """The method name, with the seed appended when several runs share a method."""
    same = [r for r in runs if r.method == run.method]
    if len(same) > 1:
        return f"{run.method}-s{run.seed}" if run.seed is not None else f"{run.method}-{run.path.name}"
    return run.method


def matrix_columns(summary: dict) -> list[str]:
    """Task names of the accuracy matrix's columns: the summary's `tasks`, else the stages' tasks in order."""
    if summary.get("tasks"):
        return [str(t) for t in summary["tasks"]]
    return list(dict.fromkeys(str(st.get("task")) for st in summary.get("stages") or []))


def _cl_of(run: Run, scenario: str = "task-aware") -> dict:
    """CL metrics recomputed from the matrix (base rewards in column order), else the summary's.
    ``scenario``: ``task-aware`` (``matrix``, ``cl``) or ``task-agnostic`` (``matrix_agnostic``, ``cl_agnostic``)."""
    agnostic = scenario == "task-agnostic"
    matrix = run.summary.get("matrix_agnostic" if agnostic else "matrix")
    stage_tasks = [str(st.get("task")) for st in run.summary.get("stages") or []]
    if matrix and stage_tasks:
        base_map = run.summary.get("base_rewards")
        base = base_map if isinstance(base_map, dict) and base_map else None
        try:
            return {"scenario": scenario, **continual_metrics(matrix, stage_tasks, base)}
        except (TypeError, ValueError, IndexError):
            pass
    return dict(run.summary.get("cl_agnostic" if agnostic else "cl") or {})


def compare_runs(runs: Sequence[Run]) -> dict:
    """All analyses across runs, keyed by label: per-run fits/finals plus each non-RL method vs `rl`.

    {"runs": {label: {method, seed, peak, final_eval, sigmoid, cl, drift, final}},
     "baseline": label of the RL run or None,
     "vs_rl": {label: {"sample_efficiency": ..., "kl_at_matched_reward": ...}}}
    """
    out: dict = {"runs": {}, "baseline": None, "vs_rl": {}}
    labels = {id(r): run_label(r, runs) for r in runs}
    for run in runs:
        c = eval_curve(run, "step")
        fit = fit_sigmoid(c.step, c.reward) if c.reward else None
        n = eval_n(run)

        def band(v: float | None, n: int | None = n, run: Run = run) -> list[float] | None:
            h = None if v is None else reward_halfwidth(v, n, len(run.tasks))
            return None if h is None else [max(0.0, v - h), min(1.0, v + h)]

        out["runs"][labels[id(run)]] = {
            "method": run.method,
            "seed": run.seed,
            "eval_n": n,
            "eval_tasks": len(run.tasks),
            "peak": c.peak[-1] if c.peak else None,
            "peak_ci": band(c.peak[-1] if c.peak else None),
            "final_eval": c.reward[-1] if c.reward else None,
            "final_eval_ci": band(c.reward[-1] if c.reward else None),
            "sigmoid": asdict(fit) if fit else None,
            "cl": _cl_of(run),
            "cl_agnostic": _cl_of(run, "task-agnostic"),
            "drift": run.summary.get("drift") or {},
            "final": run.summary.get("final") or {},
        }
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    out["by_method"] = {m: {k: seed_interval([out["runs"][labels[id(r)]][k] for r in rs]) for k in ("peak",
                                                                                                   "final_eval")}
                        for m, rs in by_method.items() if len(rs) > 1}
    rl = next((r for r in runs if r.method == "rl"), None)
    if rl is None:
        return out
    out["baseline"] = labels[id(rl)]
    for run in runs:
        if run.method == "rl":
            continue
        se, mk = sample_efficiency(rl, run), kl_at_matched_reward(rl, run)
        se["evidence"] = efficiency_interval(rl, run)
        mk["evidence"] = matched_kl_interval(rl, run, mk["reward"])
        out["vs_rl"][labels[id(run)]] = {"sample_efficiency": se, "kl_at_matched_reward": mk}
    return out

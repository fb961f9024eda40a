"""Analysis and continual-learning metrics on small hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastslow.analysis import (
    compare_runs,
    eval_curve,
    fit_sigmoid,
    kl_at_matched_reward,
    load_run,
    sample_efficiency,
)
from fastslow.stream import continual_metrics, normalise_stage_curves, stage_of, stage_spans

# --- continual-learning metrics -------------------------------------------------------------------------

# Rows = stages, columns = tasks. R[1][0] > R[0][0] so max-based forgetting differs from -BWT.
R = [
    [0.8, 0.1, 0.2],
    [0.9, 0.9, 0.3],
    [0.6, 0.4, 0.7],
]
STAGES = ["a", "b", "c"]
BASE = {"a": 0.1, "b": 0.2, "c": 0.1}


def test_continual_metrics_by_hand():
    m = continual_metrics(R, STAGES, BASE)
    assert m["acc"] == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.8) + (0.4 - 0.9)) / 2)  # -0.35
    assert m["per_task"]["a"]["forgetting"] == pytest.approx(0.9 - 0.6)
    assert m["per_task"]["b"]["forgetting"] == pytest.approx(0.9 - 0.4)
    assert m["per_task"]["c"]["forgetting"] is None  # trained in the last stage: nothing to forget yet
    assert m["forgetting"] == pytest.approx(0.4)
    assert m["fwt"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)  # 0.05


def test_continual_metrics_without_base_and_single_stage():
    assert continual_metrics(R, STAGES, None)["fwt"] is None
    one = continual_metrics([[0.5]], ["a"], {"a": 0.1})
    assert one["acc"] == pytest.approx(0.5)
    assert one["bwt"] is None and one["fwt"] is None and one["forgetting"] is None
    assert continual_metrics([], [], None)["acc"] is None


def test_stage_spans_and_normalisation():
    spans = stage_spans([{"task": "a", "steps": 10}, {"task": "b", "steps": 10}])
    assert spans == [(0, 10), (10, 20)]
    assert [stage_of(s, spans) for s in (0, 5, 10, 11, 20, 21)] == [0, 0, 0, 1, 1, None]
    curves = {
        "rl": {"a": [(0, 0.2), (10, 0.4), (20, 0.1)]},
        "fst": {"a": [(0, 0.1), (10, 0.8), (20, 0.5)]},
    }
    norm = normalise_stage_curves(curves, spans)
    # stage 0 peak on "a" is 0.8 (fst at step 10); stage 1 peak is 0.5 (fst at step 20).
    assert norm["rl"]["a"] == [(0, pytest.approx(0.25)), (10, pytest.approx(0.5)), (20, pytest.approx(0.2))]
    assert norm["fst"]["a"][1][1] == pytest.approx(1.0) and norm["fst"]["a"][2][1] == pytest.approx(1.0)
    zero = normalise_stage_curves({"rl": {"a": [(0, 0.0)]}}, spans)
    assert zero["rl"]["a"] == [(0, None)]


# --- learning curves --------------------------------------------------------------------------------------


def write_run(d: Path, method: str, rewards: list[float], kls: list[float], fast_per_step: int = 0,
              split_drift: bool = False) -> Path:
    """A run of len(rewards) steps on tasks t1/t2 (t1 = r - 0.1, t2 = r + 0.1, so their mean is r)."""
    d.mkdir(parents=True)
    lines = []
    for step, (r, kl) in enumerate(zip(rewards, kls, strict=True)):
        row = {"step": step, "rollouts": 8 * step if method != "gepa" else 0,
               "fast_rollouts": fast_per_step * step, "slow/loss": 0.1,
               "eval/t1/reward": r - 0.1, "eval/t2/reward": r + 0.1,
               "eval/t1/reward_seed_prompt": r - 0.2, "eval/t2/reward_seed_prompt": r}
        drift = {"drift/kl_rev": kl}
        if split_drift:
            lines += [json.dumps(row), json.dumps({"step": step, **drift})]
        else:
            lines.append(json.dumps({**row, **drift}))
    lines.append("{truncated")  # a run cut mid-write must still load
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": 0, "steps": len(rewards)}))
    return d


RL_REWARDS = [0.1, 0.3, 0.5, 0.4, 0.45]
RL_KL = [0.0, 0.1, 0.2, 0.3, 0.4]


def test_load_and_curve(tmp_path):
    run = load_run(write_run(tmp_path / "rl", "rl", RL_REWARDS, RL_KL, split_drift=True))
    assert run.method == "rl" and run.tasks == ["t1", "t2"]
    c = eval_curve(run, "rollouts")
    assert c.x == [0, 8, 16, 24, 32]
    assert c.reward == pytest.approx(RL_REWARDS)
    assert c.peak == pytest.approx([0.1, 0.3, 0.5, 0.5, 0.5])
    assert c.kl == pytest.approx(RL_KL)  # merged from separate rows sharing a step
    assert eval_curve(run, "rollouts", prompt="seed").reward == pytest.approx([r - 0.1 for r in RL_REWARDS])
    with pytest.raises(ValueError):
        eval_curve(run, "wallclock")
    empty = load_run(tmp_path / "nothing")
    assert empty.summary == {} and empty.rows == [] and eval_curve(empty).reward == []


def test_sample_efficiency_reached(tmp_path):
    rl = load_run(write_run(tmp_path / "rl", "rl", RL_REWARDS, RL_KL))
    fst = load_run(write_run(tmp_path / "fst", "fst", [0.1, 0.5, 0.55, 0.5, 0.6], RL_KL, fast_per_step=20))
    se = sample_efficiency(rl, fst)
    assert se["target"] == pytest.approx(0.5) and se["reached"]
    # RL first hits 0.5 at step 2 (16 slow rollouts); FST at step 1 (8 slow + 20 fast).
    assert se["slow"] == {"rl": 16, "fst": 8, "ratio": pytest.approx(2.0)}
    assert se["total"] == {"rl": 16, "fst": 28, "ratio": pytest.approx(16 / 28)}
    assert se["steps"]["ratio"] == pytest.approx(2.0)


def test_sample_efficiency_never_reached_and_matched_kl(tmp_path):
    rl = load_run(write_run(tmp_path / "rl", "rl", RL_REWARDS, RL_KL))
    fst_kl = [0, 0.02, 0.04, 0.06, 0.08]
    fst = load_run(write_run(tmp_path / "fst", "fst", [0.1, 0.3, 0.4, 0.42, 0.41], fst_kl))
    se = sample_efficiency(rl, fst)
    assert not se["reached"] and se["slow"]["ratio"] is None and se["total"]["ratio"] is None
    assert "never reached" in se["note"]
    mk = kl_at_matched_reward(rl, fst)
    # Matched level = min(0.5, 0.42). RL crosses 0.42 between (0.3, 0.1) and (0.5, 0.2): 0.1 + 0.6 * 0.1.
    assert mk["reward"] == pytest.approx(0.42)
    assert mk["kl_rl"] == pytest.approx(0.16)
    assert mk["kl_fst"] == pytest.approx(0.06)
    assert mk["ratio"] == pytest.approx(0.06 / 0.16)


def test_gepa_needs_no_slow_rollouts(tmp_path):
    rl = load_run(write_run(tmp_path / "rl", "rl", RL_REWARDS, RL_KL))
    gepa_rewards = [0.2, 0.5, 0.5, 0.5, 0.5]
    gepa = load_run(write_run(tmp_path / "gepa", "gepa", gepa_rewards, [0.0] * 5, fast_per_step=10))
    se = sample_efficiency(rl, gepa)
    assert se["reached"] and se["slow"]["fst"] == 0 and se["slow"]["ratio"] is None
    assert se["total"]["ratio"] == pytest.approx(16 / 10)
    assert "0 slow rollouts" in se["note"]
    assert kl_at_matched_reward(rl, gepa)["ratio"] == pytest.approx(0.0)


# --- sigmoid fit ------------------------------------------------------------------------------------------


def test_fit_sigmoid_recovers_parameters():
    A, B, C_mid, R0 = 0.7, 1.5, 50.0, 0.05
    C = np.arange(5, 400, 5, dtype=float)
    R = R0 + (A - R0) / (1 + (C_mid / C) ** B)
    fit = fit_sigmoid(C, R)
    assert fit is not None and fit.success and not fit.extrapolated
    assert fit.A == pytest.approx(A, abs=1e-2)
    assert fit.B == pytest.approx(B, abs=1e-2)
    assert fit.C_mid == pytest.approx(C_mid, rel=1e-2)
    assert fit.R0 == pytest.approx(R0, abs=1e-2)
    assert fit.predict([C_mid])[0] == pytest.approx((A + R0) / 2, abs=1e-3)


def test_fit_sigmoid_fits_a_curve_that_rises_then_dips():
    """An fst run's eval curve (quick demo, seed 0): the old fit ran to maxfev from every start and gave None."""
    C, R = [6, 12, 18, 24, 30, 36], [0.300, 0.264, 0.416, 0.398, 0.372, 0.338]
    fit = fit_sigmoid(C, R)
    assert fit is not None and fit.success
    assert fit.rmse < float(np.std(R))  # better than the flat line at the mean


def test_sigmoid_jacobian_matches_finite_differences():
    from fastslow.analysis import _sigmoid_logc, _sigmoid_logc_jac

    logc, params, h = np.log([3.0, 10.0, 30.0, 90.0]), np.array([0.6, 1.7, np.log(20.0), 0.1]), 1e-6
    numeric = np.stack([(_sigmoid_logc(logc, *(params + h * e)) - _sigmoid_logc(logc, *(params - h * e))) / (2 * h)
                        for e in np.eye(4)], axis=1)
    assert np.allclose(_sigmoid_logc_jac(logc, *params), numeric, atol=1e-6)


def test_fit_sigmoid_too_few_points():
    assert fit_sigmoid([10, 20], [0.1, 0.2]) is None
    assert fit_sigmoid([0, 0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5]) is None  # no C > 0


def test_compare_runs(tmp_path):
    runs = [
        load_run(write_run(tmp_path / "rl", "rl", RL_REWARDS, RL_KL)),
        load_run(write_run(tmp_path / "fst", "fst", [0.1, 0.5, 0.55, 0.5, 0.6], RL_KL, fast_per_step=20)),
    ]
    cmp = compare_runs(runs)
    assert cmp["baseline"] == "rl" and set(cmp["runs"]) == {"rl", "fst"}
    assert cmp["runs"]["fst"]["peak"] == pytest.approx(0.6)
    assert cmp["vs_rl"]["fst"]["sample_efficiency"]["slow"]["ratio"] == pytest.approx(2.0)
    json.dumps(cmp)  # must be serialisable as-is
    assert compare_runs(runs[1:])["vs_rl"] == {}

"""benchmarks/claims.py's statistics and verdict logic, on hand-made numbers (no training)."""

import importlib.util
import math
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("claims", Path(__file__).parents[1] / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(claims)


def _s(*values):
    return claims.spread(list(values), n_boot=200)


def _regime(se, reached, kl, d_rl, d_gepa, plast, first_rl, later, attr):
    return {
        "aggregate": {
            "fst_vs_rl": {"ratio_slow": _s(*se), "ratio_total": _s(*se), "kl_rev_ratio": _s(*kl),
                          "kl_fwd_ratio": _s(*kl), "reached_share": reached},
            "asymptote_gap": {"fst_minus_rl": _s(*d_rl), "fst_minus_gepa": _s(*d_gepa)},
        },
        "stream_aggregate": {
            "plasticity_auc": {k: _s(*v) for k, v in plast.items()},
            "first_stage_gain": {"rl": _s(*first_rl)},
            "later_stage_gain": {k: _s(*v) for k, v in later.items()},
            "attribution_fst": {k: _s(*v) for k, v in attr.items()},
        },
    }


def _verdicts(regime):
    out = claims.verdicts({"regimes": {"r": regime}})
    assert {v["regime"] for v in out} == {"r"} and all(v["evidence"] for v in out)
    return {v["claim"]: v["verdict"] for v in out}


def test_verdicts_reproduced_when_the_paper_holds():
    v = _verdicts(_regime(
        se=[2.0, 1.8, 2.5], reached=1.0, kl=[0.3, 0.4, 0.35], d_rl=[0.1, 0.12, 0.08], d_gepa=[0.2, 0.3, 0.25],
        plast={"base": [0.6, 0.62, 0.61], "fst": [0.59, 0.6, 0.62], "rl": [0.4, 0.42, 0.41]},
        first_rl=[0.5, 0.4, 0.45], later={"fst": [0.3, 0.35, 0.3], "rl": [0.05, 0.1, 0.0]},
        attr={"base_seed": [0.1] * 3, "base_evolved": [0.5] * 3, "trained_seed": [0.4] * 3,
              "trained_evolved": [0.7] * 3}))
    assert set(v.values()) == {"reproduced"}


def test_verdicts_partly_and_refuted():
    v = _verdicts(_regime(
        se=[1.2, 1.1, 1.3], reached=1 / 3, kl=[1.2, 1.5, 1.1], d_rl=[0.05, -0.05, 0.06], d_gepa=[-0.3, -0.2, -0.4],
        plast={"base": [0.6] * 3, "fst": [0.5, 0.45, 0.5], "rl": [0.4, 0.42, 0.41]},
        first_rl=[0.5, 0.4, 0.45], later={"fst": [0.1, 0.1, 0.1], "rl": [0.3, 0.3, 0.3]},
        attr={"base_seed": [0.1] * 3, "base_evolved": [0.8] * 3, "trained_seed": [0.4] * 3,
              "trained_evolved": [0.6] * 3}))
    assert v == {
        "sample efficiency 1.4-3x": "partly",  # faster on average, but FST rarely reached RL's peak
        "up to 70% less KL at matched reward": "refuted",  # FST drifted more
        "higher asymptote": "partly",  # mean gap > 0 but its CI includes 0, and GEPA alone is higher
        "plasticity base ~= FST > RL": "partly",  # above RL, but 0.1 below the base
        "RL stalls on later stages, FST keeps learning": "refuted",
        "both channels needed": "partly",  # beats trained+seed, not base+evolved
    }


def test_verdicts_refuted_when_numbers_are_missing():
    empty = _regime(se=[None], reached=0.0, kl=[None], d_rl=[None], d_gepa=[None],
                    plast={"base": [None], "fst": [None], "rl": [None]}, first_rl=[None],
                    later={"fst": [None], "rl": [None]},
                    attr={k: [None] for k in ("base_seed", "base_evolved", "trained_seed", "trained_evolved")})
    assert set(_verdicts(empty).values()) == {"refuted"}


def test_spread_and_bootstrap_ci():
    s = claims.spread([1.0, None, 3.0, 2.0], n_boot=500)
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert 1.0 <= s["ci"][0] <= 2.0 <= s["ci"][1] <= 3.0
    assert claims.spread([None, float("nan")])["mean"] is None


def test_spearman_rho_and_ci():
    x = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0]
    down = claims.spearman(x, [0.9, 0.8, 0.7, 0.5, 0.4, 0.1], n_boot=300)
    assert down["rho"] == pytest.approx(-1.0) and down["ci"][1] <= -0.5 and down["n"] == 6
    mixed = claims.spearman(x, [0.5, 0.1, 0.9, 0.2, 0.8, 0.3], n_boot=300)
    assert -0.5 < mixed["rho"] < 0.5 and mixed["ci"][0] < 0 < mixed["ci"][1]
    assert claims.spearman([1, 2], [3, 4])["rho"] is None  # too few points


def test_budget_held_reads_the_late_measurements():
    class R:
        summary = {"steps": 40}
        rows = [{"step": s, "drift/kl_rev": k, "slow/kl_coef": 0.1 * (s + 1)}
                for s, k in ((0, 0.0), (10, 0.5), (20, 0.2), (30, 0.1), (40, 0.1))]

    b = claims.budget_held(R(), target=0.1)
    assert b["final_ratio"] == pytest.approx(1.0)
    assert b["late_mean_abs_log_err"] == pytest.approx(math.log(2) / 3)  # 0.2, 0.1, 0.1 at steps >= 20
    assert b["late_max_ratio"] == pytest.approx(2.0) and b["final_kl_coef"] == pytest.approx(4.1)


def test_demo_mode_plans_only_the_demo_and_fills_the_readme_table(tmp_path):
    import json

    s, runs, probes = claims.demo_plan(claims.SETTINGS["full"], tmp_path, [0, 1])
    assert s["seeds"] == [0, 1] and claims.SETTINGS["full"]["seeds"] == [0, 1, 2]  # the settings are untouched
    assert sorted((j["method"], j["seed"]) for j in runs) == sorted((m, sd) for m in claims.METHODS for sd in (0, 1))
    assert {j["regime"] for j in runs} == {"prompt"} and all(claims.is_main_stream(j) for j in runs)
    assert sorted((p["arm"], p["seed"]) for p in probes) == sorted((a, sd) for a in ("base", *claims.PROBED)
                                                                   for sd in (0, 1))
    # the same run dirs as the full bench (which then reuses them), with the demo's stage length
    full_runs, _ = claims.plan(claims.SETTINGS["full"], tmp_path)
    assert {j["cfg"]["out"] for j in runs} <= {j["cfg"]["out"] for j in full_runs}
    assert all(st["steps"] == claims.SETTINGS["full"]["stage_steps"] for j in runs for st in j["cfg"]["stages"])

    stream = claims.regimes()["prompt"]["stream"]
    for j in runs:  # hand-made finished runs: final rewards 0.1 * (seed + 1) (+ 0.5 for fst)
        out = Path(j["cfg"]["out"])
        out.mkdir(parents=True)
        v = 0.1 * (j["seed"] + 1) + (0.5 if j["method"] == "fst" else 0.0)
        (out / "summary.json").write_text(json.dumps({
            "stages": [{"task": t, "steps": 90} for t in stream], "matrix": [[v] * len(stream)] * len(stream),
            "cl": {"acc": v, "bwt": -v, "fwt": 0.0, "forgetting": v}, "drift": {"kl_rev": 2 * v},
            "cl_agnostic": {"acc": v / 2, "bwt": -v, "fwt": 0.0, "forgetting": v}}))
        (out / "metrics.jsonl").write_text("\n".join(json.dumps({"step": st, **{f"eval/{t}/reward": v for t in stream}})
                                                     for st in (0, 90, 180, 270)))
    for p in probes:
        Path(p["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(p["out"] + ".json").write_text(json.dumps({"final": 0.3 + p["seed"], "auc": 0.2, "curve": []}))
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{claims.DEMO_START}\nold\n{claims.DEMO_END}\ntail\n")
    assert claims.update_project_readme(claims.demo_claims(s, runs, probes), readme)
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
    acc = next(line for line in text.splitlines() if line.startswith("| ACC (task-aware)"))
    assert acc == ("| ACC (task-aware) | 0.150 [0.100, 0.200] | 0.150 [0.100, 0.200] | 0.150 [0.100, 0.200] "
                   "| 0.650 [0.600, 0.700] | 0.150 [0.100, 0.200] |")
    acc = next(line for line in text.splitlines() if line.startswith("| ACC (task-agnostic)"))
    assert acc.startswith("| ACC (task-agnostic) | 0.075 [0.050, 0.100] |") and "0.325 [0.300, 0.350]" in acc
    assert "base 0.8 [0.3, 1.3] (n=2)" in text  # the base probe's final over seeds

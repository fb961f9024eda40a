"""benchmarks/claims.py's statistics and verdict logic, on hand-made numbers (no training)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("claims", Path(__file__).parents[1] / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(claims)


def _s(*values):
    return claims.spread(list(values), n_boot=200)


FULL = {"single_steps": 90, "eval_every": 10, "bootstrap": 200}  # 9 evals after step 0: resolves 1.4x
QUICK = {"single_steps": 8, "eval_every": 4, "bootstrap": 200}   # 2 evals: cannot


def _claims(seeds=3, settings=FULL, se=None, reached=None, bound=None, kl=None, peak=None, plateau=None,
            plast=None, gains=None, attr=None):
    """Hand-made claims.json of one regime with one task: per-seed lists (index = seed) for every number the
    verdicts read, plus the aggregates the pre-protocol rules read (so the same numbers run under both)."""
    ids = range(seeds)
    se = se or [2.0] * seeds
    reached = reached or [True] * seeds
    bound = bound or [0.5] * seeds
    kl = kl or [0.3] * seeds
    peak = peak or {"rl": [0.3] * seeds, "gepa": [0.2] * seeds, "fst": [0.5] * seeds}
    plateau = plateau or peak
    plast = plast or {"base": [0.6] * seeds, "rl": [0.3] * seeds, "fst": [0.6] * seeds}
    gains = gains or {"rl": ([0.4] * seeds, [0.0] * seeds), "fst": ([0.4] * seeds, [0.3] * seeds)}
    attr = attr or {"base_seed": [0.1] * seeds, "base_evolved": [0.3] * seeds, "trained_seed": [0.3] * seeds,
                    "trained_evolved": [0.6] * seeds}
    single = {"t": {"seeds": {str(i): {
        "methods": {m: {"peak": peak[m][i], "final": plateau[m][i], "plateau": plateau[m][i], "asymptote": None,
                        "eval_points": settings["single_steps"] // settings["eval_every"] + 1} for m in peak},
        "fst_vs_rl": {"reached": reached[i], "ratio_slow": se[i] if reached[i] else None,
                      "ratio_bound": None if reached[i] else bound[i],
                      "kl_rev_matched": {"ratio": kl[i]}, "kl_fwd_matched": {"ratio": kl[i]}}} for i in ids}}}
    stream_runs = {m: {str(i): {"stage_peaks": [{"gain": gains[m][0][i]}, {"gain": gains[m][1][i]}],
                                "plasticity": {"auc": plast[m][i]},
                                "attribution": {"t": {c: attr[c][i] for c in attr}} if m == "fst" else None}
                       for i in ids} for m in ("rl", "fst")}
    old_aggregate = {
        "fst_vs_rl": {"ratio_slow": _s(*[se[i] for i in ids if reached[i]]), "ratio_total": _s(None),
                      "kl_rev_ratio": _s(*kl), "kl_fwd_ratio": _s(*kl), "reached_share": sum(reached) / seeds},
        "asymptote_gap": {"fst_minus_rl": _s(*[peak["fst"][i] - peak["rl"][i] for i in ids]),
                          "fst_minus_gepa": _s(*[peak["fst"][i] - peak["gepa"][i] for i in ids])}}
    old_stream = {"plasticity_auc": {k: _s(*v) for k, v in plast.items()},
                  "first_stage_gain": {"rl": _s(*gains["rl"][0])},
                  "later_stage_gain": {m: _s(*gains[m][1]) for m in gains},
                  "attribution_fst": {c: _s(*v) for c, v in attr.items()}}
    return {"seeds": list(ids), "settings": settings, "regimes": {"r": {
        "single": single, "stream_runs": stream_runs, "base_plasticity": {str(i): {"auc": plast["base"][i]}
                                                                          for i in ids},
        "aggregate": old_aggregate, "stream_aggregate": old_stream}}}


CLAIMS = {"se": "sample efficiency 1.4-3x", "kl": "up to 70% less KL at matched reward", "asym": "higher asymptote",
          "plast": "plasticity base ~= FST > RL", "stall": "RL stalls on later stages, FST keeps learning",
          "both": "both channels needed"}


def _verdicts(c):
    out = claims.verdicts(c)
    assert {v["regime"] for v in out} == {"r"} and all(v["evidence"] for v in out)
    assert all(v["verdict"] in claims.VERDICTS for v in out)
    return {k: next(v["verdict"] for v in out if v["claim"] == name) for k, name in CLAIMS.items()}


def _noisy(center, spread=0.01):
    return [center - spread, center, center + spread]


def test_verdicts_reproduced_when_the_paper_holds_clearly():
    v = _verdicts(_claims(se=[2.0, 1.8, 2.5], kl=[0.3, 0.4, 0.35],
                          peak={"rl": _noisy(0.3), "gepa": _noisy(0.2), "fst": [0.5, 0.52, 0.49]},
                          plast={"base": [0.6, 0.62, 0.61], "fst": [0.59, 0.61, 0.6], "rl": [0.4, 0.42, 0.41]},
                          gains={"rl": (_noisy(0.4), [0.05, 0.02, 0.0]), "fst": (_noisy(0.4), [0.3, 0.35, 0.3])},
                          attr={"base_seed": [0.1] * 3, "base_evolved": _noisy(0.5), "trained_seed": _noisy(0.4),
                                "trained_evolved": [0.7, 0.72, 0.71]}))
    assert set(v.values()) == {"reproduced"}


def test_partly_never_contradicts_the_core_comparison():
    # The slow channel hurt (trained+evolved below base+evolved in every seed) and FST's asymptote is below RL's:
    # the old rules said "partly" (beats trained+seed; beats GEPA alone); the core comparisons say refuted.
    c = _claims(peak={"rl": [0.5, 0.52, 0.51], "gepa": _noisy(0.2), "fst": [0.4, 0.41, 0.42]},
                attr={"base_seed": [0.1] * 3, "base_evolved": [0.46, 0.47, 0.46], "trained_seed": _noisy(0.2),
                      "trained_evolved": [0.42, 0.43, 0.42]})
    v = _verdicts(c)
    assert v["both"] == "refuted" and v["asym"] == "refuted"
    old = {x["claim"]: x["verdict"] for x in _old_verdicts(c)}
    assert old[CLAIMS["both"]] == "partly" and old[CLAIMS["asym"]] == "partly"  # what the old rules said


def test_seeds_that_never_reach_rls_peak_count_as_censored():
    # One seed of three reached RL's peak with ratio 2; the other two never did (bound 0.5: RL reached its peak
    # half-way). The old rule averaged the reaching seed alone and said "partly".
    c = _claims(se=[2.0, None, None], reached=[True, False, False], bound=[None, 0.5, 0.5])
    out = claims.verdicts(c)
    se = next(x for x in out if x["claim"] == CLAIMS["se"])
    assert se["verdict"] not in ("reproduced", "partly") and "2 censored" in se["evidence"]
    assert se["core"]["values"][1] == pytest.approx(math.log(0.5))  # counted at its bound, not dropped
    assert {x["claim"]: x["verdict"] for x in _old_verdicts(c)}[CLAIMS["se"]] == "partly"


def test_a_comparison_inside_the_seed_noise_is_inconclusive():
    c = _claims(kl=[0.3, 1.5, 0.6], plast={"base": [0.6] * 3, "fst": [0.5, 0.2, 0.55], "rl": [0.3, 0.4, 0.35]})
    v = _verdicts(c)
    assert v["kl"] == "inconclusive" and v["plast"] == "inconclusive"
    old = {x["claim"]: x["verdict"] for x in _old_verdicts(c)}
    assert old[CLAIMS["kl"]] == "partly" and old[CLAIMS["plast"]] == "partly"
    assert _verdicts(_claims(seeds=1))["kl"] == "inconclusive"  # one seed: no margin at all


def test_quick_modes_eval_grid_cannot_resolve_the_ratio():
    assert _verdicts(_claims(settings=FULL, se=[2.0, 1.8, 2.2]))["se"] == "reproduced"
    out = claims.verdicts(_claims(settings=QUICK, se=[2.0, 1.8, 2.2]))
    assert out[0]["verdict"] == "inconclusive" and "cannot resolve" in out[0]["evidence"]
    assert claims.resolves(claims.SETTINGS["full"], claims.PROTOCOL["rules"]["sample_efficiency"]) == (True, 9)
    assert claims.resolves(claims.SETTINGS["quick"], claims.PROTOCOL["rules"]["sample_efficiency"]) == (False, 2)


def test_asymptote_uses_the_final_plateau_not_the_peak_when_no_sigmoid_fits():
    # FST spikes above RL once (peak) but ends below it (plateau): the old rule compared peaks
    c = _claims(peak={"rl": _noisy(0.4), "gepa": _noisy(0.2), "fst": _noisy(0.5)},
                plateau={"rl": [0.4, 0.41, 0.4], "gepa": _noisy(0.2), "fst": [0.3, 0.31, 0.3]})
    out = next(x for x in claims.verdicts(c) if x["claim"] == CLAIMS["asym"])
    assert out["verdict"] == "refuted" and "sigmoid A in 0 of 3" in out["evidence"]
    assert {x["claim"]: x["verdict"] for x in _old_verdicts(c)}[CLAIMS["asym"]] != "refuted"


def test_paired_interval_is_students_t():
    d = claims.paired([1.0, 2.0, 3.0])
    assert d["mean"] == 2.0 and d["n"] == 3
    assert d["ci"] == pytest.approx([2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)], rel=1e-5)
    assert claims.paired([1.0, None])["ci"] is None


def _old_verdicts(c):
    """The rules before protocol.yaml (commit 811623b), verbatim in effect, on the same hand-made numbers."""
    out = []
    for r in c["regimes"].values():
        agg, stream = r["aggregate"], r["stream_aggregate"]
        def m(d):
            return None if d is None else d.get("mean")

        ratio, reached = m(agg["fst_vs_rl"]["ratio_slow"]), agg["fst_vs_rl"]["reached_share"]
        se = ("reproduced" if ratio is not None and ratio >= 1.4 and reached >= 2 / 3 else
              "partly" if ratio is not None and ratio > 1.0 and reached > 0 else "refuted")
        k = m(agg["fst_vs_rl"]["kl_rev_ratio"])
        kl = "reproduced" if k is not None and k <= 0.5 else "partly" if k is not None and k < 1.0 else "refuted"
        d_rl, d_g = agg["asymptote_gap"]["fst_minus_rl"], agg["asymptote_gap"]["fst_minus_gepa"]
        asym = ("reproduced" if m(d_rl) is not None and d_rl["ci"][0] > 0 and (m(d_g) or 0) > 0 else
                "partly" if m(d_rl) is not None and (m(d_rl) > 0 or (m(d_g) or 0) > 0) else "refuted")
        p = stream["plasticity_auc"]
        b, f, rl = m(p["base"]), m(p["fst"]), m(p["rl"])
        plast = "reproduced" if f > rl and abs(b - f) <= 0.05 else "partly" if f > rl else "refuted"
        a = stream["attribution_fst"]
        both, wt, pr = m(a["trained_evolved"]), m(a["trained_seed"]), m(a["base_evolved"])
        ch = "reproduced" if both > wt and both > pr else "partly" if both > wt or both > pr else "refuted"
        out += [{"claim": CLAIMS[k_], "verdict": v_} for k_, v_ in
                (("se", se), ("kl", kl), ("asym", asym), ("plast", plast), ("both", ch))]
    return out


def test_spread_and_bootstrap_ci():
    s = claims.spread([1.0, None, 3.0, 2.0], n_boot=500)
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert 1.0 <= s["ci"][0] <= 2.0 <= s["ci"][1] <= 3.0
    assert claims.spread([None, float("nan")])["mean"] is None


def _points(rho_sign, seeds=3):
    pts = []
    for sd in range(seeds):
        for m, shift in (("rl", 1.0), ("fst", 0.0), ("gepa", None)):
            for i in range(4 if shift is not None else 1):
                kl = 0.0 if shift is None else shift + 0.1 * i + 0.01 * sd
                pts.append({"regime": "r", "method": m, "seed": sd, "kl_rev": kl, "kl_fwd": kl,
                            "plasticity_auc": 0.5 + rho_sign * 0.05 * i + 0.001 * sd, "forgetting": 0.0})
    return pts


def test_frontier_rho_pooled_within_and_partial_with_a_cluster_bootstrap():
    # Within each method plasticity rises with KL; between methods nothing: pooled mixes them, partial does not
    pts = _points(+1)
    pooled = claims.cluster_rho(pts, "kl_rev", "plasticity_auc", n_boot=200)
    partial = claims.cluster_rho(pts, "kl_rev", "plasticity_auc", n_boot=200, partial=True)
    within = claims.cluster_rho([p for p in pts if p["method"] == "rl"], "kl_rev", "plasticity_auc", n_boot=200)
    assert partial["rho"] > 0.9 and within["rho"] > 0.9 and pooled["rho"] < partial["rho"]
    assert pooled["n"] == 27 and pooled["seeds"] == 3 and pooled["ci"][0] <= pooled["rho"] <= pooled["ci"][1]
    # resampling seeds keeps a seed's runs together: with one seed there is no interval
    assert claims.cluster_rho([p for p in pts if p["seed"] == 0], "kl_rev", "plasticity_auc")["ci"] is None
    stats = claims.frontier_stats(pts, ["r"], 100)
    assert set(stats) == {f"r/{k}~{y}" for k in ("kl_rev", "kl_fwd") for y in ("plasticity_auc", "forgetting")}
    assert set(stats["r/kl_rev~plasticity_auc"]["within"]) == {"rl", "fst", "gepa"}


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


def test_a_changed_protocol_invalidates_cached_runs_and_probes(tmp_path):
    import yaml

    settings = {"seed": 0, "method": "rl"}
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "config.yaml").write_text(yaml.safe_dump(settings))
    sha = claims.protocol_sha256()
    assert len(sha) == 64 and not claims._finished_with(out, settings, sha)  # no marker: made before the protocol
    (out / "protocol.sha256").write_text(sha + "\n")
    assert claims._finished_with(out, settings, sha) and not claims._finished_with(out, settings, "0" * 64)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"final": 0.1, "auc": 0.1, "protocol": sha}))
    assert claims._cached(probe, sha) and claims._cached(probe, "0" * 64) is None
    runs, probes = claims.plan(claims.SETTINGS["quick"], tmp_path)
    assert {j["protocol"] for j in runs} == {p["protocol"] for p in probes} == {sha}
    claims.preregister(tmp_path / "root", "quick", sha)  # named before any run starts
    pre = json.loads((tmp_path / "root" / "claims.json").read_text())
    assert pre["protocol"]["sha256"] == sha and pre["status"] == "running"


def test_stream_entries_keep_the_task_agnostic_scenario_when_a_run_reports_it(tmp_path):
    from fastslow.analysis import Run

    jobs, loaded = [], {}
    for m, agnostic in (("fst", {"acc": 0.2, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.1}), ("rl", None)):
        out = str(tmp_path / f"{m}-full-kl0-s0")
        jobs.append({"kind": "stream", "regime": "r", "method": m, "seed": 0, "cfg": {"out": out}})
        summary = {"stages": [], "cl": {"acc": 0.5}, "drift": {}, **({"cl_agnostic": agnostic} if agnostic else {})}
        loaded[out] = Run(path=Path(out), summary=summary, rows=[])
    entries = claims.stream_entries("r", jobs, loaded, {}, {})
    assert entries["fst"]["0"]["cl_agnostic"]["acc"] == 0.2 and entries["fst"]["0"]["cl"]["acc"] == 0.5
    assert entries["rl"]["0"]["cl_agnostic"] is None


@pytest.mark.slow
def test_reverdict_decides_committed_results_again_without_running_anything(tmp_path):
    import shutil

    for name in ("claims.json", "frontier.json"):
        shutil.copy(claims.RESULTS / name, tmp_path / name)
    committed = json.loads((tmp_path / "claims.json").read_text())
    # whatever the committed results hold, one earlier verdict differs from what the numbers give now
    committed.pop("reverdict", None)
    committed["verdicts"][0] = {**committed["verdicts"][0], "verdict": "decided-before"}
    (tmp_path / "claims.json").write_text(json.dumps({**committed, "settings": {**committed["settings"],
                                                                                "bootstrap": 50}}))
    changes = claims.reverdict(tmp_path, tmp_path / "README.md")
    again = json.loads((tmp_path / "claims.json").read_text())
    assert again["protocol"]["sha256"] == claims.protocol_sha256()
    assert again["reverdict"]["before"] == committed["verdicts"]  # the original verdicts are kept
    assert [(c, r, now) for c, r, _, now in changes] == [(v["claim"], v["regime"], v["verdict"])
                                                        for v in again["verdicts"]]
    # no "partly" whose core comparison points the other way: its mean is on the claim's side
    for v in again["verdicts"]:
        if v["verdict"] == "partly":  # KL's core is log(FST/RL) < 0; the others' core is > 0
            assert v["core"]["ci"][1] < 0 if v["claim"].startswith("up to 70%") else v["core"]["ci"][0] > 0
    text = (tmp_path / "README.md").read_text()
    assert "(was decided-before)" in text and claims.protocol_sha256() in text
    points = json.loads((tmp_path / "frontier.json").read_text())["points"]
    assert {p["method"] for p in points} >= {"rl", "fst", "gepa"}  # zero-drift points join the frontier

"""benchmarks/real.py: the pre-registered dataset selection and the run plan, on the tiny model (no study run)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
_SPEC = importlib.util.spec_from_file_location("real", BENCH / "real.py")
real = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(real)


def test_selection_applies_the_rule_in_protocol_order_and_the_plan_covers_every_method_and_seed(
        tiny_model, tmp_path, monkeypatch):
    cands = ["rg:basic_arithmetic?max_terms=2&max_digits=1&extract=last_number", "rg:no_such_dataset_xyz",
             "rg:chain_sum?extract=last_number", "rg:leg_counting?extract=last_number"]
    cfg = {**real.REAL, "model": str(tiny_model), "max_new_tokens": 4, "threads": 1, "eval_n": 8, "train": 16,
           "select": {**real.REAL["select"], "candidates": cands, "min_base": 0.0, "max_base": 0.0,
                      "select_n": 3, "stream_len": 2, "heldout": 1}}
    monkeypatch.setattr(real, "REAL", cfg)
    sel = real.select(out=tmp_path / "sel.json")
    assert json.loads((tmp_path / "sel.json").read_text()) == sel
    by = {r["candidate"]: r for r in sel["scores"]}
    assert "error" in by["rg:no_such_dataset_xyz"]  # recorded, never fatal, never selected
    scored = [c for c in cands if "reward" in by[c]]
    assert all(by[c]["n"] == 3 and by[c]["qualifies"] == (by[c]["reward"] == 0.0) for c in scored)
    qualified = [c for c in cands if by[c].get("qualifies")]  # in the protocol's order, never by score
    assert sel["stream"] == qualified[:2] and sel["heldout"] == (qualified[2:3] or None)
    assert sel["complete"] == (len(qualified) >= 3)
    sel = {**sel, "stream": cands[:1] + cands[2:3], "heldout": cands[3:]}
    runs, probes, atts, skipped = real.plan(sel, tmp_path / "root")
    assert sorted((j["method"], j["seed"]) for j in runs) == sorted(
        (m, s) for m in cfg["methods"] + [m for m in cfg["optional_methods"] if m not in skipped]
        for s in cfg["seeds"])
    assert all(j["cfg"]["eval"]["n"] >= 128 or cfg["eval_n"] < 128 for j in runs)
    assert {p["arm"] for p in probes} == {"base", "rl", "fst"} and len(atts) == len(cfg["seeds"])
    assert all(len(j["cfg"]["stages"]) == 2 and "train=16&eval=8" in j["cfg"]["stages"][0]["task"] for j in runs)
    # every planned config is valid, and the study's own eval grid resolves a 1.4x ratio
    from fastslow.config import config_from_dict

    for j in runs:
        config_from_dict(j["cfg"])
    assert real.study.resolves({"single_steps": real.study.PROTOCOL["real"]["stage_steps"],
                                "eval_every": real.study.PROTOCOL["real"]["eval_every"]},
                               real.study.PROTOCOL["rules"]["sample_efficiency"])[0]
    c = real.cost(runs, probes, atts, 0.1)
    assert c["rollouts"] > 0 and c["hours_one_worker"] == c["rollouts"] * 0.1 / 3600


def test_analyse_reads_finished_stream_runs_as_the_study(tmp_path):
    """Hand-made finished runs of the plan: the first stage is each seed's single-task run, the verdicts are the
    micro study's (same rules), and an unfinished run is left out, never read."""
    import yaml

    cands = ["rg:chain_sum?extract=last_number", "rg:leg_counting?extract=last_number", "rg:gcd?extract=last_number",
             "rg:spell_backward"]
    sel = {"stream": cands[:3], "heldout": cands[3:]}
    runs, probes, atts, _ = real.plan(sel, tmp_path)
    runs = [j for j in runs if j["method"] in ("rl", "gepa", "fst")]
    sha, steps, every = real.study.protocol_sha256(), real.REAL["stage_steps"], real.REAL["eval_every"]
    tasks = ["chain_sum", "leg_counting", "gcd"]
    speed = {"rl": 0.005, "gepa": 0.0, "fst": 0.01}
    for j in runs[:-1]:  # the last one never finished
        out = Path(j["cfg"]["out"])
        out.mkdir(parents=True)
        m, sd = j["method"], j["seed"]
        rows = [{"step": st, "rollouts": 0 if m == "gepa" else 16 * st, "fast_rollouts": 0,
                 "drift/kl_rev": 0.0 if m == "gepa" else speed[m] * st * (2 if m == "rl" else 1),
                 **{f"eval/{t}/reward": min(1.0, 0.1 + speed[m] * st + 0.01 * sd) for t in tasks}}
                for st in range(0, 3 * steps + 1, every)]
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        matrix = [[0.2] * 3] * 3
        (out / "summary.json").write_text(json.dumps({
            "method": m, "seed": sd, "stages": [{"task": t, "steps": steps} for t in tasks], "tasks": tasks,
            "matrix": matrix, "cl": {"acc": 0.2, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0},
            "drift": {"kl_rev": rows[-1]["drift/kl_rev"]}}))
        (out / "config.yaml").write_text(yaml.safe_dump(real.study.config_dump(j["cfg"])))
        (out / "protocol.sha256").write_text(sha)
    claims = real.analyse(sel, runs, probes, atts)
    assert claims["finished_runs"] == len(runs) - 1 and claims["protocol"]["sha256"] == sha
    seeds = claims["regimes"]["real"]["single"]["chain_sum"]["seeds"]
    assert set(seeds) == {"0", "1"}  # seed 2 lacks its last run: no single-task comparison from it
    assert seeds["0"]["methods"]["fst"]["eval_points"] == steps // every + 1  # the first stage only
    assert len(claims["verdicts"]) == 6 and all(v["verdict"] in real.study.VERDICTS for v in claims["verdicts"])

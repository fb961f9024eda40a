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

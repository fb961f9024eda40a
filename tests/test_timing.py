import json

import pytest
from conftest import small_config

from fastslow.loop import train


def test_timing_json_has_per_phase_totals_and_per_step_lists(tiny_model, tmp_path):
    train(small_config(tiny_model, tmp_path / "r", method="fst", steps=2))
    timing = json.loads((tmp_path / "r" / "timing.json").read_text())
    steps = timing["per_step"]
    assert len(steps["step_s"]) == 2 and len(steps["sampling_s"]) == 2 and len(steps["update_s"]) == 2
    assert len(steps["round_s"]) == 1 and len(steps["drift_s"]) == 1  # fast.every=2, drift.every=2
    for phase, values in steps.items():
        assert timing["total_s"][phase] == sum(values) and all(v >= 0 for v in values)
    assert sum(steps["sampling_s"]) + sum(steps["update_s"]) <= sum(steps["slow_step_s"]) + 1e-6


@pytest.mark.slow  # builds the report (plots)
def test_summary_and_report_show_fast_channel_health(tiny_model, tmp_path):
    from fastslow.report import build_report

    summary = train(small_config(tiny_model, tmp_path / "r", method="fst", steps=2))
    fast = summary["fast"]
    assert fast["reflection_calls"] > 0 and fast["accepted_total"] >= 0 and fast["failed_reflection_calls"] == 0
    html = build_report([tmp_path / "r"], tmp_path / "r").read_text()
    assert "Fast channel health" in html

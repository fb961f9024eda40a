import json

import pytest

from fastslow.analysis import load_run
from fastslow.demo import METHODS, demo_config, run_demo
from fastslow.loop import train


def _rows(run_dir):
    """A run's metrics rows without its timings (the only values two identical runs may differ in)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_s") and k != "time"} for row in rows]


@pytest.mark.slow
def test_demo_pipeline_writes_runs_probes_attribution_and_report(tmp_path):
    """Two worker processes train the runs; rl and fst match the same configs trained one at a time here."""
    result = run_demo(tmp_path, stage_steps=2, probe_steps=2, eval_n=8, workers=2, log=lambda m: None)
    for method in ("rl", "fst"):
        alone = demo_config(method, quick=False, seed=0, out=tmp_path / "alone" / method, steps=2, eval_n=8)
        train(alone, log=lambda m: None)
        assert _rows(tmp_path / method) == _rows(tmp_path / "alone" / method)
    for method in METHODS:
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert load_run(tmp_path / method).method == method and len(summary["matrix"]) == 3  # one row per stage
        assert len(summary["matrix_agnostic"]) == 3
    for method in ("memory", "fst+memory"):
        assert (tmp_path / method / "memory" / "store.jsonl").is_file()
    plasticity = json.loads((tmp_path / "plasticity.json").read_text())
    assert set(plasticity["arms"]) == {"base", *METHODS}
    assert all(0 <= arm["final"] <= 1 and arm["curve"] for arm in plasticity["arms"].values())
    attribution = json.loads((tmp_path / "attribution.json").read_text())
    cells = attribution["fst"]["flip"]
    assert set(cells) == {"base_seed", "base_evolved", "trained_seed", "trained_evolved"}
    # the base weights with the seed prompt are the same model and prompt for every method
    assert len({attribution[m]["flip"]["base_seed"] for m in METHODS}) == 1
    html = (tmp_path / "report.html").read_text()
    assert result["report"].endswith("report.html") and "data:image/png;base64" in html


@pytest.mark.slow
def test_demo_of_some_methods_trains_probes_and_reports_only_those(tmp_path):
    """A demo of two methods into a folder that holds another demo's run: the probes, attribution and report
    cover the two chosen, not the run left there."""
    run_demo(tmp_path, methods=["fst"], stage_steps=2, probe_steps=2, eval_n=8, log=lambda m: None)
    result = run_demo(tmp_path, methods=["memory", "rl"], stage_steps=2, probe_steps=2, eval_n=8,
                      log=lambda m: None)
    assert result["methods"] == ["rl", "memory"]
    assert set(json.loads((tmp_path / "plasticity.json").read_text())["arms"]) == {"base", "rl", "memory"}
    assert set(json.loads((tmp_path / "attribution.json").read_text())) == {"rl", "memory"}
    assert set(json.loads((tmp_path / "analysis.json").read_text())["runs"]) == {"rl", "memory"}

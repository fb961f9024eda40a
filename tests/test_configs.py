from pathlib import Path

import pytest

from fastslow.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.total_steps > 0


def test_overrides_reach_nested_fields_and_list_items(tmp_path):
    cfg = load_config(CONFIGS[0], ["slow.lr=0.5", "stages.0.steps=3", "fast.reflector=micro"])
    assert cfg.slow.lr == 0.5 and cfg.stages[0].steps == 3

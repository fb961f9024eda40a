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


def test_demo_yaml_is_the_demo_s_fst_run(tmp_path):
    """configs/demo.yaml and `fastslow demo` have one set of settings: the file must equal what the demo runs."""
    from fastslow.demo import demo_config

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [f"out={tmp_path}"])
    assert shipped == demo_config("fst", quick=False, seed=0, out=tmp_path)

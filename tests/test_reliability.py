"""Fault injection: faulty reflection models and verifiers, non-finite losses, bad input, leaked secrets.

Every test runs the real loop on the tiny model the tests make; what is injected is named in each test.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import EchoTask, small_config
from safetensors.torch import load_file
from typer.testing import CliRunner

import fastslow.slow as slow
from fastslow.checkpoint import list_checkpoints
from fastslow.cli import app
from fastslow.loop import Trainer, TrainingError, train
from fastslow.reflect import GuardedReflector, ReflectionError
from fastslow.tasks import Problem, Verdict
from fastslow.util import redact

runner = CliRunner()
RELEASE = threading.Event()  # hung plug-ins wait on this; set at the end of the module so their threads end


@pytest.fixture(autouse=True, scope="module")
def _release_hung_threads():
    yield
    RELEASE.set()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- faulty reflection models ------------------------------------------------------------------------


def raising_reflector(prompt) -> str:
    raise ConnectionError("reflection endpoint unreachable")


def hanging_reflector(prompt) -> str:
    RELEASE.wait(30)
    return "```\ntoo late\n```"


def none_reflector(prompt):
    return None


def empty_reflector(prompt) -> str:
    return "   "


def number_reflector(prompt):
    return 42


@pytest.mark.parametrize("name", ["raising", "hanging", "none", "empty", "number"])
@pytest.mark.slow
def test_faulty_reflector_keeps_the_population_counts_and_the_run_finishes(tiny_model, tmp_path, name):
    cfg = small_config(tiny_model, tmp_path / "run", method="fst", steps=2, extra=[
        f"fast.reflector=test_reliability:{name}_reflector", "fast.reflection_timeout_s=0.1",
        "fast.reflection_retries=1", "fast.budget=40", "fast.preflight=false",  # the preflight would refuse it
    ])
    logs: list[str] = []
    t0 = time.perf_counter()
    summary = Trainer(cfg, log=logs.append).run()
    assert time.perf_counter() - t0 < 20  # a hung reflector costs timeouts, not the run
    assert summary["steps"] == 2
    round_row = next(r for r in _rows(tmp_path / "run") if "fast/reflection_errors" in r)
    assert round_row["fast/reflection_errors"] >= 2  # every try counted (retried once)
    assert round_row["fast/accepted"] == 0
    assert summary["prompts"] == [EchoTask.seed_prompt]  # nothing proposed: the population is what it was
    assert any("fast channel kept its population" in m and "reflection errors" in m for m in logs), logs


def test_guarded_reflector_rejects_garbage_and_gives_up_after_retries():
    calls = []

    def flaky(prompt):
        calls.append(prompt)
        return None if len(calls) == 1 else "```\nfine\n```"

    guard = GuardedReflector(flaky, retries=1, timeout_s=1)
    assert guard("p") == "```\nfine\n```" and guard.errors == 1 and guard.consecutive_failures == 0
    assert "NoneType" in guard.last_error
    guard = GuardedReflector(raising_reflector, retries=2, timeout_s=1)
    with pytest.raises(ReflectionError, match="after 3 tries.*unreachable") as info:
        guard("p")
    assert info.value.__cause__ is None  # the raw cause (which may quote a key) is not chained
    assert guard.errors == 3 and guard.consecutive_failures == 1


# ---- a verifier that hangs inside a full run ---------------------------------------------------------


class HangingVerifier(EchoTask):
    """Hangs on every fourth problem (train and eval), scores the rest."""

    def verify(self, problem: Problem, completion: str) -> Verdict:
        if int(problem.id.rsplit("-", 1)[1]) % 4 == 0:
            RELEASE.wait(30)
        return Verdict(0.5, "ok")


def hanging_verifier_task() -> HangingVerifier:
    return HangingVerifier("hang")


@pytest.mark.slow
def test_a_hanging_verifier_inside_a_run_times_out_and_is_counted(tiny_model, tmp_path, monkeypatch):
    cfg = small_config(tiny_model, tmp_path / "run", method="fst", steps=2,
                       task="test_reliability:hanging_verifier_task", extra=["verify_timeout_s=0.05"])
    t0 = time.perf_counter()
    summary = train(cfg)
    assert time.perf_counter() - t0 < 30
    assert summary["steps"] == 2 and summary["verifier_errors"] > 0
    last = _rows(tmp_path / "run")[-1]
    assert last["slow/verifier_errors"] == summary["verifier_errors"]


# ---- non-finite loss and gradient --------------------------------------------------------------------


def _inject(monkeypatch, kind: str) -> None:
    real = slow.policy_loss

    def faulty(logp, *args, **kwargs):
        loss, stats = real(logp, *args, **kwargs)
        if kind == "nan_loss":
            return loss * float("nan"), stats
        logp.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
        return loss, stats

    monkeypatch.setattr(slow, "policy_loss", faulty)


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
def test_a_non_finite_update_is_skipped_counted_and_leaves_weights(tiny_model, tmp_path, monkeypatch, kind):
    _inject(monkeypatch, kind)
    out = tmp_path / "run"
    summary = train(small_config(tiny_model, out, method="rl", steps=2))
    assert summary["steps"] == 2
    rows = [r for r in _rows(out) if "slow/loss" in r]
    assert [r["slow/nonfinite_skipped"] for r in rows] == [1.0, 2.0]
    assert summary["drift"]["weight_l2"] == 0.0
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(list_checkpoints(out / "checkpoints")[-1] / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer_state = torch.load(list_checkpoints(out / "checkpoints")[-1] / "trainer.pt", weights_only=False)
    assert trainer_state["optimizer"]["state"] == {}  # AdamW never stepped: no moments poisoned either


def test_a_transient_nan_is_survived(tiny_model, tmp_path, monkeypatch):
    real, calls = slow.policy_loss, []

    def nan_once(*args, **kwargs):
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * math.nan if len(calls) == 2 else loss), stats

    monkeypatch.setattr(slow, "policy_loss", nan_once)
    summary = train(small_config(tiny_model, tmp_path / "run", method="rl", steps=3))
    assert summary["steps"] == 3 and summary["drift"]["weight_l2"] > 0
    assert [r.get("slow/nonfinite_skipped") for r in _rows(tmp_path / "run") if "slow/loss" in r] == [None, 1.0, None]


def test_a_persistent_nan_stops_the_run_with_a_clear_message(tiny_model, tmp_path, monkeypatch):
    _inject(monkeypatch, "nan_loss")
    with pytest.raises(TrainingError, match=r"non-finite for 5 consecutive steps at step 4.*last good checkpoint"):
        train(small_config(tiny_model, tmp_path / "run", method="rl", steps=8))
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step_000004"


def test_cli_persistent_nan_exits_1_with_one_line(tiny_model, tmp_path, monkeypatch):
    _inject(monkeypatch, "nan_loss")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: rl\nmodel: {{path: '{tiny_model}'}}\nstages: [{{task: 'conftest:vowel_task', steps: 6}}]\n"
                   "slow: {batch_problems: 2, group_size: 4, max_new_tokens: 6}\neval: {n: 4}\n"
                   "drift: {probe_size: 2, max_new_tokens: 6}\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "non-finite for 5 consecutive steps" in errors[0], result.output


# ---- bad input ---------------------------------------------------------------------------------------


def _one_line_error(result, *fragments) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _cfg(tmp_path: Path, model: Path, task: str = "conftest:vowel_task", extra: str = "") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: rl\nmodel: {{path: '{model}'}}\nstages: [{{task: '{task}', steps: 2}}]\n{extra}")
    return cfg


def test_bad_task_files_exit_2_naming_the_problem(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _one_line_error(runner.invoke(app, ["run", str(_cfg(tmp_path, tiny_model, f"jsonl:{empty}")),
                                        "--out", str(tmp_path / "r1")]), "empty.jsonl", "no usable lines")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"}\n{oops\n')
    _one_line_error(runner.invoke(app, ["run", str(_cfg(tmp_path, tiny_model, f"jsonl:{bad}")),
                                        "--out", str(tmp_path / "r2")]), "bad.jsonl", "line 3")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80\n")
    _one_line_error(runner.invoke(app, ["run", str(_cfg(tmp_path, tiny_model, f"jsonl:{binary}")),
                                        "--out", str(tmp_path / "r3")]), "binary.jsonl")
    for r in ("r1", "r2", "r3"):
        assert not (tmp_path / r).exists()


@pytest.mark.parametrize(
    ("body", "args", "fragments"),
    [
        ("- just\n- a list\n", [], ["top level must be a mapping"]),
        (None, ["--set", "slow.lr"], ["expected key=value"]),
        (None, ["--set", "slow.group_size=1"], ["slow.group_size"]),
        (None, ["--set", "fast.reflector=no_such_module:thing", "--set", "method=fst",
                "--set", "fast.population=2", "--set", "slow.group_size=4"], ["fast.reflector", "no_such_module"]),
        (None, ["--set", "stages.0.task=no_such_module:task"], ["no_such_module"]),
    ],
)
def test_more_bad_input_exits_2_with_one_line(tiny_model, tmp_path, body, args, fragments):
    cfg = _cfg(tmp_path, tiny_model)
    if body is not None:
        cfg.write_text(body)
    _one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r"), *args]), *fragments)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_an_out_path_that_is_a_file_exits_2(tiny_model, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    _one_line_error(runner.invoke(app, ["run", str(_cfg(tmp_path, tiny_model)), "--out", str(tmp_path / "afile")]),
                    "not a directory")
    assert (tmp_path / "afile").read_text() == "keep me"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("flags", "override", "fragment"),
    [
        ([], None, "already holds a run"),  # no --resume/--force: refused
        (["--force"], "stages.0.task=jsonl:/no/such/file.jsonl", "file.jsonl"),  # --force, but a bad task file
        (["--force"], "model.path=/no/such/model", "/no/such/model"),  # --force, but a missing model
        (["--force"], "slow.lr=-1", "slow.lr"),  # --force, but an impossible value
        (["--resume"], "stages.0.steps=-3", "stages.0.steps"),  # --resume, but a negative step count
    ],
)
@pytest.mark.slow
def test_a_refused_command_leaves_an_existing_run_untouched_byte_for_byte(tiny_model, tmp_path, flags, override,
                                                                          fragment):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_model)
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    before = _snapshot(out)
    assert "metrics.jsonl" in before and any(k.startswith("checkpoints/") for k in before)
    args = ["run", str(cfg), "--out", str(out), *flags] + (["--set", override] if override else [])
    _one_line_error(runner.invoke(app, args), fragment)
    assert _snapshot(out) == before


# ---- secrets -----------------------------------------------------------------------------------------

SECRET = "sk-test-SECRET123"
SEEN_PROMPTS: list[str] = []


def leaky_reflector(prompt) -> str:
    """Fails every other call quoting the key (as API clients do); otherwise echoes what it was shown,
    so anything secret in the reflection prompt would end up in the evolved prompt and the run dir."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    SEEN_PROMPTS.append(text)
    if len(SEEN_PROMPTS) % 2:
        raise PermissionError(f"401: invalid api key {os.environ['OPENAI_API_KEY']} for org")
    current = text.split("```", 2)[1].strip()
    return f"```\n{current} {text[-400:]}\n```"


class LeakyVerifier(EchoTask):
    """Raises quoting the key on some problems (its feedback then reaches the reflection model)."""

    def verify(self, problem: Problem, completion: str) -> Verdict:
        if int(problem.id.rsplit("-", 1)[1]) % 3 == 0:
            raise RuntimeError(f"grader auth failed with token {os.environ['OPENAI_API_KEY']}")
        return Verdict(0.5, f"output {completion!r}")


def leaky_task() -> LeakyVerifier:
    return LeakyVerifier("leaky")


def test_redact_masks_secret_env_values_and_key_shapes():
    env = {"OPENAI_API_KEY": "abcdef123456", "HF_TOKEN": "tok-zzzzzzzz", "MY_SECRET": "hunter22", "SHORT_KEY": "1",
           "HOME": "/root"}
    text = "keys abcdef123456 tok-zzzzzzzz hunter22 sk-proj-AbC123xyz and hf_" + "a" * 30 + " 1 /root"
    out = redact(text, env)
    for secret in ("abcdef123456", "tok-zzzzzzzz", "hunter22", "sk-proj-AbC123xyz", "hf_aaaa"):
        assert secret not in out
    assert out.endswith(" 1 /root")  # short values and ordinary env vars are left alone


@pytest.mark.slow
def test_api_keys_never_reach_the_run_dir_logs_or_the_reflection_model(tiny_model, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    SEEN_PROMPTS.clear()
    out = tmp_path / "run"
    cfg = small_config(tiny_model, out, method="fst", steps=4, task="test_reliability:leaky_task", extra=[
        "fast.reflector=test_reliability:leaky_reflector", "fast.reflection_retries=1", "fast.budget=24",
        "fast.preflight=false",  # the preflight refuses a reflector whose first call fails (tested elsewhere)
    ])
    logs: list[str] = []
    summary = Trainer(cfg, log=logs.append).run()
    assert summary["steps"] == 4 and summary["verifier_errors"] > 0
    assert len(SEEN_PROMPTS) >= 2 and any("verifier error" in p for p in SEEN_PROMPTS)  # the faults did happen
    assert any("reflection errors" in m for m in logs)
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and (b"SECRET123" in p.read_bytes())]
    assert not leaks, leaks
    assert not any("SECRET123" in m for m in logs + SEEN_PROMPTS)
    captured = capfd.readouterr()
    assert "SECRET123" not in captured.out + captured.err

"""Kill a real ``fastslow run`` with SIGKILL at seeded random points, resume it, and get the uninterrupted run.

Kill points are chosen by kind, then placed at a random occurrence:
- ``round``: while a GEPA round is running (its scratch dir ``.fastslow-gepa-*`` exists in the run dir);
- ``checkpoint``: while a checkpoint is being written (``checkpoints/.tmp-*`` exists; the writer is held
  there by the ``FASTSLOW_CHECKPOINT_DELAY_S`` fault hook so the window is wide enough to hit);
- ``step``: a random delay after a metrics row appears (lands in a slow step, eval or drift, whatever runs);
- ``anytime``: a random delay after the process starts (may land in start-up, before any checkpoint).
Where each kill actually landed is read from the disk after the kill (the scratch dirs survive a SIGKILL).

Plus unit tests of damaged checkpoints: detected with a clear message, the previous good one used.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastslow.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    latest_good_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from fastslow.cli import app
from fastslow.config import load_config
from fastslow.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 14
KILL_PLAN = ["round", "checkpoint", "step", "anytime", "round"]


def _config(tmp_path: Path, model: Path) -> Path:
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(
        f"""method: fst
model: {{path: '{model}'}}
stages: [{{task: 'conftest:vowel_task', steps: {STEPS}}}]
slow: {{batch_problems: 4, group_size: 4, max_new_tokens: 8, lr: 0.01, warmup_steps: 0}}
fast: {{every: 2, population: 2, budget: 8, val_size: 4, reflector: 'conftest:canned_reflector'}}
drift: {{every: 2, probe_size: 4, max_new_tokens: 8}}
eval: {{every: 2, n: 8}}
checkpoint_every: 2
threads: 1
seed: 3
"""
    )
    return cfg


def _start(cfg: Path, out: Path, *, ckpt_delay: float | None = None) -> subprocess.Popen:
    # This checkout's source first: the venv's installed fastslow may be another checkout's.
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "PATH": "/usr/bin:/bin"}
    if ckpt_delay:
        env["FASTSLOW_CHECKPOINT_DELAY_S"] = str(ckpt_delay)
    return subprocess.Popen(
        [sys.executable, "-m", "fastslow.cli", "run", str(cfg), "--out", str(out), "--resume"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait(proc: subprocess.Popen, cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` every 5 ms until true (True) or the process exits / time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def _occurrences(proc: subprocess.Popen, present, n: int) -> bool:
    """Wait for the n-th time ``present()`` turns true (edges: each round / checkpoint write counts once)."""
    for i in range(n):
        if not _wait(proc, present):
            return False
        if i < n - 1 and not _wait(proc, lambda: not present()):
            return False
    return True


def _leftovers(out: Path) -> tuple[set[str], set[str]]:
    """Names of GEPA round scratch dirs and unsealed checkpoint dirs now in the run dir."""
    ckpts = out / "checkpoints"
    tmp = {t.name for t in ckpts.glob(".tmp-*") if not (t / MANIFEST).exists()} if ckpts.is_dir() else set()
    return {g.name for g in out.glob(".fastslow-gepa-*")}, tmp


def _landed(out: Path, before: tuple[set[str], set[str]], rows_before: int) -> str:
    """Where a kill landed, from what it left on disk (scratch dirs survive SIGKILL)."""
    gepa, tmp = _leftovers(out)
    if tmp - before[1]:
        return "mid-checkpoint"
    if gepa - before[0]:
        return "mid-round"
    return "start-up" if _rows(out) == rows_before else "mid-step"


def _last_step(out: Path) -> int | None:
    try:
        ckpt = latest_good_checkpoint(out / "checkpoints", warn=lambda m: None)
    except CheckpointError:
        return None
    return None if ckpt is None else int(ckpt.name.removeprefix("step_"))


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(out / "checkpoints")[-1] / "model" / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    cfg = _config(tmp_path, tiny_model)
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_config(cfg, [f"out={full}"]))  # the uninterrupted reference, same seed and settings

    rng = random.Random(20260)
    plan = KILL_PLAN[:]
    rng.shuffle(plan)
    log: list[tuple[str, str, int | None]] = []
    for kind in plan:
        before = _last_step(killed)
        leftovers = _leftovers(killed)
        proc = _start(cfg, killed, ckpt_delay=0.25 if kind == "checkpoint" else None)
        start_rows = 0 if before is None else before + 1  # rows kept on resume: row 0 + one per step done
        if kind == "round":
            hit = _occurrences(proc, lambda old=leftovers[0]: bool(_leftovers(killed)[0] - old), rng.randint(1, 2))
        elif kind == "checkpoint":
            hit = _occurrences(proc, lambda old=leftovers[1]: bool(_leftovers(killed)[1] - old), rng.randint(1, 2))
        elif kind == "step":
            target = start_rows + rng.randint(1, 3)
            hit = _wait(proc, lambda target=target: _rows(killed) >= target)
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            time.sleep(rng.uniform(0.3, 4.5))
            hit = proc.poll() is None
        if proc.poll() is not None:  # finished (or failed) before the kill point came
            out, err = proc.communicate()
            assert proc.returncode == 0, err[-3000:]
            log.append((kind, "finished first", before))
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        log.append((kind, _landed(killed, leftovers, start_rows) if hit else "missed", before))

    proc = _start(cfg, killed)  # resume until done
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    print("kill points (kind, landed, last good checkpoint step before):", log)

    landed = [where for _, where, _ in log]
    assert len(landed) >= 4 and "mid-checkpoint" in landed and "mid-round" in landed, log
    assert (killed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    s_full, s_killed = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert s_killed == s_full
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # nothing half-written is left behind once the run is complete
    assert not list((killed / "checkpoints").glob(".tmp-*")) and not list(killed.glob(".fastslow-gepa-*"))


# ---- damaged checkpoints ---------------------------------------------------------------------------


def _fake_ckpt(root: Path, step: int) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (tmp / "state.json").write_text(json.dumps({"loop": {"step": step}, "pad": "x" * 100}))

    return save_checkpoint(root, step, write, keep=5)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_weights_byte", "checksum mismatch in model/model.safetensors"),
        ("truncate_state", "checksum mismatch in state.json"),
        ("drop_manifest", f"no {MANIFEST}"),
        ("drop_state", "missing file state.json"),
        ("garble_manifest", f"unreadable {MANIFEST}"),
    ],
)
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage, message):
    root = tmp_path / "checkpoints"
    good, bad = _fake_ckpt(root, 2), _fake_ckpt(root, 4)
    if damage == "flip_weights_byte":
        f = bad / "model" / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[100] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate_state":
        f = bad / "state.json"
        f.write_bytes(f.read_bytes()[:20])
    elif damage == "drop_manifest":
        (bad / MANIFEST).unlink()
    elif damage == "drop_state":
        (bad / "state.json").unlink()
    else:
        (bad / MANIFEST).write_text('{"format": 1, "fi')
    warnings: list[str] = []
    assert latest_good_checkpoint(root, warn=warnings.append) == good
    assert len(warnings) == 1 and "step_000004" in warnings[0] and message in warnings[0], warnings
    assert "falling back" in warnings[0]


def test_unknown_format_version_is_rejected(tmp_path):
    root = tmp_path / "checkpoints"
    _good, future = _fake_ckpt(root, 2), _fake_ckpt(root, 4)
    meta = json.loads((future / MANIFEST).read_text())
    meta["format"] = FORMAT_VERSION + 1
    (future / MANIFEST).write_text(json.dumps(meta))
    problem = verify_checkpoint(future)
    assert problem and "unknown checkpoint format" in problem and f"reads format {FORMAT_VERSION}" in problem
    warnings: list[str] = []
    with pytest.raises(CheckpointError, match="newer than this fastslow"):  # never skipped, then overwritten
        latest_good_checkpoint(root, warn=warnings.append)


def test_a_damaged_checkpoint_is_replaced_and_pruned_like_any_other(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_ckpt(root, 2)
    damaged = _fake_ckpt(root, 4)
    (damaged / MANIFEST).write_text('{"format": 1, "fi')  # resume falls back to step 2, then reaches step 4 again
    assert save_checkpoint(root, 4, lambda tmp: (tmp / "state.json").write_text("{}"), keep=5) == damaged
    assert verify_checkpoint(damaged) is None
    (damaged / MANIFEST).write_text("{")
    for step in (6, 8):
        _fake_ckpt(root, step)
    save_checkpoint(root, 10, lambda tmp: (tmp / "state.json").write_text("{}"), keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000008", "step_000010"]


def test_a_half_written_temp_dir_is_never_listed(tmp_path):
    root = tmp_path / "checkpoints"
    good = _fake_ckpt(root, 2)
    (root / ".tmp-step_000004-123").mkdir()
    (root / ".tmp-step_000004-123" / "state.json").write_text("{")
    assert latest_good_checkpoint(root, warn=pytest.fail) == good
    _fake_ckpt(root, 6)  # the next successful write sweeps the leftovers of a killed writer
    assert not list(root.glob(".tmp-*"))


def test_resume_when_every_checkpoint_is_bad_exits_2_and_keeps_the_run(tiny_model, tmp_path):
    from conftest import small_config

    out = tmp_path / "run"
    train(small_config(tiny_model, out, method="rl", steps=4))
    for ckpt in list_checkpoints(out / "checkpoints"):
        f = ckpt / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-7])
    snapshot = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_good_checkpoint(out / "checkpoints", warn=lambda m: None)

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"method: rl\nmodel: {{path: '{tiny_model}'}}\nstages: [{{task: 'conftest:vowel_task', steps: 4}}]\n"
    )
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "--resume"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "no usable checkpoint" in result.output and "step_000004: checksum mismatch" in result.output
    assert "--force" in result.output
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == snapshot

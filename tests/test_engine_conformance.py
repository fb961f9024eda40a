"""Engine conformance: every registered engine held to ``native`` on what a run reports.

Unit level (``fastslow selftest --engine E --json``, :mod:`fastslow.conformance`): the lr of each update equal;
the drift meter on the same weights equal to 1e-5 (both KL directions, weight distance, entropy; full weights and
LoRA); with the objectives on one definition (``conformance.ALIGNED``) the whole first update vector and the
step's metrics equal to 1e-4 (full/LoRA x kl_coef 0/0.01).

Run level, 5 steps each, objectives aligned. The matrix {full, LoRA} x {kl_coef 0, 0.01} x {1, 2 processes}
x {uninterrupted, kill -9 then --resume} is covered pairwise by four cells (a resumed cell also runs
uninterrupted, to compare the bytes):

    cell              weights  kl_coef  processes  resume
    full-kl0-1p       full     0        1          yes     rows vs native 1e-4, lr equal, bytes equal
    lora-kl.01-1p     LoRA     0.01     1          yes     rows vs native 1e-4, lr equal, bytes equal
    full-kl.01-2p     full     0.01     2          yes     lr equal, bytes equal, ranks' weights equal
    lora-kl0-2p       LoRA     0        2          no      lr equal, ranks' weights equal

A 2-process run's checkpoints record each rank's weight hash (``engine.json``); the run stops if they differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastslow import registry

ROOT = Path(__file__).resolve().parents[1]
ENGINES = sorted(name for name in registry.listing()["engines"] if name != "native")
CELLS = {  # name: (lora, kl_coef, processes, killed and resumed)
    "full-kl0-1p": (False, 0.0, 1, True),
    "lora-kl.01-1p": (True, 0.01, 1, True),
    "full-kl.01-2p": (False, 0.01, 2, True),
    "lora-kl0-2p": (True, 0.0, 2, False),
}
STEPS = 5


def _config(dir: Path, model: Path, engine: str, lora: bool, kl_coef: float) -> Path:
    path = dir / f"{engine}-{'lora' if lora else 'full'}-{kl_coef}.yaml"
    path.write_text(f"""method: rl
engine: {engine}
model: {{path: '{model}'{", lora: {r: 4}" if lora else ""}}}
stages: [{{task: 'conformance_tasks:killable_vowel_task', steps: {STEPS}}}]
slow: {{batch_problems: 2, group_size: 4, max_new_tokens: 6, lr: 0.01, warmup_steps: 2, kl_coef: {kl_coef},
       loss_aggregation: tokens, weight_decay: 0.0, temperature: 1.0}}
scale: {{advantages: native, kl_bias_correction: false}}
drift: {{every: {STEPS}, probe_size: 2, max_new_tokens: 6}}
eval: {{every: {STEPS}, n: 4}}
checkpoint_every: 2
threads: 1
seed: 0
""")
    return path


def _start(cfg: Path, out: Path, processes: int, *extra: str, kill_after: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("FASTSLOW_TEST_KILL_AFTER", None)
    if kill_after is not None:
        env["FASTSLOW_TEST_KILL_AFTER"] = str(kill_after)
    launch = ["launch", "--nproc", "2"] if processes == 2 else ["run"]
    cmd = [sys.executable, "-m", "fastslow.cli", *launch, str(cfg), "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(*procs: subprocess.Popen, ok: bool = True) -> None:
    for proc in procs:
        code = proc.wait(timeout=600)
        err = proc.stderr.read()[-3000:]
        assert (code == 0) == ok, err


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_rel(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference between two runs' metrics rows (same steps and keys required)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x["step"], sorted(set(x) ^ set(y)))
        for k in x:
            if isinstance(x[k], float) or isinstance(y[k], float):
                scale = max(abs(x[k]), abs(y[k]))
                worst = max(worst, 0.0 if scale == 0 else abs(x[k] - y[k]) / scale)
            else:
                assert x[k] == y[k], (x["step"], k)
    return worst


def _lr_gap(rows: list[dict], reference: list[dict]) -> float:
    """Largest relative gap of ``slow/lr`` to ``reference`` on the steps where both updated; each run must also
    follow the one definition (update k uses lr * min(1, k / warm-up)) from its own count of updates."""
    updates, gap = 0, 0.0
    for row, ref in zip(rows[1:], reference[1:], strict=True):
        if "slow/lr" not in row:  # every group flat: no update (as native)
            assert row["slow/zero_var_groups"] == 2.0, row
            continue
        updates += 1
        assert row["slow/lr"] == pytest.approx(0.01 * min(1.0, updates / 2), rel=1e-12), row
        if "slow/lr" in ref:
            scale = max(row["slow/lr"], ref["slow/lr"])
            gap = max(gap, abs(row["slow/lr"] - ref["slow/lr"]) / scale)
    return gap


@pytest.fixture(scope="module", params=ENGINES)
def matrix(request, tiny_model, tmp_path_factory) -> dict:
    """Every cell's runs for one engine (two 1-process runs at a time: two cores); the measured numbers."""
    engine, base = request.param, tmp_path_factory.mktemp(f"conformance-{request.param}")
    cfg = {name: _config(base, tiny_model, engine, lora, kl) for name, (lora, kl, _, _) in CELLS.items()}
    ref = {name: _config(base, tiny_model, "native", lora, kl) for name, (lora, kl, n, _) in CELLS.items() if n == 1}
    runs = {name: base / name for name in CELLS}
    cut = {name: base / f"{name}-cut" for name, cell in CELLS.items() if cell[3]}
    one = [name for name, cell in CELLS.items() if cell[2] == 1]
    for name in one:  # the engine and native side by side
        _wait(_start(cfg[name], runs[name], 1), _start(ref[name], base / f"{name}-native", 1))
    killed = [_start(cfg[name], cut[name], 1, kill_after=cut[name] / "checkpoints" / "step_000002") for name in one]
    _wait(*killed, ok=False)  # SIGKILL at step 3
    _wait(*[_start(cfg[name], cut[name], 1, "--resume") for name in one])
    for name, (_, _, processes, resume) in CELLS.items():
        if processes == 2:
            _wait(_start(cfg[name], runs[name], 2))
            if resume:
                _wait(_start(cfg[name], cut[name], 2, kill_after=cut[name] / "checkpoints" / "step_000002"), ok=False)
                _wait(_start(cfg[name], cut[name], 2, "--resume"))
    return {"engine": engine, "runs": runs, "cut": cut, "native": {n: base / f"{n}-native" for n in one}}


@pytest.mark.slow
def test_conformance_matrix(matrix):
    """Each cell's measured differences to native (printed: the matrix the issue asks for), then the verdicts."""
    native_lr = _rows(matrix["native"]["full-kl0-1p"])
    report = {}
    for name, (_, _, processes, resume) in CELLS.items():
        rows = _rows(matrix["runs"][name])
        reference = _rows(matrix["native"][name]) if processes == 1 else native_lr
        cell: dict = {"lr_gap": _lr_gap(rows, reference)}
        if processes == 1:
            cell["rows_max_rel_vs_native"] = _max_rel(rows, _rows(matrix["native"][name]))
        if resume:
            whole = (matrix["runs"][name] / "metrics.jsonl").read_bytes()
            resumed = matrix["cut"][name] / "metrics.jsonl"
            cell["resume_bytes_identical"] = resumed.read_bytes() == whole
        if processes == 2:
            digests = [json.loads((c / "engine.json").read_text())["weights_sha256"]
                       for c in sorted((matrix["runs"][name] / "checkpoints").glob("step_*"))]
            cell["checkpoints"] = len(digests)
            cell["ranks_identical"] = all(len(d) == 2 and d[0] == d[1] for d in digests) and bool(digests)
            assert json.loads((matrix["runs"][name] / "summary.json").read_text())["world_size"] == 2
        report[name] = cell
    print(f"\nconformance matrix ({matrix['engine']} vs native):\n" + json.dumps(report, indent=1))
    for name, cell in report.items():
        assert cell["lr_gap"] == 0.0, (name, cell)
        assert cell.get("rows_max_rel_vs_native", 0.0) <= 1e-4, (name, cell)
        assert cell.get("resume_bytes_identical", True), (name, cell)
        assert cell.get("ranks_identical", True), (name, cell)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_selftest_meets_every_tolerance(engine):
    """lr per update, drift on the same weights (1e-5), first update with objectives aligned (1e-4), the
    experience memory's store and contexts after two rounds (identical)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "fastslow.cli", "selftest", "--engine", engine, "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    checks = json.loads(done.stdout)
    print("\n" + "\n".join(f"{c['name']:<13} {c['cell']:<12} {c['max_rel']:.3g}" for c in checks))
    assert {c["name"] for c in checks} == {"lr", "drift", "first_update", "memory"}
    assert {c["cell"] for c in checks if c["name"] == "first_update"} == {"full kl=0", "full kl=0.01", "lora kl=0",
                                                                          "lora kl=0.01"}
    assert all(c["ok"] for c in checks), checks
    assert done.returncode == 0


def test_resuming_under_another_process_count_is_an_event_row(tmp_path):
    """A checkpoint written by 1 process, resumed by 2: the run says so in its metrics (issue 21 item 4)."""
    from types import SimpleNamespace

    from fastslow.config import load_config
    from fastslow.preflight import ReflectionHealth
    from fastslow.record import LoopState, RunRecord

    class Stub:
        name, sharding, is_main, slow, fast = "stub", None, True, None, None

        def __init__(self, world_size: int) -> None:
            self.world_size, self.policy = world_size, SimpleNamespace(version=0)

        def save(self, directory: Path) -> None:
            (directory / "engine.json").write_text("{}")

        def load(self, directory: Path) -> None:
            pass

    cfg = load_config(None, ["stages=[{task: 'conftest:vowel_task', steps: 2}]", f"out={tmp_path / 'r'}"])
    (tmp_path / "r").mkdir()
    record = RunRecord(tmp_path / "r", cfg, main=True, log=lambda m: None)
    record.start()
    state = LoopState(step=2)
    record.log_row(state, 2, {"slow/lr": 0.1})
    record.save(state, Stub(1), ReflectionHealth(0))
    ckpt = next((tmp_path / "r" / "checkpoints").glob("step_*"))
    again = RunRecord(tmp_path / "r", cfg, main=True, log=lambda m: None)
    again.restore(ckpt, Stub(2), ReflectionHealth(0), finished_stages=lambda step: 0, changes={})
    events = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) if "event" in r]
    assert events == [{"step": 2, "event": "resume_world_size_changed", "from": 1, "to": 2}]


def test_a_checkpoint_older_than_the_new_options_resumes_at_their_defaults():
    """Configs saved before slow.loss_aggregation / scale.advantages / ... existed: those fields at their default
    are what the older version did, not a change; set otherwise they are refused."""
    from fastslow.config import ConfigError, load_config, resume_changes

    new = load_config(None, ["stages=[{task: 'conftest:vowel_task', steps: 2}]"]).model_dump(mode="json")
    old = {**new, "slow": {k: v for k, v in new["slow"].items() if k != "loss_aggregation"},
           "scale": {k: v for k, v in new["scale"].items() if k not in ("advantages", "kl_bias_correction")}}
    assert resume_changes(old, new, 1) == {}
    other = load_config(None, ["stages=[{task: 'conftest:vowel_task', steps: 2}]", "scale.advantages=native"])
    with pytest.raises(ConfigError, match="scale.advantages"):
        resume_changes(old, other.model_dump(mode="json"), 1)

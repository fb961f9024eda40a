"""Thread hygiene: how many threads, passive waiting, pool shares, and the 'machine busy' note."""

import io
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from fastslow import threads

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert threads.usable_cpus() == 3
    assert threads.choose(None, cpus=threads.usable_cpus(), env={}) == 3


@pytest.mark.parametrize(("requested", "env", "cpus", "workers", "want"), [
    (None, {}, 8, 1, 8),  # all usable CPUs
    (None, {}, 8, 3, 2),  # a pool worker's share
    (None, {}, 2, 4, 1),  # never 0
    (None, {"OMP_NUM_THREADS": "3"}, 8, 1, 3),  # the user's choice wins
    (None, {"OMP_NUM_THREADS": ""}, 4, 1, 4),  # empty = unset
    (None, {"OMP_NUM_THREADS": "x"}, 4, 1, 4),  # nonsense = unset
    (6, {"OMP_NUM_THREADS": "3"}, 2, 2, 6),  # --threads / threads: win over everything
])
def test_thread_choice(requested, env, cpus, workers, want):
    assert threads.choose(requested, cpus=cpus, env=env, workers=workers) == want


def test_hygiene_sets_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 6)
    env: dict[str, str] = {}
    assert threads.hygiene(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "6"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    assert threads.hygiene(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    env = {}
    threads.hygiene(env, workers=4)
    assert env["OMP_NUM_THREADS"] == "1"


def test_the_cli_sets_passive_waiting_before_torch_loads():
    code = ("import os, sys; import fastslow.cli; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = SRC
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wait, num, cpus = out.stdout.split()
    assert wait == "PASSIVE" and num == cpus
    # torch loads after the CLI module's first lines: nothing imported torch before the settings were made
    code = "import sys; import fastslow.threads; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    code = "import os, fastslow.cli; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def _probe(_: int) -> tuple[int, str]:
    import torch

    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]


def test_each_pool_worker_gets_its_share():
    with ProcessPoolExecutor(2, initializer=threads.worker_init, initargs=(3,)) as pool:
        assert list(pool.map(_probe, range(2))) == [(3, "3"), (3, "3")]


@pytest.mark.parametrize(("load", "cpus", "want"), [(7.0, 2, True), (3.5, 2, True), (2.4, 2, False),
                                                    (0.1, 1, False), (64.0, 64, False), (90.0, 64, True)])
def test_busy_machine(load, cpus, want):
    assert threads.busy(load, cpus) is want


def test_load_note_names_load_and_cpus(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.2, 5.0, 3.0))
    assert threads.load_note(2) == "machine busy: 2 CPUs, load 7.2"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert threads.load_note(2) is None


def test_the_progress_line_says_when_the_machine_is_busy(tiny_model, tmp_path, monkeypatch):
    from conftest import small_config
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from fastslow.cli import run_config

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    out = io.StringIO()
    progress = Progress(TextColumn("{task.fields[info]}"), console=Console(file=out, width=200), auto_refresh=False)
    with progress:
        run_config(small_config(tiny_model, tmp_path / "run", method="rl", steps=1), progress=progress)
    assert "machine busy: 2 CPUs, load 9.0" in out.getvalue()


def test_a_small_model_trains_on_one_thread_unless_the_user_chose(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.WAIT, "PASSIVE")  # restored afterwards, as NUM is
        monkeypatch.delenv(threads.NUM, raising=False)
        monkeypatch.setattr(threads, "_CHOSEN", {})
        threads.hygiene()  # fastslow's own default: one thread per usable CPU
        torch.set_num_threads(2)
        assert threads.fit_model(threads.SMALL_MODEL_PARAMS) == 2  # not small: every thread
        assert threads.fit_model(500_000) == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "_CHOSEN", {})
        monkeypatch.setenv(threads.NUM, "2")  # the user's
        assert threads.fit_model(500_000) == 2
    finally:
        torch.set_num_threads(before)

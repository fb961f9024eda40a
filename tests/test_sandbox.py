"""The sandbox for untrusted code, and the codeio task that uses it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fastslow.tasks import load_task
from fastslow.tasks.codeio import CodeIOTask, expected_outputs
from fastslow.tasks.sandbox import network_isolation, run_untrusted


def test_a_normal_program_reads_stdin_and_prints():
    r = run_untrusted("import sys\nprint(sys.stdin.read().upper())", "hello")
    assert r.ok and r.stdout == "HELLO\n" and r.returncode == 0 and not r.timed_out and r.error is None


def test_a_crash_inside_the_code_is_a_normal_result():
    r = run_untrusted("print('before')\n1/0")
    assert r.returncode == 1 and r.error is None and not r.ok and not r.timed_out
    assert r.stdout == "before\n" and "ZeroDivisionError" in r.stderr and 'snippet.py", line 2' in r.stderr


def test_an_infinite_loop_times_out_and_its_children_die(tmp_path):
    marker = tmp_path / "alive"
    child = f"import time, pathlib\nwhile True:\n    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(0.05)\n"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    t0 = time.perf_counter()
    r = run_untrusted(code, timeout_s=1, cpu_s=10)
    assert r.timed_out and r.returncode is None and "timed out" in r.error
    assert time.perf_counter() - t0 < 4
    assert marker.exists()  # the grandchild did run
    marker.unlink()
    time.sleep(0.3)
    assert not marker.exists()  # the grandchild was killed with the process group


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    r = run_untrusted("while True:\n    pass", timeout_s=20, cpu_s=1)
    assert not r.timed_out and r.error and "cpu time limit" in r.error


def test_a_memory_bomb_is_stopped():
    t0 = time.perf_counter()
    r = run_untrusted("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))", memory_mb=256)
    assert time.perf_counter() - t0 < 5
    assert r.returncode != 0 and "MemoryError" in r.stderr and "memory limit" in r.error


def test_the_network_is_unreachable():
    code = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('connected')"
    r = run_untrusted(code, timeout_s=10)
    assert "connected" not in r.stdout and r.returncode == 1 and "Error" in r.stderr
    assert network_isolation() in ("namespace", "preamble")


def test_without_namespaces_the_preamble_disables_sockets(monkeypatch):
    import fastslow.tasks.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_unshare_works", lambda: False)
    r = run_untrusted("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('connected')")
    assert r.returncode == 1 and "network access is disabled" in r.stderr and "connected" not in r.stdout
    assert run_untrusted("print(input())", "still works").stdout == "still works\n"


def test_output_is_capped():
    r = run_untrusted("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", output_limit_kb=64)
    assert len(r.stdout) <= 64 * 1024 and "size limit" in r.error


def test_writes_stay_in_a_scratch_dir_that_is_deleted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = (
        "import os, pathlib\n"
        "pathlib.Path('out.txt').write_text('data')\n"
        "os.makedirs('sub/deep')\n"
        "os.chmod('sub', 0o500)\n"  # a read-only dir must not stop the clean-up
        "print(os.getcwd())\n"
        "print(os.environ['HOME'] == os.getcwd(), os.environ['TMPDIR'] == os.getcwd())\n"
    )
    r = run_untrusted(code)
    assert r.ok, r.stderr
    scratch = Path(r.stdout.splitlines()[0])
    assert scratch != tmp_path and r.stdout.splitlines()[1] == "True True"
    assert not scratch.exists()  # deleted afterwards
    assert list(tmp_path.iterdir()) == []  # nothing landed in the parent's working dir


def test_the_environment_carries_no_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    r = run_untrusted("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OPENAI_API_KEY'))")
    assert r.ok and "SECRET123" not in r.stdout and "OPENAI_API_KEY" not in r.stdout


def test_the_parent_never_crashes_on_bad_input():
    assert run_untrusted("print(").returncode == 1  # syntax error: a result, not an exception
    assert run_untrusted("import os\nos.kill(os.getpid(), 9)").error == "killed by SIGKILL"
    r = run_untrusted("print('x')", memory_mb=1)  # too little memory even to start: reported, not raised
    assert not r.ok and (r.error or r.returncode)
    assert run_untrusted("raise SystemExit(3)").returncode == 3


# ---- codeio --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codeio() -> CodeIOTask:
    return load_task("codeio")


def test_codeio_is_deterministic_disjoint_and_sized(codeio):
    train, eval_ = codeio.problems("train"), codeio.problems("eval")
    assert len(train) == 300 and len(eval_) == 60
    assert not {p.prompt for p in train} & {p.prompt for p in eval_}
    again = CodeIOTask()
    assert [p.prompt for p in again.problems("eval")] == [p.prompt for p in eval_]
    assert all(p.answer for p in train + eval_)


def test_codeio_answers_are_what_the_code_prints(codeio):
    p = codeio.problems("train")[7]
    r = run_untrusted(p.meta["code"], p.meta["stdin"])
    assert r.stdout.rstrip() == p.answer
    assert expected_outputs([("print(int(input()) * 2)", "21")]) == ["42\n"]


def test_codeio_verifier_scores_right_partial_and_wrong(codeio):
    p = next(p for p in codeio.problems("train") if p.answer.count("\n") >= 2)
    lines = p.answer.splitlines()
    assert codeio.verify(p, p.answer).reward == 1.0
    assert codeio.verify(p, f"```\n{p.answer}\n```").reward == 1.0  # fences are not part of the output
    assert codeio.verify(p, f"Output: {p.answer}  ").reward == 1.0
    partial = codeio.verify(p, "\n".join(lines[:-1] + ["nope"]))
    assert partial.reward == pytest.approx((len(lines) - 1) / len(lines))
    assert "Expected output" in partial.feedback and "nope" in partial.feedback
    wrong = codeio.verify(p, "something else entirely")
    assert wrong.reward == 0.0 and p.answer in wrong.feedback
    too_long = codeio.verify(p, p.answer + "\nextra")
    assert too_long.reward == pytest.approx(len(lines) / (len(lines) + 1))


def test_sandbox_leaves_no_scratch_dirs_behind():
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).glob("fastslow-sandbox-*")}
    run_untrusted("open('x', 'w').write('y')")
    run_untrusted("while True: pass", timeout_s=0.5)
    after = {p.name for p in Path(tempfile.gettempdir()).glob("fastslow-sandbox-*")}
    assert after <= before
    assert os.getcwd()  # the parent's state is intact

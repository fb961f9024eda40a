"""The sandbox for untrusted code, and the codeio task that uses it."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from fastslow.tasks import load_task
from fastslow.tasks.codeio import CodeIOTask, expected_outputs
from fastslow.tasks.sandbox import isolation, network_isolation, run_untrusted


def test_a_normal_program_reads_stdin_and_prints():
    r = run_untrusted("import sys\nprint(sys.stdin.read().upper())", "hello")
    assert r.ok and r.stdout == "HELLO\n" and r.returncode == 0 and not r.timed_out and r.error is None


def test_a_crash_inside_the_code_is_a_normal_result():
    r = run_untrusted("print('before')\n1/0")
    assert r.returncode == 1 and r.error is None and not r.ok and not r.timed_out
    assert r.stdout == "before\n" and "ZeroDivisionError" in r.stderr and 'snippet.py", line 2' in r.stderr


def _running(marker: str) -> list[int]:
    """Host pids of processes whose command line holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_an_infinite_loop_times_out_and_its_children_die():
    marker = f"alive-{uuid.uuid4().hex}"
    child = f"import time\n{marker!r}\nwhile True:\n    time.sleep(0.05)\n"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    t0 = time.perf_counter()
    r = run_untrusted(code, timeout_s=1, cpu_s=10)
    assert r.timed_out and r.returncode is None and "timed out" in r.error
    assert time.perf_counter() - t0 < 4
    time.sleep(0.3)
    assert _running(marker) == []  # the grandchild was killed too


@pytest.mark.slow
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


def test_without_isolation_untrusted_code_is_refused_unless_unsafe_is_allowed(monkeypatch):
    import fastslow.tasks.sandbox as sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda: "none")
    monkeypatch.delenv("FASTSLOW_ALLOW_UNSAFE_EXEC", raising=False)
    refused = run_untrusted("print('ran')")
    assert refused.stdout == "" and "refusing to run untrusted code" in refused.error
    assert "\n" not in refused.error and "allow_unsafe_execution" in refused.error
    r = run_untrusted("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('connected')",
                      allow_unsafe=True)
    assert r.returncode == 1 and "network access is disabled" in r.stderr and "connected" not in r.stdout
    monkeypatch.setenv("FASTSLOW_ALLOW_UNSAFE_EXEC", "1")
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


# ---- hostile programs (issue 10, case 5): each must be contained where isolation works -------------------

needs_isolation = pytest.mark.skipif(isolation() == "none", reason="no isolation mechanism on this machine")


@pytest.fixture
def victim_dir():
    """A world-writable directory outside the sandbox's scratch (like another run's directory, or /dev/shm)."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path.cwd()
    d = base / f"fastslow-victim-{uuid.uuid4().hex}"
    d.mkdir()
    d.chmod(0o777)
    (d / "metrics.jsonl").write_text("precious\n")
    (d / "metrics.jsonl").chmod(0o666)
    (d / "root-only").write_text("secret-bytes\n")
    (d / "root-only").chmod(0o600)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@needs_isolation
def test_hostile_reading_a_root_only_file_is_contained(victim_dir):
    code = (f"for p in ['/etc/shadow', {str(victim_dir / 'root-only')!r}]:\n"
            "    try:\n        print(open(p).read()[:20])\n"
            "    except OSError as e:\n        print('denied', e.errno)\n")
    r = run_untrusted(code)
    assert r.ok, r.stderr
    assert "secret-bytes" not in r.stdout and "root:" not in r.stdout
    assert r.stdout.count("denied") == 2


@needs_isolation
def test_hostile_writing_and_deleting_outside_scratch_is_contained(victim_dir):
    target = victim_dir / "metrics.jsonl"
    code = (
        "import os\n"
        f"for action in (lambda: open({str(target)!r}, 'a').write('x'), lambda: os.unlink({str(target)!r}),\n"
        f"               lambda: open({str(victim_dir / 'new')!r}, 'w').write('x'),\n"
        "               lambda: open('/var/tmp/fastslow-escape', 'w').write('x')):\n"
        "    try:\n        action()\n        print('done')\n"
        "    except OSError as e:\n        print('blocked', e.errno)\n"
    )
    r = run_untrusted(code)
    assert r.ok, r.stderr
    assert "done" not in r.stdout and r.stdout.count("blocked") == 4
    assert target.read_text() == "precious\n" and sorted(p.name for p in victim_dir.iterdir()) == [
        "metrics.jsonl", "root-only"]
    assert not Path("/var/tmp/fastslow-escape").exists()


@needs_isolation
def test_hostile_fork_bomb_is_capped_and_every_process_dies():
    marker = f"bomb-{uuid.uuid4().hex}"
    code = (
        "import os, sys, time\n"
        f"sys.argv.append({marker!r})\n"
        "n = 0\n"
        "for _ in range(400):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "    n += 1\n"
        "print(n)\n"
    )
    r = run_untrusted(code, timeout_s=20, max_processes=16)
    assert r.ok, r.stderr
    assert int(r.stdout) < 16  # the process-count limit holds (as root too)
    time.sleep(0.3)
    assert _running(marker) == []  # none of them outlived the call


@needs_isolation
@pytest.mark.slow
def test_hostile_setsid_survivor_does_not_outlive_the_call(victim_dir):
    marker = f"survivor-{uuid.uuid4().hex}"
    survivor = f"import time\n{marker!r}\ntime.sleep(1.5)\nopen({str(victim_dir / 'late')!r}, 'w').write('x')\n"
    code = (f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {survivor!r}], start_new_session=True,"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint('left')\n")
    r = run_untrusted(code)
    assert r.ok and r.stdout == "left\n", r.stderr
    assert _running(marker) == []
    time.sleep(2)
    assert not (victim_dir / "late").exists()


@needs_isolation
def test_hostile_socket_has_no_network():
    code = ("import socket\nfor addr in [('1.1.1.1', 53), ('127.0.0.1', 22)]:\n    try:\n"
            "        socket.create_connection(addr, timeout=2)\n        print('connected')\n"
            "    except OSError:\n        print('no network')\n")
    r = run_untrusted(code, timeout_s=10)
    assert r.ok and r.stdout.count("no network") == 2, r.stdout + r.stderr


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


def test_sandbox_leaves_no_scratch_dirs_behind(tmp_path, monkeypatch):
    import tempfile

    # a temp dir of this test's own: tests running beside it (pytest-xdist) make scratch dirs in the shared one
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = {p.name for p in Path(tempfile.gettempdir()).glob("fastslow-sandbox-*")}
    run_untrusted("open('x', 'w').write('y')")
    run_untrusted("while True: pass", timeout_s=0.5)
    after = {p.name for p in Path(tempfile.gettempdir()).glob("fastslow-sandbox-*")}
    assert after <= before
    assert os.getcwd()  # the parent's state is intact


# ---- issue 21, case 1: the status channel is out of the code's reach -------------------------------------
_FORGE_STATUS = """\
import os
for fd in range(3, 64):  # every inherited descriptor, and init's through /proc/1/fd
    for target in (fd, f"/proc/1/fd/{fd}"):
        try:
            if isinstance(target, int):
                os.lseek(target, 0, 0)
                os.write(target, b"exit 0 ")
            else:
                with open(target, "w") as f:
                    f.write("exit 0 ")
        except OSError:
            pass
raise SystemExit(3)
"""


@needs_isolation
def test_the_code_cannot_forge_its_exit_status():
    r = run_untrusted(_FORGE_STATUS)
    assert r.returncode == 3 and not r.ok

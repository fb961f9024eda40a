"""Run untrusted Python code (a model's program, a task's snippet) without risking the training process.

:func:`run_untrusted` runs the code in a child ``python -I`` and always returns a :class:`SandboxResult`;
it never raises for anything the code does. What confines the child:

- **wall clock**: ``timeout_s``; on expiry the child's whole process group is SIGKILLed;
- **memory**: ``RLIMIT_AS`` = ``memory_mb`` (allocations beyond it raise MemoryError in the child);
- **CPU**: ``RLIMIT_CPU`` = ``cpu_s`` (SIGXCPU, then SIGKILL one second later);
- **output and files**: ``RLIMIT_FSIZE`` caps every file the child writes, its captured stdout/stderr
  included (they go to temporary files, never to unbounded pipes), at ``output_limit_kb``;
- **processes**: for a non-root user, ``RLIMIT_NPROC`` = the user's current task count + a small margin
  (the limit counts every process and thread of the user, the trainer's included, so a fixed number
  would be wrong either way). Root ignores RLIMIT_NPROC; there the pid namespace below does the work;
- **network**: when ``unshare -rn`` works (unprivileged user namespaces), the child runs in fresh user
  and network namespaces: no interface but a down loopback (``network_isolation() == "namespace"``).
  Otherwise (``"preamble"``) a preamble replaces ``socket.socket`` and friends with a function that
  raises: best effort only, since code can still reach ``_socket`` directly. (No pid namespace: with
  ``unshare -f`` the exit status of a signalled child is lost. Processes the code spawns share its
  process group, killed at the end; one that escapes with setsid still carries every rlimit above,
  RLIMIT_CPU included, so it cannot spin for long);
- **files**: the working directory is a fresh scratch dir, deleted afterwards; HOME and TMPDIR point
  there too. Writes by absolute path are limited only by file permissions (there is no chroot);
- **environment**: a minimal one (PATH, LANG, HOME, TMPDIR): no API keys, no PYTHONPATH.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_RUNNER = "fastslow_sandbox_main.py"
_SNIPPET = "snippet.py"
_NO_NET_PREAMBLE = """\
import socket as _socket_module

def _network_disabled(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")

for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket_module, _name, _network_disabled)
del _socket_module, _name
"""
# The runner executes the snippet as __main__ with its own file name, so tracebacks point at its lines.
_RUN_SNIPPET = f"""\
import runpy
runpy.run_path({_SNIPPET!r}, run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened. ``error`` is None when the program ran to its own end (even with a non-zero
    ``returncode``: a crash inside the code is a normal result, its traceback is in ``stderr``);
    otherwise it says which limit stopped it, or why the sandbox could not run it."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None


@lru_cache(maxsize=1)
def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "-rn", "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def network_isolation() -> str:
    """``"namespace"`` (unshare: no network at all) or ``"preamble"`` (socket functions disabled)."""
    return "namespace" if _unshare_works() else "preamble"


def _user_task_count() -> int:
    """Processes and threads owned by this user (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _limits(memory_mb: int, cpu_s: float, output_limit_kb: int, nproc: int | None):
    """The child's ``preexec_fn``: runs after fork, before exec; only async-safe calls (setrlimit)."""
    mem = int(memory_mb) * 1024 * 1024
    cpu = max(1, int(cpu_s + 0.999))
    fsize = int(output_limit_kb) * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _rmtree(path: Path) -> None:
    """Delete the scratch dir even if the code made parts of it read-only."""

    def retry(func, p, _exc) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: this reaches all it spawned
    except (ProcessLookupError, PermissionError):
        pass


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _why(returncode: int | None, stderr: str, *, cpu_s: float, memory_mb: int, output_limit_kb: int) -> str | None:
    if returncode is None or returncode >= 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if returncode and last.startswith("MemoryError"):
            return f"memory limit exceeded ({memory_mb} MB)"
        if returncode and "[Errno 27] File too large" in last:  # Python ignores SIGXFSZ: the write fails
            return f"output or file size limit exceeded ({output_limit_kb} KB)"
        return None
    sig = -returncode
    if sig == signal.SIGXCPU:
        return f"cpu time limit exceeded ({cpu_s:g} s)"
    if sig == signal.SIGXFSZ:
        return f"output or file size limit exceeded ({output_limit_kb} KB)"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"killed by {name}"


def run_untrusted(
    code: str,
    stdin: str = "",
    *,
    timeout_s: float = 5,
    memory_mb: int = 512,
    cpu_s: float = 5,
    output_limit_kb: int = 1024,
) -> SandboxResult:
    """Run ``code`` as a Python program with ``stdin`` as its input; see the module docstring for the limits.

    Never raises for anything the code does (or fails to do); a failure of the sandbox itself is
    reported in ``SandboxResult.error`` too.
    """
    scratch: Path | None = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix="fastslow-sandbox-"))
        namespaced = _unshare_works()
        (scratch / _SNIPPET).write_text(code)
        (scratch / _RUNNER).write_text(_RUN_SNIPPET if namespaced else _NO_NET_PREAMBLE + _RUN_SNIPPET)
        argv = [sys.executable, "-I", _RUNNER]
        if namespaced:
            argv = [shutil.which("unshare") or "unshare", "-rn", "--", *argv]  # execs python: same pid
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "HOME": str(scratch), "TMPDIR": str(scratch)}
        nproc = None if os.geteuid() == 0 else _user_task_count() + 32
        limit = output_limit_kb * 1024
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode("utf-8", errors="replace"))
            fin.seek(0)
            proc = subprocess.Popen(
                argv, stdin=fin, stdout=fout, stderr=ferr, cwd=scratch, env=env, close_fds=True,
                start_new_session=True, preexec_fn=_limits(memory_mb, cpu_s, output_limit_kb, nproc),
            )
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
                returncode = None
            finally:
                _kill_group(proc.pid)  # anything it left running in the background
            stdout, stderr = _read(fout, limit), _read(ferr, limit)
        error = (f"timed out after {timeout_s:g} s" if timed_out else
                 _why(returncode, stderr, cpu_s=cpu_s, memory_mb=memory_mb, output_limit_kb=output_limit_kb))
        return SandboxResult(stdout, stderr, returncode, timed_out, error)
    except Exception as exc:  # noqa: BLE001 - the parent never crashes because of a sandboxed program
        return SandboxResult("", "", None, False, f"sandbox failed: {type(exc).__name__}: {exc}")
    finally:
        if scratch is not None:
            _rmtree(scratch)

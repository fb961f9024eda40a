"""Run untrusted Python code (a model's program, a task's snippet) without risking the training process.

:func:`run_untrusted` runs the code in a child ``python -I`` and always returns a :class:`SandboxResult`;
it never raises for anything the code does. Resource limits hold everywhere:

- **wall clock**: ``timeout_s``; on expiry the child's whole process group is SIGKILLed;
- **memory**: ``RLIMIT_AS`` = ``memory_mb`` (allocations beyond it raise MemoryError in the child);
- **CPU**: ``RLIMIT_CPU`` = ``cpu_s`` (SIGXCPU, then SIGKILL one second later);
- **output and files**: ``RLIMIT_FSIZE`` caps every file the child writes, its captured stdout/stderr
  included (they go to temporary files, never to unbounded pipes), at ``output_limit_kb``;
- **environment**: a minimal one (PATH, LANG, HOME, TMPDIR): no API keys, no PYTHONPATH.

Isolation (:func:`isolation`, chosen automatically, best first):

- ``"unshare"`` (``/usr/bin/unshare`` from util-linux; as root, or as a user where unprivileged user
  namespaces are on): fresh mount, pid, network, IPC and UTS namespaces (a user namespace too when not
  root). A small init process inside (:data:`_INIT`) makes the whole filesystem read-only
  (``mount_setattr`` recursive), mounts a size-capped tmpfs on ``/tmp`` as the only writable place (the
  code runs in ``/tmp/work``), hides a root-only home that holds the interpreter behind a tmpfs showing only
  the interpreter, then runs the code as an unprivileged uid picked per call (as root) or in a nested user
  namespace that owns no mount (otherwise), with ``no_new_privs`` and ``RLIMIT_NPROC`` (counted per call:
  the uid is fresh, and the namespace's count is its own). The code is pid 2; when it ends, init exits,
  and the kernel kills every process left in the pid namespace (a ``setsid`` child included). The network
  namespace has only a down loopback.
- ``"bwrap"`` (bubblewrap, when installed and not root): the same view (``--ro-bind / /``, tmpfs ``/tmp``,
  ``--unshare-all``, ``--die-with-parent``, ``--new-session``).
- ``"none"``: no mechanism works here. Untrusted code is then refused (one line in
  ``SandboxResult.error``) unless the caller allows unsafe execution (``allow_unsafe=True``, the config's
  ``allow_unsafe_execution``, or ``FASTSLOW_ALLOW_UNSAFE_EXEC=1``): then it runs with the limits above
  only, and a preamble disabling ``socket`` (best effort: code can still reach ``_socket``).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
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


# The init process of the sandbox (pid 1 of its pid namespace). Argument: JSON settings. It runs with the
# privileges of the namespaces' owner, builds the view, then runs the code as pid 2 without them.
_INIT = r"""
import ctypes, json, os, signal, sys
cfg = json.loads(sys.argv[1])
status = os.fdopen(cfg["status_fd"], "w")
libc = ctypes.CDLL(None, use_errno=True)
# Not dumpable: the code (same uid, or a nested user namespace) can neither ptrace this process nor open its
# descriptors through /proc/1/fd, so the status channel stays out of its reach.
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags, data=None):
    enc = lambda v: v.encode() if v is not None else None
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


try:
    files = {name: open(os.path.join(cfg["scratch"], name), "rb").read() for name in cfg["files"]}
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY on every mount of the tree (AT_RECURSIVE)
    check(libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr /")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_kb']}k,nr_inodes=4096,mode=755")
    hidden, prefix = cfg["hide"], cfg["prefix"]
    if hidden:  # a root-only home holding the interpreter: show the interpreter alone
        os.mkdir("/tmp/.python")
        mount(prefix, "/tmp/.python", None, MS_BIND | MS_REC)
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        os.makedirs(prefix)
        mount("/tmp/.python", prefix, None, MS_MOVE)
        os.rmdir("/tmp/.python")
    os.mkdir("/tmp/work", 0o700)
    for name, data in files.items():
        with open(os.path.join("/tmp/work", name), "wb") as f:
            f.write(data)
    uid = cfg["uid"]
    if uid is not None:
        for path in ["/tmp/work", *(os.path.join("/tmp/work", n) for n in files)]:
            os.chown(path, uid, uid)
except Exception as exc:
    status.write(f"error {type(exc).__name__}: {exc}")
    status.close()
    sys.exit(125)

pid = os.fork()
if pid == 0:
    try:
        status.close()  # the status channel is init's alone: the code must not write its own verdict
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        else:
            check(libc.unshare(0x10000000), "unshare user")  # a user namespace that owns no mount
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        os.chdir("/tmp/work")
        import resource
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "HOME": "/tmp/work", "TMPDIR": "/tmp/work"}
        os.execve(cfg["python"], [cfg["python"], "-I", cfg["runner"]], env)
    except BaseException as exc:
        os.write(2, f"sandbox init: {type(exc).__name__}: {exc}\n".encode())
    os._exit(125)
while True:  # reap everything (orphans re-parent to us) until the code itself ends
    try:
        done, wstatus = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if done == pid:
        break
code = os.waitstatus_to_exitcode(wstatus)
status.write(f"exit {code}")
status.close()
sys.exit(0)  # pid 1 ends: the kernel kills whatever the code left in the namespace
"""
_UNSAFE_ENV = "FASTSLOW_ALLOW_UNSAFE_EXEC"


def _python() -> str:
    """The base interpreter (not a venv launcher): the sandbox needs the standard library only."""
    return os.path.realpath(sys.executable)


def _hidden_home(prefix: str) -> str | None:
    """The outermost ancestor of ``prefix`` that other users cannot enter (e.g. ``/root``), if any."""
    parts = Path(prefix).parts
    for i in range(2, len(parts) + 1):
        path = Path(*parts[:i])
        if not os.stat(path).st_mode & 0o001:
            return str(path)
    return None


def _unshare_argv() -> list[str]:
    exe = shutil.which("unshare") or "/usr/bin/unshare"
    ns = ["--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        ns = ["--user", "--map-root-user", *ns]
    return [exe, *ns, "--"]


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def isolation() -> str:
    """``"unshare"``, ``"bwrap"`` or ``"none"``: the isolation this machine gives (see the module docstring)."""
    if shutil.which("unshare"):
        r = run_untrusted("print('ok')", timeout_s=20, _mechanism="unshare")
        if r.ok and r.stdout.strip() == "ok":
            return "unshare"
    if os.geteuid() != 0 and shutil.which("bwrap") and _probe(_bwrap_argv(tempfile.gettempdir()) + ["true"]):
        return "bwrap"
    return "none"


def network_isolation() -> str:
    """``"namespace"`` (no network at all) or ``"preamble"`` (socket functions disabled, best effort)."""
    return "preamble" if isolation() == "none" else "namespace"


def _bwrap_argv(scratch: str) -> list[str]:
    return [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--bind", scratch,
            "/tmp/work", "--chdir", "/tmp/work", "--proc", "/proc", "--dev", "/dev", "--unshare-all",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]


def allow_unsafe_default() -> bool:
    return os.environ.get(_UNSAFE_ENV) == "1"


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
    max_processes: int = 32,
    allow_unsafe: bool | None = None,
    _mechanism: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python program with ``stdin`` as its input; see the module docstring for the limits.

    ``max_processes`` caps the processes and threads the code may have at once (under isolation).
    ``allow_unsafe`` (default: ``FASTSLOW_ALLOW_UNSAFE_EXEC=1``) lets code run with rlimits only where no
    isolation works; otherwise such a call is refused in ``SandboxResult.error``. Never raises for anything
    the code does (or fails to do); a failure of the sandbox itself is reported in ``error`` too.
    """
    mechanism = _mechanism or isolation()
    if mechanism == "none" and not (allow_unsafe_default() if allow_unsafe is None else allow_unsafe):
        return SandboxResult("", "", None, False,
                             "no isolation (unshare namespaces or bubblewrap) works on this machine: refusing to run "
                             f"untrusted code (set allow_unsafe_execution: true, or {_UNSAFE_ENV}=1, to run it "
                             "with resource limits only)")
    scratch: Path | None = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix="fastslow-sandbox-"))
        os.chmod(scratch, 0o755)
        (scratch / _SNIPPET).write_text(code)
        (scratch / _RUNNER).write_text(_RUN_SNIPPET if mechanism != "none" else _NO_NET_PREAMBLE + _RUN_SNIPPET)
        limit = output_limit_kb * 1024
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "HOME": str(scratch), "TMPDIR": str(scratch)}
        nproc = None
        pass_fds: tuple[int, ...] = ()
        with (tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr,
              tempfile.TemporaryFile() as fstatus):
            if mechanism == "unshare":
                python = _python()
                prefix = str(Path(python).parents[1])
                settings = {
                    "scratch": str(scratch), "files": [_SNIPPET, _RUNNER], "status_fd": fstatus.fileno(),
                    "tmpfs_kb": max(4 * output_limit_kb, 16 * 1024), "prefix": prefix,
                    "hide": _hidden_home(prefix) if os.geteuid() == 0 else None,
                    # A fresh unprivileged uid per call (as root): RLIMIT_NPROC then counts this call alone.
                    "uid": 100_000 + secrets.randbelow(1 << 30) if os.geteuid() == 0 else None,
                    "nproc": max_processes, "python": python, "runner": _RUNNER,
                }
                argv = [*_unshare_argv(), python, "-I", "-S", "-c", _INIT, json.dumps(settings)]
                pass_fds = (fstatus.fileno(),)
            elif mechanism == "bwrap":
                argv = [*_bwrap_argv(str(scratch)), sys.executable, "-I", _RUNNER]
                nproc = _user_task_count() + max_processes
            else:
                argv = [sys.executable, "-I", _RUNNER]
                nproc = None if os.geteuid() == 0 else _user_task_count() + max_processes
            fin.write(stdin.encode("utf-8", errors="replace"))
            fin.seek(0)
            proc = subprocess.Popen(
                argv, stdin=fin, stdout=fout, stderr=ferr, cwd=scratch, env=env, close_fds=True, pass_fds=pass_fds,
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
                _kill_group(proc.pid)  # anything it left running in the background (unshare: init dies with it)
            stdout, stderr = _read(fout, limit), _read(ferr, limit)
            if mechanism == "unshare" and not timed_out:
                told = _read(fstatus, 4096)
                if told.startswith("exit "):
                    returncode = int(told.split()[1])
                elif told.startswith("error "):
                    return SandboxResult(stdout, stderr, None, False, f"sandbox failed: {told[6:300]}")
        error = (f"timed out after {timeout_s:g} s" if timed_out else
                 _why(returncode, stderr, cpu_s=cpu_s, memory_mb=memory_mb, output_limit_kb=output_limit_kb))
        return SandboxResult(stdout, stderr, returncode, timed_out, error)
    except Exception as exc:  # noqa: BLE001 - the parent never crashes because of a sandboxed program
        return SandboxResult("", "", None, False, f"sandbox failed: {type(exc).__name__}: {exc}")
    finally:
        if scratch is not None:
            _rmtree(scratch)

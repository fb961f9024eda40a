"""Run a call with a wall-clock limit, so a hung plug-in (verifier, reflection model) costs one call.

Two ways, for two kinds of call:

- :func:`call_with_timeout` (a thread): for calls that wait on the outside world (a reflection server);
  a hung one is abandoned, and idles.
- :class:`ProcessCaller` (a forked worker process): for untrusted compute (a task's verifier). A call that
  runs past its limit is ended by killing the worker, so a verifier stuck in a busy loop cannot keep a
  core spinning and starve the run; the next call forks a fresh worker.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
    """``fn(*args)``, or TimeoutError after ``timeout_s``. A hung call is left in a daemon thread:
    Python cannot kill a thread, and leaving it costs less than losing the run."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"call exceeded {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


_HEADER = struct.Struct("<Q")
# Descriptors a worker must not keep open: a run dir's lock (flock is held while any copy is open, so a
# worker holding one would keep the run dir locked after its run ends).
private_fds: set[int] = set()


def _die_with_parent(parent: int) -> None:
    """In the worker: SIGKILL when the parent ends (Linux), so a worker never outlives its run."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _send(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int, deadline: float | None) -> bytes | None:
    """One length-prefixed message, or None at EOF; TimeoutError past ``deadline`` (monotonic)."""
    buf = b""
    need = _HEADER.size
    header_done = False
    while True:
        while len(buf) < need:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, max(need - len(buf), 1 << 16))
            if not chunk:
                return None
            buf += chunk
        if header_done:
            return buf[_HEADER.size:]
        need = _HEADER.size + _HEADER.unpack(buf[:_HEADER.size])[0]
        header_done = True
        if len(buf) >= need:
            return buf[_HEADER.size:need]


def _serve(fn: Callable[..., Any], requests: int, replies: int) -> None:
    while True:
        data = _recv(requests, None)
        if data is None:
            return
        try:
            out: tuple[str, Any] = ("ok", fn(*pickle.loads(data)))
        except BaseException as exc:  # noqa: BLE001 - the caller gets it back
            out = ("err", exc)
        try:
            payload = pickle.dumps(out)
        except Exception:  # noqa: BLE001 - an unpicklable result or exception: its text
            payload = pickle.dumps(("err", RuntimeError(f"{type(out[1]).__name__}: {out[1]}"[:500])))
        _send(replies, payload)


class ProcessCaller:
    """Calls of ``fn`` in a forked worker process, each with a wall-clock limit.

    The worker is forked at the first call (it sees ``fn``'s object as it is then) and kept for the next
    calls; a call past its limit kills it (SIGKILL: whatever it was doing ends) and raises TimeoutError, and
    a worker that dies raises RuntimeError; either way the next call forks a new one. Arguments and results
    cross as pickles. :meth:`close` (or the parent's exit) ends the worker.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._pid: int | None = None
        self._requests = self._replies = -1
        self._lock = threading.Lock()

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                for fd in (req_w, rep_r, *private_fds):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _die_with_parent(parent)
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
                except ValueError:
                    pass
                _serve(self.fn, req_r, rep_w)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(rep_w)
        self._pid, self._requests, self._replies = pid, req_w, rep_r

    def close(self) -> None:
        if self._pid is None:
            return
        for fd in (self._requests, self._replies):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass
        self._pid = None

    def __call__(self, *args: Any, timeout_s: float) -> Any:
        payload = pickle.dumps(args)  # unpicklable arguments raise here, before anything is started
        with self._lock:
            if self._pid is None:
                self._start()
            try:
                _send(self._requests, payload)
                data = _recv(self._replies, time.monotonic() + timeout_s)
            except TimeoutError:
                self.close()
                raise TimeoutError(f"call exceeded {timeout_s:g}s (its process was killed)") from None
            except OSError as exc:  # the worker died while we were writing to it
                self.close()
                raise RuntimeError(f"the worker process died ({exc.strerror})") from None
            if data is None:
                self.close()
                raise RuntimeError("the worker process died during the call")
        kind, value = pickle.loads(data)
        if kind == "err":
            raise value
        return value

    def __del__(self) -> None:  # pragma: no cover - best effort; the worker also dies with its parent
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

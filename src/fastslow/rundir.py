"""The run directory's rules: one process at a time, and fastslow deletes only what it wrote.

- **Lock**: a run dir is held through an exclusive ``fcntl.flock`` on ``.fastslow.lock`` inside it, taken
  before anything is written and kept for the life of the process. The OS releases it when the process
  dies (even by SIGKILL), so a killed run never leaves a stale lock. The file names the holder's pid, so a
  second process is refused with one line naming it.
- **Marker**: ``.fastslow-run`` (JSON) marks a directory fastslow claimed and lists what it owns: the
  top-level names it writes and the name patterns of its scratch dirs and temp files. A directory that
  holds anything and has no marker (and no run of an older fastslow) is refused: it is the user's.
- **Deleting**: ``--force`` deletes only the owned names; the sweep of leftovers of a killed process
  deletes only entries matching the owned scratch/temp patterns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from fastslow.guard import private_fds

LOCK = ".fastslow.lock"
MARKER = ".fastslow-run"
# Top-level entries a run writes (the lock and marker themselves are kept: the lock must stay while held).
OWNED = ("metrics.jsonl", "summary.json", "timing.json", "config.yaml", "checkpoints", "memory",
         "tensorboard", "wandb", "mlruns",  # report_to's trackers (fastslow.trackers)
         # fastslow serve: feedback database (SQLite and its WAL files), promoted versions, a training run's serving
         "serve.sqlite", "serve.sqlite-wal", "serve.sqlite-shm", "versions", "serve")
# Scratch dirs (GEPA rounds) and temp files (atomic JSON writes) carry a name only fastslow uses.
SCRATCH_PREFIX = ".fastslow-gepa-"
TEMP_INFIX = ".fastslow-tmp-"
SCRATCH_GLOBS = (f"{SCRATCH_PREFIX}*", f".*{TEMP_INFIX}*")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (held by another process, foreign files, a run already
    there without --resume/--force); the message is one line naming the directory."""


def _holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()


def is_claimed(out: Path) -> bool:
    """True when fastslow wrote in ``out`` (its marker, or a run of a version that predates the marker)."""
    return (out / MARKER).is_file() or _holds_run(out)


def check_no_links(out: Path) -> None:
    """Refuse a run dir where a name fastslow writes is a symbolic link: writing through it would change a file
    outside the run dir (a planted ``.fastslow.lock`` -> the user's file)."""
    for name in (LOCK, MARKER, *OWNED):
        if (out / name).is_symlink():
            raise RunDirError(f"{out / name} is a symbolic link: fastslow never writes through one (remove it)")


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (one line, :class:`RunDirError`)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link: fastslow never writes through one (remove it)") from None
        raise


def write_text_nofollow(path: Path, text: str) -> None:
    """Replace the contents of ``path`` (never following a link there)."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def check_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse early (before anything is loaded or written) a directory that cannot hold this run."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is not a directory")
    if not out.exists():
        return
    check_no_links(out)
    if not is_claimed(out):
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RunDirError(
                f"run directory {out} holds files fastslow did not write ({shown}): choose an empty or new directory"
            )
        return
    if _holds_run(out) and not (resume or force):
        raise RunDirError(
            f"run directory {out} already holds a run: pass --resume to continue it or --force to overwrite"
        )


class RunDirLock:
    """The exclusive hold of one run directory by this process (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = open_nofollow(self.out / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.out} is in use by another fastslow process (pid {holder}); "
                "wait for it to end or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        private_fds.add(fd)  # a forked verifier worker closes its copy

    def release(self) -> None:
        if self._fd is not None:
            private_fds.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort; the OS releases it at exit anyway
        self.release()


def claim(out: Path, *, resume: bool, force: bool) -> None:
    """With the lock held: write the marker, empty an old run for ``force``, sweep a dead process's scratch."""
    check_run_dir(out, resume=resume, force=force)  # again, under the lock: another process may have written
    if force and not resume:  # (the caller has refused checkpoints of another version: see record.claim_run_dir)
        for name in OWNED:
            _remove(out / name)
    marker = {"tool": "fastslow", "owned": [*OWNED, LOCK, MARKER], "scratch": list(SCRATCH_GLOBS)}
    write_text_nofollow(out / MARKER, json.dumps(marker, indent=2) + "\n")
    for pattern in SCRATCH_GLOBS:  # one process per run dir (the lock): whatever matches is a dead one's
        for stale in out.glob(pattern):
            _remove(stale, ignore_errors=True)


def _remove(path: Path, *, ignore_errors: bool = False) -> None:
    """Delete ``path``: a folder with what it holds, a file or a link itself (never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)

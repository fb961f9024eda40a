"""Checkpoints: written atomically, versioned, checksummed; a damaged one is skipped, never trusted.

Layout of ``<run>/checkpoints/step_000040/``:
    model/           weights (``save_pretrained``; the adapter only, for LoRA)
    trainer.pt       optimizer, scheduler and counters of the slow channel (absent for frozen weights)
    engine.json      the engine's name and world size, weights' version, fast-channel state (population, best prompts)
    state.json       loop position, reflection health, RNG state, config, metrics offset
    MANIFEST.json    format version, step and the sha256 of every other file (written last)

A checkpoint is built in a temporary sibling directory and renamed into place, so a kill at any
moment leaves either the previous set of checkpoints or the new one, never a half-written one that
looks whole. On load, the manifest is verified and a bad checkpoint falls back to the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fastslow.rundir import TEMP_INFIX

# 2: state.json carries the run's config and the metrics prefix (row count, sha256); metrics.jsonl is copied in.
# 3: the engine's own state (weights' version, fast channel) moves from state.json to engine.json.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
MANIFEST = "MANIFEST.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says which were tried and why each was rejected."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _fault_delay() -> None:
    """Fault-injection hook for tests: ``FASTSLOW_CHECKPOINT_DELAY_S`` holds the writer between writing the
    files and sealing them, so a kill test can land a SIGKILL inside a checkpoint write. Unset: no-op."""
    delay = os.environ.get("FASTSLOW_CHECKPOINT_DELAY_S")
    if delay:
        time.sleep(float(delay))


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, write: Callable[[Path], None], *, keep: int = 2) -> Path:
    """Create ``step_<step>`` with ``write(tmp_dir)`` filling it, then seal it with a manifest and rename."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fault_delay()
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=2))
        _fsync_tree(tmp)
    except Exception as exc:
        why = _disk_error(exc)
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written one goes; the previous checkpoints stay
        if why is None:
            raise
        kept = [p.name for p in list_checkpoints(ckpt_root)]
        raise CheckpointError(
            f"cannot write checkpoint {final.name}: {why} on the disk of {ckpt_root} "
            f"({_free_mb(ckpt_root)} MB free); "
            + (f"the previous checkpoint {kept[-1]} is kept (--resume continues from it)" if kept
               else "no checkpoint was written yet")
        ) from None
    if final.exists():  # re-writing the same step (e.g. after a resume): replace it whole, if it is ours
        if _is_foreign(final):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{final} was written in a format this fastslow cannot read; it is kept")
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(ckpt_root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    # Only checkpoints this version can read count and are pruned: another version's are never deleted.
    for old in [p for p in list_checkpoints(ckpt_root) if not _is_foreign(p)][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(f".tmp-{PREFIX}*"):  # leftovers of a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


_DISK_WORDS = ("No space left", "StorageFull", "Disk quota", "Read-only file system", "file write failed")


def _disk_error(exc: BaseException) -> str | None:
    """Why writing failed, when the disk is at fault (full, over quota, read-only); None for anything else.
    torch (``PytorchStreamWriter ... file write failed``) and safetensors report a full disk in their own words."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return os.strerror(exc.errno)
    text = str(exc)
    for word in _DISK_WORDS:
        if word in text:
            return "no space left (or the file system refused the write)" if word == "file write failed" else word
    return None


def _free_mb(path: Path) -> int | str:
    try:
        return shutil.disk_usage(path).free // (1 << 20)
    except OSError:
        return "?"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Sealed-looking checkpoints, oldest first (temporary directories are never listed)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def checkpoint_format(path: Path) -> object:
    """The format number in ``path``'s manifest, or None when there is no readable manifest."""
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def _is_foreign(path: Path) -> bool:
    """Sealed by another fastslow version (a format this one cannot read). A damaged manifest is not foreign:
    that checkpoint is ours, skipped on resume, replaced and pruned like any other."""
    fmt = checkpoint_format(path)
    return fmt is not None and fmt not in READABLE_FORMATS


def foreign_checkpoints(ckpt_root: Path) -> list[Path]:
    """Sealed checkpoints of a format this fastslow cannot read (another version's): never to be touched."""
    return [path for path in list_checkpoints(ckpt_root) if _is_foreign(path)]


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is whole; otherwise why not (one line, naming the file at fault)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (half-written or damaged)"
    try:
        meta = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return f"{MANIFEST} is not a checkpoint manifest"
    if meta.get("format") not in READABLE_FORMATS:
        return (
            f"unknown checkpoint format {meta.get('format')!r}: this fastslow reads format {FORMAT_VERSION} "
            "(written by another fastslow version?)"
        )
    for rel, digest in meta["files"].items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {rel} (corrupted)"
    return None


def latest_good_checkpoint(ckpt_root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported through ``warn`` and skipped.

    Returns None only when there is no checkpoint at all (a run killed before its first one starts
    over). When checkpoints exist but none verifies, raises :class:`CheckpointError` naming each and
    why: silently starting over would throw the run away.
    """
    rejected: list[str] = []
    newest = list_checkpoints(ckpt_root)[-1:]
    fmt = checkpoint_format(newest[0]) if newest else None
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"the newest checkpoint {newest[0]} has format {fmt}, newer than this fastslow's ({FORMAT_VERSION}): "
            "resume it with the fastslow that wrote it"
        )
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        rejected.append(f"{path.name}: {problem}")
        warn(f"checkpoint {path.name} is damaged ({problem}); falling back to the previous one")
    if rejected:
        raise CheckpointError(
            f"no usable checkpoint in {ckpt_root} ({'; '.join(rejected)}); "
            "run without --resume, with --force, to start over"
        )
    return None


def run_weights(run_dir: str | Path, warn: Callable[[str], None] = print) -> Path:
    """The ``model/`` directory of a run's latest good checkpoint (FileNotFoundError if it has none)."""
    ckpt = latest_good_checkpoint(Path(run_dir) / "checkpoints", warn=warn)
    if ckpt is None:
        raise FileNotFoundError(f"no usable checkpoint in {run_dir}")
    return ckpt / "model"

"""Checkpoints: written atomically, versioned, checksummed; a damaged one is skipped, never trusted.

Layout of ``<run>/checkpoints/step_000040/``:
    model/           weights (``save_pretrained``; the adapter only, for LoRA)
    trainer.pt       optimizer, scheduler and counters of the slow channel (absent for frozen weights)
    state.json       loop position, fast-channel state (population, best prompts), RNG state, metrics offset
    MANIFEST.json    format version, step and the sha256 of every other file (written last)

A checkpoint is built in a temporary sibling directory and renamed into place, so a kill at any
moment leaves either the previous set of checkpoints or the new one, never a half-written one that
looks whole. On load, the manifest is verified and a bad checkpoint falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

FORMAT_VERSION = 1
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


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
    tmp.mkdir()
    write(tmp)
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-writing the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(ckpt_root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(f".tmp-{PREFIX}*"):  # leftovers of a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Sealed-looking checkpoints, oldest first (temporary directories are never listed)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is whole; otherwise why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (half-written?)"
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        return f"unreadable manifest: {exc}"
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')!r}, this fastslow reads format {FORMAT_VERSION}"
    for rel, digest in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {rel}"
    return None


def latest_good_checkpoint(ckpt_root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path.name} is damaged ({problem}); falling back to the previous one")
    return None

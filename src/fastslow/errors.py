"""Which errors are the user's (exit 2, one line) and which are fastslow's own bugs (exit 1, please report).

A user error comes from the user's inputs or environment: a config, a task file, a model folder, a run
directory, the disk (full, read-only, a path too long), or the user's own plug-in code (a task factory,
a verifier, a reflector) raising. Everything else that escapes a command is a bug of fastslow.
"""

from __future__ import annotations

import sys
import sysconfig
import traceback
from pathlib import Path

import fastslow
from fastslow.util import one_line

PACKAGE_DIR = Path(fastslow.__file__).resolve().parent
# Code under these is the Python install (stdlib, site-packages), neither fastslow nor the user's plug-in.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sysconfig.get_paths()["purelib"],
                                     sysconfig.get_paths()["platlib"], sysconfig.get_paths()["stdlib"]}
)
BUG_HINT = "this is a bug in fastslow: please report it with the command you ran"


class ModelError(ValueError):
    """The model cannot be loaded (missing, broken config.json or weights, unknown type, device absent)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the last good checkpoint is kept (exit 1)."""


class RankFailure(RuntimeError):
    """Another process of the run failed: this one stops with the same line and exit status (see Engine.agree)."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.line, self.code = line, code


def check_device(device: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a GPU) before anything is loaded."""
    import torch

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ModelError(f"model.device {device!r}: no such CUDA device on this machine (use cpu or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("model.device 'mps': not available on this machine (use cpu or auto)")


def load_policy(cfg, weights=None):
    """``Policy.load`` with every failure to load the user's model turned into one :class:`ModelError` line."""
    from fastslow.policy import Policy

    check_device(cfg.device)
    try:
        return Policy.load(cfg, weights=weights)
    except MemoryError:
        raise ModelError(f"model {cfg.path!r} does not fit in memory") from None
    except Exception as exc:  # noqa: BLE001 - a broken folder fails in many libraries' own ways
        raise ModelError(f"cannot load model {cfg.path[:200]!r}: {type(exc).__name__}: {one_line(exc, 200)}") from None


def _user_types() -> tuple[type[BaseException], ...]:
    import yaml

    from fastslow.checkpoint import CheckpointError
    from fastslow.config import ConfigError
    from fastslow.registry import PluginError
    from fastslow.rundir import RunDirError
    from fastslow.tasks import TaskError

    # OSError covers the environment: full disk, read-only file system, name too long, permissions. A plug-in
    # that fails to import is the user's environment too.
    return (ConfigError, RunDirError, TaskError, CheckpointError, ModelError, PluginError, OSError, MemoryError,
            yaml.YAMLError)


def _in_user_code(filename: str) -> bool:
    path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    if path.startswith("<"):
        return False
    if path.startswith(str(PACKAGE_DIR)):
        return False
    return not path.startswith(_LIBRARY_DIRS)


def raised_by_plugin(exc: BaseException) -> bool:
    """True when the innermost frames that raised ``exc`` are the user's code (a plug-in module, a task
    factory), not fastslow's and not a library's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(_in_user_code(f.filename) for f in frames)


def exit_code(exc: BaseException) -> int:
    """2 for errors of the user's inputs, environment or plug-in code; 1 for everything else."""
    if isinstance(exc, RankFailure):
        return exc.code
    return 2 if isinstance(exc, _user_types()) or raised_by_plugin(exc) else 1


def describe(exc: BaseException) -> str:
    """One redacted line: the message of a user error; the type and message of a plug-in error; for a
    fastslow bug, the message and where it was raised, with the request to report it."""
    if isinstance(exc, RankFailure):  # already the failing rank's one line
        return exc.line
    if isinstance(exc, TrainingError):  # the run's own verdict: its message says what to do
        return one_line(exc, 400)
    code = exit_code(exc)
    if code == 2 and isinstance(exc, _user_types()):
        text = one_line(exc) if not isinstance(exc, OSError) or not exc.strerror else _os_error(exc)
        return text
    if code == 2:
        return f"plug-in code raised {type(exc).__name__}: {one_line(exc, 200)}"
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
    return f"{type(exc).__name__}: {one_line(exc, 200)}{at} ({BUG_HINT})"


def _os_error(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    shown = str(name)[:200] + ("..." if len(str(name)) > 200 else "")
    return one_line(f"{exc.strerror}: {shown}" if shown else exc.strerror)


def build_checked(build, cfg, weights=None):
    """``build(cfg, weights)`` (an engine: model, channels, reflector) with a missing device refused first and
    a failure to load the user's model turned into one :class:`ModelError` line. Errors that are already
    the user's (a config, a task, a plug-in raising) pass through unchanged."""
    check_device(cfg.model.device)
    path = str(cfg.model.path)
    try:
        return build(cfg, weights)
    except MemoryError:  # as load_policy says it
        raise ModelError(f"model {path!r} does not fit in memory") from None
    except OSError as exc:  # transformers' own "cannot find/read" errors do not always name the model
        raise ModelError(f"cannot load model {path[:200]!r}: {one_line(exc, 200)}") from None
    except (RankFailure, *_user_types()):  # another rank's failure is already its one line
        raise
    except Exception as exc:  # noqa: BLE001 - a broken model folder fails in many libraries' own ways
        if raised_by_plugin(exc):
            raise
        raise ModelError(f"cannot load model {path[:200]!r}: {type(exc).__name__}: {one_line(exc, 200)}") from None

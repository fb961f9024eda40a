"""Experiment trackers beside ``metrics.jsonl`` (``report_to``): the same namespaced rows, logged by the main
process at the same steps, through the trackers' own libraries (optional: ``pip install 'fastslow[trackers]'``).

- ``tensorboard``: event files in ``<run>/tensorboard`` (``torch.utils.tensorboard``);
- ``wandb``: offline unless ``WANDB_MODE`` says otherwise (``<run>/wandb``; ``wandb sync`` uploads it later);
- ``mlflow``: the local file store ``<run>/mlruns`` (``MLFLOW_ALLOW_FILE_STORE``) unless ``MLFLOW_TRACKING_URI``
  names a server;
- ``trackio``: its local store (project ``fastslow``).

A tracker that cannot be imported or started is one line (exit 2) before step 0; values that are not finite
numbers (an ``event`` row, a skipped loss logged as null) are left out, as they are not metrics.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from fastslow.config import ConfigError, flatten

KNOWN = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "fastslow"
DIRS = ("tensorboard", "wandb", "mlruns")  # what the trackers write in the run dir (owned by the run)


class TrackerError(ConfigError):
    """A tracker in ``report_to`` cannot be imported or started (one line, exit 2)."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The metrics of a row: finite numbers only (``step`` itself is the x axis, not a metric)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, out: Path, name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, name: str, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=name, dir=str(out), config=config,
                              mode=os.environ.get("WANDB_MODE") or "offline", reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, name: str, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow-skinny has no database backend: the local file store, which MLflow 3 asks to opt into
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(PROJECT)
        self.run = mlflow.start_run(run_name=name)
        flat = flatten(config)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, out: Path, name: str, config: dict) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


_KINDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def check_installed(names: list[str]) -> None:
    """TrackerError (one line) for a tracker whose library is not installed (``--dry-run`` checks this)."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    for name in names:
        if importlib.util.find_spec(modules[name]) is None:
            raise TrackerError(f"field 'report_to': {name} is not installed (pip install 'fastslow[trackers]', or "
                               f"{_PACKAGES[name]})")


def open_trackers(names: list[str], out: Path, config: dict) -> list[Tracker]:
    """Start every tracker of ``report_to`` (``config``: the run's config, redacted). TrackerError, in one line,
    when one cannot be imported or started; those already started are closed first."""
    from fastslow.util import one_line

    started: list[Tracker] = []
    for name in dict.fromkeys(names):
        try:
            started.append(_KINDS[name](out, out.name, config))
        except Exception as exc:  # noqa: BLE001 - a missing library or a refused start: the user's environment
            for tracker in started:
                close_quietly(tracker)
            hint = (f" (pip install 'fastslow[trackers]', or {_PACKAGES[name]})"
                    if isinstance(exc, ImportError) else "")
            raise TrackerError(f"field 'report_to': {name} cannot start: {type(exc).__name__}: "
                               f"{one_line(exc, 200)}{hint}") from None
    return started


def close_quietly(tracker: Tracker) -> None:
    try:
        tracker.close()
    except Exception:  # noqa: BLE001 - closing a tracker never fails a run that has finished
        pass

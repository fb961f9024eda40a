"""Engines: who samples, who updates the weights, who evolves prompts. The loop is the same for all.

An engine factory takes the run's :class:`~fastslow.config.Config` and the weights to start from (a
checkpoint's ``model/`` dir, or None) and returns an :class:`Engine`: the policy the drift meter and
checkpoints use, a :class:`~fastslow.channels.Sampler`, and the slow and fast channels the method turns on.
Engines register in :mod:`fastslow.registry` (``native`` here; ``trl`` for TRL's GRPOTrainer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastslow.channels import FastChannel, Sampler, SlowChannel
from fastslow.config import Config, ConfigError

if TYPE_CHECKING:  # the policy module loads torch and transformers: not needed to validate a config's engine
    from fastslow.policy import Policy


def slow_on(method: str) -> bool:
    return method in ("rl", "fst")


def fast_on(method: str) -> bool:
    return method in ("gepa", "memory", "fst")


@dataclass
class Engine:
    """What the loop runs on. ``is_main``: this process writes the run dir (rank 0 of ``world_size``).

    ``broadcast(obj)`` returns rank 0's ``obj`` on every rank (identity in one process); ``close()`` frees
    what the engine holds (processes, servers).
    """

    name: str
    policy: Policy
    sample: Sampler
    slow: SlowChannel | None
    fast: FastChannel | None
    world_size: int = 1
    sharding: str | None = None  # how the weights are split over the processes (None: a whole copy on each)
    is_main: bool = True
    broadcast: Callable[[Any], Any] = field(default=lambda obj: obj)
    close: Callable[[], None] = field(default=lambda: None)


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate launch announce it (0 when started alone), known before
    any engine is built (the run-dir lock is taken by rank 0 only)."""
    import os

    return int(os.environ.get("RANK", "0"))


EngineFactory = Callable[[Config, "Path | None"], Engine]


def build_engine(cfg: Config, weights: Path | None) -> Engine:
    """The engine ``cfg.engine`` names, started from ``weights`` (None: the model's own)."""
    from fastslow import registry

    factory = registry.engine_factory(cfg.engine)
    if factory is None:
        raise ConfigError(f"field 'engine': unknown engine {cfg.engine!r}: use one of {registry.known('engines')}")
    return factory(cfg, weights)


def _native(cfg: Config, weights: Path | None) -> Engine:
    from fastslow.engines.native import build

    return build(cfg, weights)


def _register() -> None:
    from fastslow import registry

    registry.register_engine("native", _native, "one process: HF generate + fastslow's CISPO step (the reference)")


_register()


def _trl(cfg: Config, weights: Path | None) -> Engine:
    from fastslow.engines.trl import build

    return build(cfg, weights)


def _register_trl() -> None:
    from fastslow import registry

    registry.register_engine("trl", _trl, "TRL's GRPOTrainer (CISPO) under accelerate/torchrun: pip install "
                             "'fastslow[scale]'; `fastslow launch` for several processes")


_register_trl()

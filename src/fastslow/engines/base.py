"""An :class:`~fastslow.channels.Engine` assembled from a policy, a sampler and the two channels.

Both built-in engines are one of these; they differ in the parts (and in ``broadcast``/``close`` when
several processes run). What an engine saves in a checkpoint directory:

    model/        weights (``save_pretrained``; the adapter only, for LoRA)
    trainer.pt    the slow channel's optimizer, schedule and counters (absent for frozen weights)
    engine.json   the engine's name and world size, the weights' version and sha256 on each rank, the fast
                  channel's state
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastslow.channels import FastChannel, Sampler, SlowChannel
from fastslow.config import ConfigError
from fastslow.errors import TrainingError
from fastslow.policy import Policy

ENGINE_STATE = "engine.json"


@dataclass
class ChannelEngine:
    """The parts of an engine; ``is_main``: this process writes the run dir (rank 0 of ``world_size``)."""

    name: str
    policy: Policy
    sample: Sampler
    slow: SlowChannel | None
    fast: FastChannel | None
    world_size: int = 1
    sharding: str | None = None  # how the weights are split over the processes (None: a whole copy on each)
    is_main: bool = True
    broadcast_fn: Callable[[Any], Any] = field(default=lambda obj: obj)
    close_fn: Callable[[], None] = field(default=lambda: None)
    gather_fn: Callable[[Any], list[Any]] = field(default=lambda obj: [obj])

    def broadcast(self, obj: Any) -> Any:
        return self.broadcast_fn(obj)

    def gather(self, obj: Any) -> list[Any]:
        return self.gather_fn(obj)

    def agree(self, error: BaseException | None) -> None:
        """Called by every rank at the same point with what it raised there (or None): when any rank failed,
        every rank raises the first failing rank's error as the same one line and exit status."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        from fastslow.errors import RankFailure, describe, exit_code

        mine = None if error is None else (describe(error), exit_code(error))
        failures = [f for f in self.gather(mine) if f is not None]
        if not failures:
            return
        raised = error if error is not None and mine == tuple(failures[0]) else RankFailure(*failures[0])
        raised.agreed_by_ranks = True  # every rank raises it now: the CLI lets all print before any exits
        if raised is error:
            raise error
        raise raised from error

    def close(self) -> None:
        self.close_fn()

    def preflight(self) -> None:
        """The fast channel's test call, on the main process only; its verdict reaches every rank."""
        if self.fast is None:
            return
        error = None
        if self.is_main:
            try:
                self.fast.preflight()
            except ConfigError as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error:
            raise ConfigError(error)

    def save(self, directory: Path) -> None:
        # Gathered on every rank (collectives where the weights are sharded), written by the main process alone.
        weights = self.policy.full_state_dict()
        slow_state = self.slow.state_dict() if self.slow is not None else None
        # Each rank's hash of its weights, recorded: whole copies (no sharding) must be identical, else the ranks
        # drifted apart (a bug) and the run stops; sharded ranks hash their own shard (the gathered whole
        # weights are on the main process only).
        digests = self.gather(self.policy.weights_sha256(weights if self.sharding is None else None))
        if self.sharding is None and len(set(digests)) > 1:
            raise TrainingError(f"the processes hold different weights (sha256 per rank: {digests})")
        if not self.is_main:
            return
        self.policy.save(directory / "model", state_dict=weights)
        if slow_state is not None:
            torch.save(slow_state, directory / "trainer.pt")
        state = {"engine": self.name, "world_size": self.world_size, "policy_version": self.policy.version,
                 "weights_sha256": digests, "fast": self.fast.state_dict() if self.fast is not None else None}
        (directory / ENGINE_STATE).write_text(json.dumps(state))

    def load(self, directory: Path) -> None:
        state = read_engine_state(directory)
        self.policy.version = state["policy_version"]
        if self.slow is not None:
            self.slow.load_state_dict(torch.load(directory / "trainer.pt", weights_only=False))
        if self.fast is not None and state["fast"] is not None:
            self.fast.load_state_dict(state["fast"])


def read_engine_state(directory: Path) -> dict:
    """``engine.json``; checkpoints of format 2 and older kept the same values in ``state.json``."""
    path = directory / ENGINE_STATE
    if path.is_file():
        return json.loads(path.read_text())
    legacy = json.loads((directory / "state.json").read_text())
    return {"policy_version": legacy["loop"].get("policy_version", 0), "fast": legacy.get("fast")}

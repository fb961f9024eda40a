"""Engine ``trl``: the slow channel on TRL's ``GRPOTrainer`` (CISPO) under accelerate, one loop step at a time.

We never call ``GRPOTrainer.train()``: the fastslow loop keeps control of steps, stages and the fast channel.
The trainer supplies what it is good at at scale: its model wrapped by accelerate (DDP, FSDP2), its optimizer,
its loss (``compute_loss``) and its generation path (vLLM through TRL's own switch).

A slow step on B problems x G rollouts keeps each problem's G rows contiguous (one ``num_generations`` group,
whatever mix of K population prompts it holds). With W processes each rank holds B/W whole groups; the sampler
shards (prompt, problem) pairs by whole groups, samples its shard and gathers everything, so every rank sees the
same rollouts and trains on its own rows.

The package, by job:

- :mod:`~fastslow.engines.trl.mapping`: what must be installed, the shardings accepted, config -> ``GRPOConfig``;
- :mod:`~fastslow.engines.trl.engine`: model, base, trainer, schedule, the policy and the collective sampler;
- :mod:`~fastslow.engines.trl.slow`: the slow step (advantages, vLLM importance ratio, update);
- :mod:`~fastslow.engines.trl.lockstep`: GEPA rounds in lockstep on every rank;
- :mod:`~fastslow.engines.trl.adapter`: every private TRL member used, checked by a test.

Verified on CPU: one process, and two processes through torchrun/gloo under DDP and under FSDP2 (the tests
force accelerate's FSDP2 path on CPU). DeepSpeed (any ZeRO stage) and FSDP version 1 are refused in one line
(:func:`~fastslow.engines.trl.mapping.checked_sharding`). vLLM is wired through TRL's own switch; on CPU the
tests run it with a stand-in for vLLM's generator (``fastslow selftest --engine trl`` checks a GPU machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastslow.config import Config
from fastslow.engines.trl.lockstep import LockstepFast, LockstepReflector
from fastslow.engines.trl.mapping import (
    INSTALL_HINT,
    EngineUnavailable,
    checked_sharding,
    grpo_config,
    grpo_kwargs,
    lora_config,
    require_trl,
    sharding_of_accelerate_config,
    sharding_of_env,
    world_size_from_env,
)

if TYPE_CHECKING:
    from fastslow.engines import Engine
    from fastslow.engines.trl.engine import TrlEngine

__all__ = [
    "INSTALL_HINT", "EngineUnavailable", "LockstepFast", "LockstepReflector", "TrlEngine", "build", "checked_sharding",
    "grpo_config", "grpo_kwargs", "lora_config", "require_trl", "sharding_of_accelerate_config",
    "sharding_of_env", "world_size_from_env",
]


def __getattr__(name: str):
    if name in ("TrlEngine", "TrlPolicy", "TrlSampler"):  # torch, transformers and TRL load only when used
        from fastslow.engines.trl import engine

        return getattr(engine, name)
    raise AttributeError(name)


def build(cfg: Config, weights: Path | None) -> Engine:
    """The ``trl`` engine of :mod:`fastslow.engines` (registered there as ``engine: trl``)."""
    from fastslow.engines import Engine, fast_on, slow_on
    from fastslow.engines.trl.engine import TrlEngine, TrlSampler
    from fastslow.fast import FastChannel
    from fastslow.preflight import check_reflector
    from fastslow.reflect import make_reflector
    from fastslow.rollout import PolicySampler

    eng = TrlEngine(cfg, weights=weights)
    policy = eng.policy
    if not slow_on(cfg.method):
        policy.model.requires_grad_(False)
    fast = None
    sampler = TrlSampler(eng, cfg.verify_timeout_s)
    lm = None
    if fast_on(cfg.method):
        lockstep = eng.world_size > 1
        # One process: the plain sampler. Several: every rank runs the round through the collective sampler.
        fast_sampler = sampler if lockstep else PolicySampler(policy, verify_timeout_s=cfg.verify_timeout_s)
        lm = make_reflector(cfg.fast.reflector, cfg.fast)
        fast = FastChannel(fast_sampler, cfg.fast, lm, seed=cfg.seed, max_new_tokens=cfg.slow.max_new_tokens,
                           version=lambda: policy.version)
        if lockstep:
            fast.reflector = LockstepReflector(fast.reflector, is_main=eng.is_main, broadcast=eng.broadcast)
            fast = LockstepFast(fast, eng)

    def preflight() -> None:
        """The one reflector test call, on the main process; every rank raises its failure alike."""
        if lm is not None:
            eng.preflight(lambda: check_reflector(cfg, lm))

    return Engine("trl", policy, sampler, eng.slow if slow_on(cfg.method) else None,
                  fast, world_size=eng.world_size, is_main=eng.is_main, broadcast=eng.broadcast, close=eng.close,
                  sharding="FSDP2" if eng.trainer.accelerator.is_fsdp2 else None, preflight=preflight,
                  agree=eng.agree, gather=eng.gather, describe=eng.describe)

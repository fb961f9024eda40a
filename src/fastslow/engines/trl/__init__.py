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
from typing import TYPE_CHECKING, Any

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
    from fastslow.engines.base import ChannelEngine
    from fastslow.engines.trl.engine import TrlEngine

__all__ = [
    "INSTALL_HINT", "EngineUnavailable", "LockstepFast", "LockstepReflector", "TrlEngine", "build", "check_launch",
    "checked_sharding", "describe", "grpo_config", "grpo_kwargs", "lora_config", "require_trl",
    "sharding_of_accelerate_config", "sharding_of_env", "world_size_from_env",
]


def __getattr__(name: str):
    if name in ("TrlEngine", "TrlPolicy", "TrlSampler"):  # torch, transformers and TRL load only when used
        from fastslow.engines.trl import engine

        return getattr(engine, name)
    raise AttributeError(name)


def build(cfg: Config, weights: Path | None) -> ChannelEngine:
    """The ``trl`` engine (registered by :mod:`fastslow.engines` as ``engine: trl``)."""
    from fastslow.channels import fast_on, slow_on
    from fastslow.engines.base import ChannelEngine
    from fastslow.engines.native import build_fast
    from fastslow.engines.trl.engine import TrlEngine, TrlSampler
    from fastslow.rollout import PolicySampler

    eng = TrlEngine(cfg, weights=weights)
    policy = eng.policy
    if not slow_on(cfg.method):
        policy.model.requires_grad_(False)
    sampler = TrlSampler(eng, cfg.verify_timeout_s)
    engine = ChannelEngine("trl", policy, sampler, eng.slow if slow_on(cfg.method) else None, None,
                           world_size=eng.world_size, is_main=eng.is_main, broadcast_fn=eng.broadcast,
                           close_fn=eng.close, gather_fn=eng.gather,
                           sharding="FSDP2" if eng.trainer.accelerator.is_fsdp2 else None)
    if fast_on(cfg.method):
        lockstep = eng.world_size > 1
        # One process: the plain sampler. Several: every rank runs the round through the collective sampler.
        fast_sampler = sampler if lockstep else PolicySampler(policy, verify_timeout_s=cfg.verify_timeout_s)
        error = fast = None
        try:  # the same channel as native's (GEPA, memory or both); only the main process reads and writes RUN/memory
            fast = build_fast(cfg, policy, fast_sampler, Path(cfg.out) if eng.is_main else None)
        except Exception as exc:  # noqa: BLE001 - e.g. a foreign memory there: every rank stops with its line
            error = exc
        engine.agree(error)
        if lockstep:  # the parts that call a reflection model: each calls it on the main process only
            parts = (fast.gepa, fast.memory) if cfg.fast_kind == "gepa+memory" else (fast,)
            fast = LockstepFast(fast, eng, parts)
        engine.fast = fast
    return engine


def check_launch(cfg: Config, accelerate_config: str | None) -> None:
    """What the processes would refuse, refused before any starts: TRL missing, an unsupported sharding, a batch
    that ``scale.nproc`` processes (all nodes together) cannot split into whole groups."""
    require_trl()
    checked_sharding(accelerate_config)
    grpo_kwargs(cfg, world_size=cfg.scale.nproc, cuda=False)


def describe(cfg: Config, world_size: int | None) -> dict[str, Any]:
    """``--dry-run`` for engine ``trl``: an unsupported sharding (DeepSpeed ZeRO, FSDP1) is refused
    (:func:`checked_sharding`), the GRPOConfig is built from the mapping (TRL validates it); the world size is
    ``world_size`` or ``scale.nproc``; the device is the one the config names (``model.device``), not this
    machine's. No weights are loaded. Shows the learning-rate schedule (in optimizer updates, whatever the
    process count), gradient checkpointing, and how vLLM's sampling log-probs correct the loss."""
    import importlib.util

    import torch

    from fastslow.config import ConfigError
    from fastslow.slow import schedule_summary

    require_trl()
    sharding = checked_sharding(cfg.scale.accelerate_config)
    size = world_size or cfg.scale.nproc
    cuda = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())
    kw = grpo_kwargs(cfg, world_size=size, cuda=cuda)
    check = dict(kw)
    if cuda and not torch.cuda.is_available():  # validating a GPU config here: TRL refuses bf16 without a GPU
        check.update(bf16=False, fp16=False, use_cpu=True)
    try:
        grpo_config(**check)  # TRL's own checks of the mapped arguments (built for one process here)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"engine 'trl': GRPOConfig refuses the settings: {' '.join(str(exc).split())}") from None
    sc = cfg.scale
    return {
        "world_size": size,
        "vllm": sc.vllm,
        # vLLM is not a fastslow dependency (GPU wheels): say whether this machine could start it
        "vllm_installed": importlib.util.find_spec("vllm") is not None,
        "vllm_importance_sampling": None if sc.vllm == "off" else {
            "mode": sc.vllm_importance_sampling, "cap": sc.vllm_importance_sampling_cap,
            "ratio": "exp(trainer log-prob - vLLM's sampling log-prob) per TRL's mode; off: none"},
        "accelerate_config": sc.accelerate_config,
        "sharding": sharding,
        "rows_per_step": cfg.slow.batch_problems * cfg.slow.group_size,
        "lr_schedule": schedule_summary(cfg.slow),
        "gradient_checkpointing": sc.gradient_checkpointing,
        "advantages": sc.advantages,
        "grpo_config": {k: kw[k] for k in sorted(kw)},
    }

"""The native engine: one process, Hugging Face ``generate`` for rollouts, :class:`SlowLearner`, :class:`FastChannel`.

The reference implementation of the seams in :mod:`fastslow.channels`; CPUs and small models.
"""

from __future__ import annotations

from pathlib import Path

from fastslow.config import Config
from fastslow.engines import Engine, fast_on, slow_on
from fastslow.fast import FastChannel
from fastslow.policy import Policy
from fastslow.preflight import check_reflector
from fastslow.reflect import make_reflector
from fastslow.rollout import PolicySampler
from fastslow.slow import SlowLearner, schedule_summary


def build(cfg: Config, weights: Path | None) -> Engine:
    policy = Policy.load(cfg.model, weights=weights)
    if not slow_on(cfg.method):
        policy.model.requires_grad_(False)
    sample = PolicySampler(policy, verify_timeout_s=cfg.verify_timeout_s)
    slow = SlowLearner(policy, cfg.slow) if slow_on(cfg.method) else None
    fast = lm = None
    if fast_on(cfg.method):
        lm = make_reflector(cfg.fast.reflector, cfg.fast)
        fast = FastChannel(sample, cfg.fast, lm, seed=cfg.seed, max_new_tokens=cfg.slow.max_new_tokens,
                           version=lambda: policy.version)

    def preflight() -> None:
        if lm is not None:
            check_reflector(cfg, lm)  # one short real call: a dead reflector never starts a run

    return Engine("native", policy, sample, slow, fast, preflight=preflight,
                  describe=lambda: {"engine": "native", "world_size": 1, "lr_schedule": schedule_summary(cfg.slow)})

"""The native engine: one process, Hugging Face ``generate`` for rollouts, :class:`SlowLearner`, :class:`FastChannel`.

The reference implementation of the seams in :mod:`fastslow.channels`; CPUs and small models.
"""

from __future__ import annotations

from pathlib import Path

from fastslow.channels import fast_on, slow_on
from fastslow.config import Config
from fastslow.engines.base import ChannelEngine
from fastslow.fast import FastChannel
from fastslow.policy import Policy
from fastslow.reflect import make_reflector
from fastslow.rollout import PolicySampler
from fastslow.slow import SlowLearner


def build(cfg: Config, weights: Path | None) -> ChannelEngine:
    policy = Policy.load(cfg.model, weights=weights)
    if not slow_on(cfg.method):
        policy.model.requires_grad_(False)
    sample = PolicySampler(policy, verify_timeout_s=cfg.verify_timeout_s)
    slow = SlowLearner(policy, cfg.slow) if slow_on(cfg.method) else None
    fast = None
    if fast_on(cfg.method):
        fast = FastChannel(sample, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                           max_new_tokens=cfg.slow.max_new_tokens, version=lambda: policy.version)
    return ChannelEngine("native", policy, sample, slow, fast)

"""The native engine: one process, Hugging Face ``generate`` for rollouts, :class:`SlowLearner`, the fast channel.

The reference implementation of the seams in :mod:`fastslow.channels`; CPUs and small models.
"""

from __future__ import annotations

from pathlib import Path

from fastslow.channels import Sampler, fast_on, slow_on
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
    fast = build_fast(cfg, policy, sample, Path(cfg.out)) if fast_on(cfg.method) else None
    return ChannelEngine("native", policy, sample, slow, fast)


def build_fast(cfg: Config, policy: Policy, sample: Sampler, out: Path | None = None):
    """The fast channel ``cfg.fast_kind`` names: GEPA's population, the experience memory, or both (the trl
    engine builds the same). ``out``: the run dir the memory is written under (None: not written)."""
    kind = cfg.fast_kind
    gepa = memory = None
    if "gepa" in kind:
        gepa = FastChannel(sample, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                           max_new_tokens=cfg.slow.max_new_tokens, version=lambda: policy.version)
    if "memory" in kind:
        from fastslow.checks import context_limit
        from fastslow.memory import GepaMemoryChannel, MemoryChannel
        from fastslow.memory.retrieve import hidden_state_embedder

        limit, budget = context_limit(policy), cfg.slow.max_new_tokens

        def fits(context: str, problem) -> bool:
            return limit is None or policy.count_tokens(policy.format(context, problem.prompt)) + budget <= limit

        embed = hidden_state_embedder(policy) if cfg.fast.memory.retriever != "bm25" else None
        memory = MemoryChannel(sample, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                               max_new_tokens=budget, count_tokens=policy.count_tokens, fits=fits, out=out,
                               embed=embed, version=lambda: policy.version)
        if gepa is not None:
            return GepaMemoryChannel(gepa, memory)
    return memory or gepa

"""The native engine: one process, Hugging Face ``generate`` for rollouts, :class:`SlowLearner`, the fast channel.

The reference implementation of the seams in :mod:`fastslow.channels`; CPUs and small models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def build_fast(cfg: Config, policy: Policy, sample: Sampler, out: Path | None = None, *,
               version: Callable[[], int] | None = None, budget: int | None = None,
               count_tokens: Callable[[str], int] | None = None, fits: Callable[[str, Any], bool] | None = None):
    """The fast channel ``cfg.fast_kind`` names: GEPA's population, the experience memory, or both (the trl
    engine and the server build the same). ``out``: the run dir the memory is written under (None: not written).

    ``policy`` counts tokens and embeds for the memory; ``version`` (default the policy's) tells the channel when
    the weights changed. The server passes its own ``version``, ``budget`` (new tokens of a request),
    ``count_tokens`` and ``fits`` (a context fits when the request as served fits)."""
    kind = cfg.fast_kind
    version = version or (lambda: policy.version)
    gepa = memory = None
    if "gepa" in kind:
        gepa = FastChannel(sample, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                           max_new_tokens=cfg.slow.max_new_tokens, version=version)
    if "memory" in kind:
        from fastslow.checks import context_limit
        from fastslow.memory import GepaMemoryChannel, MemoryChannel
        from fastslow.memory.retrieve import hidden_state_embedder

        budget = budget or cfg.slow.max_new_tokens
        count_tokens = count_tokens or policy.count_tokens
        if fits is None:
            limit = context_limit(policy)

            def fits(context: str, problem) -> bool:
                return limit is None or count_tokens(policy.format(context, problem.prompt)) + budget <= limit

        embed = hidden_state_embedder(policy) if cfg.fast.memory.retriever != "bm25" else None
        memory = MemoryChannel(sample, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                               max_new_tokens=budget, count_tokens=count_tokens, fits=fits, out=out,
                               embed=embed, version=version)
        if gepa is not None:
            return GepaMemoryChannel(gepa, memory)
    return memory or gepa

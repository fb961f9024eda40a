"""Drift meter: how far the weights moved from the base, measured on a fixed probe set.

Probes are fixed problems of the stream with the *seed* prompt (never the evolved one), so they
measure the weights alone. Per token, exact over the vocabulary:

    kl_rev = E_{y ~ pi}   [ sum_v pi(v|.)   (log pi(v|.)   - log base(v|.)) ]   (samples from the policy)
    kl_fwd = E_{y ~ base} [ sum_v base(v|.) (log base(v|.) - log pi(v|.))   ]   (samples from the base)

averaged over completion tokens. Policy samples are drawn with the same seed at every measurement
(common random numbers: changes in the numbers come from the weights, not from the draw).

Run-time invariant (no engine may report a drift it did not measure): at the first measurement on weights equal
to the base's, the policy's and the base's logits on the probes are identical; once the weights have moved
(weight_l2 > 0), a KL of exactly 0 means the "base" is the live policy, and the run stops
(:class:`~fastslow.errors.TrainingError`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastslow.config import DriftConfig
from fastslow.errors import TrainingError
from fastslow.policy import Batch, Policy
from fastslow.util import derive_seed


def exact_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) over the last (vocabulary) dimension."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the distribution over the last (vocabulary) dimension, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a parameter sharded by FSDP2 (a DTensor; gathering is a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def weight_l2(policy: Policy) -> float:
    """L2 norm of (theta - theta_base) over every weight the base holds (frozen ones too: a served copy of trained
    weights is frozen but has moved); for LoRA, of the merged deltas B·A·scale."""
    if policy.is_lora:
        total = 0.0
        for module in policy.model.modules():
            if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
                for name in module.active_adapters:
                    if name in getattr(module, "lora_A", {}):
                        total += float(whole(module.get_delta_weight(name)).float().pow(2).sum())
        return total**0.5
    base = policy.base_parameters()
    total = sum(float((whole(p.detach()) - whole(base[n])).float().pow(2).sum())
                for n, p in policy.model.named_parameters() if n in base)
    return total**0.5


@torch.no_grad()
def at_base(policy: Policy) -> bool:
    """The weights are exactly the base's (every parameter; for LoRA, every adapter delta is 0)."""
    if policy.is_lora:
        return weight_l2(policy) == 0.0
    base = policy.base_parameters()
    # Every parameter compared (no early exit): gathering a sharded one is a collective every rank must join.
    return all([torch.equal(whole(p), whole(base[n])) for n, p in policy.model.named_parameters() if n in base])


class DriftMeter:
    def __init__(self, policy: Policy, probe_prompts: Sequence[str], cfg: DriftConfig, *, seed: int,
                 chunk: int = 16) -> None:
        self.policy, self.cfg, self.chunk = policy, cfg, chunk
        self.prompts = list(probe_prompts)
        self.seed = derive_seed(seed, "drift-probe")
        self._base_samples: Batch | None = None  # the base never changes: sample it once
        self._base_logits: list[torch.Tensor] = []  # ... and score it once: base logits on base samples, per chunk
        self._last: tuple[int, dict[str, float]] | None = None  # (policy version, metrics): same weights, same numbers

    def _sample(self, use_base: bool) -> Batch:
        return self.policy.generate(
            self.prompts, temperature=1.0, max_new_tokens=self.cfg.max_new_tokens, seed=self.seed, use_base=use_base
        )

    def _check_base_is_policy(self, pi: torch.Tensor, base: torch.Tensor) -> None:
        """Weights equal to the base's and not updated yet: the base's logits must be the policy's (else the
        meter compares two different forwards, not two sets of weights)."""
        if not self._at_base:
            return
        exact = pi.dtype == torch.float32 and self.policy.model.dtype == torch.float32
        same = torch.equal(pi, base) if exact else torch.allclose(pi, base, rtol=0, atol=1e-2)
        if not same:
            gap = float((pi - base).abs().max())
            raise TrainingError(f"drift meter: before any update the base's logits differ from the policy's "
                                f"(max |difference| {gap:.3g}) on the same weights: the base is not the policy's model")

    @torch.no_grad()
    def _mean_over_tokens(self, batch: Batch, *, policy_first: bool) -> tuple[float, float]:
        """Mean per-token KL (direction set by ``policy_first``) and mean policy entropy on ``batch``."""
        kl_sum = ent_sum = tokens = 0.0
        cache = not policy_first  # base samples are fixed, so are the base's logits on them
        for i, start in enumerate(range(0, len(batch), self.chunk)):
            part = batch.select(range(start, min(start + self.chunk, len(batch))))
            pi = self.policy.completion_logits(part)
            if cache and i < len(self._base_logits):
                base = self._base_logits[i]
            else:
                base = self.policy.completion_logits(part, use_base=True)
                if cache:
                    self._base_logits.append(base)
            if not policy_first:
                self._check_base_is_policy(pi, base)
            mask = part.completion_mask.float()
            kl = exact_kl(pi, base) if policy_first else exact_kl(base, pi)
            kl_sum += float((kl * mask).sum())
            ent_sum += float((entropy(pi) * mask).sum())
            tokens += float(mask.sum())
        tokens = max(tokens, 1.0)
        return kl_sum / tokens, ent_sum / tokens

    def measure(self) -> dict[str, float]:
        """``drift/*`` metrics for the current weights (weights unchanged since the last call: its numbers)."""
        if self._last is not None and self._last[0] == self.policy.version:
            return dict(self._last[1])
        was_training = self.policy.model.training
        self.policy.model.eval()
        distance = weight_l2(self.policy)
        self._at_base = self.policy.version == 0 and self._last is None and at_base(self.policy)
        try:
            kl_rev, ent = self._mean_over_tokens(self._sample(use_base=False), policy_first=True)
            if self._base_samples is None:
                self._base_samples = self._sample(use_base=True)
            kl_fwd, _ = self._mean_over_tokens(self._base_samples, policy_first=False)
        finally:
            self.policy.model.train(was_training)
        metrics = {
            "drift/kl_rev": max(kl_rev, 0.0),
            "drift/kl_fwd": max(kl_fwd, 0.0),
            "drift/entropy": ent,
            "drift/weight_l2": distance,
        }
        if metrics["drift/weight_l2"] > 0 and min(kl_rev, kl_fwd) == 0.0:
            raise TrainingError(
                f"drift meter: the weights moved (weight_l2 {metrics['drift/weight_l2']:.4g}) but the KL to the base "
                f"is exactly 0 (kl_rev {kl_rev:.3g}, kl_fwd {kl_fwd:.3g}): the base model is the live policy")
        self._last = (self.policy.version, metrics)
        return dict(metrics)

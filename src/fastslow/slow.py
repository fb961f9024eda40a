"""Slow channel: RL on weights from verifiable rewards.

One step, for B problems with G rollouts each (the G rollouts of a problem may use several prompts):

    A_i   = (r_i - mean_g r) / (std_g r + eps)             one advantage per rollout, per problem group
    rho_t = pi_theta(y_t) / pi_old(y_t)
    CISPO: l_t = - sg(min(rho_t, tau)) * A_i * log pi_theta(y_t)      (ratio truncated above, no masking)
    GRPO : l_t = - min(rho_t * A_i, clip(rho_t, 1-eps, 1+eps) * A_i)
    (+ kl_coef * k3(pi_theta, pi_base) per token, when kl_coef > 0; with kl_target the coefficient
     is adapted after each drift measurement by KLController, a drift budget on the exact reverse KL)
    loss  = mean over kept groups of (token-mean of l_t within the group)     "per-prompt" averaging
            (slow.loss_aggregation: tokens -> sum of l_t over kept tokens / kept tokens, TRL's cispo)

Groups whose rewards are all equal carry no signal and are dropped (counted, not refilled); a batch of flat
groups makes no update. Learning rate: update k (1, 2, ...) uses lr * min(1, k / warmup_steps)
(:func:`lr_schedule`, the one definition of every engine); ``slow/lr`` is the rate the step's update used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastslow.config import SlowConfig
from fastslow.drift import entropy
from fastslow.policy import Batch, Policy


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N, G] -> (advantages [N, G], keep [N] bool). Population std; flat groups not kept."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    keep = std.squeeze(1) > 1e-8
    return (rewards - mean) / (std + eps), keep


def k3(logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || base) on samples from pi: exp(d) - d - 1, d = log base - log pi."""
    d = base_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    group: torch.Tensor,
    *,
    loss: str = "cispo",
    tau: float = 4.0,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    base_logp: torch.Tensor | None = None,
    aggregation: str = "group",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level RL loss averaged per group (problem), or over all tokens (``aggregation="tokens"``).

    logp, old_logp, base_logp, mask: [R, C] over rollouts R; advantages, group: [R] (group = problem index).
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.unsqueeze(1)
    if loss == "cispo":
        weight = torch.clamp(ratio, max=tau).detach()
        token_loss = -weight * adv * logp
        clipped = ratio > tau
    elif loss == "grpo":
        clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        token_loss = -torch.min(ratio * adv, clipped_ratio * adv)
        clipped = (ratio * adv) > (clipped_ratio * adv)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    kl = None
    if base_logp is not None:
        kl = k3(logp, base_logp.detach())
        if kl_coef > 0:
            token_loss = token_loss + kl_coef * kl
    n_tok = mask.sum().clamp(min=1)
    if aggregation == "tokens":
        total = (token_loss * mask).sum() / n_tok
    else:
        groups, inverse = torch.unique(group, return_inverse=True)
        zeros = torch.zeros(len(groups), dtype=logp.dtype, device=logp.device)
        per_group_sum = zeros.index_add(0, inverse, (token_loss * mask).sum(1))
        per_group_tokens = zeros.index_add(0, inverse, mask.sum(1))
        total = (per_group_sum / per_group_tokens.clamp(min=1)).mean()
    stats = {"clip_frac": float((clipped.float() * mask).sum() / n_tok)}
    if kl is not None:
        stats["k3"] = float((kl.detach() * mask).sum() / n_tok)
    return total, stats


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean policy entropy over the completion tokens in ``mask``."""
    return float((entropy(logits.detach()) * mask).sum() / mask.sum().clamp(min=1))


@dataclass
class Rollouts:
    """One slow step's rollouts: rows in group order (problem 0's G rollouts, then problem 1's, ...)."""

    batch: Batch
    rewards: torch.Tensor  # [N, G]


def warmup_factor(update: int, warmup_steps: int) -> float:
    """The share of ``slow.lr`` that update number ``update`` (0, 1, ...) uses: min(1, (update + 1) / warmup_steps).

    The first update uses lr / warmup_steps (never 0), update ``warmup_steps`` the full rate.
    """
    return min(1.0, (update + 1) / max(warmup_steps, 1))


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer updates, then constant; step it once per update, on every
    process (one schedule whatever the process count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: warmup_factor(update, warmup_steps))


def schedule_summary(cfg: SlowConfig) -> dict:
    """The learning-rate schedule in numbers (what ``--dry-run`` prints), the same on every engine."""
    return {"warmup_updates": cfg.warmup_steps, "lr": cfg.lr,
            "first_update_lr": cfg.lr * warmup_factor(0, cfg.warmup_steps),
            "rule": "update k uses lr * min(1, k / warmup_updates); one schedule step per update, any process count"}


class KLController:
    """Adaptive KL coefficient holding a drift budget (integral control of beta in log space).

    After each exact measurement of the reverse KL by the drift meter (the budget's definition):
    ``log beta += gain * clip(log(kl / target), -MAX_ERR, MAX_ERR)``, the multiplicative update of the
    adaptive KL controller of RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences": clipped error, beta *= 1 + K * e), with the error in log space. The clip bounds one update
    to a factor of exp(gain * MAX_ERR), so one noisy measurement cannot swing beta far.

    A budget measured a few times per run can only be held if beta starts near the right scale and is not
    wound down before the policy has moved:

    - ``init``: the starting coefficient; ``None`` or 0 starts at :meth:`default_init` (target), the
      coefficient at which the k3 penalty's pull per token (~ beta * |log ratio| ~ beta * sqrt(2 KL))
      balances a unit-scale policy-gradient push (advantages are normalized per group) at the target KL;
    - start-up (anti-windup): while the KL is below the target and still rising, beta is not lowered (a KL
      near 0 at the first measurements says the weights have not moved yet, not that the penalty is too
      strong). Once the KL has reached the target, or stops rising below it, the controller acts both ways.

    Measured on the micro world (bench-quick settings, 24 steps, 6 measurements), this holds the final KL
    within a small factor of the target where a start at 0.01 without the start-up rule ended 10-30x above.
    """

    MAX_ERR = 2.0
    MIN_COEF, MAX_COEF = 1e-4, 1e3

    def __init__(self, target: float, gain: float, init: float | None = None) -> None:
        self.target, self.gain = target, gain
        self.coef = self._bounded(init if init else self.default_init(target))
        self.reached = False  # the KL has reached the target at least once
        self.last_kl: float | None = None  # the previous measurement

    @staticmethod
    def default_init(target: float) -> float:
        """1 / sqrt(2 * target): the coefficient whose penalty balances a unit policy-gradient push at the target."""
        return 1.0 / math.sqrt(2.0 * target)

    def _bounded(self, coef: float) -> float:
        return min(max(coef, self.MIN_COEF), self.MAX_COEF)

    def update(self, kl: float) -> float:
        """Feed one measured KL (nats/token); returns the new coefficient."""
        kl = max(kl, 1e-8)
        rising = self.last_kl is None or kl >= self.last_kl
        self.last_kl = kl
        self.reached = self.reached or kl >= self.target
        error = min(max(math.log(kl / self.target), -self.MAX_ERR), self.MAX_ERR)
        if error < 0 and not self.reached and rising:
            error = 0.0  # start-up: under budget and still climbing towards it
        self.coef = self._bounded(self.coef * math.exp(self.gain * error))
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "reached": self.reached, "last_kl": self.last_kl}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]
        self.reached = state.get("reached", False)
        self.last_kl = state.get("last_kl")


class SlowLearner:
    """AdamW with linear warm-up over the trainable parameters, and the RL update."""

    def __init__(self, policy: Policy, cfg: SlowConfig) -> None:
        self.policy, self.cfg = policy, cfg
        params = [p for _, p in policy.trainable_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, cfg.warmup_steps)
        self.nonfinite_streak = 0
        self.skipped_updates = 0
        self.kl_controller = (
            KLController(cfg.kl_target, cfg.kl_target_gain, cfg.kl_coef or None) if cfg.kl_target else None
        )

    @property
    def kl_coef(self) -> float:
        """The KL penalty coefficient in force: the controller's under a drift budget, else ``cfg.kl_coef``."""
        return self.kl_controller.coef if self.kl_controller else self.cfg.kl_coef

    def observe_drift(self, kl_rev: float | None) -> None:
        """Hand the drift meter's reverse KL to the drift budget's controller (no-op without ``kl_target``)."""
        if self.kl_controller is not None and kl_rev is not None:
            self.kl_controller.update(kl_rev)

    def state_dict(self) -> dict:
        return {
            "kl_coef": self.kl_coef,
            **({"kl_controller": self.kl_controller.state_dict()} if self.kl_controller else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        if self.kl_controller is not None and "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        elif self.kl_controller is not None and "kl_coef" in state:
            self.kl_controller.coef = state["kl_coef"]

    @torch.no_grad()
    def _k3(self, batch: Batch) -> float:
        """Mean per-token k3 estimate of KL(pi || base) on ``batch`` (samples from pi)."""
        logp = Policy.token_logprobs(self.policy.completion_logits(batch), batch.completion_ids)
        base_logp = Policy.token_logprobs(self.policy.completion_logits(batch, use_base=True), batch.completion_ids)
        mask = batch.completion_mask.float()
        return float((k3(logp, base_logp) * mask).sum() / mask.sum().clamp(min=1))

    def step(self, ro: Rollouts, *, measure_k3: bool = False) -> dict[str, float]:
        """One RL step on ``ro``. Returns ``slow/*`` metrics, and ``drift/k3_train`` exactly when ``measure_k3``."""
        cfg, policy = self.cfg, self.policy
        n, g = ro.rewards.shape
        adv, keep = group_advantages(ro.rewards)
        metrics: dict[str, float] = {
            "slow/reward_mean": float(ro.rewards.mean()),
            "slow/zero_var_groups": float((~keep).sum()),
            "slow/kl_coef": self.kl_coef,
            "slow/completion_len": float(ro.batch.completion_mask.sum(1).float().mean()),
        }
        rows = torch.arange(n * g).view(n, g)[keep].flatten()
        if len(rows) == 0:  # nothing to learn from: every group was flat
            metrics.update({"slow/loss": 0.0, "slow/clip_frac": 0.0, "slow/grad_norm": 0.0})
            if measure_k3:  # still measured, so k3 rows line up with the drift meter's
                metrics["drift/k3_train"] = self._k3(ro.batch)
            return metrics
        batch = ro.batch.select(rows)
        advantages = adv[keep].flatten().to(policy.device)
        group = torch.arange(n).unsqueeze(1).expand(n, g)[keep].flatten()
        mask = batch.completion_mask
        base_logp = None
        kl_coef = self.kl_coef
        if kl_coef > 0 or measure_k3:
            base_logp = Policy.token_logprobs(policy.completion_logits(batch, use_base=True), batch.completion_ids)
        old_logp = None
        if cfg.updates_per_batch > 1:
            with torch.no_grad():
                old_logp = Policy.token_logprobs(policy.completion_logits(batch), batch.completion_ids)
        policy.model.train()
        for update in range(cfg.updates_per_batch):
            logits = policy.completion_logits(batch)
            logp = Policy.token_logprobs(logits, batch.completion_ids)
            # One update per batch: the sampler is the current policy, so pi_old = sg(pi_theta), rho = 1.
            loss, stats = policy_loss(
                logp,
                logp.detach() if old_logp is None else old_logp,
                advantages,
                mask,
                group,
                loss=cfg.loss,
                tau=cfg.tau,
                clip_eps=cfg.clip_eps,
                kl_coef=kl_coef,
                base_logp=base_logp,
                aggregation=cfg.loss_aggregation,
            )
            if update == 0:
                metrics["slow/entropy"] = token_entropy(logits, mask)
                if measure_k3:
                    metrics["drift/k3_train"] = stats["k3"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in self.optimizer.param_groups[0]["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # A non-finite loss or gradient would poison the weights: skip, count, let the loop decide.
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                self.nonfinite_streak += 1
                metrics["slow/nonfinite_skipped"] = float(self.skipped_updates)
                break
            self.nonfinite_streak = 0
            metrics["slow/lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
            self.optimizer.step()
            self.scheduler.step()
            policy.version += 1
        metrics.update(
            {
                "slow/loss": float(loss.detach()),
                "slow/clip_frac": stats["clip_frac"],
                "slow/grad_norm": float(grad_norm),
            }
        )
        return metrics

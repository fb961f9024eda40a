"""The ``trl`` engine's slow channel: TRL's loss, backward (DDP all-reduce), clip and step, one loop step at a time.

    advantages  trl:    (r - mean_g) / (unbiased std_g + 1e-4), flat groups kept (advantage 0)
                native: fastslow's group_advantages, flat groups masked out of the loss
    vLLM        ratio_t = exp(log pi_trainer(y_t) - log pi_vLLM(y_t)), truncated or masked per TRL's mode
    update      TRL's compute_loss -> accelerator.backward -> clip -> AdamW step -> lr_schedule step (once, every rank)

A batch whose groups are all flat makes no update (as native). ``slow/lr`` is the rate the update used.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

import fastslow.engines.trl.adapter as adapter
from fastslow.slow import KLController, Rollouts, group_advantages

if TYPE_CHECKING:
    from fastslow.engines.trl.engine import TrlEngine


def trl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [N, G] -> advantages [N*G] as TRL computes them with ``scale_rewards="group"`` (TRL's ``nanstd``)."""
    mean = rewards.mean(dim=1, keepdim=True)
    return ((rewards - mean) / (adapter.nanstd(rewards, dim=1) + 1e-4)).flatten()


def importance_ratio(trainer_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                     clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio ([B, T] for token modes, [B, 1] for sequence modes)."""
    diff = torch.nan_to_num((trainer_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


class TrlSlowChannel:
    """The slow channel over GRPOTrainer (see the module docstring)."""

    def __init__(self, engine: TrlEngine) -> None:
        self.engine = engine
        self.trainer = engine.trainer
        self.scheduler = engine.scheduler
        self.nonfinite_streak = 0
        self.skipped_updates = 0
        slow = engine.cfg.slow
        # A drift budget (slow.kl_target) steers TRL's beta, which compute_loss reads at every call.
        self.kl_controller = (KLController(slow.kl_target, slow.kl_target_gain, slow.kl_coef or None)
                              if slow.kl_target else None)
        if self.kl_controller is not None:
            self.trainer.beta = self.kl_controller.coef

    def observe_drift(self, kl_rev: float | None) -> None:
        """The drift meter's reverse KL (measured alike on every rank) updates beta under ``slow.kl_target``."""
        if self.kl_controller is not None and kl_rev is not None:
            self.trainer.beta = self.kl_controller.update(kl_rev)

    def state_dict(self) -> dict:
        """Everything to resume the slow channel; under FSDP2 a collective (call on every rank)."""
        tr = self.trainer
        return {"optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                "global_step": adapter.global_step(tr), "nonfinite_streak": self.nonfinite_streak,
                "skipped_updates": self.skipped_updates, "kl_coef": tr.beta,
                **({"kl_controller": self.kl_controller.state_dict()} if self.kl_controller else {})}

    def _optimizer_state(self) -> dict:
        tr = self.trainer
        if not tr.accelerator.is_fsdp2:
            return tr.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # The unsharded state, keyed by parameter name, on the main process (which writes it).
        return get_optimizer_state_dict(tr.model_wrapped, tr.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        tr = self.trainer
        if tr.accelerator.is_fsdp2:  # every rank reads the whole state and keeps its own shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(tr.model_wrapped, tr.optimizer.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            tr.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        adapter.set_global_step(tr, state["global_step"])
        self.nonfinite_streak = state["nonfinite_streak"]
        self.skipped_updates = state["skipped_updates"]
        if self.kl_controller is not None:
            self.kl_controller.load_state_dict(state.get("kl_controller", {"coef": state["kl_coef"]}))
            self.trainer.beta = self.kl_controller.coef

    def _advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages [N*G] and the rows that carry signal [N*G] (all rows under TRL's definition)."""
        if self.engine.cfg.scale.advantages == "native":
            adv, keep = group_advantages(rewards)
            return adv.flatten(), keep.repeat_interleave(rewards.shape[1])
        return trl_advantages(rewards), torch.ones(rewards.numel(), dtype=torch.bool)

    def step(self, rollouts: Rollouts, *, measure_k3: bool = False) -> dict[str, float]:
        """One update on ``rollouts`` (all ranks' rows, in group order); this rank trains its own groups."""
        eng, tr = self.engine, self.trainer
        n, g = rollouts.rewards.shape
        per_rank = n // eng.world_size
        rows = torch.arange(eng.rank * per_rank * g, (eng.rank + 1) * per_rank * g)
        batch = rollouts.batch.select(rows)
        flat = rollouts.rewards.std(dim=1, unbiased=False) <= 1e-8
        metrics = {
            "slow/kl_coef": float(tr.beta),
            "slow/reward_mean": float(rollouts.rewards.mean()),
            "slow/zero_var_groups": float(flat.sum()),
            "slow/completion_len": float(rollouts.batch.completion_mask.sum(1).float().mean()),
        }
        dev = eng.device
        advantages, signal = self._advantages(rollouts.rewards)
        all_mask = rollouts.batch.completion_mask * signal.unsqueeze(1).to(rollouts.batch.completion_mask)
        inputs: dict[str, Any] = {
            "prompt_ids": batch.prompt_ids.to(dev), "prompt_mask": batch.prompt_mask.to(dev),
            "completion_ids": batch.completion_ids.to(dev), "completion_mask": all_mask[rows].to(dev),
            "advantages": advantages[rows].to(dev),
            # TRL normalises its cispo loss by the tokens of the whole (all-rank) batch
            "num_items_in_batch": all_mask.sum().to(dev),
        }
        if bool(flat.all()):  # nothing to learn from (every rank sees the same rewards: all skip together)
            metrics.update({"slow/loss": 0.0, "slow/clip_frac": 0.0, "slow/grad_norm": 0.0})
            if measure_k3:  # still measured, so k3 rows line up with the drift meter's
                inputs["completion_mask"] = batch.completion_mask.to(dev)
                ref = self._logps(inputs, reference=True)
                metrics["drift/k3_train"] = self._k3(inputs, ref, rollouts.batch.completion_mask.sum())
            return metrics
        with torch.no_grad():
            if tr.beta != 0.0 or measure_k3:
                inputs["ref_per_token_logps"] = self._logps(inputs, reference=True)
                if tr.beta == 0.0 and measure_k3:  # TRL measures k3 only when it is in the loss
                    metrics["drift/k3_train"] = self._k3(inputs, inputs["ref_per_token_logps"], all_mask.sum())
            ratio_settings = adapter.importance_sampling(tr)
            if tr.num_iterations > 1 or ratio_settings is not None:
                inputs["old_per_token_logps"] = self._logps(inputs, reference=False)
            if ratio_settings is not None:
                if batch.logprobs is None:
                    raise RuntimeError("vLLM's sampling log-probs are missing from the rollouts")
                inputs["importance_sampling_ratio"] = importance_ratio(
                    inputs["old_per_token_logps"], batch.logprobs.to(dev), inputs["completion_mask"], *ratio_settings)
                if tr.num_iterations == 1:  # one update: the ratio to the sampler is the trainer's own, rho = 1
                    del inputs["old_per_token_logps"]
        tr.model_wrapped.train()
        for _ in range(tr.num_iterations):
            loss = adapter.loss(tr, inputs)
            tr.accelerator.backward(loss)
            # Listed at each step: FSDP2 swaps the registered parameter objects (sharded / whole) as it runs.
            params = [p for p in tr.model.parameters() if p.requires_grad]
            grad_norm = tr.accelerator.clip_grad_norm_(params, tr.args.max_grad_norm or math.inf)
            if not torch.isfinite(torch.as_tensor(grad_norm)):
                # The all-reduced norm is the same on every rank, so every rank skips together.
                tr.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                self.nonfinite_streak += 1
                metrics["slow/nonfinite_skipped"] = float(self.skipped_updates)
                break
            self.nonfinite_streak = 0
            metrics["slow/lr"] = tr.optimizer.param_groups[0]["lr"]  # the rate this update uses
            tr.optimizer.step()
            self.scheduler.step()  # ours, not prepared by accelerate: once per update on every rank
            tr.optimizer.zero_grad(set_to_none=True)
            adapter.set_global_step(tr, adapter.global_step(tr) + 1)
            eng.policy.version += 1
        logged = adapter.take_metrics(tr)
        metrics.update({
            "slow/loss": float(tr.accelerator.reduce(loss.detach(), reduction="mean")),
            "slow/grad_norm": float(grad_norm),
            "slow/entropy": logged.get("entropy", float("nan")),
            "slow/clip_frac": logged.get("cispo_clip_ratio", 0.0),
        })
        if measure_k3 and "kl" in logged:
            metrics["drift/k3_train"] = logged["kl"]
        return metrics

    @torch.no_grad()
    def _k3(self, inputs: dict[str, Any], ref: torch.Tensor, tokens: torch.Tensor) -> float:
        """Mean k3 estimate of KL(pi || base) over the masked completion tokens of every rank, before the update."""
        d = ref - self._logps(inputs, reference=False)
        total = ((torch.exp(d) - d - 1) * inputs["completion_mask"]).sum()
        total = self.trainer.accelerator.reduce(total, reduction="sum")
        return float(total / tokens.clamp(min=1))

    def _logps(self, inputs: dict[str, Any], *, reference: bool) -> torch.Tensor:
        tr = self.trainer
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = inputs["completion_ids"].size(1)
        model, ctx = tr.model_wrapped, contextlib.nullcontext()
        if reference and tr.ref_model is not None:
            model = tr.ref_model
        elif reference and self.engine.cfg.model.lora is None:  # beta 0 (k3 measured only): our frozen copy
            model = self.engine.policy.base_model
        elif reference:  # LoRA: the base is the adapter-disabled model, as in TRL
            ctx = adapter.reference_adapter(tr.accelerator.unwrap_model(tr.model))
        with ctx:
            return adapter.logps(tr, model, ids, attn, keep)

"""Engine ``trl``: the slow channel on TRL's ``GRPOTrainer`` (CISPO) under accelerate, one loop step at a time.

We never call ``GRPOTrainer.train()``: the fastslow loop keeps control of steps, stages and the fast channel.
The trainer supplies what it is good at at scale:

- its model, wrapped by accelerate (DDP, DeepSpeed, FSDP), its optimizer and learning-rate schedule;
- its loss (``compute_loss`` with ``loss_type="cispo"``) and reference log-probs (adapter disabled under LoRA);
- its generation path (``unwrap_model_for_generation``; vLLM through TRL's own switch).

A slow step on B problems x G rollouts keeps each problem's G rows contiguous (one ``num_generations``
group, whatever mix of K population prompts it holds), so TRL's advantage normalisation is one per
problem. With W processes each rank holds B/W whole groups; the sampler shards (prompt, problem) pairs
by whole groups, samples its shard and gathers everything, so every rank sees the same :class:`Scored`
and trains on its own rows. Every rank generates the same number of rows per call (a short share is
padded, the padding discarded), so no rank ever skips a forward the others make.

With W > 1 the GEPA round runs in lockstep on every rank (:class:`LockstepFast`): the same
``gepa.optimize`` round (same seed, same valset) on every rank, every rollout through the collective
sampler, the reflection model called on the main process alone and its reply (or its failure) broadcast
(:class:`LockstepReflector`). Every rank's population is then identical by construction (checked after
each round), and the trainer's model is never used by one rank alone during a round.

Sharded weights (FSDP2): every forward is a collective, so every rank takes part in everything that runs
the model: sampling (HF ``generate`` keeps ranks in step with ``synced_gpus``), the drift meter (each rank
measures, the main process's numbers are broadcast), and checkpoints (the full weights and optimizer state
are gathered on every rank, the main process writes them: a checkpoint does not depend on the process count).

Verified on CPU: one process, and two processes through torchrun/gloo under DDP and under FSDP2 (accelerate
applies FSDP on accelerators only; the tests force its FSDP2 path on CPU). DeepSpeed ZeRO-3 and FSDP version 1
are refused in one line (:func:`checked_sharding`): their checkpoint path was never run. vLLM is wired through
TRL's own switch but was not run here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastslow.config import Config, ConfigError
from fastslow.policy import Batch, Policy, _pad_cat
from fastslow.reflect import GuardedReflector, ReflectionError
from fastslow.rollout import Scored
from fastslow.slow import KLController, Rollouts
from fastslow.tasks import Problem, Task, safe_verify
from fastslow.util import one_line

if TYPE_CHECKING:
    from fastslow.engines.base import ChannelEngine

INSTALL_HINT = "engine 'trl' needs TRL and accelerate: pip install 'fastslow[scale]'"


class EngineUnavailable(ConfigError):
    """The environment lacks what ``engine: trl`` needs (a user error: one line, exit 2)."""


def require_trl() -> None:
    """Raise :class:`EngineUnavailable` (one line saying what to install) when TRL or accelerate is missing."""
    try:
        import accelerate  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailable(f"{INSTALL_HINT} ({exc.name or exc} cannot be imported)") from None


def world_size_from_env() -> int:
    """Processes of this run, as torchrun / accelerate launch announce them (1 when started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding_of_env(env: Mapping[str, str] | None = None) -> str | None:
    """The sharding ``accelerate launch`` announced to this process ('DeepSpeed ZeRO-3', 'FSDP2', 'FSDP1'), or None."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP2" if env.get("FSDP_VERSION", "1") == "2" else "FSDP1"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def sharding_of_accelerate_config(path: str | Path | None) -> str | None:
    """The sharding an accelerate config file asks for ('DeepSpeed ZeRO-3', 'FSDP2', 'FSDP1'), or None.

    Raises :class:`ConfigError` when the file cannot be read as YAML.
    """
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"field 'scale.accelerate_config': cannot read {str(path)!r}: {one_line(exc, 200)}") from None
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "FSDP2" if str((data.get("fsdp_config") or {}).get("fsdp_version", 1)) == "2" else "FSDP1"
    if kind == "DEEPSPEED" and str((data.get("deepspeed_config") or {}).get("zero_stage")) == "3":
        return "DeepSpeed ZeRO-3"
    return None


SUPPORTED_SHARDING = (None, "FSDP2")


def checked_sharding(accelerate_config: str | Path | None = None) -> str | None:
    """The sharding asked for (by ``accelerate_config``, else by ``accelerate launch``'s environment), or None.

    Raises :class:`ConfigError` (one line, exit 2) for a sharding whose collective paths were never run.
    """
    kind = sharding_of_accelerate_config(accelerate_config) or sharding_of_env()
    if kind in SUPPORTED_SHARDING:
        return kind
    raise ConfigError(
        f"engine 'trl': {kind} is not supported in this version (its sharded checkpoints were never run); "
        "shard with FSDP2 (configs/accelerate/fsdp2.yaml) or use DDP (configs/accelerate/ddp.yaml)"
    )


def grpo_config(**kwargs: Any) -> Any:
    """TRL's ``GRPOConfig``; its deprecation notices about its own field names are not the user's concern."""
    from trl import GRPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GRPOConfig(**kwargs)


SCRATCH_PLACEHOLDER = "<a temporary directory per run>"


def grpo_kwargs(cfg: Config, *, world_size: int, cuda: bool | None = None,
                output_dir: str = SCRATCH_PLACEHOLDER) -> dict[str, Any]:
    """The one mapping of a fastslow config onto ``trl.GRPOConfig`` keyword arguments (see ``ScaleConfig``).

    ``cuda`` None: the device ``model.device`` resolves to on this machine. ``output_dir``: TRL's own
    directory (it saves and logs nothing there, as we never call ``train()``), kept out of the run dir.
    Raises :class:`ConfigError` when the batch cannot be split into whole groups per process.
    """
    s, sc = cfg.slow, cfg.scale
    if s.batch_problems % world_size:
        raise ConfigError(
            f"field 'slow.batch_problems': {s.batch_problems} problems cannot be split over {world_size} processes "
            "(each process trains whole groups): use a multiple of the process count"
        )
    rows_per_rank = s.batch_problems // world_size * s.group_size
    if cuda is None:
        cuda = cfg.model.device != "cpu" and torch.cuda.is_available()
    kw: dict[str, Any] = {
        "output_dir": output_dir,
        "loss_type": s.loss,
        "epsilon_high": s.tau if s.loss == "cispo" else s.clip_eps,
        "epsilon": s.clip_eps,
        "beta": s.kl_coef,
        "num_generations": s.group_size,
        "per_device_train_batch_size": rows_per_rank,
        "steps_per_generation": 1,
        "gradient_accumulation_steps": 1,
        "num_iterations": s.updates_per_batch,
        "scale_rewards": "group",
        "learning_rate": s.lr,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": s.warmup_steps,
        "adam_beta1": s.betas[0],
        "adam_beta2": s.betas[1],
        "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm or 0.0,
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "bf16": cfg.model.dtype == "bfloat16" and cuda,
        "fp16": cfg.model.dtype == "float16" and cuda,
        "use_cpu": not cuda,
        "gradient_checkpointing": sc.gradient_checkpointing,
        "use_vllm": sc.vllm != "off",
        "seed": cfg.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "log_completions": False,
        "disable_dropout": True,
    }
    if sc.vllm != "off":
        kw["vllm_mode"] = sc.vllm
        if sc.vllm == "colocate":
            kw["vllm_gpu_memory_utilization"] = sc.vllm_gpu_memory_utilization
            kw["vllm_tensor_parallel_size"] = sc.vllm_tensor_parallel_size
        else:
            kw["vllm_server_host"] = sc.vllm_server_host
            kw["vllm_server_port"] = sc.vllm_server_port
    return kw


def lora_config(cfg: Config):
    """``model.lora`` as a ``peft.LoraConfig`` (TRL's ``peft_config``), or None."""
    if cfg.model.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.model.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      task_type="CAUSAL_LM")


def trl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [N, G] -> advantages [N*G] as TRL computes them with ``scale_rewards="group"``.

    The group statistics come from TRL's own ``nanstd`` so a TRL change shows up here, not silently.
    """
    from trl.trainer.utils import nanstd

    mean = rewards.mean(dim=1, keepdim=True)
    std = nanstd(rewards, dim=1, keepdim=True)
    return ((rewards - mean) / (std + 1e-4)).flatten()


def _no_reward(prompts, completions, **kwargs) -> list[float]:  # pragma: no cover - never called
    """GRPOTrainer wants a reward function; ours are the tasks' verifiers, applied by the sampler."""
    raise RuntimeError("fastslow scores rollouts itself")


@contextlib.contextmanager
def _root_unsharded(root: Any):
    """FSDP2 root ``root`` with its own parameters gathered (no-op for None).

    Under LoRA, HF ``generate`` runs the inner model's forward, never the root's (the PEFT wrapper), so the
    root's pre-forward hook, which gathers the root's own parameters, does not fire; the wrapped layers still
    gather theirs in their own hooks.
    """
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


class TrlPolicy(Policy):
    """A :class:`Policy` over the trainer's own model: sampling goes through the trainer's generation path."""

    def __init__(self, trainer, tokenizer, base_model=None) -> None:
        super().__init__(trainer.model, tokenizer, trainer.accelerator.device, base_model=base_model)
        self.trainer = trainer

    def generate(self, prompts: Sequence[str], *, temperature: float, top_p: float = 1.0, max_new_tokens: int,
                 seed: int, use_base: bool = False, max_batch: int = 256) -> Batch:
        """As :meth:`Policy.generate`; under DeepSpeed ZeRO-3 TRL gathers the sharded weights for the call.

        With vLLM on, TRL samples at the trainer's temperature (``slow.temperature``), greedy evaluation
        included: vLLM's sampling parameters belong to TRL (not verified here, no GPU).
        """
        tr = self.trainer
        if tr.use_vllm and not use_base:
            return self._generate_vllm(prompts, seed=seed)
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(tr.model_wrapped, tr.accelerator,
                                         gather_deepspeed3_params=tr.args.ds3_gather_for_generation), \
                _root_unsharded(tr.model_wrapped if tr.accelerator.is_fsdp2 else None):
            return super().generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    seed=seed, use_base=use_base, max_batch=max_batch)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP2 the whole weights gathered from every rank (call on all ranks); else None."""
        accelerator = self.trainer.accelerator
        if not accelerator.is_fsdp2:
            return None
        state = accelerator.get_state_dict(self.trainer.model_wrapped)
        # Gathered copies of tied weights are separate tensors: tie them again, so they are saved once.
        for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            if target in state and source in state:
                state[target] = state[source]
        return state

    def _generate_vllm(self, prompts: Sequence[str], *, seed: int) -> Batch:  # pragma: no cover - needs a GPU
        torch.manual_seed(seed)
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids, _ = self.trainer._generate_single_turn(ids, None, {}, 1)
        return self._batch_from_ids(ids, completion_ids)

    def _batch_from_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> Batch:
        pad = self.tokenizer.pad_token_id
        rows = [(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long)) for p in prompt_ids]
        pids, pmask = _pad_cat([r[0] for r in rows], [r[1] for r in rows], pad, left=True)
        crows = [(torch.tensor([c or [pad]]), torch.tensor([[1] * len(c) or [0]])) for c in completion_ids]
        cids, cmask = _pad_cat([r[0] for r in crows], [r[1] for r in crows], pad, left=False)
        texts = self.tokenizer.batch_decode(cids.masked_fill(cmask == 0, pad), skip_special_tokens=True)
        dev = self.device
        return Batch(pids.to(dev), pmask.to(dev), cids.to(dev), cmask.to(dev), texts)


class TrlSlowChannel:
    """The slow channel over GRPOTrainer: TRL's advantages, loss, backward (DDP all-reduce), clip, step."""

    def __init__(self, engine: TrlEngine) -> None:
        self.engine = engine
        self.trainer = engine.trainer
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
        return {"optimizer": self._optimizer_state(), "scheduler": tr.lr_scheduler.state_dict(),
                "global_step": tr.state.global_step, "nonfinite_streak": self.nonfinite_streak,
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
        tr.lr_scheduler.load_state_dict(state["scheduler"])
        tr.state.global_step = state["global_step"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.skipped_updates = state["skipped_updates"]
        if self.kl_controller is not None:
            self.kl_controller.load_state_dict(state.get("kl_controller", {"coef": state["kl_coef"]}))
            self.trainer.beta = self.kl_controller.coef

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
        mask = batch.completion_mask.to(dev)
        inputs: dict[str, Any] = {
            "prompt_ids": batch.prompt_ids.to(dev), "prompt_mask": batch.prompt_mask.to(dev),
            "completion_ids": batch.completion_ids.to(dev), "completion_mask": mask,
            "advantages": trl_advantages(rollouts.rewards)[rows].to(dev),
            # TRL normalises its cispo loss by the tokens of the whole (all-rank) batch
            "num_items_in_batch": rollouts.batch.completion_mask.sum().to(dev),
        }
        with torch.no_grad():
            if tr.beta != 0.0 or measure_k3:
                inputs["ref_per_token_logps"] = self._logps(inputs, reference=True)
            if tr.num_iterations > 1:
                inputs["old_per_token_logps"] = self._logps(inputs, reference=False)
        tr.model_wrapped.train()
        for _ in range(tr.num_iterations):
            loss = tr.compute_loss(tr.model_wrapped, inputs)
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
            tr.optimizer.step()
            tr.lr_scheduler.step()
            tr.optimizer.zero_grad(set_to_none=True)
            tr.state.global_step += 1
            eng.policy.version += 1
        logged = tr._metrics["train"]
        metrics.update({
            "slow/loss": float(tr.accelerator.reduce(loss.detach(), reduction="mean")),
            "slow/grad_norm": float(grad_norm),
            "slow/lr": tr.lr_scheduler.get_last_lr()[0],
            "slow/entropy": logged["entropy"][-1] if logged.get("entropy") else float("nan"),
            "slow/clip_frac": logged["cispo_clip_ratio"][-1] if logged.get("cispo_clip_ratio") else 0.0,
        })
        if "kl" in logged and logged["kl"]:
            metrics["drift/k3_train"] = logged["kl"][-1]
        logged.clear()  # TRL appends per call and only flushes in its own log(); we report per step
        return metrics

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
            from trl.trainer.utils import use_adapter

            unwrapped = tr.accelerator.unwrap_model(tr.model)
            ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with ctx:
            logps, _, _ = tr._get_per_token_logps_and_entropies(model, ids, attn, keep, batch_size=len(ids))
        return logps


class LockstepReflector(GuardedReflector):
    """The guarded reflector of a lockstep round: the main process calls the model, every rank gets its reply.

    Timeout, retries and size checks happen on the main process only (inside the guard); the outcome (the
    reply, or the failure as one line) and the guard's counters are broadcast, so every rank returns the same
    text or raises the same :class:`ReflectionError`, and ``exhausted`` turns true on every rank together.
    """

    def __init__(self, guard: GuardedReflector, *, is_main: bool, broadcast: Callable[[Any], Any]) -> None:
        self.__dict__.update(vars(guard))  # the same model, limits and counters as the guard it replaces
        self.is_main, self.broadcast = is_main, broadcast

    _COUNTERS = ("calls", "errors", "failed_calls", "consecutive_failures", "last_error")

    def __call__(self, prompt: Any) -> str:
        reply = message = None
        if self.is_main:
            try:
                reply = super().__call__(prompt)
            except ReflectionError as exc:
                message = str(exc)
            except Exception as exc:  # noqa: BLE001 - a fault of the guard itself: still sent, or the others hang
                message = one_line(f"{type(exc).__name__}: {exc}")
        counters = {k: getattr(self, k) for k in self._COUNTERS}
        reply, message, counters = self.broadcast((reply, message, counters))
        for k, v in counters.items():
            setattr(self, k, v)
        if message is not None:  # the same type and text on every rank, so GEPA takes the same path on each
            raise ReflectionError(message)
        return reply


class LockstepFast:
    """A fast channel whose rounds run in lockstep on every rank (see the module docstring).

    ``inner`` is a :class:`~fastslow.fast.FastChannel` over the collective sampler with a
    :class:`LockstepReflector`. Only the main process keeps GEPA's scratch dir in the run dir. After each
    round the ranks compare digests of their state and round: a difference is a fastslow bug and stops the run.
    """

    def __init__(self, inner, engine: TrlEngine) -> None:
        self.inner, self.engine = inner, engine

    @property
    def population(self) -> list[str]:
        return self.inner.population

    @property
    def best(self) -> dict[str, str]:
        return self.inner.best

    def run_round(self, task: Task, workdir: Path | None = None):
        eng = self.engine
        result = self.inner.run_round(task, workdir=workdir if eng.is_main else None)
        mine = json.dumps([self.inner.state_dict(), result.metrics, result.rollouts, result.accepted, result.error],
                          sort_keys=True, default=str)
        from accelerate.utils import gather_object

        digests = gather_object([hashlib.sha256(mine.encode()).hexdigest()])
        if len(set(digests)) > 1:
            raise RuntimeError(f"GEPA round {self.inner.rounds} diverged between ranks (state digests {digests})")
        return result

    def contexts(self, task: Task, problem, group_size: int, view: str = "train") -> list[str]:
        return self.inner.contexts(task, problem, group_size, view)

    def preflight(self) -> None:
        self.inner.preflight()  # the engine calls it on the main process and broadcasts the verdict

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class TrlSampler:
    """The engine's :class:`~fastslow.channels.Sampler`: a collective over all ranks (see :meth:`TrlEngine.sample`)."""

    def __init__(self, engine: TrlEngine, verify_timeout_s: float | None = None) -> None:
        self.engine, self.verify_timeout_s = engine, verify_timeout_s

    def __call__(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0) -> Scored:
        return self.engine.sample(task, pairs, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  top_p=top_p, verify_timeout_s=self.verify_timeout_s)


class TrlEngine:
    """GRPOTrainer built from a fastslow config, prepared by accelerate, driven one loop step at a time.

    ``policy`` (a :class:`TrlPolicy` over the trainer's model), ``slow`` (:class:`TrlSlowChannel`) and
    :meth:`sample` are what the loop uses; ``is_main``/``world_size``/``rank`` guard file writes and shards.
    ``weights`` (a checkpoint's ``model/`` dir) replaces the trained part after the trainer is built, so the
    reference stays the base model.
    """

    name = "trl"

    def __init__(self, cfg: Config, *, weights: str | Path | None = None, build: bool = True) -> None:
        require_trl()
        checked_sharding(cfg.scale.accelerate_config)  # before the model loads: nothing spent on a refused run
        self.cfg = cfg
        # TRL's output_dir: our own per-process temporary directory (removed by close()), so concurrent runs
        # never share one and nothing of TRL's lands in the run dir.
        self.scratch = tempfile.mkdtemp(prefix="fastslow-trl-")
        self.args = grpo_config(**grpo_kwargs(cfg, world_size=world_size_from_env(), output_dir=self.scratch))
        # GRPOConfig set up the process group (torchrun's environment): rank and size are known from here on.
        self.world_size, self.rank = self.args.world_size, self.args.process_index
        self.is_main = self.rank == 0
        self.trainer = None
        if build:
            self.load(weights)

    def load(self, weights: str | Path | None = None) -> None:
        """Build the model, the trainer, its optimizer and schedule; ``weights`` replaces the trained part."""
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        from trl import GRPOTrainer

        from fastslow.policy import resolve_model_path

        hf_logging.disable_progress_bar()
        cfg = self.cfg
        path = resolve_model_path(cfg.model.path)
        if not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
            raise FileNotFoundError(f"model path not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
        # A placeholder row: GRPOTrainer wants a dataset, our loop supplies the problems.
        self.trainer = tr = GRPOTrainer(
            model=model, reward_funcs=[_no_reward], args=self.args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": ["-"]}), peft_config=lora_config(cfg),
        )
        tokenizer.padding_side = "left"
        base = None
        if cfg.model.lora is None:  # full fine-tuning: TRL's reference when it has one, else a frozen copy
            base = tr.ref_model if tr.ref_model is not None else copy.deepcopy(tr.model).eval().requires_grad_(False)
        if weights is not None:  # after the base is taken: the base stays the model's own weights on resume
            self._load_weights(Path(weights))
        tr.create_optimizer_and_scheduler(num_training_steps=max(cfg.total_steps * self.args.num_iterations, 1))
        plugin = tr.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
            # No dataloader goes through prepare() (the loop supplies the problems): tell DeepSpeed the batch.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.args.per_device_train_batch_size
        tr.model_wrapped, tr.optimizer, tr.lr_scheduler = tr.accelerator.prepare(tr.model, tr.optimizer,
                                                                                 tr.lr_scheduler)
        tr.current_gradient_accumulation_steps = 1
        if tr.accelerator.is_fsdp2:
            # FSDP2 names its root at the first forward: make that the whole model, not a layer that a
            # LoRA generate reaches first (see _root_unsharded).
            with torch.no_grad():
                tr.model_wrapped(input_ids=torch.tensor([[tokenizer.pad_token_id]], device=tr.accelerator.device))
        self.device = tr.accelerator.device
        self.policy = TrlPolicy(tr, tokenizer, base_model=base)
        self.slow = TrlSlowChannel(self)

    def _load_weights(self, weights: Path) -> None:
        model = self.trainer.model
        if self.cfg.model.lora is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
        else:
            from transformers import AutoModelForCausalLM

            model.load_state_dict(AutoModelForCausalLM.from_pretrained(str(weights)).state_dict())

    def close(self) -> None:
        """Remove the temporary directory this engine made for TRL."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity in one process)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def describe(self) -> dict[str, Any]:
        """The resolved settings (what ``--dry-run`` prints)."""
        keys = sorted(grpo_kwargs(self.cfg, world_size=self.world_size))
        return {"engine": self.name, "world_size": self.world_size, "vllm": self.cfg.scale.vllm,
                "grpo_config": {k: getattr(self.args, k) for k in keys}}

    def sample(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float, max_new_tokens: int,
               seed: int, top_p: float = 1.0, verify_timeout_s: float | None = None) -> Scored:
        """The :class:`~fastslow.channels.Sampler` of this engine: a collective over all ranks.

        Rank r samples and scores its contiguous share of ``pairs`` (whole groups when ``len(pairs)`` is
        B x G with W | B); the shares are gathered so every rank returns the same :class:`Scored`.
        Each share is seeded by (seed, rank) so a run is deterministic for a fixed process count.
        """
        w, r = self.world_size, self.rank
        share = math.ceil(len(pairs) / w)
        mine = list(pairs[r * share:(r + 1) * share])
        n = len(mine)
        if w > 1 and n < share:
            # Every rank generates `share` rows, so none skips a forward the others make (sharded weights
            # need every rank in each one); the padding rows are discarded unscored.
            mine += [pairs[-1]] * (share - n)
        comp, prompt_ids, verdicts, errors, batch = [], [], [], 0, None
        if mine:
            pol = self.policy
            prompts = [pol.format(system, problem.prompt) for system, problem in mine]
            batch = pol.generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 seed=seed + r)
            for (_, problem), text in zip(mine[:n], batch.texts[:n], strict=True):
                verdict, errored = safe_verify(task, problem, text, timeout_s=verify_timeout_s)
                verdicts.append(verdict)
                errors += errored
            rows = zip(batch.prompt_ids[:n].cpu(), batch.prompt_mask[:n].cpu())
            prompt_ids = [ids[m.bool()].tolist() for ids, m in rows]
            rows = zip(batch.completion_ids[:n].cpu(), batch.completion_mask[:n].cpu())
            comp = [ids[m.bool()].tolist() for ids, m in rows]
        if w > 1 or batch is None:
            from accelerate.utils import gather_object

            shares = gather_object([(prompt_ids, comp, verdicts, errors)]) if w > 1 else [([], [], [], 0)]
            prompt_ids = [x for s in shares for x in s[0]]
            comp = [x for s in shares for x in s[1]]
            verdicts = [x for s in shares for x in s[2]]
            errors = sum(s[3] for s in shares)
            return Scored(self.policy._batch_from_ids(prompt_ids, comp), verdicts, errors)
        return Scored(batch, verdicts, errors)


def build(cfg: Config, weights: Path | None) -> ChannelEngine:
    """The ``trl`` engine (registered by :mod:`fastslow.engines` as ``engine: trl``)."""
    from fastslow.channels import fast_on, slow_on
    from fastslow.engines.base import ChannelEngine
    from fastslow.fast import FastChannel
    from fastslow.reflect import make_reflector
    from fastslow.rollout import PolicySampler

    eng = TrlEngine(cfg, weights=weights)
    policy = eng.policy
    if not slow_on(cfg.method):
        policy.model.requires_grad_(False)
    fast = None
    sampler = TrlSampler(eng, cfg.verify_timeout_s)
    if fast_on(cfg.method):
        lockstep = eng.world_size > 1
        # One process: the plain sampler. Several: every rank runs the round through the collective sampler.
        fast_sampler = sampler if lockstep else PolicySampler(policy, verify_timeout_s=cfg.verify_timeout_s)
        fast = FastChannel(fast_sampler, cfg.fast, make_reflector(cfg.fast.reflector, cfg.fast), seed=cfg.seed,
                           max_new_tokens=cfg.slow.max_new_tokens, version=lambda: policy.version)
        if lockstep:
            fast.reflector = LockstepReflector(fast.reflector, is_main=eng.is_main, broadcast=eng.broadcast)
            fast = LockstepFast(fast, eng)
    return ChannelEngine("trl", policy, sampler, eng.slow if slow_on(cfg.method) else None, fast,
                         world_size=eng.world_size, is_main=eng.is_main, broadcast_fn=eng.broadcast,
                         close_fn=eng.close, sharding="FSDP2" if eng.trainer.accelerator.is_fsdp2 else None)


def check_launch(cfg: Config, accelerate_config: str | None) -> None:
    """What the processes would refuse, refused before any starts: TRL missing, an unsupported sharding."""
    require_trl()
    checked_sharding(accelerate_config)


def describe(cfg: Config, world_size: int | None) -> dict[str, Any]:
    """``--dry-run`` for engine ``trl``: an unsupported sharding (ZeRO-3, FSDP1) is refused
    (:func:`checked_sharding`), the GRPOConfig is built from the mapping (TRL validates it); the world size is
    ``world_size`` or ``scale.nproc``; the device is the one the config names (``model.device``), not this
    machine's. No weights are loaded."""
    import importlib.util

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
    return {
        "world_size": size,
        "vllm": cfg.scale.vllm,
        # vLLM is not a fastslow dependency (GPU wheels): say whether this machine could start it
        "vllm_installed": importlib.util.find_spec("vllm") is not None,
        "accelerate_config": cfg.scale.accelerate_config,
        "sharding": sharding,
        "rows_per_step": cfg.slow.batch_problems * cfg.slow.group_size,
        "grpo_config": {k: kw[k] for k in sorted(kw)},
    }

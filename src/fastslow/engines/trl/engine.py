"""The ``trl`` engine's build: model, trainer, optimizer and schedule, the policy over the trainer's model, and
the collective sampler.

Full fine-tuning keeps a frozen copy of the initial weights as the base, taken before ``GRPOTrainer`` patches
the model's ``forward`` (a copy taken after it would call the live policy: a KL of 0); TRL's own reference
model is the base when TRL builds one (``beta`` > 0). Under LoRA the base is the adapter-disabled model.

Sharded weights (FSDP2): every forward is a collective, so every rank takes part in everything that runs the
model: sampling (HF ``generate`` keeps ranks in step with ``synced_gpus``), the drift meter (each rank measures,
the main process's numbers are broadcast), and checkpoints (the full weights and optimizer state are gathered
on every rank, the main process writes them: a checkpoint does not depend on the process count).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fastslow.engines.trl.adapter as adapter
from fastslow.config import Config
from fastslow.engines.trl.mapping import (
    checked_sharding,
    grpo_config,
    grpo_kwargs,
    lora_config,
    require_trl,
    world_size_from_env,
)
from fastslow.policy import Batch, Policy, _pad_cat, aligned
from fastslow.rollout import Scored
from fastslow.slow import schedule_summary
from fastslow.tasks import Problem, Task, safe_verify


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
        self.share_prompts = not trainer.accelerator.is_fsdp2  # see Policy.share_prompts

    def generate(self, prompts: Sequence[str], *, temperature: float, top_p: float = 1.0, max_new_tokens: int,
                 seed: int, use_base: bool = False, max_batch: int = 256) -> Batch:
        """As :meth:`Policy.generate`; with vLLM on (policy samples) through TRL's vLLM path with this call's
        settings, the batch then carries vLLM's log-probs of the sampled tokens."""
        tr = self.trainer
        if adapter.uses_vllm(tr) and not use_base:
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            completion_ids, logprobs = adapter.generate_vllm(tr, ids, temperature=temperature, top_p=top_p,
                                                             max_new_tokens=max_new_tokens, seed=seed)
            return self.batch_from_ids(ids, completion_ids, logprobs)
        with adapter.unwrapped_for_generation(tr), _root_unsharded(tr.model_wrapped if tr.accelerator.is_fsdp2
                                                                   else None):
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

    def batch_from_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                       logprobs: list[list[float]] | None = None) -> Batch:
        """A :class:`Batch` of token ids (and the sampler's log-probs of the completion tokens, when given)."""
        pad = self.tokenizer.pad_token_id
        rows = [(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long)) for p in prompt_ids]
        pids, pmask = _pad_cat([r[0] for r in rows], [r[1] for r in rows], pad, left=True)
        crows = [(torch.tensor([c or [pad]]), torch.tensor([[1] * len(c) or [0]])) for c in completion_ids]
        cids, cmask = _pad_cat([r[0] for r in crows], [r[1] for r in crows], pad, left=False)
        texts = self.tokenizer.batch_decode(cids.masked_fill(cmask == 0, pad), skip_special_tokens=True)
        lps = None
        if logprobs is not None:
            lps = torch.zeros(cids.shape, dtype=torch.float32)
            for i, row in enumerate(logprobs):
                lps[i, : len(row)] = torch.tensor([math.nan if x is None else x for x in row], dtype=torch.float32)
            lps = lps.to(self.device)
        dev = self.device
        return Batch(pids.to(dev), pmask.to(dev), cids.to(dev), cmask.to(dev), texts, lps)


class TrlEngine:
    """GRPOTrainer built from a fastslow config, prepared by accelerate, driven one loop step at a time.

    ``policy`` (a :class:`TrlPolicy` over the trainer's model), ``slow``
    (:class:`~fastslow.engines.trl.slow.TrlSlowChannel`) and :meth:`sample` are what the loop uses;
    ``is_main``/``world_size``/``rank`` guard file writes and shards. ``weights`` (a checkpoint's ``model/``
    dir) replaces the trained part after the base is taken, so the base stays the model's own weights.
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
        from fastslow.slow import lr_schedule

        hf_logging.disable_progress_bar()
        cfg = self.cfg
        path = resolve_model_path(cfg.model.path)
        if not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
            raise FileNotFoundError(f"model path not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
        # The base of full fine-tuning: a copy of the weights as loaded, before GRPOTrainer patches the model's
        # forward (whose closure would keep calling the live policy) and before resumed weights replace them.
        frozen = None
        if cfg.model.lora is None and not self.args.beta:
            model = aligned(model)  # as its deep copy: the same kernels, bit-identical logits before any update
            frozen = adapter.as_reference(copy.deepcopy(model).eval().requires_grad_(False), self.args)
        # A placeholder row: GRPOTrainer wants a dataset, our loop supplies the problems.
        self.trainer = tr = GRPOTrainer(
            model=model, reward_funcs=[_no_reward], args=self.args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": ["-"]}), peft_config=lora_config(cfg),
        )
        tokenizer.padding_side = "left"
        base = None
        if cfg.model.lora is None:  # TRL's reference when it has one (loaded from the model's files), else ours
            base = aligned(tr.ref_model) if tr.ref_model is not None else frozen.to(tr.accelerator.device)
        if weights is not None:
            self._load_weights(Path(weights))
        if cfg.scale.gradient_checkpointing:  # transformers turns it on in Trainer.train(), which we never call
            inner = tr.model.get_base_model() if hasattr(tr.model, "get_base_model") else tr.model
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tr.create_optimizer()
        # fastslow's schedule (one definition on every engine), stepped by the slow channel once per update.
        # Not prepared by accelerate: a prepared scheduler steps once per process per update.
        self.scheduler = lr_schedule(tr.optimizer, cfg.slow.warmup_steps)
        tr.model_wrapped, tr.optimizer = tr.accelerator.prepare(tr.model, tr.optimizer)
        tr.lr_scheduler = self.scheduler
        if tr.accelerator.is_fsdp2:
            # FSDP2 names its root at the first forward: make that the whole model, not a layer that a
            # LoRA generate reaches first (see _root_unsharded).
            with torch.no_grad():
                tr.model_wrapped(input_ids=torch.tensor([[tokenizer.pad_token_id]], device=tr.accelerator.device))
        self.device = tr.accelerator.device
        self.policy = TrlPolicy(tr, tokenizer, base_model=base)
        from fastslow.engines.trl.slow import TrlSlowChannel

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

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def describe(self) -> dict[str, Any]:
        """The resolved settings (what ``--dry-run`` prints)."""
        keys = sorted(grpo_kwargs(self.cfg, world_size=self.world_size))
        return {"engine": self.name, "world_size": self.world_size, "vllm": self.cfg.scale.vllm,
                "lr_schedule": schedule_summary(self.cfg.slow),
                "gradient_checkpointing": self.cfg.scale.gradient_checkpointing,
                "grpo_config": {k: getattr(self.args, k) for k in keys}}

    def sample(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float, max_new_tokens: int,
               seed: int, top_p: float = 1.0, verify_timeout_s: float | None = None) -> Scored:
        """The :class:`~fastslow.channels.Sampler` of this engine: a collective over all ranks.

        Rank r samples and scores its contiguous share of ``pairs`` (whole groups when ``len(pairs)`` is
        B x G with W | B); the shares are gathered so every rank returns the same :class:`Scored`.
        Each share is seeded by (seed, rank) so a run is deterministic for a fixed process count.
        Every rank generates the same number of rows per call (a short share is padded, the padding
        discarded), so no rank ever skips a forward the others make.
        """
        w, r = self.world_size, self.rank
        share = math.ceil(len(pairs) / w)
        mine = list(pairs[r * share:(r + 1) * share])
        n = len(mine)
        if w > 1 and n < share:
            mine += [pairs[-1]] * (share - n)
        comp, prompt_ids, lps, verdicts, errors, batch = [], [], None, [], 0, None
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
            if batch.logprobs is not None:
                rows = zip(batch.logprobs[:n].cpu(), batch.completion_mask[:n].cpu())
                lps = [lp[m.bool()].tolist() for lp, m in rows]
        if w > 1 or batch is None:
            shares = self.gather((prompt_ids, comp, lps, verdicts, errors)) if w > 1 else [([], [], None, [], 0)]
            prompt_ids = [x for s in shares for x in s[0]]
            comp = [x for s in shares for x in s[1]]
            lps = None if any(s[2] is None for s in shares if s[1]) else [x for s in shares for x in (s[2] or [])]
            verdicts = [x for s in shares for x in s[3]]
            errors = sum(s[4] for s in shares)
            return Scored(self.policy.batch_from_ids(prompt_ids, comp, lps), verdicts, errors)
        return Scored(batch, verdicts, errors)


class TrlSampler:
    """The engine's :class:`~fastslow.channels.Sampler`: a collective over all ranks (see :meth:`TrlEngine.sample`)."""

    def __init__(self, engine: TrlEngine, verify_timeout_s: float | None = None) -> None:
        self.engine, self.verify_timeout_s = engine, verify_timeout_s

    def __call__(self, task: Task, pairs: Sequence[tuple[str, Problem]], *, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0) -> Scored:
        return self.engine.sample(task, pairs, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  top_p=top_p, verify_timeout_s=self.verify_timeout_s)

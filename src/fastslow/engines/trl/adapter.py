"""Every private member of TRL the engine relies on, in one place.

The engine drives ``GRPOTrainer`` one loop step at a time instead of calling ``train()``, so it reaches a few
members TRL does not promise to keep. Nothing else in :mod:`fastslow.engines.trl` names them; :func:`problems`
lists what no longer matches (a test calls it, so a TRL upgrade that moves one fails loudly, not silently):

- ``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size=)``;
- ``_generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)`` and, under vLLM, the
  sampling settings of ``vllm_generation`` (``temperature``, ``top_p``, ``max_completion_length``,
  ``generation_kwargs``) and ``_last_loaded_step``;
- ``_metrics["train"]`` (what ``compute_loss`` measured: ``entropy``, ``kl``, ``cispo_clip_ratio``);
- the inputs ``compute_loss`` reads (``advantages``, ``num_items_in_batch``, ``ref_per_token_logps``,
  ``old_per_token_logps``, ``importance_sampling_ratio``) and the trainer state it writes
  (``state.global_step``, ``current_gradient_accumulation_steps``);
- ``trl.trainer.utils.use_adapter`` / ``nanstd`` / ``add_fused_lm_head`` and ``trl.models.unwrap_model_for_generation``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

LOSS_INPUTS = ("advantages", "num_items_in_batch", "ref_per_token_logps", "old_per_token_logps",
               "importance_sampling_ratio", "current_gradient_accumulation_steps")
METRICS = ("entropy", "kl", "cispo_clip_ratio")
VLLM_SAMPLING = ("temperature", "top_p", "max_completion_length", "generation_kwargs")


def logps(trainer: Any, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Per-token log-probs [B, keep] of the last ``keep`` tokens (TRL divides the logits by its temperature)."""
    out, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, keep,
                                                           batch_size=len(input_ids))
    return out


def as_reference(model: Any, args: Any) -> Any:
    """``model`` (a frozen copy of the initial weights) made callable by :func:`logps` as TRL makes its own
    reference model: TRL's fused LM head (temperature-scaled log-probs) added; plain calls are unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
    return model


def loss(trainer: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """TRL's loss on ``inputs`` (one optimizer step per call: no gradient accumulation)."""
    trainer.current_gradient_accumulation_steps = 1
    return trainer.compute_loss(trainer.model_wrapped, inputs)


def take_metrics(trainer: Any) -> dict[str, float]:
    """The last value of each of :data:`METRICS` that ``compute_loss`` logged since the previous call, then forgets
    them (TRL appends per call and only flushes in its own ``log()``)."""
    logged = trainer._metrics["train"]
    out = {k: logged[k][-1] for k in METRICS if logged.get(k)}
    logged.clear()
    return out


def global_step(trainer: Any) -> int:
    return trainer.state.global_step


def set_global_step(trainer: Any, step: int) -> None:
    """The optimizer updates done (TRL re-syncs vLLM's weights when it changes)."""
    trainer.state.global_step = step


@contextlib.contextmanager
def reference_adapter(unwrapped_peft_model: Any) -> Iterator[None]:
    """Under LoRA, the base model: the adapter disabled (TRL's ``use_adapter``; a ``ref`` adapter when present)."""
    from trl.trainer.utils import use_adapter

    name = "ref" if "ref" in unwrapped_peft_model.peft_config else None
    with use_adapter(unwrapped_peft_model, adapter_name=name):
        yield


def nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    from trl.trainer.utils import nanstd as trl_nanstd

    return trl_nanstd(x, dim=dim, keepdim=True)


def unwrapped_for_generation(trainer: Any):
    """TRL's context for generating with the trainer's model (gathers ZeRO-3 weights; turns checkpointing off)."""
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                       gather_deepspeed3_params=trainer.args.ds3_gather_for_generation)


def uses_vllm(trainer: Any) -> bool:
    return bool(trainer.use_vllm)


def importance_sampling(trainer: Any) -> tuple[str, float | None, float | None] | None:
    """(mode, clip_min, clip_max) of TRL's vLLM importance-sampling correction, or None when it is off."""
    if not (trainer.use_vllm and trainer.vllm_importance_sampling_correction):
        return None
    return (trainer.vllm_importance_sampling_mode, trainer.vllm_importance_sampling_clip_min,
            trainer.vllm_importance_sampling_clip_max)


def generate_vllm(trainer: Any, prompt_ids: list[list[int]], *, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int) -> tuple[list[list[int]], list[list[float]]]:
    """Completions and their sampling log-probs from TRL's vLLM path, with this call's sampling settings.

    TRL's ``vllm_generation`` samples with the settings it was built with; they are swapped in for the call
    (temperature 0 is greedy in vLLM; ``seed`` goes into vLLM's ``SamplingParams``) and restored after.
    """
    gen = trainer.vllm_generation
    saved = {k: getattr(gen, k) for k in VLLM_SAMPLING}
    gen.temperature, gen.top_p, gen.max_completion_length = temperature, top_p, max_new_tokens
    gen.generation_kwargs = {**(saved["generation_kwargs"] or {}), "seed": seed}
    try:
        completion_ids, logprobs = trainer._generate_single_turn(prompt_ids, None, {}, 1)
    finally:
        for k, v in saved.items():
            setattr(gen, k, v)
    return [list(c) for c in completion_ids], [list(lp) for lp in logprobs]


def problems() -> list[str]:
    """What in the installed TRL no longer matches what this module uses (empty: all there)."""
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    found: list[str] = []

    def params(fn) -> list[str]:
        return list(inspect.signature(fn).parameters)

    def source(owner: Any, name: str) -> str:  # "" when gone (reported once, below or above)
        fn = getattr(owner, name, None)
        return inspect.getsource(fn) if fn is not None else ""

    want = {
        "_get_per_token_logps_and_entropies": ["self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                               "batch_size"],
        "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"],
        "compute_loss": ["self", "model", "inputs"],
    }
    for name, args in want.items():
        fn = getattr(GRPOTrainer, name, None)
        if fn is None:
            found.append(f"GRPOTrainer.{name} is gone")
        elif params(fn)[: len(args)] != args:
            found.append(f"GRPOTrainer.{name}{inspect.signature(fn)} no longer takes {args}")
    loss_src = source(GRPOTrainer, "_compute_loss")
    found += [f"GRPOTrainer._compute_loss no longer reads {k!r}" for k in LOSS_INPUTS if k not in loss_src]
    found += [f"GRPOTrainer._compute_loss no longer logs {k!r}" for k in METRICS if f'"{k}"' not in loss_src]
    init_src = source(GRPOTrainer, "__init__")
    for attr in ("self._metrics", "self._last_loaded_step", "self.vllm_generation", "self.use_vllm",
                 "self.vllm_importance_sampling_correction", "self.vllm_importance_sampling_mode",
                 "self.vllm_importance_sampling_clip_min", "self.vllm_importance_sampling_clip_max"):
        if attr not in init_src:
            found.append(f"GRPOTrainer.__init__ no longer sets {attr}")
    turn_src = source(GRPOTrainer, "_generate_single_turn")
    if turn_src and ("self.vllm_generation.generate(" not in turn_src or "lp[0]" not in turn_src):
        found.append("GRPOTrainer._generate_single_turn no longer returns vLLM's sampled-token log-probs")
    gen_init = params(VLLMGeneration.__init__)
    found += [f"VLLMGeneration no longer takes {k!r}" for k in VLLM_SAMPLING if k not in gen_init]
    gen_src = source(VLLMGeneration, "generate")
    found += [f"VLLMGeneration.generate no longer reads self.{k}" for k in VLLM_SAMPLING if f"self.{k}" not in gen_src]
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import add_fused_lm_head, use_adapter
    from trl.trainer.utils import nanstd as trl_nanstd

    if params(add_fused_lm_head)[:3] != ["model", "temperature", "cast_lm_head_to_fp32"]:
        found.append("trl.trainer.utils.add_fused_lm_head changed its arguments")
    if "adapter_name" not in params(use_adapter):
        found.append("trl.trainer.utils.use_adapter no longer takes adapter_name")
    if params(trl_nanstd)[:3] != ["tensor", "dim", "keepdim"]:
        found.append("trl.trainer.utils.nanstd changed its arguments")
    if "gather_deepspeed3_params" not in params(unwrap_model_for_generation):
        found.append("trl.models.unwrap_model_for_generation no longer takes gather_deepspeed3_params")
    return found

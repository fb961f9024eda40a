"""The ``trl`` engine's settings: what it needs installed, the shardings it accepts, and the one mapping of a
fastslow config onto ``trl.GRPOConfig`` (documented in :class:`~fastslow.config.ScaleConfig`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastslow.config import Config, ConfigError
from fastslow.util import one_line

INSTALL_HINT = "engine 'trl' needs TRL and accelerate: pip install 'fastslow[scale]'"
SCRATCH_PLACEHOLDER = "<a temporary directory per run>"
SUPPORTED_SHARDING = (None, "FSDP2")


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
    """The sharding ``accelerate launch`` announced here ('DeepSpeed ZeRO-<n>', 'FSDP2', 'FSDP1'), or None."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP2" if env.get("FSDP_VERSION", "1") == "2" else "FSDP1"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"DeepSpeed ZeRO-{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return None


def sharding_of_accelerate_config(path: str | Path | None) -> str | None:
    """The sharding an accelerate config file asks for ('DeepSpeed ZeRO-<n>', 'FSDP2', 'FSDP1'), or None.

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
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{(data.get('deepspeed_config') or {}).get('zero_stage', '?')}"
    return None


def checked_sharding(accelerate_config: str | Path | None = None) -> str | None:
    """The sharding asked for (by ``accelerate_config``, else by ``accelerate launch``'s environment), or None.

    Raises :class:`ConfigError` (one line, exit 2) for a sharding that was never run: FSDP version 1 and every
    DeepSpeed ZeRO stage. (ZeRO-1/2: accelerate's ``backward`` already applies the optimizer step, so the
    non-finite skip would come too late, and the optimizer state is split over ranks while one rank saves.)
    """
    kind = sharding_of_accelerate_config(accelerate_config) or sharding_of_env()
    if kind in SUPPORTED_SHARDING:
        return kind
    raise ConfigError(
        f"engine 'trl': {kind} is not supported in this version (never run: its update and checkpoint paths "
        "differ); shard with FSDP2 (configs/accelerate/fsdp2.yaml) or use DDP (configs/accelerate/ddp.yaml)"
    )


def grpo_config(**kwargs: Any) -> Any:
    """TRL's ``GRPOConfig``; its deprecation notices about its own field names are not the user's concern."""
    from trl import GRPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GRPOConfig(**kwargs)


def grpo_kwargs(cfg: Config, *, world_size: int, cuda: bool | None = None,
                output_dir: str = SCRATCH_PLACEHOLDER) -> dict[str, Any]:
    """The one mapping of a fastslow config onto ``trl.GRPOConfig`` keyword arguments (see ``ScaleConfig``).

    ``cuda`` None: the device ``model.device`` resolves to on this machine. ``output_dir``: TRL's own
    directory (it saves and logs nothing there, as we never call ``train()``), kept out of the run dir.
    The learning-rate schedule is not TRL's: the engine builds fastslow's (:func:`fastslow.slow.lr_schedule`).
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
        "use_bias_correction_kl": sc.kl_bias_correction,
        "num_generations": s.group_size,
        "per_device_train_batch_size": rows_per_rank,
        "steps_per_generation": 1,
        "gradient_accumulation_steps": 1,
        "num_iterations": s.updates_per_batch,
        "scale_rewards": "group",
        "learning_rate": s.lr,
        # fastslow's schedule replaces TRL's (one definition of warm-up for every engine and process count)
        "lr_scheduler_type": "constant",
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
        # TRL's correction of the vLLM/trainer mismatch, fed with the log-probs vLLM returns (see ScaleConfig)
        kw["vllm_importance_sampling_correction"] = sc.vllm_importance_sampling != "off"
        if sc.vllm_importance_sampling != "off":
            kw["vllm_importance_sampling_mode"] = sc.vllm_importance_sampling
            kw["vllm_importance_sampling_clip_max"] = sc.vllm_importance_sampling_cap
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

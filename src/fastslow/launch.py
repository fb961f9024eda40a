"""``fastslow launch`` (a run on several processes, GPUs or nodes) and ``fastslow run --dry-run``.

On GPUs the processes are started by ``accelerate launch`` (DDP, DeepSpeed ZeRO-3 or FSDP2 from an
accelerate config file); on CPUs by ``torchrun`` with the gloo backend, because ``accelerate launch --cpu
--num_processes N`` was seen to start a single process. Each process runs ``fastslow run CONFIG`` with
engine ``trl``; the main process writes the run directory.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fastslow.channels import fast_on
from fastslow.config import Config, ConfigError


def launch_command(config: Path, run_args: list[str], *, nproc: int, accelerate_config: str | None = None,
                   nnodes: int = 1, node_rank: int = 0, main_address: str = "127.0.0.1", main_port: int = 29500,
                   gpu: bool | None = None) -> list[str]:
    """The command line that starts ``nproc`` processes per node of ``fastslow run CONFIG RUN_ARGS``.

    ``gpu`` None: accelerate when CUDA is available, torchrun otherwise.
    """
    if nproc < 1 or nnodes < 1:
        raise ConfigError("launch: --nproc and --nnodes must be at least 1")
    gpu = torch.cuda.is_available() if gpu is None else gpu
    target = ["-m", "fastslow.cli", "run", str(config), *run_args]
    if gpu:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if accelerate_config:
            cmd += ["--config_file", accelerate_config]
        cmd += ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes)]
        if nnodes > 1:
            cmd += ["--machine_rank", str(node_rank), "--main_process_ip", main_address,
                    "--main_process_port", str(main_port)]
        return cmd + target
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes > 1:
        cmd += ["--node_rank", str(node_rank), "--master_addr", main_address, "--master_port", str(main_port)]
    else:
        cmd += ["--standalone"]
    return cmd + target


def launch(cmd: list[str], log=print) -> int:
    """Run ``cmd`` (from :func:`launch_command`); its exit status."""
    log("launch: " + shlex.join(cmd))
    return subprocess.run(cmd, check=False).returncode


def dry_run(cfg: Config, *, world_size: int | None = None) -> dict[str, Any]:
    """Validate ``cfg`` without training or loading weights; the resolved settings.

    Loads every task of the stream and builds the reflector (no call is made to it); the engine adds and
    checks its own settings (:attr:`fastslow.channels.EngineSpec.describe`).
    """
    from fastslow import registry
    from fastslow.reflect import make_reflector
    from fastslow.tasks import load_task

    tasks = {s.task: load_task(s.task).name for s in cfg.stages}
    if fast_on(cfg.method):
        make_reflector(cfg.fast.reflector, cfg.fast)
    out: dict[str, Any] = {"method": cfg.method, "engine": cfg.engine, "model": cfg.model.path,
                           "tasks": list(tasks.values()), "steps": cfg.total_steps}
    out.update(registry.engine_spec(cfg.engine).describe(cfg, world_size))
    return out


def format_dry_run(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str)


def accelerate_configs() -> list[Path]:
    """The accelerate configs shipped in the repository's configs/accelerate (empty for a wheel install)."""
    root = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    return sorted(root.glob("*.yaml"))

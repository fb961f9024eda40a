"""``fastslow launch`` (a run on several processes, GPUs or nodes) and ``fastslow run --dry-run``.

On GPUs the processes are started by ``accelerate launch`` (DDP, DeepSpeed ZeRO-3 or FSDP2 from an
accelerate config file); on CPUs by ``torchrun`` with the gloo backend, because ``accelerate launch --cpu
--num_processes N`` was seen to start a single process. Each process runs ``fastslow run CONFIG`` with
engine ``trl``; the main process writes the run directory.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fastslow.channels import fast_on
from fastslow.config import Config, ConfigError
from fastslow.util import die_with_parent

STARTER_ENV = "FASTSLOW_STARTER_PID"


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
        cmd = [sys.executable, "-m", "fastslow.launch", "--accelerate"]  # accelerate launch, wrapped
        if accelerate_config:
            cmd += ["--config_file", accelerate_config]
        cmd += ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes)]
        if nnodes > 1:
            cmd += ["--machine_rank", str(node_rank), "--main_process_ip", main_address,
                    "--main_process_port", str(main_port)]
        return cmd + target
    # torchrun through fastslow's wrapper (this module's main): one line for a dead rank, dies with the launcher
    cmd = [sys.executable, "-m", "fastslow.launch", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes > 1:
        cmd += ["--node_rank", str(node_rank), "--master_addr", main_address, "--master_port", str(main_port)]
    else:
        cmd += ["--standalone"]
    return cmd + target


def check_port_free(address: str, port: int) -> None:
    """The main node's rendezvous port must be free before the processes start (one line, not a traceback)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise ConfigError(f"launch: --main-port {port} on {address} is not free ({exc.strerror}): "
                              "choose another port, or stop what holds it") from None


def launch(cmd: list[str], log=print) -> int:
    """Run ``cmd`` (from :func:`launch_command`); 0, or 1/2 with one line saying what ended it.

    torchrun runs in its own process group: a signal to the launcher (Ctrl-C, SIGTERM, SIGHUP) is passed on to
    it, and a launcher killed outright takes it along (``PR_SET_PDEATHSIG``); torchrun stops its ranks.
    """
    log("launch: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)  # set before its exec: no race
    forwarded: list[int] = []

    def forward(signum, _frame) -> None:
        forwarded.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if forwarded:
        log(f"launch: stopped by {signal.Signals(forwarded[0]).name}; the processes were stopped "
            "(--resume continues from the last checkpoint)")
        return 2
    if rc < 0:
        log(f"launch: the process starter ({Path(cmd[2] if len(cmd) > 2 else cmd[0]).name}, pid {proc.pid}) was "
            f"killed by {signal.Signals(-rc).name}; its ranks stop with it (--resume continues from the last "
            "checkpoint)")
        return 2
    return rc


def _starter(argv: list[str]) -> int:
    """``torchrun ARGV`` (or ``accelerate launch ARGV[1:]`` when ARGV[0] is ``--accelerate``) with its failures as
    one line: a rank that died (its own error line is above), a rendezvous that failed (a busy port), a signal.
    The ranks end with this process, and it with the launcher."""
    import logging
    import subprocess

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from fastslow.util import one_line

    os.environ[STARTER_ENV] = str(os.getpid())  # the ranks end with this process (fastslow.cli reads it)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its per-rank warnings
    name = "accelerate launch" if argv[:1] == ["--accelerate"] else "torchrun"
    try:
        if name == "torchrun":
            from torch.distributed.run import parse_args, run

            run(parse_args(argv))
        else:
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(argv[1:]))
    except subprocess.CalledProcessError as exc:  # accelerate's one-process path: the run's own line is above
        print(f"launch: the run exited with status {exc.returncode} (its own error line, if any, is above)",
              file=sys.stderr)
        return exc.returncode if exc.returncode in (1, 2) else 1
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        print(f"launch: rank {rank} {how} (its own error line, if any, is above); the other ranks were stopped",
              file=sys.stderr)
        return code if code in (1, 2) else 1
    except SignalException as exc:
        print(f"launch: stopped by {signal.Signals(exc.sigval).name}; the ranks were stopped", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a rendezvous or start-up failure: one line
        print(f"launch: {name} failed: {type(exc).__name__}: {one_line(exc, 300)}", file=sys.stderr)
        return 2
    return 0


def dry_run(cfg: Config, *, world_size: int | None = None) -> dict[str, Any]:
    """Validate ``cfg`` without training or loading weights; the resolved settings.

    Loads every task of the stream and builds the reflector (no call is made to it); the engine adds and
    checks its own settings (:attr:`fastslow.channels.EngineSpec.describe`).
    """
    from fastslow import registry
    from fastslow.reflect import make_reflector
    from fastslow.tasks import load_task

    tasks = {s.task: load_task(s.task).name for s in cfg.stages}
    from fastslow.trackers import check_installed

    check_installed(cfg.report_to)
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


if __name__ == "__main__":  # `python -m fastslow.launch [--accelerate] ARGS`: what launch_command starts
    sys.exit(_starter(sys.argv[1:]))

"""The run record: what a run leaves in its directory, and how a resumed run picks it up again.

    metrics.jsonl     one JSON row per logged step, appended; a running sha256 of what was written
    checkpoints/      step_NNNNNN/: the engine's files (see :mod:`fastslow.engines.base`), ``state.json``
                      (loop position, reflection health, RNG, config, metrics offset) and a copy of the
                      metrics rows so far; atomic and checksummed (:mod:`fastslow.checkpoint`)
    summary.json      the run's results (:func:`summary`); timing.json: per-phase times
    config.yaml       the resolved config, redacted

Only the main process writes (``main``); every rank restores the same loop state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from fastslow.channels import Engine
from fastslow.checkpoint import CheckpointError, foreign_checkpoints, save_checkpoint, write_json_atomic
from fastslow.config import Config
from fastslow.preflight import ReflectionHealth
from fastslow.rundir import TEMP_INFIX, RunDirError, claim, write_text_nofollow
from fastslow.stream import continual_metrics, stream_columns
from fastslow.trackers import numeric
from fastslow.util import redact


@dataclass
class LoopState:
    """Where the loop is, and what it counted; saved whole in every checkpoint."""

    step: int = 0
    rollouts: int = 0
    fast_rollouts: int = 0
    policy_version: int = 0
    verifier_errors: int = 0
    accepted_total: int = 0  # candidates GEPA accepted, all rounds
    reflection_calls: int = 0
    reflection_errors: int = 0
    matrix: list[list[float]] = field(default_factory=list)
    matrix_agnostic: list[list[float]] = field(default_factory=list)  # the same with task-agnostic contexts
    base_rewards: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    last_drift: dict[str, float] = field(default_factory=dict)
    last_fast: dict[str, float] = field(default_factory=dict)  # the last fast round's metrics
    metrics_bytes: int = 0
    metrics_rows: int = 0
    metrics_sha256: str = ""  # of the first metrics_bytes of metrics.jsonl ("" in format-1 checkpoints)
    verifier_calls: int = 0
    fast_rounds: list[dict] = field(default_factory=list)  # per round: step, population, front_size, val_flat


def claim_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """With the run dir's lock held: claim it (:func:`fastslow.rundir.claim`); ``--force`` never deletes
    checkpoints another fastslow version wrote."""
    if force and not resume:
        foreign = foreign_checkpoints(out / "checkpoints")
        if foreign:
            raise RunDirError(
                f"{foreign[-1]} was written by another fastslow version (a format this one cannot read); "
                "--force never deletes it: move it away first"
            )
    claim(out, resume=resume, force=force)


class RunRecord:
    """The metrics chain, the checkpoints and the results of one run directory."""

    def __init__(self, out: Path, cfg: Config, *, main: bool, log: Callable[[str], None] = print,
                 task_hashes: dict[str, str] | None = None) -> None:
        self.out, self.cfg, self.main, self.log = Path(out), cfg, main, log
        self.task_hashes = task_hashes or {}  # saved with each checkpoint: a resume refuses tasks that changed
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._hash = hashlib.sha256()

    def start(self) -> None:
        """A new run: an empty metrics file and the resolved config."""
        if self.main:
            self.metrics_path.write_text("")
            self.write_config()

    def config_dict(self) -> dict:
        """The resolved config, redacted (what config.yaml holds, and what trackers are given)."""
        return yaml.safe_load(redact(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)))

    def write_config(self) -> None:
        text = yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
        write_text_nofollow(self.out / "config.yaml", redact(text))  # a planted link is refused, not followed

    # ---- the metrics chain --------------------------------------------------------------------
    def log_row(self, state: LoopState, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """One row: ``step``, cumulative rollouts, then the metrics (a skipped non-finite value is null).
        Returns its metrics as trackers take them (finite numbers only)."""
        row = {"step": step, "rollouts": state.rollouts, "fast_rollouts": state.fast_rollouts, **metrics}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.append(state, json.dumps(clean) + "\n")
        return numeric(clean)

    def append(self, state: LoopState, line: str) -> None:
        """Append one line; ``state`` keeps the row count and a running sha256 of everything written."""
        if not self.main:
            return
        data = line.encode()
        with self.metrics_path.open("ab") as f:
            f.write(data)
        self._hash.update(data)
        state.metrics_bytes += len(data)
        state.metrics_rows += 1
        state.metrics_sha256 = self._hash.hexdigest()

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, state: LoopState, engine: Engine, health: ReflectionHealth) -> None:
        """An atomic checkpoint of the engine and the loop. Called on every rank (the engine gathers)."""
        state.policy_version = engine.policy.version

        def write(tmp: Path) -> None:
            engine.save(tmp)
            if not self.main:
                return
            loop = {
                "loop": asdict(state),
                "reflection_health": health.state_dict(),
                "torch_rng": torch.get_rng_state().tolist(),
                "config": self.cfg.model_dump(mode="json"),
                "world_size": engine.world_size,
                "tasks": self.task_hashes,
            }
            (tmp / "state.json").write_text(json.dumps(loop))
            # The rows so far travel with the checkpoint: a metrics file cut short is rebuilt from them.
            with self.metrics_path.open("rb") as src:
                (tmp / "metrics.jsonl").write_bytes(src.read(state.metrics_bytes))

        if self.main:
            save_checkpoint(self.ckpt_root, state.step, write, keep=self.cfg.keep_checkpoints)
        else:
            write(Path(os.devnull))  # the engine's collectives; nothing is written

    def restore(self, ckpt: Path, engine: Engine, health: ReflectionHealth, *, finished_stages: Callable[[int], int],
                changes: dict) -> LoopState:
        """The loop state of ``ckpt``; the engine and the reflection health restored from it; the metrics file
        cut back to (or rebuilt as) the rows the checkpoint knew. ``changes``: safe config changes, logged."""
        saved = json.loads((ckpt / "state.json").read_text())
        state = LoopState(**saved["loop"])
        engine.load(ckpt)
        health.load_state_dict(saved.get("reflection_health", {}))
        torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
        # A lengthened last stage has not ended yet: its accuracy-matrix row is written again at its new end.
        state.matrix = state.matrix[: finished_stages(state.step)]
        state.matrix_agnostic = state.matrix_agnostic[: finished_stages(state.step)]
        if self.main:
            self._restore_metrics(ckpt, state)
            self.write_config()
            written_by = saved.get("world_size", engine.world_size)
            if written_by != engine.world_size:  # rollouts are sharded and seeded per rank: not the same run
                self.append(state, json.dumps({"step": state.step, "event": "resume_world_size_changed",
                                               "from": written_by, "to": engine.world_size}) + "\n")
                self.log(f"resume: {written_by} processes wrote {ckpt.name}, {engine.world_size} resume it: the run "
                         "goes on, but no longer replays the uninterrupted run")
            if changes:  # safe changes only (the others were refused before anything was written)
                self.append(state, json.dumps({"step": state.step, "event": "resume_config_changed",
                                               "changed": changes}) + "\n")
                self.log(f"resume: config changed: {', '.join(sorted(changes))}")
        return state

    def _restore_metrics(self, ckpt: Path, state: LoopState) -> None:
        """Cut rows written after ``ckpt`` (the lost future); rebuild a file cut short or altered from the
        checkpoint's copy. Never pads: a file shorter than the checkpoint's offset is not extended."""
        data = self.metrics_path.read_bytes() if self.metrics_path.is_file() else b""
        prefix = data[: state.metrics_bytes]
        intact = len(prefix) == state.metrics_bytes and (
            not state.metrics_sha256 or hashlib.sha256(prefix).hexdigest() == state.metrics_sha256)
        if not intact:
            copy = ckpt / "metrics.jsonl"
            if not copy.is_file():
                raise CheckpointError(
                    f"{self.metrics_path} holds less than the {state.metrics_bytes} bytes checkpoint {ckpt.name} "
                    "recorded and the checkpoint carries no copy: cannot resume without losing rows"
                )
            prefix = copy.read_bytes()
            self.log(f"{self.metrics_path.name} was cut short or altered: rebuilt from checkpoint {ckpt.name}")
        tmp = self.metrics_path.with_name(f".metrics.jsonl{TEMP_INFIX}{os.getpid()}")
        tmp.write_bytes(prefix)
        os.replace(tmp, self.metrics_path)
        self._hash = hashlib.sha256(prefix)

    # ---- results ------------------------------------------------------------------------------
    def finish(self, summary: dict, timing: dict[str, list[float]]) -> None:
        if self.main:
            write_json_atomic(self.out / "summary.json", summary)
            write_json_atomic(self.out / "timing.json", timing_summary(timing))


def summary(cfg: Config, state: LoopState, engine: Engine, health: ReflectionHealth, stage_tasks: list[str],
            oversize_skipped: dict[str, int]) -> dict:
    """``summary.json``: final rewards, drift, the accuracy matrix and continual-learning metrics, the fast
    channel's population and health, verifier faults (see DESIGN.md's run directory contract)."""
    fast = engine.fast
    return {
        "method": cfg.method,
        "seed": cfg.seed,
        "model": cfg.model.path,
        "steps": state.step,
        "rollouts": state.rollouts,
        "fast_rollouts": state.fast_rollouts,
        "engine": engine.name,
        "world_size": engine.world_size,
        "sharding": engine.sharding,
        "stages": [{"task": name, "spec": stage.task, "steps": stage.steps}
                   for name, stage in zip(stage_tasks, cfg.stages)],
        "tasks": stream_columns(stage_tasks),
        "final": state.last_eval,
        "base_rewards": state.base_rewards,
        "drift": {k.removeprefix("drift/"): v for k, v in state.last_drift.items()},
        "fast_kind": cfg.fast_kind,
        "matrix": state.matrix,
        "matrix_agnostic": state.matrix_agnostic,
        # Task-aware: each task is evaluated with its own context (the method is told the task); task-agnostic:
        # one context source for every task (DESIGN.md's definitions).
        "cl": _cl(state.matrix, stage_tasks, state.base_rewards, "task-aware"),
        "cl_agnostic": _cl(state.matrix_agnostic, stage_tasks, state.base_rewards, "task-agnostic"),
        "memory": {k.removeprefix("fast/memory/"): v for k, v in state.last_fast.items()
                   if k.startswith("fast/memory/")} or None,
        "prompts": fast.population if fast else [],
        "best_prompts": fast.best if fast else {},
        "fast": {"accepted_total": state.accepted_total, "reflection_calls": state.reflection_calls,
                 "reflection_errors": state.reflection_errors, "failed_reflection_calls": health.failed_calls,
                 "rounds_nothing_accepted": health.rounds_nothing_accepted,
                 **{f"round_{k}": [r[k] for r in state.fast_rounds] for k in ("step", "population", "front_size",
                                                                              "val_flat")}} if fast else None,
        "verifier_errors": state.verifier_errors,
        "verifier_calls": state.verifier_calls,
        "eval_n": cfg.eval.n,  # problems per task of each evaluation: the reports' intervals need it
        "oversize_problems_skipped": oversize_skipped,
    }


def _cl(matrix: list[list[float]], stage_tasks: list[str], base: dict[str, float], scenario: str) -> dict | None:
    if not matrix:
        return None
    return {"scenario": scenario, **continual_metrics(matrix, stage_tasks[: len(matrix)], base or None)}


def timing_summary(timing: dict[str, list[float]]) -> dict:
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "total_s": {k: sum(v) for k, v in timing.items()},
        "per_step": dict(timing),
        "mean_step_s": mean(timing["step_s"]),
        "mean_slow_step_s": mean(timing["slow_step_s"]),
        "mean_round_s": mean(timing["round_s"]),
        "mean_eval_s": mean(timing["eval_s"]),
        "rounds": len(timing["round_s"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }

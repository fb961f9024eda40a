"""The training loop of every method, and the run directory it writes.

    for step in 0 .. total-1:                       (stages of the stream run back to back)
        task = stage(step).task
        fast on and step hits T  ->  GEPA round on the current weights -> population
        slow on                  ->  B problems x G rollouts (prompts mixed per group) -> RL update
        every E steps            ->  drift meter; evaluation of every task (seed prompt and best prompt)
        stage end                ->  row of the accuracy matrix
        every N steps            ->  atomic checkpoint

Metric rows carry ``step`` = loop steps completed (row 0 is the base, before anything ran).
Every random draw is seeded from (seed, what, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml

from fastslow.checkpoint import latest_good_checkpoint, save_checkpoint, write_json_atomic
from fastslow.config import Config
from fastslow.drift import DriftMeter
from fastslow.fast import FastChannel
from fastslow.policy import Policy
from fastslow.reflect import make_reflector
from fastslow.rollout import rollout
from fastslow.slow import Rollouts, SlowLearner
from fastslow.stream import continual_metrics, stage_spans
from fastslow.tasks import Task, load_task
from fastslow.util import derive_seed, redact

MAX_NONFINITE_STREAK = 5


class RunDirError(RuntimeError):
    """The run directory holds another run and neither resume nor force was asked for."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the last good checkpoint is kept."""


@dataclass
class LoopState:
    step: int = 0
    rollouts: int = 0
    fast_rollouts: int = 0
    policy_version: int = 0
    verifier_errors: int = 0
    matrix: list[list[float]] = field(default_factory=list)
    base_rewards: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    last_drift: dict[str, float] = field(default_factory=dict)
    metrics_bytes: int = 0


def slow_on(method: str) -> bool:
    return method in ("rl", "fst")


def fast_on(method: str) -> bool:
    return method in ("gepa", "fst")


class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 on_step: Callable[[int, int, dict], None] | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.on_step, self.log = cfg, on_step, log
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        # Engine 'trl' (several processes under torchrun/accelerate): only the main process writes the run dir.
        self.engine = _make_engine(cfg, resume=resume)
        self.is_main = self.engine.is_main if self.engine else True
        if self.is_main:
            _prepare_run_dir(self.out, resume=resume, force=force, clear=False)  # refuse early, write nothing yet
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.spans = stage_spans([s.model_dump() for s in cfg.stages])  # (first step, end step) per stage
        self.tasks: dict[str, Task] = {}
        for stage in cfg.stages:
            if stage.task not in self.tasks:
                self.tasks[stage.task] = load_task(stage.task)
        ckpt = latest_good_checkpoint(self.ckpt_root, warn=log) if resume else None
        if self.engine is not None:
            self.engine.load(ckpt / "model" if ckpt else None)
            self.policy = self.engine.policy
        else:
            self.policy = Policy.load(cfg.model, weights=ckpt / "model" if ckpt else None)
        if not slow_on(cfg.method):
            self.policy.model.requires_grad_(False)
        self.slow = None
        if slow_on(cfg.method):
            self.slow = self.engine.slow if self.engine else SlowLearner(self.policy, cfg.slow)
        self.fast = None
        if fast_on(cfg.method):
            self.fast = FastChannel(self.policy, cfg.fast, make_reflector(cfg.fast.reflector), seed=cfg.seed,
                                    max_new_tokens=cfg.slow.max_new_tokens, verify_timeout_s=cfg.verify_timeout_s)
            if self.engine is not None:
                self.fast = self.engine.fast_channel(self.fast)
        probes = []
        for task in self.tasks.values():
            for problem in list(task.problems("eval"))[: cfg.drift.probe_size]:
                probes.append(self.policy.format(task.seed_prompt, problem.prompt))
        self.drift = DriftMeter(self.policy, probes, cfg.drift, seed=cfg.seed)
        # Every input is loaded (tasks, model, checkpoint): only now may --force clear an existing run.
        if self.is_main:
            _prepare_run_dir(self.out, resume=resume, force=force)
        self.state = LoopState()
        self.timing: dict[str, list[float]] = {"step_s": [], "round_s": [], "slow_step_s": [], "eval_s": []}
        if ckpt is not None:
            self._restore(ckpt)
            log(f"resumed from {ckpt} (step {self.state.step})")
        elif self.is_main:
            self.metrics_path.write_text("")
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(redact(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, st = self.cfg, self.state
        total = cfg.total_steps
        if st.step == 0 and st.metrics_bytes == 0:
            row = {**self._drift(), **self._evaluate(step=0)}
            st.base_rewards = {name: r["reward_seed_prompt"] for name, r in st.last_eval.items()}
            self._log_row(0, row)
        while st.step < total:
            t0 = time.perf_counter()
            step = st.step
            stage_idx, stage_start, stage_end = self._stage(step)
            task = self.tasks[cfg.stages[stage_idx].task]
            row: dict[str, float] = {}
            if self.fast is not None and (step - stage_start) % cfg.fast.every == 0:
                t_round = time.perf_counter()
                row.update(self.fast.run_round(task, workdir=self.out))
                if self.fast.last_error:  # a faulty reflector or round is survived, never silently
                    self.log(f"step {step}: fast channel kept its population: {self.fast.last_error}")
                st.fast_rollouts += self.fast.last_round_rollouts
                st.verifier_errors += self.fast.last_verifier_errors
                self.timing["round_s"].append(time.perf_counter() - t_round)
            if self.slow is not None:
                t_slow = time.perf_counter()
                row.update(self._slow_step(task, step))
                self.timing["slow_step_s"].append(time.perf_counter() - t_slow)
            st.step = step + 1
            done = st.step
            if done % cfg.drift.every == 0 or done == total:
                row.update(self._drift())
            if done % cfg.eval.every == 0 or done == stage_end:
                row.update(self._evaluate(step=done))
            if done == stage_end and self.is_main:
                st.matrix.append([st.last_eval[name]["reward"] for name in self._stream_task_names()])
            row["slow/verifier_errors"] = float(st.verifier_errors)
            self._log_row(done, row)
            self.timing["step_s"].append(time.perf_counter() - t0)
            if self.on_step:
                self.on_step(done, total, row)
            if done % cfg.checkpoint_every == 0 or done == stage_end:
                self._checkpoint()
        summary = self._summary()
        if self.is_main:
            write_json_atomic(self.out / "summary.json", summary)
            write_json_atomic(self.out / "timing.json", self._timing_summary())
        return summary

    def _slow_step(self, task: Task, step: int) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        train = task.problems("train")
        rng = random.Random(derive_seed(cfg.seed, "batch", step))
        problems = [train[i] for i in rng.sample(range(len(train)), min(cfg.slow.batch_problems, len(train)))]
        g = cfg.slow.group_size
        contexts = self.fast.prompts_for_group(task, g) if self.fast else [task.seed_prompt] * g
        pairs = [(ctx, p) for p in problems for ctx in contexts]
        sample = partial(rollout, self.policy) if self.engine is None else self.engine.sample
        scored = sample(
            task, pairs, temperature=cfg.slow.temperature, top_p=cfg.slow.top_p,
            max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "rollout", step),
            verify_timeout_s=cfg.verify_timeout_s,
        )
        st.rollouts += len(pairs)
        st.verifier_errors += scored.verifier_errors
        rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(len(problems), g)
        measure_k3 = (step + 1) % cfg.drift.every == 0
        metrics = self.slow.step(Rollouts(scored.batch, rewards), measure_k3=measure_k3)
        if self.slow.nonfinite_streak >= MAX_NONFINITE_STREAK:
            raise TrainingError(
                f"loss or gradient non-finite for {self.slow.nonfinite_streak} consecutive steps at step {step}; "
                f"updates were skipped, the last good checkpoint is in {self.ckpt_root} (try a lower slow.lr)"
            )
        st.policy_version = self.policy.version
        return metrics

    # ---- measurements -------------------------------------------------------------------------
    def _drift(self) -> dict[str, float]:
        if not self.is_main:  # measured once, by the main process
            return {}
        self.state.last_drift = self.drift.measure()
        return dict(self.state.last_drift)

    def _stream_task_names(self) -> list[str]:
        return [task.name for task in self.tasks.values()]

    def _evaluate(self, step: int) -> dict[str, float]:
        """Every task of the stream, greedy (by default) on its eval split, with seed and best prompt."""
        t0 = time.perf_counter()
        cfg, row = self.cfg, {}
        for task in self.tasks.values() if self.is_main else ():  # measured once, by the main process
            problems = list(task.problems("eval"))[: cfg.eval.n]
            result = {}
            best = self.fast.best.get(task.name, task.seed_prompt) if self.fast else task.seed_prompt
            for key, prompt in (("reward_seed_prompt", task.seed_prompt), ("reward", best)):
                if key == "reward" and prompt == task.seed_prompt:
                    result[key] = result["reward_seed_prompt"]
                    continue
                scored = rollout(
                    self.policy, task, [(prompt, p) for p in problems], temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "eval", step, task.name),
                    verify_timeout_s=cfg.verify_timeout_s,
                )
                self.state.verifier_errors += scored.verifier_errors
                result[key] = scored.mean_reward
            self.state.last_eval[task.name] = result
            row[f"eval/{task.name}/reward"] = result["reward"]
            row[f"eval/{task.name}/reward_seed_prompt"] = result["reward_seed_prompt"]
        self.timing["eval_s"].append(time.perf_counter() - t0)
        return row

    # ---- bookkeeping --------------------------------------------------------------------------
    def _stage(self, step: int) -> tuple[int, int, int]:
        """(stage index, first step, end step) of the stage that loop step ``step`` (0-based) trains."""
        for i, (start, end) in enumerate(self.spans):
            if start <= step < end:
                return i, start, end
        raise IndexError(step)

    def _log_row(self, step: int, metrics: dict[str, float]) -> None:
        st = self.state
        if not self.is_main:
            return
        row = {"step": step, "rollouts": st.rollouts, "fast_rollouts": st.fast_rollouts, **metrics}
        with self.metrics_path.open("a") as f:
            # Strict JSON: a skipped non-finite loss is logged as null, not NaN.
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            f.write(json.dumps(clean) + "\n")
        st.metrics_bytes = self.metrics_path.stat().st_size

    def _checkpoint(self) -> None:
        st = self.state
        st.policy_version = self.policy.version
        if not self.is_main:
            return

        def write(tmp: Path) -> None:
            self.policy.save(tmp / "model")
            if self.slow is not None:
                torch.save(self.slow.state_dict(), tmp / "trainer.pt")
            state = {
                "loop": asdict(st),
                "fast": self.fast.state_dict() if self.fast else None,
                "torch_rng": torch.get_rng_state().tolist(),
            }
            (tmp / "state.json").write_text(json.dumps(state))

        save_checkpoint(self.ckpt_root, st.step, write, keep=self.cfg.keep_checkpoints)

    def _restore(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        self.state = LoopState(**state["loop"])
        self.policy.version = self.state.policy_version
        if self.slow is not None:
            self.slow.load_state_dict(torch.load(ckpt / "trainer.pt", weights_only=False))
        if self.fast is not None and state["fast"] is not None:
            self.fast.load_state_dict(state["fast"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        # Rows written after this checkpoint belong to the lost future: cut them.
        if self.is_main:
            with self.metrics_path.open("r+b") as f:
                f.truncate(self.state.metrics_bytes)

    def _summary(self) -> dict:
        cfg, st = self.cfg, self.state
        names = self._stream_task_names()
        base = [st.base_rewards.get(n) for n in names]
        return {
            "method": cfg.method,
            "seed": cfg.seed,
            "model": cfg.model.path,
            "steps": st.step,
            "rollouts": st.rollouts,
            "fast_rollouts": st.fast_rollouts,
            "stages": [{"task": self.tasks[s.task].name, "steps": s.steps} for s in cfg.stages],
            "tasks": names,
            "final": st.last_eval,
            "base_rewards": st.base_rewards,
            "drift": {k.removeprefix("drift/"): v for k, v in st.last_drift.items()},
            "matrix": st.matrix,
            "cl": continual_metrics(st.matrix, None if None in base else base) if st.matrix else None,
            "prompts": self.fast.population if self.fast else [],
            "best_prompts": self.fast.best if self.fast else {},
            "verifier_errors": st.verifier_errors,
            "engine": cfg.engine,
            "world_size": self.engine.world_size if self.engine else 1,
        }

    def _timing_summary(self) -> dict:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {
            "mean_step_s": mean(self.timing["step_s"]),
            "mean_slow_step_s": mean(self.timing["slow_step_s"]),
            "mean_round_s": mean(self.timing["round_s"]),
            "mean_eval_s": mean(self.timing["eval_s"]),
            "rounds": len(self.timing["round_s"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def _make_engine(cfg: Config, *, resume: bool):
    """The scale engine of ``cfg.engine`` (None for the native engine, which the loop builds itself)."""
    if cfg.engine == "native":
        return None
    from fastslow.engines.trl import TrlEngine

    return TrlEngine(cfg, build=False)


def _prepare_run_dir(out: Path, *, resume: bool, force: bool, clear: bool = True) -> None:
    """Refuse a run dir holding another run (unless resume/force); with ``clear``, empty it (force) and
    sweep what a killed process left (GEPA round scratch dirs, half-written JSON temp files)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is not a directory")
    holds_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if holds_run and not (resume or force):
        raise RunDirError(
            f"run directory {out} already holds a run: pass --resume to continue it or --force to overwrite"
        )
    if not clear:
        return
    if holds_run and force and not resume:
        for name in ("metrics.jsonl", "summary.json", "timing.json", "config.yaml"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("gepa-*"), *out.glob(".*.tmp-*")]:  # one process per run dir: these are dead
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def train(cfg: Config, **kwargs) -> dict:
    """Run ``cfg`` to the end (or resume it); returns the summary also written to ``summary.json``."""
    return Trainer(cfg, **kwargs).run()

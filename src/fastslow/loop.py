"""The training loop of every method, and the run directory it writes.

    for step in 0 .. total-1:                       (stages of the stream run back to back)
        task = stage(step).task                     (stage: start <= step < end, see stream.stage_at)
        fast on and (step - stage start) % T == 0 ->  GEPA round on the current weights -> population
        slow on                  ->  B problems x G rollouts (prompts mixed per group) -> RL update
        every E_drift steps      ->  drift meter (and the slow step's k3 estimate on the same steps)
        every E_eval steps       ->  evaluation of every task (seed prompt and best prompt)
        stage end                ->  evaluation + a row of the accuracy matrix
        every N steps            ->  atomic checkpoint

The loop only talks to the engine's seams (:mod:`fastslow.channels`): ``engine.sample``, ``engine.slow``,
``engine.fast``; any engine registered in :mod:`fastslow.engines` runs this same loop.
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
from pathlib import Path

import torch
import yaml

from fastslow.checkpoint import latest_good_checkpoint, save_checkpoint, write_json_atomic
from fastslow.config import Config, ConfigError
from fastslow.drift import DriftMeter
from fastslow.engines import build_engine
from fastslow.rollout import score_prompt
from fastslow.slow import Rollouts
from fastslow.stream import continual_metrics, stage_at, stage_spans, stream_columns
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
    accepted_total: int = 0  # candidates GEPA accepted, all rounds
    reflection_calls: int = 0
    reflection_errors: int = 0
    matrix: list[list[float]] = field(default_factory=list)
    base_rewards: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    last_drift: dict[str, float] = field(default_factory=dict)
    metrics_bytes: int = 0


class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 on_step: Callable[[int, int, dict], None] | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.on_step, self.log = cfg, on_step, log
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        _prepare_run_dir(self.out, resume=resume, force=force, clear=False)  # refuse early, write nothing yet
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.spans = stage_spans([s.model_dump() for s in cfg.stages])  # [first step, end step) per stage
        self.tasks, self.stage_tasks = load_stream(cfg)  # tasks by unique name; the task name of each stage
        ckpt = latest_good_checkpoint(self.ckpt_root, warn=log) if resume else None
        self.engine = build_engine(cfg, ckpt / "model" if ckpt else None)
        self.policy, self.slow, self.fast = self.engine.policy, self.engine.slow, self.engine.fast
        probes = []
        for task in self.tasks.values():
            for problem in list(task.problems("eval"))[: cfg.drift.probe_size]:
                probes.append(self.policy.format(task.seed_prompt, problem.prompt))
        self.drift = DriftMeter(self.policy, probes, cfg.drift, seed=cfg.seed)
        self.main = self.engine.is_main  # only the main process writes the run dir
        # Every input is loaded (tasks, model, checkpoint): only now may --force clear an existing run.
        if self.main:  # other ranks would race the main's first writes (and see "already holds a run")
            _prepare_run_dir(self.out, resume=resume, force=force)
        self.state = LoopState()
        self.timing: dict[str, list[float]] = {"step_s": [], "round_s": [], "slow_step_s": [], "eval_s": []}
        if ckpt is not None:
            self._restore(ckpt)
            log(f"resumed from {ckpt} (step {self.state.step})")
        elif self.main:
            self.metrics_path.write_text("")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            (self.out / "config.yaml").write_text(redact(config_text))

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
            stage_idx = stage_at(step, self.spans)
            stage_start, stage_end = self.spans[stage_idx]
            task = self.tasks[self.stage_tasks[stage_idx]]
            row: dict[str, float] = {}
            if self.fast is not None and (step - stage_start) % cfg.fast.every == 0:
                t_round = time.perf_counter()
                rnd = self.fast.run_round(task, workdir=self.out)
                row.update(rnd.metrics)
                if rnd.error:  # a faulty reflector or round is survived, never silently
                    self.log(f"step {step}: fast channel kept its population: {rnd.error}")
                st.fast_rollouts += rnd.rollouts
                st.verifier_errors += rnd.verifier_errors
                st.accepted_total += rnd.accepted
                st.reflection_calls += rnd.reflection_calls
                st.reflection_errors += rnd.reflection_errors
                self.timing["round_s"].append(time.perf_counter() - t_round)
            if self.slow is not None:
                t_slow = time.perf_counter()
                row.update(self._slow_step(task, step))
                self.timing["slow_step_s"].append(time.perf_counter() - t_slow)
            st.step = step + 1
            done = st.step
            if self._drift_due(done):
                row.update(self._drift())
            if done % cfg.eval.every == 0 or done == stage_end:
                row.update(self._evaluate(step=done))
            if done == stage_end:
                st.matrix.append([st.last_eval[name]["reward"] for name in stream_columns(self.stage_tasks)])
            row["slow/verifier_errors"] = float(st.verifier_errors)
            self._log_row(done, row)
            self.timing["step_s"].append(time.perf_counter() - t0)
            if self.on_step:
                self.on_step(done, total, row)
            if done % cfg.checkpoint_every == 0 or done == stage_end:
                self._checkpoint()
        summary = self._summary()
        if self.main:
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
        scored = self.engine.sample(
            task, pairs, temperature=cfg.slow.temperature, top_p=cfg.slow.top_p,
            max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "rollout", step),
        )
        st.rollouts += len(pairs)
        st.verifier_errors += scored.verifier_errors
        rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(len(problems), g)
        # k3 on the training rollouts is logged on exactly the rows the drift meter measures.
        metrics = self.slow.step(Rollouts(scored.batch, rewards), measure_k3=self._drift_due(step + 1))
        if self.slow.nonfinite_streak >= MAX_NONFINITE_STREAK:
            raise TrainingError(
                f"loss or gradient non-finite for {self.slow.nonfinite_streak} consecutive steps at step {step}; "
                f"updates were skipped, the last good checkpoint is in {self.ckpt_root} (try a lower slow.lr)"
            )
        st.policy_version = self.policy.version
        return metrics

    # ---- measurements -------------------------------------------------------------------------
    def _drift_due(self, done: int) -> bool:
        """Drift is measured after ``done`` loop steps every ``drift.every`` steps and at the very end."""
        return done % self.cfg.drift.every == 0 or done == self.cfg.total_steps

    def _drift(self) -> dict[str, float]:
        self.state.last_drift = self.drift.measure()
        if self.slow is not None:  # the drift budget (slow.kl_target) steers on the exact reverse KL
            self.slow.observe_drift(self.state.last_drift.get("drift/kl_rev"))
        return dict(self.state.last_drift)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Every task of the stream, greedy (by default) on its eval split, with seed and best prompt."""
        t0 = time.perf_counter()
        cfg, row = self.cfg, {}
        for task in self.tasks.values():
            result = {}
            best = self.fast.best.get(task.name, task.seed_prompt) if self.fast else task.seed_prompt
            for key, prompt in (("reward_seed_prompt", task.seed_prompt), ("reward", best)):
                if key == "reward" and prompt == task.seed_prompt:
                    result[key] = result["reward_seed_prompt"]
                    continue
                scored = score_prompt(
                    self.engine.sample, task, prompt, cfg.eval.n, temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "eval", step, task.name),
                )
                self.state.verifier_errors += scored.verifier_errors
                result[key] = scored.mean_reward
            self.state.last_eval[task.name] = result
            row[f"eval/{task.name}/reward"] = result["reward"]
            row[f"eval/{task.name}/reward_seed_prompt"] = result["reward_seed_prompt"]
        self.timing["eval_s"].append(time.perf_counter() - t0)
        return row

    # ---- bookkeeping --------------------------------------------------------------------------
    def _log_row(self, step: int, metrics: dict[str, float]) -> None:
        st = self.state
        row = {"step": step, "rollouts": st.rollouts, "fast_rollouts": st.fast_rollouts, **metrics}
        if not self.main:
            return
        with self.metrics_path.open("a") as f:
            # Strict JSON: a skipped non-finite loss is logged as null, not NaN.
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            f.write(json.dumps(clean) + "\n")
        st.metrics_bytes = self.metrics_path.stat().st_size

    def _checkpoint(self) -> None:
        st = self.state
        st.policy_version = self.policy.version

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

        if self.main:
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
        if self.main:
            with self.metrics_path.open("r+b") as f:
                f.truncate(self.state.metrics_bytes)

    def _summary(self) -> dict:
        cfg, st = self.cfg, self.state
        names = stream_columns(self.stage_tasks)
        return {
            "method": cfg.method,
            "seed": cfg.seed,
            "model": cfg.model.path,
            "steps": st.step,
            "rollouts": st.rollouts,
            "fast_rollouts": st.fast_rollouts,
            "engine": self.engine.name,
            "world_size": self.engine.world_size,
            "stages": [{"task": name, "spec": stage.task, "steps": stage.steps}
                       for name, stage in zip(self.stage_tasks, cfg.stages)],
            "tasks": names,
            "final": st.last_eval,
            "base_rewards": st.base_rewards,
            "drift": {k.removeprefix("drift/"): v for k, v in st.last_drift.items()},
            "matrix": st.matrix,
            "cl": continual_metrics(st.matrix, self.stage_tasks[: len(st.matrix)], st.base_rewards or None)
            if st.matrix else None,
            "prompts": self.fast.population if self.fast else [],
            "best_prompts": self.fast.best if self.fast else {},
            "fast": {"accepted_total": st.accepted_total, "reflection_calls": st.reflection_calls,
                     "reflection_errors": st.reflection_errors} if self.fast else None,
            "verifier_errors": st.verifier_errors,
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


def load_stream(cfg: Config) -> tuple[dict[str, Task], list[str]]:
    """The stream's tasks by unique name (in order of first appearance) and the task name of each stage.

    A stage's ``name:`` renames its task. The same spec in several stages is one task (a revisit); two
    different specs that end up with one name are a config error naming both.
    """
    tasks: dict[str, Task] = {}
    spec_of: dict[str, str] = {}
    stage_tasks: list[str] = []
    loaded: dict[tuple[str, str | None], Task] = {}
    for stage in cfg.stages:
        key = (stage.task, stage.name)
        if key not in loaded:
            loaded[key] = load_task(stage.task, name=stage.name)
        task = loaded[key]
        first = spec_of.setdefault(task.name, stage.task)
        if first != stage.task:
            raise ConfigError(
                f"field 'stages': tasks {first!r} and {stage.task!r} are both named {task.name!r}: "
                "give one of the stages a distinct 'name:'"
            )
        tasks.setdefault(task.name, task)
        stage_tasks.append(task.name)
    return tasks, stage_tasks


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

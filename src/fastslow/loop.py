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

import hashlib
import json
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from fastslow.checkpoint import CheckpointError, latest_good_checkpoint, save_checkpoint, write_json_atomic
from fastslow.checks import VerifierWindow, check_splits, fit_to_context, weights_finite
from fastslow.config import Config, ConfigError, resume_changes
from fastslow.drift import DriftMeter
from fastslow.engines import build_engine, launched_rank
from fastslow.errors import TrainingError, build_checked
from fastslow.preflight import ReflectionHealth, check_model, check_reflector
from fastslow.rollout import score_prompt
from fastslow.rundir import TEMP_INFIX, RunDirError, RunDirLock, check_run_dir, claim  # noqa: F401 - re-exported
from fastslow.slow import Rollouts
from fastslow.stream import continual_metrics, stage_at, stage_spans, stream_columns
from fastslow.tasks import Task, load_task
from fastslow.util import derive_seed, redact

MAX_NONFINITE_STREAK = 5
# timing.json: per-step lists and totals of each phase (seconds). slow_step = sampling + update.
PHASES = ("step_s", "round_s", "slow_step_s", "sampling_s", "update_s", "drift_s", "eval_s")


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
    matrix_agnostic: list[list[float]] = field(default_factory=list)  # the same, task-agnostic contexts
    base_rewards: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    last_drift: dict[str, float] = field(default_factory=dict)
    last_fast: dict[str, float] = field(default_factory=dict)  # the last fast round's metrics
    metrics_bytes: int = 0
    metrics_rows: int = 0
    metrics_sha256: str = ""  # of the first metrics_bytes of metrics.jsonl ("" in format-1 checkpoints)
    verifier_calls: int = 0


class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 on_step: Callable[[int, int, dict], None] | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.on_step, self.log = cfg, on_step, log
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        check_run_dir(self.out, resume=True, force=False)  # a file or the user's folder: refused, nothing written
        self.lock = RunDirLock(self.out)
        # One process per run dir, held until run() ends (or the process dies); under torchrun/accelerate
        # launch only rank 0 (the engine's main process) holds it.
        if self.out.is_dir() and launched_rank() == 0:
            self.lock.acquire()  # (a new dir is locked when it is created, once every input has loaded)
        try:
            check_run_dir(self.out, resume=resume, force=force)  # under the lock: a run there is not running
            self._setup(resume=resume, force=force)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, *, resume: bool, force: bool) -> None:
        cfg, log = self.cfg, self.log
        if cfg.allow_unsafe_execution:  # read by the sandbox of untrusted code (fastslow.tasks.sandbox)
            os.environ["FASTSLOW_ALLOW_UNSAFE_EXEC"] = "1"
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.spans = stage_spans([s.model_dump() for s in cfg.stages])  # [first step, end step) per stage
        self.tasks, self.stage_tasks = load_stream(cfg)  # tasks by unique name; the task name of each stage
        check_model(cfg)  # before anything loads: a missing model is one line, not a hub traceback
        for name, task in self.tasks.items():
            check_splits(task, name)
        ckpt = latest_good_checkpoint(self.ckpt_root, warn=log) if resume else None
        self._resume_changes: dict = {}
        if ckpt is not None:
            saved = json.loads((ckpt / "state.json").read_text())
            if saved.get("config") is not None:  # format-1 checkpoints carry no config
                self._resume_changes = resume_changes(saved["config"], cfg.model_dump(mode="json"),
                                                      saved["loop"]["step"])
        self.engine = build_checked(build_engine, cfg, ckpt / "model" if ckpt else None)
        self.policy, self.slow, self.fast = self.engine.policy, self.engine.slow, self.engine.fast
        if self.fast is not None and hasattr(self.fast, "reflector"):
            check_reflector(cfg, self.fast.reflector.lm)  # one short real call: a dead reflector never starts a run
        self.health = ReflectionHealth(cfg.fast.stop_after_failed_rounds)
        self.oversize_skipped = self._fit_tasks_to_context()
        probes = []
        for task in self.tasks.values():
            for problem in list(task.problems("eval"))[: cfg.drift.probe_size]:
                probes.append(self.policy.format(task.seed_prompt, problem.prompt))
        self.drift = DriftMeter(self.policy, probes, cfg.drift, seed=cfg.seed)
        self.main = self.engine.is_main  # only the main process writes the run dir
        # Every input is loaded (tasks, model, checkpoint): only now may --force clear an existing run.
        if self.main:  # one process writes the run dir; the other ranks neither lock nor claim it
            if not self.lock.held:
                self.lock.acquire()
            claim(self.out, resume=resume, force=force)
        self.state = LoopState()
        self.verifier_window = VerifierWindow(cfg.verifier_error_window, cfg.max_verifier_error_share)
        self._metrics_hash = hashlib.sha256()
        self.timing: dict[str, list[float]] = {k: [] for k in PHASES}
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
        try:
            return self._run()
        finally:
            self.engine.close()
            self.lock.release()

    def _run(self) -> dict:
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
                st.last_fast = dict(rnd.metrics)
                if rnd.error:  # a faulty reflector or round is survived, never silently
                    self.log(f"step {step}: fast channel kept its population: {rnd.error}")
                st.fast_rollouts += rnd.rollouts
                self._verified(rnd.verifier_errors, rnd.rollouts)
                st.accepted_total += rnd.accepted
                st.reflection_calls += rnd.reflection_calls
                st.reflection_errors += rnd.reflection_errors
                failed = rnd.failed_reflection_calls
                if failed is None:  # a channel that does not count them: every call failed <=> every try failed
                    all_failed = rnd.reflection_errors >= rnd.reflection_calls * (cfg.fast.reflection_retries + 1)
                    failed = rnd.reflection_calls if all_failed else 0
                stop = self.health.record(rnd.reflection_calls, failed, rnd.accepted)
                row["fast/failed_reflection_calls"] = float(self.health.failed_calls)
                row["fast/accepted_total"] = float(st.accepted_total)
                if stop:
                    raise TrainingError(
                        f"fast.reflector {cfg.fast.reflector}: every reflection call failed in "
                        f"{self.health.streak} consecutive rounds (last: {rnd.error}); stopped at step "
                        f"{step}, checkpoints kept in {self.ckpt_root} (fast.stop_after_failed_rounds: 0 carries on)"
                    )
                self.timing["round_s"].append(time.perf_counter() - t_round)
            if self.slow is not None:
                t_slow = time.perf_counter()
                row.update(self._slow_step(task, step))
                self.timing["slow_step_s"].append(time.perf_counter() - t_slow)
            st.step = step + 1
            done = st.step
            if self._drift_due(done):
                t_drift = time.perf_counter()
                row.update(self._drift())
                self.timing["drift_s"].append(time.perf_counter() - t_drift)
            if done % cfg.eval.every == 0 or done == stage_end:
                row.update(self._evaluate(step=done))
            if done == stage_end:
                st.matrix.append([st.last_eval[name]["reward"] for name in stream_columns(self.stage_tasks)])
                st.matrix_agnostic.append([st.last_eval[name]["reward_agnostic"]
                                           for name in stream_columns(self.stage_tasks)])
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
        pairs = []
        for p in problems:  # one group (one advantage) per problem, whatever contexts it mixes
            contexts = self.fast.contexts(task, p, g) if self.fast else [task.seed_prompt] * g
            if len(contexts) != g:
                raise TrainingError(f"the fast channel gave {len(contexts)} contexts for a group of {g}")
            pairs += [(ctx, p) for ctx in contexts]
        t_sample = time.perf_counter()
        scored = self.engine.sample(
            task, pairs, temperature=cfg.slow.temperature, top_p=cfg.slow.top_p,
            max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "rollout", step),
        )
        t_update = time.perf_counter()
        self.timing["sampling_s"].append(t_update - t_sample)
        st.rollouts += len(pairs)
        self._verified(scored.verifier_errors, len(pairs))
        rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(len(problems), g)
        # k3 on the training rollouts is logged on exactly the rows the drift meter measures.
        metrics = self.slow.step(Rollouts(scored.batch, rewards), measure_k3=self._drift_due(step + 1))
        self.timing["update_s"].append(time.perf_counter() - t_update)
        if self.slow.nonfinite_streak >= MAX_NONFINITE_STREAK:
            raise TrainingError(
                f"loss or gradient non-finite for {self.slow.nonfinite_streak} consecutive steps at step {step}; "
                f"updates were skipped, the last good checkpoint is in {self.ckpt_root} (try a lower slow.lr)"
            )
        if not weights_finite(self.policy.model):  # e.g. lr 1e9: a finite step that overflowed the weights
            raise TrainingError(
                f"the weights became non-finite after the update of step {step}; the last good checkpoint is in "
                f"{self.ckpt_root} (try a lower slow.lr)"
            )
        st.policy_version = self.policy.version
        return metrics

    def _verified(self, errors: int, calls: int) -> None:
        """Count verifier outcomes; too many errors in the window stop the run (the checkpoint is kept)."""
        st = self.state
        st.verifier_errors += errors
        st.verifier_calls += calls
        self.verifier_window.add(errors, calls)

    def _fit_tasks_to_context(self) -> dict[str, int]:
        """Problems whose prompt (with the seed prompt and the completion budget) exceeds the model's context
        are a config error naming the first, or left out and counted (``oversize_problems: skip``)."""
        skipped: dict[str, int] = {}
        for spec, task in self.tasks.items():
            self.tasks[spec], n = fit_to_context(task, self.policy, self.cfg.slow.max_new_tokens,
                                                 skip=self.cfg.oversize_problems == "skip")
            if n:
                skipped[task.name] = n
                self.log(f"task {task.name}: {n} problems longer than the model's context left out")
        return skipped

    # ---- measurements -------------------------------------------------------------------------
    def _drift_due(self, done: int) -> bool:
        """Drift is measured after ``done`` loop steps every ``drift.every`` steps and at the very end."""
        return done % self.cfg.drift.every == 0 or done == self.cfg.total_steps

    def _drift(self) -> dict[str, float]:
        # Every rank measures (with sharded weights each forward is a collective); every rank then takes the
        # main process's numbers, so the drift budget steers alike everywhere.
        self.state.last_drift = self.engine.broadcast(self.drift.measure())
        moved = {k: v for k, v in self.state.last_drift.items() if k in ("drift/kl_rev", "drift/kl_fwd") and v != 0}
        if self.slow is None and moved:  # frozen weights (gepa, memory) sit at KL exactly 0, by construction
            raise TrainingError(f"method {self.cfg.method} trains no weights but the drift meter measured {moved}")
        if self.slow is not None:  # the drift budget (slow.kl_target) steers on the exact reverse KL
            self.slow.observe_drift(self.state.last_drift.get("drift/kl_rev"))
        return dict(self.state.last_drift)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Every task of the stream, greedy (by default) on its eval split, with the seed prompt and with the
        fast channel's context for each problem: task-aware (``reward``: told the task) and task-agnostic
        (``reward_agnostic``: one context source for every task). Identical contexts are scored once."""
        t0 = time.perf_counter()
        cfg, row = self.cfg, {}
        for task in self.tasks.values():
            problems = list(task.problems("eval"))[: cfg.eval.n]
            views = {"reward_seed_prompt": [task.seed_prompt] * len(problems)}
            for key, view in (("reward", "task"), ("reward_agnostic", "agnostic")):
                views[key] = ([self.fast.contexts(task, p, 1, view=view)[0] for p in problems] if self.fast
                              else views["reward_seed_prompt"])
            result: dict[str, float] = {}
            for key, contexts in views.items():
                same = next((k for k in result if views[k] == contexts), None)
                if same is not None:
                    result[key] = result[same]
                    continue
                scored = score_prompt(
                    self.engine.sample, task, contexts, cfg.eval.n, temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.slow.max_new_tokens, seed=derive_seed(cfg.seed, "eval", step, task.name),
                )
                self._verified(scored.verifier_errors, len(scored.verdicts))
                result[key] = scored.mean_reward
            self.state.last_eval[task.name] = result
            for key in ("reward", "reward_seed_prompt", "reward_agnostic"):
                row[f"eval/{task.name}/{key}"] = result[key]
        self.timing["eval_s"].append(time.perf_counter() - t0)
        return row

    # ---- bookkeeping --------------------------------------------------------------------------
    def _log_row(self, step: int, metrics: dict[str, float]) -> None:
        st = self.state
        row = {"step": step, "rollouts": st.rollouts, "fast_rollouts": st.fast_rollouts, **metrics}
        if not self.main:
            return
        # Strict JSON: a skipped non-finite loss is logged as null, not NaN.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._append_metrics(json.dumps(clean) + "\n")
        problem = self.verifier_window.verdict()
        if problem:  # checked once the row is logged, so the run's record shows the counts that stopped it
            raise TrainingError(
                f"{problem} (verifier errors {st.verifier_errors}/{st.verifier_calls} in all); the run stops at "
                f"step {step}, the last good checkpoint is in {self.ckpt_root}"
            )

    def _append_metrics(self, line: str) -> None:
        """Append one row; the state keeps the row count and a running sha256 of everything written."""
        st, data = self.state, line.encode()
        with self.metrics_path.open("ab") as f:
            f.write(data)
        self._metrics_hash.update(data)
        st.metrics_bytes += len(data)
        st.metrics_rows += 1
        st.metrics_sha256 = self._metrics_hash.hexdigest()

    def _checkpoint(self) -> None:
        st = self.state
        st.policy_version = self.policy.version
        # Gathered on every rank (collectives where the weights are sharded), written by the main process alone.
        weights = self.policy.full_state_dict()
        slow_state = self.slow.state_dict() if self.slow is not None else None
        if not self.main:
            return

        def write(tmp: Path) -> None:
            self.policy.save(tmp / "model", state_dict=weights)
            if slow_state is not None:
                torch.save(slow_state, tmp / "trainer.pt")
            state = {
                "loop": asdict(st),
                "fast": self.fast.state_dict() if self.fast else None,
                "reflection_health": self.health.state_dict(),
                "torch_rng": torch.get_rng_state().tolist(),
                "config": self.cfg.model_dump(mode="json"),
            }
            (tmp / "state.json").write_text(json.dumps(state))
            # The rows so far travel with the checkpoint: a metrics file cut short is rebuilt from them.
            with self.metrics_path.open("rb") as src:
                (tmp / "metrics.jsonl").write_bytes(src.read(st.metrics_bytes))

        save_checkpoint(self.ckpt_root, st.step, write, keep=self.cfg.keep_checkpoints)

    def _restore(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        self.state = LoopState(**state["loop"])
        self.policy.version = self.state.policy_version
        if self.slow is not None:
            self.slow.load_state_dict(torch.load(ckpt / "trainer.pt", weights_only=False))
        if self.fast is not None and state["fast"] is not None:
            self.fast.load_state_dict(state["fast"])
        self.health.load_state_dict(state.get("reflection_health", {}))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        # A lengthened last stage has not ended yet: its accuracy-matrix row is written again at its new end.
        ended = sum(end <= self.state.step for _, end in self.spans)
        self.state.matrix, self.state.matrix_agnostic = self.state.matrix[:ended], self.state.matrix_agnostic[:ended]
        if not self.main:
            return
        self._restore_metrics(ckpt)
        if self._resume_changes:  # safe changes only (the others were refused before anything was written)
            self._append_metrics(json.dumps({"step": self.state.step, "event": "resume_config_changed",
                                             "changed": self._resume_changes}) + "\n")
            self.log(f"resume: config changed: {', '.join(sorted(self._resume_changes))}")

    def _restore_metrics(self, ckpt: Path) -> None:
        """Cut rows written after ``ckpt`` (the lost future); rebuild a file cut short or altered from the
        checkpoint's copy. Never pads: a file shorter than the checkpoint's offset is not extended."""
        st = self.state
        data = self.metrics_path.read_bytes() if self.metrics_path.is_file() else b""
        prefix = data[: st.metrics_bytes]
        intact = len(prefix) == st.metrics_bytes and (
            not st.metrics_sha256 or hashlib.sha256(prefix).hexdigest() == st.metrics_sha256)
        if not intact:
            copy = ckpt / "metrics.jsonl"
            if not copy.is_file():
                raise CheckpointError(
                    f"{self.metrics_path} holds less than the {st.metrics_bytes} bytes checkpoint {ckpt.name} "
                    "recorded and the checkpoint carries no copy: cannot resume without losing rows"
                )
            prefix = copy.read_bytes()
            self.log(f"{self.metrics_path.name} was cut short or altered: rebuilt from checkpoint {ckpt.name}")
        tmp = self.metrics_path.with_name(f".metrics.jsonl{TEMP_INFIX}{os.getpid()}")
        tmp.write_bytes(prefix)
        os.replace(tmp, self.metrics_path)
        self._metrics_hash = hashlib.sha256(prefix)

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
            "sharding": self.engine.sharding,
            "stages": [{"task": name, "spec": stage.task, "steps": stage.steps}
                       for name, stage in zip(self.stage_tasks, cfg.stages)],
            "tasks": names,
            "final": st.last_eval,
            "base_rewards": st.base_rewards,
            "drift": {k.removeprefix("drift/"): v for k, v in st.last_drift.items()},
            "fast_kind": cfg.fast_kind,
            "matrix": st.matrix,
            "matrix_agnostic": st.matrix_agnostic,
            # Task-aware: each task evaluated with its own context (told the task); task-agnostic: one source.
            "cl": self._cl(st.matrix, "task-aware"),
            "cl_agnostic": self._cl(st.matrix_agnostic, "task-agnostic"),
            "memory": {k.removeprefix("fast/memory/"): v for k, v in st.last_fast.items()
                       if k.startswith("fast/memory/")} or None,
            "prompts": self.fast.population if self.fast else [],
            "best_prompts": self.fast.best if self.fast else {},
            "fast": {"accepted_total": st.accepted_total, "reflection_calls": st.reflection_calls,
                     "reflection_errors": st.reflection_errors, "failed_reflection_calls": self.health.failed_calls,
                     "rounds_nothing_accepted": self.health.rounds_nothing_accepted} if self.fast else None,
            "verifier_errors": st.verifier_errors,
            "verifier_calls": st.verifier_calls,
            "oversize_problems_skipped": self.oversize_skipped,
        }

    def _cl(self, matrix: list[list[float]], scenario: str) -> dict | None:
        if not matrix:
            return None
        metrics = continual_metrics(matrix, self.stage_tasks[: len(matrix)], self.state.base_rewards or None)
        return {"scenario": scenario, **metrics}

    def _timing_summary(self) -> dict:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {
            "total_s": {k: sum(v) for k, v in self.timing.items()},
            "per_step": dict(self.timing),
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


def train(cfg: Config, **kwargs) -> dict:
    """Run ``cfg`` to the end (or resume it); returns the summary also written to ``summary.json``."""
    return Trainer(cfg, **kwargs).run()

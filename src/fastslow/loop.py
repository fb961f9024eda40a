"""The training loop of every method, and the run directory it writes.

    for step in 0 .. total-1:                       (stages of the stream run back to back)
        task = stage(step).task                     (stage: start <= step < end, see stream.stage_at)
        fast on and (step - stage start) % T == 0 ->  fast round on the current weights (GEPA population and/or
                                                      experience memory)
        slow on                  ->  B problems x G rollouts (fast.contexts per problem) -> RL update
        every E_drift steps      ->  drift meter (and the slow step's k3 estimate on the same steps)
        every E_eval steps       ->  evaluation of every task (seed prompt; the fast channel's context per
                                     problem, task-aware and task-agnostic)
        stage end                ->  evaluation + a row of the accuracy matrix
        every N steps            ->  atomic checkpoint

The loop only talks to the engine's seams (:mod:`fastslow.channels`): ``engine.sample``, ``engine.slow``,
``engine.fast``; any engine registered in :mod:`fastslow.engines` runs this same loop.
Metric rows carry ``step`` = loop steps completed (row 0 is the base, before anything ran).
Every random draw is seeded from (seed, what, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastslow import registry, threads
from fastslow.channels import Engine
from fastslow.checkpoint import latest_good_checkpoint
from fastslow.checks import VerifierWindow, check_splits, fit_to_context
from fastslow.config import Config, ConfigError, resume_changes, resume_task_changes
from fastslow.drift import DriftMeter
from fastslow.errors import TrainingError, build_checked
from fastslow.preflight import ReflectionHealth, check_model
from fastslow.record import LoopState, RunRecord, claim_run_dir, summary
from fastslow.rundir import RunDirError, RunDirLock, check_run_dir  # noqa: F401 - RunDirError re-exported
from fastslow.slow import Rollouts
from fastslow.stream import stage_at, stage_spans, stream_columns
from fastslow.tasks import Task, close_verifier_workers, content_hash, load_task
from fastslow.trackers import close_quietly, open_trackers
from fastslow.util import derive_seed, launched_rank

MAX_NONFINITE_STREAK = 5
# timing.json: per-step lists and totals of each phase (seconds). slow_step = sampling + update.
PHASES = ("step_s", "round_s", "slow_step_s", "sampling_s", "update_s", "drift_s", "eval_s")


def build_engine(cfg: Config, weights: Path | None) -> Engine:
    """The engine ``cfg.engine`` names (a registered :class:`~fastslow.channels.EngineSpec`), from ``weights``."""
    spec = registry.engine_spec(cfg.engine)
    if spec is None:
        raise ConfigError(f"field 'engine': unknown engine {cfg.engine!r}: use one of {registry.known('engines')}")
    return spec.build(cfg, weights)


class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 on_step: Callable[[int, int, dict], None] | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.on_step, self.log = cfg, on_step, log
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
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
        self.task_hashes = {name: content_hash(task) for name, task in self.tasks.items()}
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
            resume_task_changes(saved.get("tasks") or {}, self.task_hashes, saved["loop"]["step"])
        self.engine = build_checked(build_engine, cfg, ckpt / "model" if ckpt else None)
        self.policy, self.slow, self.fast = self.engine.policy, self.engine.slow, self.engine.fast
        if not cfg.threads:
            threads.fit_model(sum(p.numel() for p in self.policy.model.parameters()))
        self.engine.preflight()  # one short real call of the reflector: a dead one never starts a run
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
            claim_run_dir(self.out, resume=resume, force=force)
        self.record = RunRecord(self.out, cfg, main=self.main, log=log, task_hashes=self.task_hashes)
        self.state = LoopState()
        self.verifier_window = VerifierWindow(cfg.verifier_error_window, cfg.max_verifier_error_share)
        self.timing: dict[str, list[float]] = {k: [] for k in PHASES}
        # Greedy evaluations of unchanged weights on unchanged contexts are repeated by frozen-weight methods at every
        # evaluation: (weights version, task, contexts) -> (mean reward, verifier errors, verdicts) of the last one.
        self._eval_memo: dict[tuple, tuple[float, int, int]] = {}
        if ckpt is not None:
            self.state = self.record.restore(
                ckpt, self.engine, self.health, changes=self._resume_changes,
                finished_stages=lambda step: sum(end <= step for _, end in self.spans))
            log(f"resumed from {ckpt} (step {self.state.step})")
        else:
            self.record.start()
        self.trackers = []  # report_to: started before step 0 (one that cannot start is one line), main process only
        if self.main and cfg.report_to:
            self.trackers = open_trackers(cfg.report_to, self.out, self.record.config_dict())

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.engine.close()
            close_verifier_workers()
            for tracker in self.trackers:
                close_quietly(tracker)
            self.lock.release()

    def _run(self) -> dict:
        cfg, st = self.cfg, self.state
        total = cfg.total_steps
        if st.step == 0 and st.metrics_bytes == 0:
            row = {**self._drift(), **self._evaluate(step=0)}
            st.base_rewards = {name: r["reward_seed_prompt"] for name, r in st.last_eval.items()}
            self._together(lambda: self._log_row(0, row))
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
                st.fast_rounds.append({"step": step, "population": rnd.population, "front_size": rnd.front_size,
                                       "val_flat": rnd.val_flat})
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
            # What the main process does alone (writing, the verifier verdict) may fail there alone: every rank
            # learns it and stops with the same line; none waits in a collective for a failed peer.
            self._together(lambda: self._log_row(done, row))  # noqa: B023 - called at once
            self.timing["step_s"].append(time.perf_counter() - t0)
            if self.on_step:
                self.on_step(done, total, row)
            if done % cfg.checkpoint_every == 0 or done == stage_end:
                self._checkpoint()
        result = summary(cfg, st, self.engine, self.health, self.stage_tasks, self.oversize_skipped)
        self.record.finish(result, self.timing)
        return result

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
        if not self.policy.finite():  # e.g. lr 1e9: a finite step that overflowed the weights
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
        for stale in [k for k in self._eval_memo if k[0] != self.policy.version]:
            del self._eval_memo[stale]
        for task in self.tasks.values():
            problems = list(task.problems("eval"))[: cfg.eval.n]
            views = {"reward_seed_prompt": [task.seed_prompt] * len(problems)}
            for key, view in (("reward", "task"), ("reward_agnostic", "agnostic")):
                views[key] = ([self.fast.contexts(task, p, 1, view=view)[0] for p in problems] if self.fast
                              else views["reward_seed_prompt"])
            memo_keys = {key: (self.policy.version, task.name, tuple(contexts)) for key, contexts in views.items()}
            fresh = list(dict.fromkeys(k for k in memo_keys.values()
                                       if cfg.eval.temperature > 0 or k not in self._eval_memo))
            seed = derive_seed(cfg.seed, "eval", step, task.name)
            # Greedy: every view's rows in one generate call (no draw to change; on CPU a decode step costs
            # much the same for 64 rows as for 32). Sampled: each view its own seeded call, as before.
            for chunk in ([fresh] if cfg.eval.temperature == 0 and fresh else [[k] for k in fresh]):
                pairs = [(c, p) for k in chunk for c, p in zip(k[2], problems, strict=True)]
                scored = self.engine.sample(task, pairs, temperature=cfg.eval.temperature,
                                            max_new_tokens=cfg.slow.max_new_tokens, seed=seed)
                for i, k in enumerate(chunk):  # the call's verifier errors are counted once, with its first view
                    rewards = scored.rewards[i * len(problems):(i + 1) * len(problems)]
                    self._eval_memo[k] = (sum(rewards) / max(len(rewards), 1),
                                          scored.verifier_errors if i == 0 else 0, len(rewards))
            result: dict[str, float] = {}
            counted: set[tuple] = set()
            for key, k in memo_keys.items():
                reward, errors, verdicts = self._eval_memo[k]
                if k not in counted:  # views with the same contexts are one evaluation
                    counted.add(k)
                    self._verified(errors, verdicts)
                result[key] = reward
            self.state.last_eval[task.name] = result
            for key in ("reward", "reward_seed_prompt", "reward_agnostic"):
                row[f"eval/{task.name}/{key}"] = result[key]
        self.timing["eval_s"].append(time.perf_counter() - t0)
        return row

    # ---- bookkeeping --------------------------------------------------------------------------
    def _log_row(self, step: int, metrics: dict[str, float]) -> None:
        row = self.record.log_row(self.state, step, metrics)
        for tracker in self.trackers:  # the same row, namespaced keys and all
            tracker.log(row, step)
        problem = self.verifier_window.verdict(final=step == self.cfg.total_steps)
        if problem:  # checked once the row is logged, so the run's record shows the counts that stopped it
            st = self.state
            raise TrainingError(
                f"{problem} (verifier errors {st.verifier_errors}/{st.verifier_calls} in all); the run stops at "
                f"step {step}, the last good checkpoint is in {self.ckpt_root}"
            )

    def _checkpoint(self) -> None:
        self._together(lambda: self.record.save(self.state, self.engine, self.health))

    def _together(self, work: Callable[[], None]) -> None:
        """``work()``; its failure on any rank is raised on every rank alike (``engine.agree``)."""
        error = None
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
            error = exc
        self.engine.agree(error)


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

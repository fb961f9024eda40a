"""Fast channel: a Pareto population of system prompts, evolved by GEPA on the *current* policy.

Every T loop steps :meth:`FastChannel.run_round` runs a light GEPA round:

1. re-score the seed prompt and the carried population with the current weights on this round's
   Pareto (validation) set (GEPA never re-scores old candidates, so their scores would be stale);
2. seed GEPA's state with those candidates and fresh scores, and let ``gepa.optimize`` spend a
   per-round budget of metric calls (GEPA's own seed, changed every round; our logger; no cache);
3. keep the top-K of the Pareto front (ranked by mean validation score) as the new population, counting only
   proposals that strictly beat their parent on validation, and fill it to K when the front is smaller
   (:func:`top_k_front`); a validation set too flat to tell candidates apart is grown for the next round.

The slow channel then mixes the population inside every problem's group (G/K rollouts per prompt).
Rollouts go through the engine's :class:`~fastslow.channels.Sampler`, so GEPA scores prompts with the
weights the slow channel trains, never a second copy. The only coupling to gepa internals is
:func:`seeded_state` (``gepa.core.state``), hence the pin.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gepa
from gepa import EvaluationBatch
from gepa.core.result import GEPAResult
from gepa.core.state import GEPAState, ValsetEvaluation
from gepa.gepa_utils import find_dominator_programs

from fastslow.channels import Round, Sampler
from fastslow.config import FastConfig
from fastslow.preflight import check_reflector
from fastslow.reflect import GuardedReflector, ReflectionLM
from fastslow.tasks import Problem, Task
from fastslow.util import derive_seed, one_line

COMPONENT = "system_prompt"


class BudgetSpent(RuntimeError):
    """The round's rollout budget (``fast.budget``, re-scoring included) would be exceeded."""


class FastAdapter:
    """GEPA adapter over the sampler: a candidate is ``{"system_prompt": text}``, scored by the verifier.

    Evaluations are memoised by (weights version, prompt, problem id): GEPA 0.1.4 re-evaluates the seed
    on resume, and re-scoring already evaluated each candidate; neither should cost rollouts twice.
    ``generated`` counts the rollouts actually sampled; with ``limit`` set, a call that would take it past
    ``limit`` samples nothing and raises :class:`BudgetSpent` (the round's hard cap).
    """

    propose_new_texts = None  # GEPA's own reflective proposer, with our reflection model

    def __init__(
        self, sample: Sampler, task: Task, *, version: Callable[[], int], temperature: float, max_new_tokens: int,
        seed: int,
    ) -> None:
        self.sample, self.task, self.version = sample, task, version
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.generated = 0
        self.limit: int | None = None
        self.verifier_errors = 0
        self._memo: dict[tuple[int, str, str], tuple[str, float, str]] = {}

    def evaluate(self, batch: list[Problem], candidate: dict[str, str], capture_traces: bool = False):
        text = candidate[COMPONENT]
        self.prefetch(batch, [text])
        results = [self._memo[(self.version(), text, p.id)] for p in batch]
        trajectories = None
        if capture_traces:
            trajectories = [
                {"Inputs": p.prompt, "Generated Outputs": out, "Feedback": feedback}
                for p, (out, _, feedback) in zip(batch, results, strict=True)
            ]
        return EvaluationBatch(
            outputs=[r[0] for r in results], scores=[r[1] for r in results], trajectories=trajectories
        )

    def prefetch(self, batch: list[Problem], texts: Sequence[str]) -> None:
        """Sample, in one call, every (prompt, problem) of ``texts`` x ``batch`` not yet memoised.

        Re-scoring the carried prompts this way costs one generate call, not one per prompt: on CPU a decode
        step of a small model reads every weight whatever the rows (SmolLM2-135M, 32 tokens: ~6 s for 3 rows,
        ~7 s for 16). Scoring is greedy by default (``fast.temperature: 0``), so decoding rows together changes no
        draw; with a temperature the joint call draws from its own seed.
        """
        version = self.version()
        texts = list(dict.fromkeys(texts))
        todo = [(t, p) for t in texts for p in batch if (version, t, p.id) not in self._memo]
        if not todo:
            return
        if self.limit is not None and self.generated + len(todo) > self.limit:
            raise BudgetSpent(f"{self.generated} of {self.limit} rollouts spent; {len(todo)} more needed")
        missing = list(dict.fromkeys(t for t, _ in todo))
        scored = self.sample(
            self.task,
            todo,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            seed=derive_seed(self.seed, version, *missing, *dict.fromkeys(p.id for _, p in todo)),
        )
        self.generated += len(todo)
        self.verifier_errors += scored.verifier_errors
        for (t, p), out, v in zip(todo, scored.batch.texts, scored.verdicts, strict=True):
            self._memo[(version, t, p.id)] = (out, v.reward, v.feedback)

    def make_reflective_dataset(self, candidate, eval_batch, components_to_update):
        return {c: list(eval_batch.trajectories or []) for c in components_to_update}


class _QuietLogger:
    """GEPA swaps sys.stdout for a tee when run with a run_dir and no logger; we always pass one."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def seeded_state(candidates: list[str], adapter: FastAdapter, valset: list[Problem]) -> GEPAState:
    """A GEPA state whose pool is ``candidates`` (first = seed), all scored afresh on ``valset``."""
    ids = list(range(len(valset)))  # GEPA's list loader keys examples by index
    adapter.prefetch(valset, candidates)

    def scored(text: str) -> ValsetEvaluation:
        ev = adapter.evaluate(valset, {COMPONENT: text})
        return ValsetEvaluation(dict(zip(ids, ev.outputs, strict=True)), dict(zip(ids, ev.scores, strict=True)), None)

    state = GEPAState({COMPONENT: candidates[0]}, scored(candidates[0]), frontier_type="instance")
    for text in candidates[1:]:
        state.update_state_with_new_program([0], {COMPONENT: text}, scored(text), None, 0)
    state.num_full_ds_evals = len(candidates)
    state.total_num_evals = 0  # so that max_metric_calls is this round's budget
    return state


class FillAcceptance:
    """GEPA's minibatch gate: strict improvement, or any new prompt while the pool holds fewer than ``k`` distinct ones.

    Such a prompt is then scored on validation, so that a round whose proposals do not win their minibatch (a
    flat or hard task, a weak reflector) still yields K prompts to mix. It can fill the population, never lead
    the front: :func:`top_k_front` requires a strict gain over its parent on validation.
    """

    def __init__(self, k: int) -> None:
        self.k = k

    def should_accept(self, proposal: Any, state: GEPAState) -> bool:
        old, new = sum(proposal.subsample_scores_before or []), sum(proposal.subsample_scores_after or [])
        distinct = {c[COMPONENT] for c in state.program_candidates}
        short = len(distinct) < self.k and proposal.candidate[COMPONENT] not in distinct
        return new > old or short


def beats_parent(result: Any, i: int) -> bool:
    """Candidate ``i`` scores strictly above its parent(s) on this round's validation set (GEPA only checks
    the reflection minibatch, where a lucky draw of 2-3 problems lets a no-better prompt in)."""
    parents = [p for p in (result.parents[i] or []) if p is not None]
    scores = result.val_aggregate_scores
    return bool(parents) and scores[i] > max(scores[p] for p in parents) + 1e-12


def top_k_front(result: Any, k: int, carried: int | None = None) -> tuple[list[str], dict[str, float]]:
    """The new population: top-K of the Pareto front, filled to K when the front is smaller.

    The front is taken over the *kept* pool: the ``carried`` candidates GEPA was seeded with (seed prompt and the
    re-scored population) and the proposals that strictly beat their parent on validation (:func:`beats_parent`).
    It is ranked by mean validation score (ties: more instances led, then older). When it holds fewer than K
    distinct prompts, the population is filled, so that every group mixes K prompts as the paper's FST does:
    first the kept pool's dominated candidates, then the proposals GEPA scored but that did not beat their
    parent, each by mean validation score (ties: kept first, then older). Fillers condition rollouts only: the
    task's best prompt is always the front's first. Fewer than K distinct prompts in the whole round (e.g. the
    first round, no proposal scored) gives a smaller population, and ``population`` says so.

    Returns (texts, info) with info = {front_size, population, filled, accepted, rejected_on_val}.
    """
    n = result.num_candidates
    carried = n if carried is None else min(carried, n)
    scores = result.val_aggregate_scores
    accepted = [i for i in range(carried, n) if beats_parent(result, i)]
    kept = list(range(carried)) + accepted
    # Instance-level Pareto front of the kept pool: a candidate leads an instance when no kept one scores higher.
    instances = {inst for i in kept for inst in result.val_subscores[i]}
    top = {inst: max(result.val_subscores[i].get(inst, -math.inf) for i in kept) for inst in instances}
    best_at = {inst: {i for i in kept if result.val_subscores[i].get(inst, -math.inf) >= top[inst] - 1e-12}
               for inst in instances}
    front = find_dominator_programs(best_at, {i: scores[i] for i in kept}) if best_at else kept[:1]
    led = {i: sum(i in s for s in best_at.values()) for i in front}
    ranked = sorted(front, key=lambda i: (-scores[i], -led[i], i))
    rest = sorted((i for i in range(n) if i not in front), key=lambda i: (-scores[i], i not in kept, i))
    texts: list[str] = []
    filled = 0
    for i in ranked + rest:
        text = result.candidates[i][COMPONENT]
        if len(texts) < k and text not in texts:
            filled += i not in front
            texts.append(text)
    info = {"front_size": float(len(front)), "population": float(len(texts)), "filled": float(filled),
            "accepted": float(len(accepted)), "rejected_on_val": float(n - carried - len(accepted))}
    return texts, info


def val_flat(scores: Sequence[float]) -> bool:
    """Validation too flat to tell candidates apart: every candidate scored the same, or the only one scored 0
    or 1 on every problem (floor or ceiling: no proposal can show it is better)."""
    if not scores:
        return True
    same = max(scores) - min(scores) <= 1e-12
    return same and (len(scores) > 1 or scores[0] <= 1e-12 or scores[0] >= 1 - 1e-12)


class FastChannel:
    """The population, the best prompt per task, and the round driver (the native :class:`channels.FastChannel`).

    ``version()`` is the weights' version: evaluations are reused only while it is unchanged.
    """

    def __init__(self, sample: Sampler, cfg: FastConfig, reflector: ReflectionLM, *, seed: int,
                 max_new_tokens: int, version: Callable[[], int]) -> None:
        self.sample, self.cfg, self.seed, self.version = sample, cfg, seed, version
        self.max_new_tokens = max_new_tokens
        self.reflector = GuardedReflector(reflector, retries=cfg.reflection_retries, timeout_s=cfg.reflection_timeout_s,
                                          max_consecutive_failures=cfg.max_consecutive_reflection_failures,
                                          max_reply_chars=cfg.max_reply_chars, max_prompt_chars=cfg.max_prompt_chars)
        self.population: list[str] = []
        self.best: dict[str, str] = {}
        self.rounds = 0
        self.round_errors = 0
        self.val_size = cfg.val_size  # grows when a round's validation set was too flat to tell (fast.val_growth)

    def state_dict(self) -> dict:
        return {
            "population": self.population,
            "best": self.best,
            "rounds": self.rounds,
            "round_errors": self.round_errors,
            "val_size": self.val_size,
            "reflection_errors": self.reflector.errors,
            "reflection_calls": self.reflector.calls,
        }

    def load_state_dict(self, state: dict) -> None:
        self.population, self.best = list(state["population"]), dict(state["best"])
        self.rounds, self.round_errors = state["rounds"], state["round_errors"]
        self.val_size = state.get("val_size", self.cfg.val_size)  # checkpoints from before it grew
        self.reflector.errors, self.reflector.calls = state["reflection_errors"], state["reflection_calls"]

    def preflight(self) -> None:
        """One short real call of the reflection model (``fast.preflight: false`` skips it)."""
        check_reflector(self.cfg, self.reflector.lm)

    def contexts(self, task: Task, problem: Problem, group_size: int, view: str = "train") -> list[str]:
        """The G contexts of one problem's group: K population slots, G/K rollouts each (the same for every
        problem). Evaluation: the task's best prompt (``task``) or the population's top (``agnostic``)."""
        if view != "train":
            top = self.best.get(task.name) if view == "task" else (self.population or [None])[0]
            return [top or task.seed_prompt] * group_size
        population = self.population or [task.seed_prompt]
        k = min(self.cfg.population, group_size)
        slots = [population[i % len(population)] for i in range(k)]
        return [slots[i * k // group_size] for i in range(group_size)]

    def run_round(self, task: Task, workdir: Path | None = None) -> Round:
        """One light GEPA round on ``task`` with the current weights (see the module docstring)."""
        cfg = self.cfg
        round_seed = derive_seed(self.seed, "gepa-round", self.rounds)
        train = list(task.problems("train"))
        valset = random.Random(round_seed).sample(train, min(self.val_size, len(train)))
        adapter = FastAdapter(
            self.sample, task, version=self.version, temperature=cfg.temperature,
            max_new_tokens=self.max_new_tokens, seed=round_seed,
        )
        candidates = list(dict.fromkeys([task.seed_prompt, *self.population]))
        state = seeded_state(candidates, adapter, valset)
        rescore_rollouts = adapter.generated
        calls_before, errors_before, failed_before = (self.reflector.calls, self.reflector.errors,
                                                      self.reflector.failed_calls)
        error: str | None = None  # this round's fault, one redacted line, for the run log
        accepted = 0
        tmp = Path(tempfile.mkdtemp(prefix=".fastslow-gepa-", dir=workdir))
        metrics: dict[str, float] = {}
        result = None
        # fast.budget is a hard cap on the round's rollouts, re-scoring included (re-scoring always runs:
        # a budget below its cost is spent on it alone). GEPA checks its own max_metric_calls only between
        # iterations, so the adapter enforces the cap; the iteration that hits it is dropped (below).
        adapter.limit = max(cfg.budget, rescore_rollouts)
        try:
            state.save(str(tmp))
            self.reflector.new_round()
            result = gepa.optimize(
                seed_candidate={COMPONENT: candidates[0]},
                trainset=train,
                valset=valset,
                adapter=adapter,
                reflection_lm=self.reflector,
                reflection_minibatch_size=cfg.minibatch,
                candidate_selection_strategy="pareto",
                acceptance_criterion=FillAcceptance(cfg.population),
                max_metric_calls=max(cfg.budget - rescore_rollouts, 0),
                # A reflector that keeps failing ends the round; the population is kept.
                stop_callbacks=[lambda _state: self.reflector.exhausted],
                run_dir=str(tmp),
                logger=_QuietLogger(),
                seed=round_seed % (2**31),
                cache_evaluation=False,
                track_best_outputs=False,
                display_progress_bar=False,
                raise_on_exception=True,
            )
        except BudgetSpent:
            # GEPA saved its state at the start of the iteration that ran out: every earlier acceptance is kept.
            result = GEPAResult.from_state(GEPAState.load(str(tmp)))
        except Exception as exc:  # noqa: BLE001 - a failed round keeps the re-scored population; the run goes on
            self.round_errors += 1
            error = one_line(f"round failed: {type(exc).__name__}: {exc}")
            scores = [sum(state.prog_candidate_val_subscores[i].values()) / max(len(valset), 1)
                      for i in range(len(candidates))]
            order = sorted(range(len(candidates)), key=lambda i: -scores[i])
            population = [candidates[i] for i in order][: cfg.population]
            info = {"front_size": float(len(candidates)), "population": float(len(population)), "filled": 0.0,
                    "accepted": 0.0, "rejected_on_val": 0.0}
        finally:
            adapter.limit = None
            shutil.rmtree(tmp, ignore_errors=True)
        if result is not None:
            population, info = top_k_front(result, cfg.population, carried=len(candidates))
            scores = list(result.val_aggregate_scores)
            accepted = int(info["accepted"])
        flat = val_flat(scores)
        metrics["fast/best_val"] = max(scores)
        metrics["fast/accepted"] = float(accepted)
        metrics["fast/proposals_rejected_on_val"] = info["rejected_on_val"]
        metrics["fast/filled"] = info["filled"]
        metrics["fast/val_size"] = float(len(valset))
        metrics["fast/val_flat"] = float(flat)
        if flat:  # nothing can beat its parent on this set: a larger one next round (fast.val_growth), but
            # re-scoring the carried prompts may take at most half the round's budget, or no proposal is ever made
            affordable = max(cfg.val_size, cfg.budget // (2 * (len(population) + 1)))
            self.val_size = min(max(self.val_size + 1, math.ceil(self.val_size * cfg.val_growth)),
                                max(cfg.val_max or 4 * cfg.val_size, cfg.val_size), len(train), affordable)
        self.population = population
        self.best[task.name] = population[0]
        self.rounds += 1
        metrics.update(
            {
                "fast/front_size": info["front_size"],
                "fast/population": info["population"],
                "fast/proposals": float(self.reflector.calls - calls_before),
                "fast/reflection_errors": float(self.reflector.errors),
                "fast/round_errors": float(self.round_errors),
                "fast/round_rollouts": float(adapter.generated),
                "fast/rescore_rollouts": float(rescore_rollouts),
                "fast/seed_val": sum(adapter.evaluate(valset, {COMPONENT: task.seed_prompt}).scores) / len(valset),
                "fast/new_reflection_errors": float(self.reflector.errors - errors_before),
            }
        )
        new_errors = self.reflector.errors - errors_before
        if error is None and new_errors:
            error = f"{new_errors} reflection errors, last: {self.reflector.last_error}"
        return Round(metrics=metrics, rollouts=adapter.generated, verifier_errors=adapter.verifier_errors,
                     accepted=accepted, population=len(population), front_size=int(info["front_size"]),
                     val_flat=flat, reflection_calls=self.reflector.calls - calls_before,
                     reflection_errors=new_errors, failed_reflection_calls=self.reflector.failed_calls - failed_before,
                     error=error)

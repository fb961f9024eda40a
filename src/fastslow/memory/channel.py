"""The memory fast channel (``fast.kind: memory``) and GEPA with memory (``fast.kind: gepa+memory``).

A round on ``task`` (every ``fast.every`` steps, like a GEPA round, on the current weights):

1. draw ``fast.val_size`` train problems (at most ``fast.budget / 2``); for each, retrieve its context
   (base prompt + lessons + cases, :meth:`MemoryChannel.context`) and sample one attempt with it and one with
   the base prompt alone (``fast.temperature``; one sampler call; never more than ``fast.budget`` rollouts);
2. marks: a problem the memory context did better on marks its retrieved lessons ``helpful``, worse
   ``harmful`` (Training-Free GRPO's group comparison, with text instead of gradients);
3. cases: each memory attempt becomes a case (its problem is from the train split, checked);
4. the curator (:mod:`fastslow.memory.curator`) asks the reflector for lessons from the worst attempts;
5. every delta is merged at once (:meth:`Store.apply`), the caps evict, the store is written to
   ``RUN/memory/store.jsonl``.

A curator failure (the reflector failing after its retries, a garbled reply) costs that round: none of its
deltas is applied, it is counted (``fast/memory/round_errors``), the run goes on; a reflector that fails on
every call stops the run through the loop's reflection health, as for GEPA. A retrieval failure is counted
(``fast/memory/retrieval_errors``) and that context is ranked without retrieval (utility, recency).

Retrieval (``fast.memory.retriever``, :mod:`fastslow.memory.retrieve`): BM25, or dense / hybrid over the policy's
own hidden states, through an ``embed`` callable the engine passes (the channel never sees a model).

:meth:`MemoryChannel.learn` is a round on attempts sampled elsewhere (``fastslow serve``: the answers users
gave feedback on): steps 2-5 without sampling, the marks from which attempts were shown a lesson.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from fastslow.channels import Round, Sampler
from fastslow.config import FastConfig
from fastslow.memory.curator import curate
from fastslow.memory.retrieve import Embed, EmbeddingCache, RetrievalError, Retriever, make_retriever
from fastslow.memory.store import Case, Delta, Lesson, Store, normalise, read_dir
from fastslow.preflight import check_reflector
from fastslow.reflect import GuardedReflector, ReflectionLM
from fastslow.tasks import Problem, Task
from fastslow.util import derive_seed, one_line

PERFECT = 1.0 - 1e-9


class MemoryChannel:
    """Experience memory behind the :class:`fastslow.channels.FastChannel` seam (frozen weights or beside RL).

    ``count_tokens(text)``: tokens of a context with the policy's tokenizer; ``fits(context, problem)``: the
    formatted prompt plus the completion budget fits the model. ``base_prompt(task)``: what memory is added to
    (the seed prompt; GEPA's best prompt under ``gepa+memory``). ``out``: the run dir (the store goes to
    ``out/memory``; None: not written). ``embed(texts)`` (unit vectors from the current weights) and ``version()``
    (the weights' version; the vectors are cached until it moves): needed by the dense and hybrid retrievers.
    """

    def __init__(self, sample: Sampler, cfg: FastConfig, reflector: ReflectionLM, *, seed: int, max_new_tokens: int,
                 count_tokens: Callable[[str], int], fits: Callable[[str, Problem], bool] | None = None,
                 out: Path | None = None, base_prompt: Callable[[Task], str] | None = None,
                 embed: Embed | None = None, version: Callable[[], int] = lambda: 0) -> None:
        self.sample, self.cfg, self.mcfg, self.seed = sample, cfg, cfg.memory, seed
        self.max_new_tokens, self.count_tokens, self.fits = max_new_tokens, count_tokens, fits
        self.dir = Path(out) / "memory" if out is not None else None
        if self.dir is not None:
            read_dir(self.dir)  # a foreign or damaged memory stops the run before anything is written
        self.base_prompt = base_prompt or (lambda task: task.seed_prompt)
        self.reflector = GuardedReflector(reflector, retries=cfg.reflection_retries, timeout_s=cfg.reflection_timeout_s,
                                          max_consecutive_failures=cfg.max_consecutive_reflection_failures,
                                          max_reply_chars=cfg.max_reply_chars, max_prompt_chars=cfg.max_prompt_chars)
        self.store = Store(self.mcfg.max_lessons, self.mcfg.max_cases, drop_margin=self.mcfg.drop_harmful_margin)
        self.population: list[str] = []
        self.best: dict[str, str] = {}
        self.rounds = self.round_errors = self.retrieval_errors = self.refused = self.leaks_refused = 0
        self.embed = EmbeddingCache(embed, version) if embed is not None else None  # lessons and cases share it
        self._lesson_index = make_retriever(self.mcfg.retriever, self.embed)
        self._case_index = make_retriever(self.mcfg.retriever, self.embed)
        self._eval_prompts: dict[str, set[str]] = {}

    def preflight(self) -> None:
        """One short real call of the reflection model (the curator's), as GEPA's channel does."""
        check_reflector(self.cfg, self.reflector.lm)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"store": self.store.state_dict(), "rounds": self.rounds, "round_errors": self.round_errors,
                "retrieval_errors": self.retrieval_errors, "refused": self.refused,
                "leaks_refused": self.leaks_refused, "reflection_errors": self.reflector.errors,
                "reflection_calls": self.reflector.calls, "failed_reflection_calls": self.reflector.failed_calls}

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state["store"])
        self.rounds, self.round_errors = state["rounds"], state["round_errors"]
        self.retrieval_errors, self.refused, self.leaks_refused = (state["retrieval_errors"], state["refused"],
                                                                   state["leaks_refused"])
        self.reflector.errors, self.reflector.calls = state["reflection_errors"], state["reflection_calls"]
        self.reflector.failed_calls = state["failed_reflection_calls"]
        self._write()

    def _write(self) -> None:
        if self.dir is not None:
            self.store.write_dir(self.dir)

    def summary(self) -> dict:
        """Sizes and counters for ``summary.json``."""
        return {"lessons": len(self.store.lessons), "cases": len(self.store.cases),
                "lessons_by_task": _count(x.task for x in self.store.lessons),
                "cases_by_task": _count(c.task for c in self.store.cases),
                "evicted": self.store.evicted_total, "dropped_harmful": self.store.dropped_total,
                "refused_lessons": self.refused, "eval_leaks_refused": self.leaks_refused,
                "rounds": self.rounds, "round_errors": self.round_errors, "retrieval_errors": self.retrieval_errors}

    # ---- contexts ---------------------------------------------------------------------------------
    def contexts(self, task: Task, problem: Problem, group_size: int, view: str = "train") -> list[str]:
        """The G contexts of ``problem``'s group: its retrieved context, G times. ``view``: ``train`` and
        ``task`` retrieve from ``task``'s memory, ``agnostic`` from the whole memory (the task is not told)."""
        return [self.context(self.base_prompt(task), task, problem, view)[0]] * group_size

    def _ranked(self, entries: list, texts: list[str], index: Retriever, query: str, tiebreak) -> list:
        try:
            scores = index.scores(texts, query)
        except RetrievalError:
            self.retrieval_errors += 1
            scores = [0.0] * len(entries)
        return [e for _, e in sorted(zip(scores, entries, strict=True), key=lambda se: (-se[0], tiebreak(se[1])))]

    def context(self, base: str, task: Task, problem: Problem, view: str) -> tuple[str, list[int]]:
        """``base`` + the top lessons and successful cases for ``problem`` within the caps; (text, lesson ids).

        Lessons with more harmful than helpful marks are never retrieved; a case of ``problem`` itself is not
        shown for it. The chosen lessons are listed worst first, so the best sits next to the problem."""
        m, store = self.mcfg, self.store
        mine = (lambda e: True) if view == "agnostic" else (lambda e: e.task == task.name)
        said = normalise(base)
        lessons = [x for x in store.lessons if mine(x) and x.utility >= 0 and normalise(x.text) not in said]
        cases = [c for c in store.cases if mine(c) and c.reward >= PERFECT and c.problem_id != problem.id]
        chosen: list[Lesson] = []
        shown: list[Case] = []
        if lessons and m.lessons_per_context:
            ranked = self._ranked(store.lessons, [x.text for x in store.lessons], self._lesson_index,
                                  problem.prompt, lambda x: (-x.utility, -x.id))
            keep = {id(x) for x in lessons}
            for lesson in [x for x in ranked if id(x) in keep][: m.lessons_per_context]:
                if self._fits(_render(base, [*chosen, lesson], shown), problem):
                    chosen.append(lesson)
        if cases and m.cases_per_context:
            ranked = self._ranked(store.cases, [c.problem for c in store.cases], self._case_index,
                                  problem.prompt, lambda c: (-c.reward, -c.id))
            keep = {id(c) for c in cases}
            for case in [c for c in ranked if id(c) in keep][: m.cases_per_context]:
                if self._fits(_render(base, chosen, [*shown, case]), problem):
                    shown.append(case)
        return _render(base, chosen, shown), [x.id for x in chosen]

    def _fits(self, text: str, problem: Problem) -> bool:
        if self.count_tokens(text) > self.mcfg.max_context_tokens:
            return False
        return self.fits is None or self.fits(text, problem)

    def playbook(self, task: Task, base: str) -> list[Lesson]:
        """The task's lessons shown to the curator: retrievable ones, most useful first, at most the context's."""
        said = normalise(base)
        mine = [x for x in self.store.lessons if x.task == task.name and x.utility >= 0
                and normalise(x.text) not in said]
        return sorted(mine, key=lambda x: (-x.utility, x.id))[: max(self.mcfg.lessons_per_context, 1)]

    # ---- a round ----------------------------------------------------------------------------------
    def _is_eval(self, task: Task, problem: Problem) -> bool:
        if task.name not in self._eval_prompts:
            self._eval_prompts[task.name] = {p.prompt for p in task.problems("eval")}
        return problem.prompt in self._eval_prompts[task.name]

    def run_round(self, task: Task, workdir: Path | None = None) -> Round:
        cfg = self.cfg
        round_seed = derive_seed(self.seed, "memory-round", self.rounds)
        train = list(task.problems("train"))
        n = max(1, min(cfg.val_size, len(train), cfg.budget // 2))
        problems = random.Random(round_seed).sample(train, n)
        base = self.base_prompt(task)
        built = [self.context(base, task, p, "train") for p in problems]
        pairs = [(text, p) for (text, _), p in zip(built, problems, strict=True)]
        # Problems that got memory are also sampled with the base prompt alone (within fast.budget).
        ab = [i for i, (text, _) in enumerate(built) if text != base][: max(cfg.budget - n, 0)]
        pairs += [(base, problems[i]) for i in ab]
        scored = self.sample(task, pairs, temperature=cfg.temperature, max_new_tokens=self.max_new_tokens,
                             seed=round_seed)
        rewards, texts, verdicts = scored.rewards, scored.batch.texts, scored.verdicts
        base_reward = {i: rewards[n + k] for k, i in enumerate(ab)}
        deltas: list[Delta] = []
        for i in ab:
            diff = rewards[i] - base_reward[i]
            if diff:
                deltas += [Delta("helpful" if diff > 0 else "harmful", task=task.name, lesson=lid)
                           for lid in built[i][1]]
        attempts = [Attempt(p, texts[i], float(rewards[i]), verdicts[i].feedback) for i, p in enumerate(problems)]
        merged = self._merge(task, base, attempts, deltas)
        with_memory = [rewards[i] for i in ab]
        metrics = {
            **merged.sizes(self),
            "fast/memory/context_tokens_max": float(max(self.count_tokens(t) for t, _ in built)),
            "fast/memory/reward": sum(rewards[:n]) / n,
            "fast/memory/gain": (sum(with_memory) - sum(base_reward.values())) / len(ab) if ab else 0.0,
            "fast/memory/round_rollouts": float(len(pairs)),
            **self._counters(),
        }
        return merged.round(self, metrics, rollouts=len(pairs), verifier_errors=scored.verifier_errors)

    def shown(self, task: Task, text: str) -> list[int]:
        """Ids of ``task``'s lessons that ``text`` (a prompt that was answered) shows."""
        return [x.id for x in self.store.lessons if x.task == task.name and x.text in text]

    def learn(self, task: Task, attempts: Sequence[Attempt], *,
              lock: AbstractContextManager | None = None) -> Round:
        """A round on attempts sampled elsewhere (served traffic: each a rollout with its reward); samples nothing.

        Marks: a lesson some attempts were shown and others not is ``helpful`` when those shown it scored higher
        on average, ``harmful`` when lower (traffic's own A/B test, across problems rather than within one); a
        lesson every attempt was shown is not marked. Then cases, the curator and the merge as in
        :meth:`run_round`. ``lock`` is held while the deltas merge, not during the reflector's call."""
        marks: list[Delta] = []
        for lid in sorted({i for a in attempts for i in a.shown}):
            shown = [a.reward for a in attempts if lid in a.shown]
            hidden = [a.reward for a in attempts if lid not in a.shown]
            diff = sum(shown) / len(shown) - sum(hidden) / len(hidden) if hidden else 0.0
            if diff:
                marks.append(Delta("helpful" if diff > 0 else "harmful", task=task.name, lesson=lid))
        merged = self._merge(task, self.base_prompt(task), attempts, marks, lock)
        metrics = {**merged.sizes(self),
                   "fast/memory/reward": sum(a.reward for a in attempts) / len(attempts) if attempts else 0.0,
                   "fast/memory/attempts": float(len(attempts)), **self._counters()}
        return merged.round(self, metrics, rollouts=0, verifier_errors=0)

    def _merge(self, task: Task, base: str, attempts: Sequence[Attempt], deltas: list[Delta],
               lock: AbstractContextManager | None = None) -> _Merged:
        """Cases from ``attempts``, the curator on the worst of them, then every delta merged at once (a curator
        fault merges nothing and is counted); the store is written."""
        m = self.mcfg
        deltas = list(deltas)
        leaks = 0
        for a in attempts:
            p = a.problem
            if self._is_eval(task, p):  # never: rounds draw train problems; a task whose splits overlap is caught
                leaks += 1
                continue
            deltas.append(Delta("case", task=task.name, case=Case(0, task.name, str(p.id), p.prompt, a.completion,
                                                                   a.reward, a.feedback)))
        self.leaks_refused += leaks
        worst = sorted(range(len(attempts)), key=lambda i: (attempts[i].reward, i))[: m.reflect_examples]
        records = [{"Inputs": attempts[i].problem.prompt, "Generated Outputs": attempts[i].completion,
                    "Feedback": attempts[i].feedback}
                   for i in worst if attempts[i].reward < PERFECT and not self._is_eval(task, attempts[i].problem)]
        out = _Merged(calls=self.reflector.calls, errors=self.reflector.errors, failed=self.reflector.failed_calls)
        try:
            if records:
                self.reflector.new_round()
                proposal = curate(self.reflector, task.name, base, self.playbook(task, base), records,
                                  max_lesson_chars=m.max_lesson_chars)
                self.refused += proposal.refused
                deltas += proposal.deltas
            with lock or nullcontext():
                applied = self.store.apply(deltas, self.rounds)
            out.added, out.marked, out.evicted = applied.added, applied.marked, applied.dropped + applied.evicted
        except Exception as exc:  # noqa: BLE001 - a curator fault costs this round's deltas, never the run
            self.round_errors += 1
            out.error = one_line(f"memory round failed, nothing merged: {type(exc).__name__}: {exc}")
        self.rounds += 1
        self._write()
        return out

    def _counters(self) -> dict[str, float]:
        return {"fast/memory/round_errors": float(self.round_errors),
                "fast/memory/retrieval_errors": float(self.retrieval_errors),
                "fast/memory/reflection_errors": float(self.reflector.errors)}


@dataclass(frozen=True)
class Attempt:
    """One scored attempt a round learns from; ``shown``: ids of the lessons its context showed."""

    problem: Problem
    completion: str
    reward: float
    feedback: str
    shown: frozenset[int] = frozenset()


@dataclass
class _Merged:
    """What :meth:`MemoryChannel._merge` did, and the reflector's counters before it."""

    calls: int
    errors: int
    failed: int
    added: int = 0
    marked: int = 0
    evicted: list[dict] = field(default_factory=list)
    error: str | None = None

    def sizes(self, channel: MemoryChannel) -> dict[str, float]:
        store = channel.store
        return {
            "fast/memory/lessons": float(len(store.lessons)),
            "fast/memory/cases": float(len(store.cases)),
            "fast/memory/added": float(self.added),
            "fast/memory/marked": float(self.marked),
            "fast/memory/evicted_round": float(len(self.evicted)),
            "fast/memory/evicted_total": float(store.evicted_total + store.dropped_total),
            "fast/memory/refused_lessons": float(channel.refused),
            "fast/memory/eval_leaks_refused": float(channel.leaks_refused),
        }

    def round(self, channel: MemoryChannel, metrics: dict[str, float], *, rollouts: int,
              verifier_errors: int) -> Round:
        reflector = channel.reflector
        error, new_errors = self.error, reflector.errors - self.errors
        if error is None and new_errors:
            error = f"{new_errors} reflection errors, last: {reflector.last_error}"
        if self.evicted:
            shown = "; ".join(f"{e['kind']} {e['id']} ({e['why']})" for e in self.evicted[:5])
            error = (error + "; " if error else "") + f"memory evicted {len(self.evicted)}: {shown}"
        return Round(metrics=metrics, rollouts=rollouts, verifier_errors=verifier_errors, accepted=self.added,
                     reflection_calls=reflector.calls - self.calls, reflection_errors=new_errors,
                     failed_reflection_calls=reflector.failed_calls - self.failed, error=error)


def _render(base: str, lessons: list[Lesson], cases: list[Case]) -> str:
    """Base prompt, lessons (the best last), then successful cases as worked examples."""
    text = " ".join([base, *(x.text for x in reversed(lessons))]).strip()
    if cases:
        text += "\nExamples:\n" + "\n".join(f"{c.problem} -> {c.attempt.strip()}" for c in cases)
    return text


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


class GepaMemoryChannel:
    """``fast.kind: gepa+memory``: GEPA's prompt population, with each context extended by retrieved memory.

    A round runs GEPA's round, then the memory's (whose base prompt is GEPA's best for the task); the group's
    G contexts are GEPA's K population slots, each plus the memory retrieved for the problem.
    """

    def __init__(self, gepa, memory: MemoryChannel) -> None:
        self.gepa, self.memory = gepa, memory
        memory.base_prompt = lambda task: gepa.best.get(task.name, task.seed_prompt)

    @property
    def reflector(self):
        return self.gepa.reflector  # GEPA's (serve's preflight reads its model)

    @property
    def population(self) -> list[str]:
        return self.gepa.population

    @property
    def best(self) -> dict[str, str]:
        return self.gepa.best

    def summary(self) -> dict:
        return self.memory.summary()

    def preflight(self) -> None:
        self.gepa.preflight()

    def contexts(self, task: Task, problem: Problem, group_size: int, view: str = "train") -> list[str]:
        prompts = self.gepa.contexts(task, problem, group_size, view=view)
        extended = {p: self.memory.context(p, task, problem, view)[0] for p in dict.fromkeys(prompts)}
        return [extended[p] for p in prompts]

    def run_round(self, task: Task, workdir: Path | None = None) -> Round:
        a, b = self.gepa.run_round(task, workdir=workdir), self.memory.run_round(task, workdir=workdir)
        failed = None if a.failed_reflection_calls is None else a.failed_reflection_calls + (
            b.failed_reflection_calls or 0)
        return Round(metrics={**a.metrics, **b.metrics}, rollouts=a.rollouts + b.rollouts,
                     verifier_errors=a.verifier_errors + b.verifier_errors, accepted=a.accepted + b.accepted,
                     reflection_calls=a.reflection_calls + b.reflection_calls,
                     reflection_errors=a.reflection_errors + b.reflection_errors, failed_reflection_calls=failed,
                     error="; ".join(e for e in (a.error, b.error) if e) or None)

    def state_dict(self) -> dict:
        return {"gepa": self.gepa.state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gepa.load_state_dict(state["gepa"])
        self.memory.load_state_dict(state["memory"])

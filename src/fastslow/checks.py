"""Run-time checks that turn silent failure into a clear stop: verifier errors over a window, tasks with
an empty split, problems longer than the model's context, weights that became non-finite."""

from __future__ import annotations

from collections import deque

from fastslow.tasks import Problem, Task, TaskError


class VerifierWindow:
    """The share of verifier errors over the last ``window`` verifier calls (counted in batches).

    A verifier that raises, hangs, or returns a reward outside [0, 1] (NaN, inf, 5.0, not a Verdict)
    scores 0 for that rollout; when that happens for more than ``max_share`` of a full window the
    rewards say nothing about the policy, and training on them is a silent failure.
    """

    def __init__(self, window: int, max_share: float) -> None:
        self.window, self.max_share = window, max_share
        self._batches: deque[tuple[int, int]] = deque()
        self._errors = self._calls = 0

    def add(self, errors: int, calls: int) -> None:
        if calls <= 0:
            return
        self._batches.append((errors, calls))
        self._errors += errors
        self._calls += calls
        # Keep the fewest newest batches that still cover the window.
        while self._batches and self._calls - self._batches[0][1] >= self.window:
            e, c = self._batches.popleft()
            self._errors -= e
            self._calls -= c

    def verdict(self, final: bool = False) -> str | None:
        """None while the verifier is healthy (or the window is not full yet); otherwise why the run stops.

        ``final``: the run's last row. A run shorter than the window is judged on all its calls then, so a
        verifier that failed throughout a short run cannot end it with exit 0."""
        if (self._calls < self.window and not final) or self._errors <= self.max_share * self._calls:
            return None
        return (f"the verifier failed on {self._errors} of the last {self._calls} calls (more than "
                f"max_verifier_error_share={self.max_share:g}): its rewards cannot train the policy")


def check_splits(task: Task, spec: str) -> Task:
    """A task with an empty train or eval split is bad input (it would fail deep inside the loop)."""
    for split in ("train", "eval"):
        try:
            n = len(task.problems(split))
        except TaskError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's task failing is bad input: one line
            from fastslow.util import one_line

            raise TaskError(f"task {spec!r}: problems({split!r}) raised {type(exc).__name__}: {one_line(exc, 200)}"
                            ) from None
        if n == 0:
            raise TaskError(f"task {spec!r} has no {split} problems")
    return task


def context_limit(policy) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    cfg = getattr(policy.model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _FittedTask:
    """A task with the problems that do not fit the context left out (everything else delegated)."""

    def __init__(self, task: Task, keep: dict[str, list[Problem]]) -> None:
        self._task, self._keep = task, keep
        self.name, self.seed_prompt = task.name, task.seed_prompt

    def problems(self, split):
        return self._keep[split]

    def verify(self, problem, completion):
        return self._task.verify(problem, completion)

    def __getattr__(self, attr: str):
        return getattr(self._task, attr)


def fit_to_context(task: Task, policy, max_new_tokens: int, *, skip: bool) -> tuple[Task, int]:
    """``(task, 0)`` when every problem fits; with ``skip``, the task without the oversize problems and their
    count; otherwise :class:`TaskError` naming the first problem that does not fit.

    A problem fits when its formatted prompt (seed prompt as system turn) plus ``max_new_tokens`` is within
    the context. Very long prompts are judged by their length in characters before tokenizing, so a 50 MB
    question is never handed to the tokenizer (no tokenizer emits fewer than one token per 256 characters)."""
    limit = context_limit(policy)
    if limit is None:
        return task, 0
    budget = limit - max_new_tokens
    keep: dict[str, list[Problem]] = {}
    dropped = 0
    for split in ("train", "eval"):
        keep[split] = []
        problems = list(task.problems(split))
        texts = [policy.format(task.seed_prompt, problem.prompt) for problem in problems]
        short = [i for i, text in enumerate(texts) if len(text) <= budget * 256]
        # One tokenizer call per split (a dataset may hold many thousand problems), short texts only.
        tokens = dict(zip(short, map(len, policy.tokenizer([texts[i] for i in short])["input_ids"]))) if short else {}
        for i, problem in enumerate(problems):
            fits = i in tokens and tokens[i] <= budget
            if fits:
                keep[split].append(problem)
                continue
            if not skip:
                raise TaskError(
                    f"task {task.name!r}: problem {str(problem.id)[:80]!r} ({split}) does not fit the model's "
                    f"context of {limit} tokens with max_new_tokens={max_new_tokens} "
                    "(shorten it, or set oversize_problems: skip)"
                )
            dropped += 1
    if not dropped:
        return task, 0
    for split, kept in keep.items():
        if not kept:
            raise TaskError(f"task {task.name!r}: no {split} problem fits the model's context of {limit} tokens")
    return _FittedTask(task, keep), dropped

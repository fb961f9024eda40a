"""CodeIO-style task: predict what a short Python program prints for a given input.

Problems come from a small deterministic generator of programs (string, list and arithmetic
routines, some printing several lines). The expected output is never written by hand: every snippet is
executed once in the sandbox (:mod:`fastslow.tasks.sandbox`) and the result cached per process. The
verifier compares line by line: reward = share of lines right (1.0 for an exact match), and the
feedback shows the expected and the predicted output.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from fastslow.tasks import Problem, Split, TaskError, Verdict
from fastslow.tasks.sandbox import run_untrusted

N_TRAIN, N_EVAL = 300, 60

# Each template draws its parameters from the rng and returns (program, stdin). Programs read stdin,
# so the same routine is asked about different inputs.
_Template = Callable[[random.Random], tuple[str, str]]


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _ints(rng: random.Random, lo: int = 3, hi: int = 6) -> list[int]:
    return [rng.randint(-9, 20) for _ in range(rng.randint(lo, hi))]


def _reverse_words(rng):
    code = "words = input().split()\nprint(' '.join(w[::-1] for w in reversed(words)))\n"
    return code, " ".join(_word(rng) for _ in range(rng.randint(2, 4)))


def _count_chars(rng):
    ch = rng.choice("aeiou")
    code = (f"s = input()\nn = sum(1 for c in s if c == {ch!r})\n"
            f"print(n)\nprint(s.replace({ch!r}, '*'))\n")
    return code, _word(rng, 6, 12)


def _running_sum(rng):
    code = ("xs = [int(t) for t in input().split()]\ntotal = 0\nfor x in xs:\n"
            "    total += x\n    print(total)\n")
    return code, " ".join(map(str, _ints(rng)))


def _filter_map(rng):
    k = rng.randint(2, 4)
    code = (f"xs = [int(t) for t in input().split()]\nys = [x * x for x in xs if x % {k} == 0]\n"
            "print(ys)\nprint(len(ys), sum(ys))\n")
    return code, " ".join(map(str, _ints(rng, 4, 8)))


def _fizzbuzz(rng):
    a, b = rng.choice([(2, 3), (3, 5), (2, 5)])
    code = (f"n = int(input())\nfor i in range(1, n + 1):\n    out = ''\n    if i % {a} == 0:\n        out += 'Fizz'\n"
            f"    if i % {b} == 0:\n        out += 'Buzz'\n    print(out or i)\n")
    return code, str(rng.randint(4, 9))


def _collatz(rng):
    code = ("n = int(input())\nsteps = 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
            "    steps += 1\nprint(steps)\n")
    return code, str(rng.randint(2, 40))


def _digits(rng):
    base = rng.choice([2, 3, 10])
    code = (f"n = int(input())\ndigits = []\nwhile n:\n    digits.append(n % {base})\n    n //= {base}\n"
            "print(''.join(map(str, reversed(digits))) or '0')\nprint(sum(digits))\n")
    return code, str(rng.randint(0, 200))


def _dict_count(rng):
    code = ("counts = {}\nfor w in input().split():\n    counts[w] = counts.get(w, 0) + 1\n"
            "for w in sorted(counts):\n    print(w, counts[w])\n")
    pool = [_word(rng, 2, 3) for _ in range(3)]
    return code, " ".join(rng.choice(pool) for _ in range(rng.randint(3, 7)))


def _stack(rng):
    code = ("stack = []\nfor tok in input().split():\n    if tok == 'pop':\n        if stack:\n"
            "            print(stack.pop())\n        else:\n            print('empty')\n    else:\n"
            "        stack.append(tok)\nprint(stack)\n")
    toks = [rng.choice(["pop", _word(rng, 1, 2)]) for _ in range(rng.randint(3, 7))]
    return code, " ".join(toks)


def _slices(rng):
    i, j = rng.randint(0, 2), rng.randint(3, 6)
    step = rng.choice([1, 2, -1])
    code = f"s = input()\nprint(s[{i}:{j}])\nprint(s[::{step}])\nprint(s.upper().count('A'), len(s))\n"
    return code, _word(rng, 5, 10)


def _fib(rng):
    code = ("n = int(input())\na, b = 0, 1\nseq = []\nfor _ in range(n):\n    seq.append(a)\n    a, b = b, a + b\n"
            "print(seq)\n")
    return code, str(rng.randint(1, 12))


def _errors(rng):
    # Programs may fail: the expected output is what they print before the error (stdout only).
    code = ("xs = [int(t) for t in input().split()]\nfor x in xs:\n    print(10 // x)\n")
    xs = _ints(rng, 2, 4)
    return code, " ".join(map(str, xs))


TEMPLATES: list[_Template] = [_reverse_words, _count_chars, _running_sum, _filter_map, _fizzbuzz, _collatz,
                              _digits, _dict_count, _stack, _slices, _fib, _errors]

# Expected outputs, keyed by sha256(code, stdin): computed once per process.
_OUTPUT_CACHE: dict[str, str] = {}

# One sandboxed process runs a batch of snippets, each with its own stdin and captured stdout: the
# snippets are the generator's, and one process start instead of hundreds keeps task loading fast.
_BATCH_DRIVER = """\
import contextlib, io, json, sys
jobs = json.loads(sys.stdin.read())
out = {}
for key, code, stdin in jobs:
    buf = io.StringIO()
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
    except Exception:
        pass
    out[key] = buf.getvalue()
sys.stdin = sys.__stdin__
print(json.dumps(out))
"""


def _key(code: str, stdin: str) -> str:
    return hashlib.sha256(json.dumps([code, stdin]).encode()).hexdigest()


def expected_outputs(snippets: list[tuple[str, str]]) -> list[str]:
    """What each (code, stdin) prints, executed in the sandbox (once per process; cached)."""
    todo = {_key(c, i): (c, i) for c, i in snippets if _key(c, i) not in _OUTPUT_CACHE}
    if todo:
        payload = json.dumps([[k, c, i] for k, (c, i) in todo.items()])
        result = run_untrusted(_BATCH_DRIVER, payload, timeout_s=60, cpu_s=60, memory_mb=1024,
                               output_limit_kb=16 * 1024, allow_unsafe=True)  # fastslow's own programs
        if not result.ok:
            raise TaskError(f"codeio: computing expected outputs failed: {result.error or result.stderr[-300:]}")
        _OUTPUT_CACHE.update(json.loads(result.stdout))
    return [_OUTPUT_CACHE[_key(c, i)] for c, i in snippets]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _extract(completion: str) -> str:
    """The predicted output: code fences and a leading 'Output:' label are not part of it."""
    text = completion.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    if text.lower().startswith("output:"):
        text = text[len("output:"):].lstrip(" \t")
    return text.strip("\n")


def make_problems(seed: int = 0, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> dict[str, list[Problem]]:
    """Deterministic problems: templates taken in turn, parameters from ``random.Random(seed)``.

    Candidates are drawn with a margin, then duplicates (which would leak eval into train) and programs
    that print nothing (an empty answer is no question) are dropped, in order.
    """
    rng = random.Random(seed)
    want = n_train + n_eval
    snippets = [TEMPLATES[i % len(TEMPLATES)](rng) for i in range(want * 3 // 2 + 20)]
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for (code, stdin), out in zip(snippets, expected_outputs(snippets), strict=True):
        answer = "\n".join(_lines(out))
        if (code, stdin) in seen or not answer:
            continue
        seen.add((code, stdin))
        prompt = f"Program:\n```python\n{code}```\nInput: {stdin}\nWhat does it print?"
        problems.append(Problem(f"codeio-{len(problems)}", prompt, answer, meta={"code": code, "stdin": stdin}))
        if len(problems) == want:
            break
    if len(problems) < want:
        raise TaskError(f"codeio: the generator made only {len(problems)} distinct problems, {want} asked")
    return {"train": problems[:n_train], "eval": problems[n_train:]}


class CodeIOTask:
    """Predict a program's printed output. Reward: share of lines right (exact match = 1.0)."""

    name = "codeio"
    seed_prompt = "Predict exactly what the program prints for the given input. Reply with the output only."

    def __init__(self, seed: int = 0, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> None:
        self._problems = make_problems(seed, n_train, n_eval)

    def problems(self, split: Split) -> list[Problem]:
        return self._problems[split]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        want, got = _lines(problem.answer), _lines(_extract(completion))
        if got == want:
            return Verdict(1.0, "Correct: the output matches exactly.")
        right = sum(a == b for a, b in zip(want, got))
        reward = right / max(len(want), len(got), 1)
        return Verdict(
            reward,
            f"{right} of {len(want)} expected lines right"
            + (f" ({len(got)} lines predicted)" if len(got) != len(want) else "")
            + f".\nExpected output:\n{problem.answer}\nPredicted output:\n{chr(10).join(got)}",
        )

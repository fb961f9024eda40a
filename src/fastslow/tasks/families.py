"""The built-in task families (jsonl, codeio, reasoning-gym, HumanEval): a plug-in like any other.

Registered through the ``fastslow.plugins`` entry point ``tasks``; :mod:`fastslow.tasks` itself (the Task
protocol and ``load_task``) imports none of them.
"""

from __future__ import annotations

from fastslow import registry
from fastslow.tasks import Task, TaskError


def _builtin_jsonl(path: str) -> Task:
    from fastslow.tasks.jsonl import JsonlTask

    path, _, query = path.partition("?")  # jsonl:data.jsonl?match=ci&extract=last_line
    options = dict(pair.partition("=")[::2] for pair in query.split("&") if pair)
    unknown = set(options) - {"match", "extract"}
    if unknown:
        raise TaskError(f"jsonl:{path}: unknown option {sorted(unknown)[0]!r}: use match= or extract=")
    try:
        return JsonlTask.from_file(path, **options)
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable file (binary, a directory, odd values): one line
        raise TaskError(f"cannot read task file {path}: {type(exc).__name__}: {exc}") from None


def _builtin_codeio(rest: str) -> Task:
    from fastslow.tasks.codeio import CodeIOTask

    return CodeIOTask()


def _builtin_rg(rest: str) -> Task:
    from fastslow.tasks.rg import rg_task

    return rg_task(rest)


def _builtin_humaneval(rest: str) -> Task:
    from fastslow.tasks.humaneval import HumanEvalTask

    return HumanEvalTask()


def _register_builtins() -> None:
    registry.register_task("jsonl:", _builtin_jsonl, "question/answer lines from a JSON-lines file")
    registry.register_task("codeio", _builtin_codeio, "predict a short program's printed output")
    registry.register_task("rg:", _builtin_rg, "a reasoning-gym dataset: rg:<dataset>[?key=value&...]")
    registry.register_task("humaneval", _builtin_humaneval, "HumanEval function completion, tests in the sandbox")


_register_builtins()

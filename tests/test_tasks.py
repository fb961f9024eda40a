import json

import pytest
from conftest import EchoTask, small_config

from fastslow.loop import train
from fastslow.tasks import TaskError, Verdict, load_task, safe_verify
from fastslow.tasks.jsonl import JsonlTask


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_task_exact_and_numeric(tmp_path):
    lines = [json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) for i in range(10)]
    task = load_task(f"jsonl:{_write(tmp_path / 'add.jsonl', lines)}")
    assert task.name == "add" and len(task.problems("train")) == 8 and len(task.problems("eval")) == 2
    p = task.problems("train")[0]
    assert task.verify(p, p.answer).reward == 1.0
    assert task.verify(p, "wrong").reward == 0.0 and p.answer in task.verify(p, "wrong").feedback
    numeric = JsonlTask.from_file(tmp_path / "add.jsonl", match="numeric")
    assert numeric.verify(p, f"so the answer is {p.answer}.0").reward == 1.0


def test_jsonl_bad_lines_are_reported_by_line_number(tmp_path):
    lines = [json.dumps({"question": "q", "answer": "a"}), "{not json", json.dumps({"question": "q"})]
    with pytest.raises(TaskError, match=r"line 2.*line 3"):
        load_task(f"jsonl:{_write(tmp_path / 'bad.jsonl', lines)}")
    with pytest.raises(TaskError, match="no usable lines"):
        load_task(f"jsonl:{_write(tmp_path / 'empty.jsonl', [''])}")


class Exploding(EchoTask):
    def verify(self, problem, completion):
        if problem.id.endswith("3"):
            raise ZeroDivisionError("division by zero")
        return Verdict(0.5, "ok")


def exploding_task():
    return Exploding("boom")


def test_a_raising_verifier_costs_one_rollout():
    task = Exploding("boom")
    verdict, errored = safe_verify(task, task.problems("train")[3], "x")
    assert errored and verdict.reward == 0.0 and "ZeroDivisionError" in verdict.feedback
    verdict, errored = safe_verify(task, task.problems("train")[1], "x")
    assert not errored and verdict.reward == 0.5


def test_a_hanging_verifier_times_out():
    import time

    class Slow(EchoTask):
        def verify(self, problem, completion):
            time.sleep(120)

    task = Slow("slow")
    t0 = time.perf_counter()
    verdict, errored = safe_verify(task, task.problems("train")[0], "x", timeout_s=0.2)
    # the call came back long before the verifier would have (a margin no loaded machine eats)
    assert errored and "TimeoutError" in verdict.feedback and time.perf_counter() - t0 < 60


def test_run_goes_on_when_the_verifier_raises(tiny_model, tmp_path):
    summary = train(small_config(tiny_model, tmp_path / "run", method="rl", steps=2, task="test_tasks:exploding_task"))
    assert summary["steps"] == 2 and summary["verifier_errors"] > 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["slow/verifier_errors"] == summary["verifier_errors"]

"""The experience-memory fast channel: store, curator, retrieval, caps, leakage, faults, runs and resume."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EchoTask, assert_one_line_error, read_rows, small_config
from typer.testing import CliRunner

from fastslow.cli import app
from fastslow.config import ConfigError, load_config
from fastslow.loop import train
from fastslow.memory import MemoryChannel, MemoryFileError, Store, read_dir
from fastslow.memory.curator import curate, lesson_units
from fastslow.memory.retrieve import BM25Index, RetrievalError
from fastslow.memory.store import Case, Delta, Lesson
from fastslow.rollout import Scored
from fastslow.tasks import Problem, Verdict

ROOT = Path(__file__).resolve().parents[1]


def lesson_reflector(prompt) -> str:
    """Proposes the current instruction plus one new lesson named after the prompt's hash (deterministic, grows)."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    current = text.split("```", 2)[1].strip()
    return f"```\n{current}\nCheck rule {hashlib.sha256(text.encode()).hexdigest()[:6]}.\n```"


def failing_reflector(prompt) -> str:
    raise RuntimeError("reflection service down")


# ---- the store ------------------------------------------------------------------------------------------


def test_deltas_merge_the_same_whatever_their_order():
    deltas = [Delta("add", "t", text=f"Lesson {i}.") for i in range(6)]
    deltas += [Delta("add", "t", text="lesson 3."), Delta("add", "u", text="Lesson 1.")]  # a duplicate; another task
    deltas += [Delta("case", "t", case=Case(0, "t", f"p{i}", f"q{i}", "a", i / 4, "fb")) for i in range(4)]
    states = []
    for seed in range(4):
        store = Store(max_lessons=5, max_cases=3)
        store.apply(random.Random(seed).sample(deltas, len(deltas)), round_=0)
        states.append(json.dumps(store.state_dict()))
    assert len(set(states)) == 1
    store = Store(5, 3)
    store.load_state_dict(json.loads(states[0]))
    texts = [(x.task, x.text) for x in store.lessons]
    assert ("u", "Lesson 1.") in texts and sum(t == "t" for t, _ in texts) == 4  # 7 unique, 5 kept
    assert sorted(c.reward for c in store.cases) == [0.25, 0.5, 0.75]  # the lowest reward was evicted


def test_full_store_evicts_lowest_helpful_minus_harmful_first_and_reports_it():
    store = Store(max_lessons=3, max_cases=10)
    store.apply([Delta("add", "t", text=f"L{i}.") for i in range(3)], round_=0)
    ids = [x.id for x in store.lessons]
    store.apply([Delta("helpful", "t", lesson=ids[0]), Delta("helpful", "t", lesson=ids[0]),
                 Delta("harmful", "t", lesson=ids[1]), Delta("helpful", "t", lesson=ids[2])], round_=1)
    applied = store.apply([Delta("add", "t", text="L3.")], round_=2)  # four lessons, room for three
    assert [e["text"] for e in applied.evicted] == ["L1."]  # utility -1: lowest
    assert sorted(x.text for x in store.lessons) == ["L0.", "L2.", "L3."]
    assert store.evicted_total == 1 and store.recent_evictions[-1]["why"] == "full"


def test_a_lesson_marked_harmful_enough_is_dropped():
    store = Store(max_lessons=10, max_cases=10, drop_margin=2)
    store.apply([Delta("add", "t", text="Bad advice.")], round_=0)
    lid = store.lessons[0].id
    assert not store.apply([Delta("harmful", "t", lesson=lid)], round_=1).dropped
    dropped = store.apply([Delta("harmful", "t", lesson=lid)], round_=2).dropped
    assert [d["text"] for d in dropped] == ["Bad advice."] and not store.lessons


def test_store_file_round_trips_and_foreign_or_damaged_files_are_refused(tmp_path):
    store = Store(5, 5)
    store.apply([Delta("add", "t", text="Reverse it."),
                 Delta("case", "t", case=Case(0, "t", "p1", "abc", "[cba]", 1.0, "Correct."))], round_=0)
    mem = tmp_path / "memory"
    store.write_dir(mem)
    meta, lessons, cases = read_dir(mem)
    assert meta["lessons"] == 1 and lessons == store.lessons and cases == store.cases
    good = (mem / "store.jsonl").read_text()
    for damage in ("not json\n", good.replace('"fastslow-memory"', '"other-tool"'),
                   good.replace('"version": 1', '"version": 99'), good + '{"kind": "lesson", "id": 9}\n',
                   "\n".join(good.splitlines()[:-1]) + "\n"):
        (mem / "store.jsonl").write_text(damage)
        with pytest.raises(MemoryFileError, match="never overwritten"):
            read_dir(mem)
    (mem / "store.jsonl").write_text(good)
    (mem / "notes.txt").write_text("mine")
    with pytest.raises(MemoryFileError, match="unknown files"):
        read_dir(mem)


# ---- curator and retrieval -------------------------------------------------------------------------------


def test_lesson_units_reads_bullets_and_sentences():
    assert lesson_units("Transform the input. Reverse it. Answer in [ ].") == [
        "Transform the input.", "Reverse it.", "Answer in [ ]."]
    assert lesson_units("Rules:\n- Use units.\n2) Round to 2 places.\n```") == ["Use units.", "Round to 2 places."]


def test_micro_reflector_as_curator_adds_the_rule_and_marks_a_wrong_lesson_harmful():
    from fastslow.world.reflector import MicroReflector
    from fastslow.world.tasks import micro_task

    task = micro_task("flip")  # reverse, in [ ]
    problems = list(task.problems("train"))[:6]
    records = [{"Inputs": p.prompt, "Generated Outputs": "x", "Feedback": task.verify(p, "x").feedback}
               for p in problems]
    wrong = Lesson(7, "flip", "Sort it.")
    proposal = curate(MicroReflector(), "flip", task.seed_prompt, [wrong], records, max_lesson_chars=200)
    added = {d.text for d in proposal.deltas if d.op == "add"}
    assert added == {"Reverse it.", "Answer in [ ]."}
    assert [(d.op, d.lesson) for d in proposal.deltas if d.op != "add"] == [("harmful", 7)]


def test_bm25_ranks_the_matching_entry_first_and_handles_empty_corpora():
    index = BM25Index()
    docs = ["Convert miles to kilometres.", "Capitals of Europe: Paris is in France.", "the a of"]
    scores = index.scores(docs, "What is the capital of France?")
    assert scores.argmax() == 1 and scores[0] == 0
    assert list(index.scores(["the", "a"], "the")) == [0.0, 0.0]  # nothing indexable: no ranking, no error
    assert list(index.scores(docs, "zzz")) == [0.0, 0.0, 0.0]


# ---- the channel on a fake sampler -------------------------------------------------------------------------


class FakeSampler:
    """Echoes the problem reversed when the context mentions 'Reverse', else the problem: deterministic."""

    def __call__(self, task, pairs, *, temperature, max_new_tokens, seed, top_p=1.0):
        from fastslow.policy import Batch

        texts = [p.prompt[::-1] if "Reverse" in ctx else p.prompt for ctx, p in pairs]
        verdicts = [task.verify(p, t) for (_, p), t in zip(pairs, texts, strict=True)]
        batch = Batch.__new__(Batch)
        batch.texts = texts
        return Scored(batch, verdicts, 0)


def _channel(reflector, tmp_path=None, **memory) -> MemoryChannel:
    cfg = load_config(None, ["stages=[{task: 'conftest:echo_task', steps: 1}]", "fast.val_size=6", "fast.budget=12",
                             "fast.preflight=false", *(f"fast.memory.{k}={v}" for k, v in memory.items())]).fast
    return MemoryChannel(FakeSampler(), cfg, reflector, seed=0, max_new_tokens=8, count_tokens=len,
                         out=tmp_path)


def test_memory_and_context_stay_under_their_caps_however_long_the_stream():
    channel = _channel(lesson_reflector, max_lessons=5, max_cases=7, max_context_tokens=60, lessons_per_context=20,
                       cases_per_context=20)
    tasks = [EchoTask(f"t{i % 3}") for i in range(3)]
    for r in range(40):
        rnd = channel.run_round(tasks[r % 3])
        assert rnd.error is None or "evicted" in rnd.error
        assert rnd.rollouts <= 12  # fast.budget
        assert len(channel.store.lessons) <= 5 and len(channel.store.cases) <= 7
        for task in tasks:
            for p in task.problems("eval")[:4]:
                for view in ("task", "agnostic"):
                    assert len(channel.contexts(task, p, 1, view=view)[0]) <= 60
    assert channel.store.evicted_total > 0  # the caps were hit and entries were dropped, not kept
    assert channel.summary()["evicted"] == channel.store.evicted_total


def test_a_failing_curator_costs_its_round_only_and_a_failing_retriever_is_counted(monkeypatch):
    channel = _channel(lambda prompt: "```\nAnswer. Reverse it.\n```")
    task = EchoTask()
    channel.run_round(task)
    before = json.dumps(channel.store.state_dict())
    channel.reflector.lm = failing_reflector
    rnd = channel.run_round(EchoTask("other"))  # no lesson of its own yet: imperfect attempts, a curator call
    assert "nothing merged" in rnd.error and channel.round_errors == 1
    assert rnd.reflection_calls == 1 and rnd.failed_reflection_calls == 1  # the loop's health sees it
    assert json.dumps(channel.store.state_dict()) == before  # no delta of the failed round was merged

    def broken(self, docs, query):
        raise RetrievalError("index exploded")

    monkeypatch.setattr(BM25Index, "scores", broken)
    context = channel.contexts(task, task.problems("eval")[0], 2)
    assert "Reverse it." in context[0] and channel.retrieval_errors >= 1


def test_a_reflector_failing_on_every_call_stops_the_run(tiny_model, tmp_path):
    from fastslow.errors import TrainingError

    cfg = small_config(tiny_model, tmp_path / "run", method="memory", steps=8, extra=[
        "fast.reflector=test_memory:failing_reflector", "fast.preflight=false", "fast.stop_after_failed_rounds=2",
        "fast.reflection_retries=0"])
    with pytest.raises(TrainingError, match="every reflection call failed in 2 consecutive rounds"):
        train(cfg)


# ---- no leakage ------------------------------------------------------------------------------------------


class SecretEvalTask(EchoTask):
    """Eval problems and answers carry markers no train problem has; train and eval share one input (a leak a
    task could have), so the guard is exercised too."""

    def __init__(self) -> None:
        super().__init__("secret")
        self._split["eval"] = [Problem(f"e{i}", f"EVALQ{i}", f"EVALA{i}") for i in range(8)]
        self._split["train"] = self._split["train"][:20] + [Problem("t-dup", "EVALQ3", "EVALA3")]

    def verify(self, problem, completion):
        return Verdict(float(completion.strip() == problem.answer), f"Expected answer: {problem.answer}")


def secret_task() -> SecretEvalTask:
    return SecretEvalTask()


@pytest.mark.parametrize("retriever", ["bm25", "dense"])
@pytest.mark.slow
def test_no_eval_problem_or_answer_is_ever_stored_or_retrieved(tiny_model, tmp_path, monkeypatch, retriever):
    retrieved: list[str] = []
    context = MemoryChannel.context

    def recording(self, base, task, problem, view):
        text, ids = context(self, base, task, problem, view)
        retrieved.append(text)
        return text, ids

    monkeypatch.setattr(MemoryChannel, "context", recording)
    out = tmp_path / "run"
    cfg = small_config(tiny_model, out, method="memory", steps=6, task="test_memory:secret_task", extra=[
        "fast.reflector=test_memory:lesson_reflector", "fast.val_size=21", "fast.budget=64", "fast.preflight=false",
        f"fast.memory.retriever={retriever}"])
    summary = train(cfg)
    stored = (out / "memory" / "store.jsonl").read_text()
    state = "".join(p.read_text() for p in (out / "checkpoints").glob("*/*.json"))  # every checkpoint file
    assert summary["memory"]["eval_leaks_refused"] >= 1  # the shared input was drawn and refused
    assert summary["memory"]["cases"] > 0 and retrieved
    for i in range(8):
        for secret in (f"EVALQ{i}", f"EVALA{i}"):
            assert secret not in stored and secret not in state
            assert not any(secret in text for text in retrieved)


# ---- runs: methods, drift, evaluation views, CLI -------------------------------------------------------------


@pytest.mark.parametrize("method,kind", [("memory", None), ("fst", "memory"), ("fst", "gepa+memory")])
@pytest.mark.slow
def test_memory_methods_run_write_memory_and_report_both_scenarios(tiny_model, tmp_path, method, kind):
    out = tmp_path / "run"
    extra = ["fast.preflight=false", "fast.reflector=test_memory:lesson_reflector"]
    if kind:
        extra.append(f"fast.kind={kind}")
    summary = train(small_config(tiny_model, out, method=method, steps=4, extra=extra))
    assert (out / "memory" / "store.jsonl").is_file()
    assert summary["fast_kind"] == (kind or "memory") and summary["memory"]["lessons"] >= 1
    assert summary["cl"]["scenario"] == "task-aware" and summary["cl_agnostic"]["scenario"] == "task-agnostic"
    rows = read_rows(out)
    assert all("eval/vowel/reward_agnostic" in r for r in rows if "eval/vowel/reward" in r)
    kl = [r["drift/kl_rev"] for r in rows if "drift/kl_rev" in r]
    if method == "memory":
        assert kl and all(v == 0.0 for v in kl) and summary["rollouts"] == 0
    else:
        assert kl[-1] > 0


def test_gepa_reports_the_agnostic_view_from_its_top_prompt(tiny_model, tmp_path):
    out = tmp_path / "gepa"
    summary = train(small_config(tiny_model, out, method="gepa", steps=4, extra=["fast.preflight=false"]))
    assert all(v == 0.0 for r in read_rows(out) for k, v in r.items() if k.startswith("drift/kl"))
    assert summary["matrix_agnostic"] and summary["cl_agnostic"]["acc"] is not None


def test_config_refuses_a_kind_its_method_does_not_hold():
    with pytest.raises(ConfigError, match="use method: fst"):
        load_config(None, ["method=gepa", "fast.kind=memory", "stages=[{task: 'micro/flip', steps: 1}]"])
    cfg = load_config(None, ["method=fst", "fast.kind=memory", "fast.population=3",  # K need not divide G
                             "stages=[{task: 'micro/flip', steps: 1}]"])
    assert cfg.fast_kind == "memory"


def test_memory_show_and_a_foreign_memory_stops_resume_untouched(tiny_model, tmp_path):
    out = tmp_path / "run"
    extra = ["fast.preflight=false", "fast.reflector=test_memory:lesson_reflector"]
    train(small_config(tiny_model, out, method="memory", steps=2, extra=extra))
    runner = CliRunner()
    shown = runner.invoke(app, ["memory", "show", str(out), "--task", "vowel"])
    assert shown.exit_code == 0 and "[vowel]" in shown.output and "Check rule" in shown.output
    (out / "memory" / "store.jsonl").write_text('{"format": "someone-else"}\n')
    assert_one_line_error(runner.invoke(app, ["memory", "show", str(out)]), "never overwritten")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(small_config(tiny_model, out, method="memory", steps=4, extra=extra)
                              .model_dump(mode="json")))
    assert_one_line_error(runner.invoke(app, ["run", str(cfg), "--resume"]), "never overwritten")
    assert (out / "memory" / "store.jsonl").read_text() == '{"format": "someone-else"}\n'


# ---- kill -9 and resume ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "fst+memory"])
def test_sigkill_then_resume_gives_the_uninterrupted_run_and_memory(tiny_model, tmp_path, kind):
    method, _, fast_kind = kind.partition("+")
    extra = ["fast.preflight=false", "fast.reflector=test_memory:lesson_reflector", "threads=1"]
    extra += [f"fast.kind={fast_kind}"] if fast_kind else []
    cfg_path = tmp_path / "kill.yaml"
    cfg = small_config(tiny_model, tmp_path / "unused", method=method, steps=8, extra=extra)
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_config(cfg_path, [f"out={full}"]))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "PATH": "/usr/bin:/bin"}
    rng = random.Random(17)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "fastslow.cli", "run", str(cfg_path), "--out", str(killed),
                                 "--resume"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rows = (killed / "metrics.jsonl").read_bytes().count(b"\n") if (killed / "metrics.jsonl").exists() else 0
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:  # past the next row or two, then a random moment
            now = (killed / "metrics.jsonl").read_bytes().count(b"\n") if (killed / "metrics.jsonl").exists() else 0
            if now >= rows + rng.randint(1, 3):
                time.sleep(rng.uniform(0, 0.3))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    proc = subprocess.run([sys.executable, "-m", "fastslow.cli", "run", str(cfg_path), "--out", str(killed),
                           "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (killed / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert (killed / "memory" / "store.jsonl").read_bytes() == (full / "memory" / "store.jsonl").read_bytes()
    assert json.loads((killed / "summary.json").read_text()) == json.loads((full / "summary.json").read_text())


@pytest.mark.slow
def test_resume_restores_the_memory_exactly(tiny_model, tmp_path):
    """In process: a run stopped after its step-2 checkpoint and resumed equals the run made in one go."""
    extra = ["fast.preflight=false", "fast.reflector=test_memory:lesson_reflector"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(small_config(tiny_model, full, method="memory", steps=6, extra=extra))
    train(small_config(tiny_model, part, method="memory", steps=2, extra=extra))
    (part / "memory" / "store.jsonl").write_text((full / "memory" / "store.jsonl").read_text())  # a later state
    train(small_config(tiny_model, part, method="memory", steps=6, extra=extra), resume=True)
    assert (part / "memory" / "store.jsonl").read_bytes() == (full / "memory" / "store.jsonl").read_bytes()
    rows = [r for r in read_rows(part) if r.get("event") is None]
    assert [json.dumps(r) for r in rows] == [json.dumps(r) for r in read_rows(full)]

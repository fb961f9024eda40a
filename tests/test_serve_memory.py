"""fastslow serve with the experience memory: contexts retrieved per request, memory curated from feedback.

Driven in-process with the official ``openai`` client over the ASGI app (``TestClient`` is an httpx client); the
learner's rounds are called directly (or by its thread where the thread is what is tested).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import openai
import pytest
import torch
from conftest import VowelTask, read_rows
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fastslow.cli import app as cli_app
from fastslow.config import load_config
from fastslow.tasks import Problem

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apple", "banana", "cherry", "damson", "elder", "fig", "grape", "guava", "kiwi", "lemon", "lime", "mango",
         "melon", "olive", "orange", "papaya", "peach", "pear", "plum", "quince", "raisin", "sloe", "tomato", "yuzu"]


def word_task() -> VowelTask:
    """User turns that share words ('say apple', 'say fig'): BM25 has something to tell them apart by."""
    task = VowelTask("words")
    problems = [Problem(f"words-{i}", f"say {w}", w) for i, w in enumerate(WORDS)]
    task._split = {"train": problems[:20], "eval": problems[20:]}
    return task


def word_reflector(prompt) -> str:
    """Keeps the instruction and adds one lesson per attempt shown (named after its last word); deterministic."""
    from fastslow.world.reflector import parse_reflection_prompt

    parsed = parse_reflection_prompt(prompt)
    if parsed is None:  # the preflight's probe
        return "ok"
    instruction, examples = parsed
    lessons = [f"For {e.inputs.split()[-1]} use vowels." for e in examples]
    return "```\n" + "\n".join([instruction, *lessons]) + "\n```"


def broken_reflector(prompt) -> str:
    raise RuntimeError("reflection service down")


def memory_config(model: Path, out: Path, method: str = "memory", extra: list[str] = ()) -> list[str]:
    return [
        f"method={method}", f"model.path={model}", "stages=[{task: 'test_serve_memory:word_task', steps: 1}]",
        f"out={out}", "fast.reflector=test_serve_memory:word_reflector", "fast.memory.lessons_per_context=1",
        "fast.memory.cases_per_context=1", "fast.budget=8", "fast.val_size=4", "fast.population=2",
        "slow.max_new_tokens=8", "slow.lr=0.01", "slow.warmup_steps=0", "drift.probe_size=4", "threads=1",
        "serve.max_prompt_tokens=240", "serve.fast_every_n_feedbacks=8", "serve.every_n_feedbacks=1000",
        "serve.gate_n=4", "serve.idle_window_s=1000", *extra,
    ]


@pytest.fixture
def serve(tmp_path, tiny_model, monkeypatch):
    """``serve(method, extra)``: an open learning server on tmp_path/run (generation started) and an openai client."""
    from fastslow.serve import open_server

    monkeypatch.delenv("FASTSLOW_SERVE_KEY", raising=False)
    made: list = []

    def make(method: str = "memory", extra: list[str] = (), learn: bool = True):
        cfg = load_config(None, memory_config(tiny_model, tmp_path / "run", method, extra))
        srv = open_server(cfg, tmp_path / "run", learn=learn, log=lambda m: None)
        made.append(srv)
        srv.state.generator.start()
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                               http_client=TestClient(srv.asgi))
        return srv, client

    yield make
    for srv in made:
        srv.close()


def ask(client, turn: str, reward: float | None = None):
    """A chat request (greedy) and, with ``reward``, feedback on its answer."""
    r = client.chat.completions.create(model="fastslow", messages=[{"role": "user", "content": turn}],
                                       temperature=0)
    if reward is not None:
        ack = client.post("/feedback", body={"id": r.id, "reward": reward, "text": f"scored {reward}"}, cast_to=dict)
        assert ack["status"] == "stored", ack
    return r


def served_contexts(run: Path, ids: list[str]) -> list[str]:
    """The system turns (fast contexts) these answers were generated with, read from the stored prompts (the tiny
    model's chat template: ``<s>system<u>user<a>``)."""
    con = sqlite3.connect(run / "serve.sqlite")
    try:
        found = dict(con.execute(f"SELECT id, prompt FROM answers WHERE id IN ({','.join('?' * len(ids))})", ids))
    finally:
        con.close()
    return [found[i].split("<u>")[0].removeprefix("<s>") for i in ids]


def feed(client, turns: list[str]) -> None:
    for i, turn in enumerate(turns):
        ask(client, turn, reward=(i % 4) / 4)


@pytest.mark.slow
def test_requests_get_retrieved_memory_and_only_feedback_grows_it(serve, tmp_path):
    srv, client = serve()
    run, served = tmp_path / "run", srv.state.served
    weights = {k: v.clone() for k, v in served.policy.model.state_dict().items()}
    turns = [f"say {w}" for w in WORDS[:8]]
    first = [ask(client, t) for t in turns[:2]]
    assert {r.system_fingerprint for r in first} == {"fastslow-w0-c0"}
    assert served_contexts(run, [r.id for r in first]) == [served.task.seed_prompt] * 2  # empty memory
    ask(client, "say zucchini")  # answered, never scored: must not enter memory
    feed(client, turns)
    held_out = ask(client, f"say {WORDS[-1]}", reward=1.0)  # an eval problem: never memory
    srv.learner.fast_round()
    row = [r for r in read_rows(run) if r.get("event") == "serve_fast_round"][-1]
    memory = served.memory
    lessons = [x.text for x in memory.store.lessons]
    assert row["fast/memory/lessons"] == len(lessons) > 1 and row["fast/memory/cases"] == 8
    assert row["fast/memory/attempts"] == 8 and row["serve/context_changed"] and row["serve/context_version"] == 1
    assert {c.problem for c in memory.store.cases} == set(turns)  # only the scored traffic, no held-out answer
    assert held_out.id not in {c.attempt for c in memory.store.cases}

    # Each request now gets its own retrieval: the lesson on its word (lessons_per_context=1).
    with_lesson = [w for w in WORDS[:8] if f"For {w} use vowels." in lessons]
    again = [ask(client, f"say {w}") for w in with_lesson]
    contexts = served_contexts(run, [r.id for r in again])
    assert len(set(contexts)) == len(again) >= 2
    for word, context in zip(with_lesson, contexts, strict=True):
        assert context.startswith(served.task.seed_prompt) and f"For {word} use vowels." in context
    assert {r.system_fingerprint for r in again} == {"fastslow-w0-c1"}

    # More feedback: memory grows and the context version moves; the weights never change (no slow channel).
    feed(client, [f"say {w}" for w in WORDS[8:16]])
    srv.learner.fast_round()
    row = [r for r in read_rows(run) if r.get("event") == "serve_fast_round"][-1]
    assert row["fast/memory/cases"] == 16 and row["fast/memory/lessons"] > len(lessons)
    assert row["serve/context_version"] == 2 and "zucchini" not in json.dumps(memory.store.state_dict())
    assert srv.learner.candidate is None and served.state.kl_rev == 0.0
    assert all(torch.equal(v, served.policy.model.state_dict()[k]) for k, v in weights.items())
    assert {r["drift/kl_rev"] for r in read_rows(run) if "drift/kl_rev" in r} == {0.0}
    shown = CliRunner().invoke(cli_app, ["memory", "show", str(run)])
    assert shown.exit_code == 0 and f"{int(row['fast/memory/lessons'])} lessons, 16 cases" in shown.output


@pytest.mark.slow
def test_a_restart_serves_the_same_memory(serve, tmp_path):
    srv, client = serve()
    feed(client, [f"say {w}" for w in WORDS[:8]])
    srv.learner.fast_round()
    probes = [f"say {w}" for w in WORDS] + ["say zucchini"]
    state = srv.state.served.memory.state_dict()
    contexts = [srv.state.served.context_for(t) for t in probes]
    fingerprint = srv.state.served.fingerprint
    feed(client, [f"say {w}" for w in WORDS[8:10]])  # feedback after the last version: kept for the next round
    srv.close()
    again, client = serve(learn=False)  # serving only: the memory comes from the newest version
    assert again.state.served.memory.state_dict()["store"] == state["store"]
    assert [again.state.served.context_for(t) for t in probes] == contexts
    assert again.state.served.fingerprint == fingerprint == "fastslow-w0-c1"
    assert ask(client, "say apple").system_fingerprint == fingerprint
    again.close()
    learning, client = serve()  # learning again: the round picks up the two feedbacks stored after the version
    r = ask(client, "say apple")
    assert served_contexts(tmp_path / "run", [r.id]) == contexts[:1] and r.system_fingerprint == fingerprint
    learning.learner.fast_round()
    assert [row for row in read_rows(tmp_path / "run") if row.get("event") == "serve_fast_round"][-1][
        "fast/memory/attempts"] == 2


@pytest.mark.slow
def test_a_crashing_curator_costs_one_round_never_the_server(serve, tmp_path):
    srv, client = serve()
    memory = srv.state.served.memory
    memory.reflector.lm = broken_reflector
    srv.learner.start()  # its own thread, as served
    feed(client, [f"say {w}" for w in WORDS[:8]])
    rounds = wait_rounds(tmp_path / "run", 1)
    assert "memory round failed, nothing merged" in rounds[-1]["reason"]
    assert rounds[-1]["fast/memory/round_errors"] == 1 and not rounds[-1]["serve/context_changed"]
    assert memory.store.lessons == [] and memory.store.cases == [] and srv.state.served.fingerprint.endswith("-c0")
    assert ask(client, "say apple").system_fingerprint == "fastslow-w0-c0"  # the server answers on
    memory.reflector.lm = word_reflector
    feed(client, [f"say {w}" for w in WORDS[8:16]])
    rounds = wait_rounds(tmp_path / "run", 2)
    assert rounds[-1]["fast/memory/round_errors"] == 1 and rounds[-1]["fast/memory/cases"] == 8
    assert "reason" not in rounds[-1] and srv.learner.error is None
    assert ask(client, "say apple").system_fingerprint == "fastslow-w0-c1"


def wait_rounds(run: Path, n: int) -> list[dict]:
    deadline = time.time() + 60
    while time.time() < deadline:
        rounds = [r for r in read_rows(run) if r.get("event") == "serve_fast_round"]
        if len(rounds) >= n:
            return rounds
        time.sleep(0.1)
    raise AssertionError(f"no fast round {n}: {read_rows(run)}")


def test_gepa_plus_memory_serves_the_prompt_with_retrieved_memory_and_gates_with_it(serve, tmp_path):
    srv, client = serve("fst", ["fast.kind=gepa+memory", "serve.max_kl=100", "serve.max_regression=1",
                                "serve.train_batch=4", "serve.train_steps=1"])
    feed(client, [f"say {w}" for w in WORDS[:8]])
    srv.learner.fast_round()
    row = [r for r in read_rows(tmp_path / "run") if r.get("event") == "serve_fast_round"][-1]
    assert row["fast/memory/cases"] == 8 and row["fast/population"] >= 1 and row["fast/round_rollouts"] > 0
    served = srv.state.served
    contexts = {w: served.context_for(f"say {w}") for w in WORDS[:8]}
    assert all(c.startswith(served.state.context) for c in contexts.values())
    assert len(set(contexts.values())) > 1
    contexts_seen = []
    score = srv.learner.heldout

    def spy(policy, context):
        contexts_seen.append(context)
        return score(policy, context)

    srv.learner.heldout = spy
    srv.learner.train_and_gate()
    assert contexts_seen and contexts_seen[0] == [served.context_for(p.prompt)
                                                  for p in served.task.problems("eval")[:4]]


@pytest.mark.slow
def test_shipped_serve_memory_config_learns_from_verifier_feedback(tmp_path, monkeypatch):
    """configs/serve-memory.yaml: the micro world, its reflector as curator, the verifier as feedback."""
    from fastslow.serve import open_server

    monkeypatch.delenv("FASTSLOW_SERVE_KEY", raising=False)
    cfg = load_config(ROOT / "configs" / "serve-memory.yaml", [f"out={tmp_path / 'run'}"])
    assert cfg.fast_kind == "memory" and cfg.serve.score == "verifier"
    srv = open_server(cfg, tmp_path / "run", learn=True, log=lambda m: None)
    try:
        srv.state.generator.start()
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                               http_client=TestClient(srv.asgi))
        for p in list(srv.state.served.task.problems("train"))[:16]:
            client.chat.completions.create(model="fastslow", messages=[{"role": "user", "content": p.prompt}])
        srv.learner.fast_round()
        lessons = [x.text for x in srv.state.served.memory.store.lessons]
        assert lessons and len(srv.state.served.memory.store.cases) == 16
        assert all(x in srv.state.served.context_for("abc") for x in lessons)
    finally:
        srv.close()


def test_retrieval_keeps_every_request_under_the_prompt_limit(serve):
    """Memory is added only while the request as served stays under serve.max_prompt_tokens: no 400s from it."""
    srv, client = serve(extra=["serve.max_prompt_tokens=40"])
    feed(client, [f"say {w}" for w in WORDS[:8]])
    srv.learner.fast_round()
    assert srv.state.served.memory.store.lessons
    for w in WORDS[:8]:  # each would be over 40 tokens with its lesson ("For apple use vowels." is 21)
        assert ask(client, f"say {w}").choices[0].finish_reason in ("stop", "length")
        assert srv.state.served.context_for(f"say {w}") == srv.state.served.task.seed_prompt


def test_a_serve_dir_from_before_user_turns_were_stored_is_migrated(tmp_path):
    from fastslow.serve.store import FeedbackStore

    con = sqlite3.connect(tmp_path / "serve.sqlite")
    con.executescript("""CREATE TABLE answers (id TEXT PRIMARY KEY, created REAL NOT NULL, task TEXT NOT NULL,
        problem_id TEXT, prompt TEXT NOT NULL, completion TEXT NOT NULL, stopped INTEGER NOT NULL,
        fingerprint TEXT NOT NULL);
        INSERT INTO answers VALUES ('old', 0, 't', NULL, 'p', 'c', 1, 'fastslow-w0-c0');""")
    con.close()
    store = FeedbackStore(tmp_path / "serve.sqlite")
    try:
        store.add_answers([("new", "t", None, "p2", "c2", False, "fastslow-w0-c0", "say fig")])
        assert store.add_feedback("old", 0.5, None, "feedback") == store.add_feedback("new", 1.0, None, "x") == "ok"
        assert [(r.id, r.user) for r in store.feedback_after(0, 10)] == [("old", None), ("new", "say fig")]
    finally:
        store.close()


def test_dense_retrieval_embeds_with_the_served_weights(serve):
    srv, client = serve(extra=["fast.memory.retriever=hybrid"])
    feed(client, [f"say {w}" for w in WORDS[:8]])
    srv.learner.fast_round()
    memory = srv.state.served.memory
    assert ask(client, "say apple").system_fingerprint == "fastslow-w0-c1"
    assert memory.embed.embedded > 0 and memory.retrieval_errors == 0
    assert "For apple use vowels." in srv.state.served.context_for("say apple")

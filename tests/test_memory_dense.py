"""Dense and hybrid memory retrieval over the policy's own hidden states (``fast.memory.retriever``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EchoTask, read_rows, small_config
from test_memory import FakeSampler, lesson_reflector
from typer.testing import CliRunner

from fastslow.cli import app
from fastslow.config import ConfigError, ModelConfig, load_config
from fastslow.loop import train
from fastslow.memory import MemoryChannel
from fastslow.memory.retrieve import (
    RRF_K,
    BM25Index,
    DenseIndex,
    EmbeddingCache,
    HybridIndex,
    RetrievalError,
    hidden_state_embedder,
    ranks,
)
from fastslow.memory.store import Delta
from fastslow.policy import Policy
from fastslow.tasks import Problem

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ["Answer in square brackets.", "Sort the letters alphabetically.", "Reverse the letters of the input.",
           "Count the vowels and answer with a number.", "Keep only the consonants.", "Write every letter twice."]


@pytest.fixture(scope="module")
def micro() -> Policy:
    return Policy.load(ModelConfig(path="micro", device="cpu"))


def order(scores) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]


def dense_channel(policy: Policy, retriever: str = "dense", **memory) -> MemoryChannel:
    cfg = load_config(None, ["stages=[{task: 'conftest:echo_task', steps: 1}]", "fast.val_size=6", "fast.budget=12",
                             "fast.preflight=false", f"fast.memory.retriever={retriever}",
                             *(f"fast.memory.{k}={v}" for k, v in memory.items())]).fast
    return MemoryChannel(FakeSampler(), cfg, lesson_reflector, seed=0, max_new_tokens=8, count_tokens=len,
                         embed=hidden_state_embedder(policy), version=lambda: policy.version)


def test_dense_ranks_a_misspelt_near_duplicate_first_where_bm25_sees_no_word(micro):
    query = "Revers the leters of the inptu."  # LESSONS[2] with typos: no word in common with any lesson
    assert not BM25Index().scores(LESSONS, query).any()
    index = DenseIndex(EmbeddingCache(hidden_state_embedder(micro), lambda: micro.version))
    assert order(index.scores(LESSONS, query))[0] == 2
    # Through the channel: the store's lessons, one problem, the near-duplicate retrieved first.
    channel = dense_channel(micro, lessons_per_context=3)
    channel.store.apply([Delta("add", "echo", text=t) for t in LESSONS], round_=0)
    text, ids = channel.context("Answer.", EchoTask(), Problem("q", query, ""), "train")
    near = next(x.id for x in channel.store.lessons if x.text == LESSONS[2])
    assert ids[0] == near and LESSONS[2] in text and channel.retrieval_errors == 0


def test_a_vector_does_not_depend_on_the_texts_embedded_with_it(micro):
    """Same text, same bits, alone or batched with longer and shorter texts: a resumed run (empty cache) reads
    the same contexts as the run made in one go."""
    embed = hidden_state_embedder(micro)
    texts = [*LESSONS, "", "abc", "x" * 400]  # empty, short, longer than the model's context (truncated)
    alone = np.stack([embed([t])[0] for t in texts])
    assert np.array_equal(alone, embed(texts)) and np.array_equal(alone, embed(texts[::-1])[::-1])
    norms = np.linalg.norm(alone, axis=1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and norms[len(LESSONS)] == 0  # empty text: zero vector


def test_hybrid_is_reciprocal_rank_fusion_and_differs_from_both_when_they_disagree(micro):
    class Fixed:
        def __init__(self, scores):
            self.values = np.asarray(scores, dtype=float)

        def scores(self, docs, query):
            return self.values

    a, b = Fixed([3, 2, 1, 0]), Fixed([0, 3, 2, 1])  # a: 0 1 2 3, b: 1 2 3 0
    assert order(HybridIndex(a, b).scores("wxyz", "q")) == [1, 0, 2, 3]  # neither a's nor b's order
    assert list(ranks(np.array([0.5, 0.0, 0.0, 0.9]))) == [2, 3, 3, 1]  # ties share the best rank
    assert order(HybridIndex(a, Fixed([0, 0, 0, 0])).scores("wxyz", "q")) == [0, 1, 2, 3]  # no opinion: a decides
    # On the micro model: BM25 and dense disagree on this query, the fusion is neither.
    embed = EmbeddingCache(hidden_state_embedder(micro), lambda: micro.version)
    docs, query = LESSONS[:5], "Answer in [ ]."
    bm25, dense = BM25Index().scores(docs, query), DenseIndex(embed).scores(docs, query)
    hybrid = HybridIndex(BM25Index(), DenseIndex(embed)).scores(docs, query)
    assert order(bm25) != order(dense)
    assert order(hybrid) not in (order(bm25), order(dense))
    assert np.allclose(hybrid, 1 / (RRF_K + ranks(bm25)) + 1 / (RRF_K + ranks(dense)))


def test_the_cache_embeds_each_text_once_per_weights_version():
    micro = Policy.load(ModelConfig(path="micro", device="cpu"))  # its own: the weights are changed below
    cache = EmbeddingCache(hidden_state_embedder(micro), lambda: micro.version)
    index = DenseIndex(cache)
    before = index.scores(LESSONS, "Reverse it.")
    index.scores(LESSONS, "Sort them.")
    assert cache.embedded == len(LESSONS) + 2  # the lessons once, each query once
    vector = cache(["Reverse it."])[0].copy()
    # A real update (one SGD step on a completion's log-likelihood), the version bumped as SlowLearner does.
    optimizer = torch.optim.SGD(micro.model.parameters(), lr=0.5)
    batch = micro.make_batch([micro.format("Reverse it.", "abc")], ["[cba]"])
    logits = micro.completion_logits(batch)
    (-micro.token_logprobs(logits, batch.completion_ids).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert np.array_equal(cache(["Reverse it."])[0], vector)  # same version: the cache answers
    micro.version += 1
    after = index.scores(LESSONS, "Reverse it.")
    assert cache.embedded == 2 * len(LESSONS) + 3  # everything again under the new weights
    assert not np.array_equal(cache(["Reverse it."])[0], vector) and not np.array_equal(after, before)


def test_a_failing_embedder_is_counted_and_the_context_still_built(micro):
    channel = dense_channel(micro, "hybrid")
    channel.store.apply([Delta("add", "echo", text=t) for t in LESSONS], round_=0)

    def broken(texts):
        raise RuntimeError("out of memory")

    channel.embed.embed = broken
    text, ids = channel.context("Answer.", EchoTask(), Problem("q", "abc", ""), "train")
    assert channel.retrieval_errors == 1 and len(ids) == 6 and all(t in text for t in LESSONS)
    with pytest.raises(RetrievalError, match="dense retrieval failed: RuntimeError: out of memory"):
        DenseIndex(channel.embed).scores(LESSONS, "abc")


def test_retriever_defaults_to_bm25_and_refuses_unknown_names():
    cfg = load_config(None, ["method=memory", "stages=[{task: 'micro/flip', steps: 1}]"])
    assert cfg.fast.memory.retriever == "bm25"
    with pytest.raises(ConfigError, match="retriever"):
        load_config(None, ["method=memory", "fast.memory.retriever=colbert", "stages=[{task: 'micro/flip', steps: 1}]"])
    with pytest.raises(ValueError, match="needs the policy's hidden states"):
        MemoryChannel(FakeSampler(), load_config(None, ["stages=[{task: 'micro/flip', steps: 1}]",
                                                        "fast.memory.retriever=dense"]).fast,
                      lesson_reflector, seed=0, max_new_tokens=8, count_tokens=len)


@pytest.mark.slow
def test_smoke_config_runs_memory_with_dense_retrieval(tmp_path):
    out = tmp_path / "smoke"
    result = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "smoke.yaml"), "--set", "method=memory", "--set",
                                      "fast.memory.retriever=dense", "--set", f"out={out}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "memory" / "store.jsonl").is_file() and summary["memory"]["cases"] > 0
    assert summary["memory"]["retrieval_errors"] == 0 and summary["final"]["flip"]["reward"] > 0


@pytest.mark.slow
def test_fst_with_dense_memory_resumes_to_the_run_made_in_one_go(tiny_model, tmp_path):
    """Weights move every step (the cache is emptied each time) and the resumed run starts with no cache: the
    contexts, hence metrics and memory, are those of the run made in one go."""
    extra = ["fast.preflight=false", "fast.reflector=test_memory:lesson_reflector", "fast.kind=memory",
             "fast.memory.retriever=hybrid"]
    full, part = tmp_path / "full", tmp_path / "part"
    summary = train(small_config(tiny_model, full, method="fst", steps=4, extra=extra))
    assert summary["memory"]["lessons"] >= 1 and summary["memory"]["cases"] >= 1  # something was retrieved
    assert summary["memory"]["retrieval_errors"] == 0
    train(small_config(tiny_model, part, method="fst", steps=2, extra=extra))
    train(small_config(tiny_model, part, method="fst", steps=4, extra=extra), resume=True)
    assert (part / "memory" / "store.jsonl").read_bytes() == (full / "memory" / "store.jsonl").read_bytes()
    rows = [r for r in read_rows(part) if r.get("event") is None]
    assert [json.dumps(r) for r in rows] == [json.dumps(r) for r in read_rows(full)]

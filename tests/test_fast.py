import pytest
import torch
from conftest import canned_reflector, echo_task

import fastslow.fast as fast
from fastslow.channels import FastChannel as FastChannelProtocol
from fastslow.channels import Round
from fastslow.config import FastConfig, ModelConfig
from fastslow.fast import COMPONENT, FastAdapter, FastChannel
from fastslow.policy import Policy
from fastslow.rollout import PolicySampler


def _channel(tiny_model, reflector=canned_reflector, **kw) -> tuple[FastChannel, Policy]:
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    cfg = FastConfig(**{"population": 2, "budget": 8, "val_size": 4, **kw})
    channel = FastChannel(PolicySampler(policy), cfg, reflector, seed=0, max_new_tokens=6,
                          version=lambda: policy.version)
    return channel, policy


def test_native_channel_satisfies_the_protocol(tiny_model):
    channel, _ = _channel(tiny_model)
    assert isinstance(channel, FastChannelProtocol)


def test_round_rescores_carried_candidates_with_the_current_weights(tiny_model, monkeypatch):
    channel, policy = _channel(tiny_model)
    task = echo_task()
    channel.population = ["stale prompt one", "stale prompt two"]
    seen = {}
    original = fast.seeded_state

    def spy(candidates, adapter, valset):
        state = original(candidates, adapter, valset)
        seen["candidates"], seen["valset"], seen["version"] = candidates, valset, adapter.version()
        seen["scores"] = [dict(s) for s in state.prog_candidate_val_subscores]
        return state

    monkeypatch.setattr(fast, "seeded_state", spy)
    # the weights move between rounds: scores from before are stale
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    policy.version = 7
    rnd = channel.run_round(task)
    assert isinstance(rnd, Round) and seen["version"] == 7
    assert seen["candidates"] == [task.seed_prompt, "stale prompt one", "stale prompt two"]
    fresh = FastAdapter(PolicySampler(policy), task, version=lambda: 7, temperature=0.0, max_new_tokens=6, seed=1)
    for text, scores in zip(seen["candidates"], seen["scores"]):
        assert list(scores.values()) == fresh.evaluate(seen["valset"], {COMPONENT: text}).scores
    assert rnd.metrics["fast/rescore_rollouts"] == 3 * 4  # seed + two carried, each on the whole Pareto set
    assert rnd.rollouts == rnd.metrics["fast/round_rollouts"] >= 12
    assert 1 <= len(channel.population) <= 2 and channel.best[task.name] == channel.population[0]


def test_round_seed_changes_each_round_and_rollouts_are_counted(tiny_model, monkeypatch):
    channel, _ = _channel(tiny_model)
    seeds = []
    real = fast.gepa.optimize

    def spy(**kwargs):
        seeds.append(kwargs["seed"])
        assert kwargs["cache_evaluation"] is False and kwargs["logger"] is not None
        return real(**kwargs)

    monkeypatch.setattr(fast.gepa, "optimize", spy)
    r1 = channel.run_round(echo_task())
    channel.run_round(echo_task())
    assert len(set(seeds)) == 2
    assert r1.rollouts >= r1.metrics["fast/rescore_rollouts"] > 0
    assert r1.reflection_calls >= 1 and r1.reflection_errors == 0 and r1.error is None


def test_a_failing_reflector_keeps_the_population_and_ends_the_round(tiny_model):
    calls = []

    def broken(prompt):
        calls.append(prompt)
        raise ConnectionError("model down")

    channel, _ = _channel(tiny_model, reflector=broken, budget=400, reflection_retries=1,
                          max_consecutive_reflection_failures=2)
    channel.population = ["kept prompt"]
    rnd = channel.run_round(echo_task())
    # the guard is exhausted after 2 failed calls (2 tries each): the round ends instead of spending its budget
    assert rnd.reflection_calls == 2 and rnd.reflection_errors == 4 and len(calls) == 4
    assert rnd.accepted == 0 and "ConnectionError" in rnd.error
    assert set(channel.population) <= {"kept prompt", echo_task().seed_prompt}


def test_budget_is_a_hard_cap_counting_rescoring_and_keeps_what_was_accepted(tiny_model):
    for budget in (10, 23):
        channel, _ = _channel(tiny_model, budget=budget, minibatch=3)
        task = echo_task()
        rounds = [channel.run_round(task) for _ in range(2)]
        for rnd in rounds:
            assert rnd.error is None
            assert rnd.rollouts <= budget  # re-scoring (4 per carried candidate here) included
            assert rnd.metrics["fast/rescore_rollouts"] <= rnd.rollouts
        assert channel.population  # a round that hit the cap still returns its population
    channel, _ = _channel(tiny_model, budget=2)  # below the cost of re-scoring the seed: re-scoring alone
    rnd = channel.run_round(echo_task())
    assert rnd.rollouts == 4 and rnd.accepted == 0 and rnd.error is None


def test_a_round_that_hits_the_cap_keeps_the_candidates_accepted_before(tiny_model):
    from types import SimpleNamespace

    from fastslow.rollout import Scored
    from fastslow.tasks import Verdict

    def sampler(task, pairs, **kw):  # rewards a prompt by how many hints it carries: every proposal improves
        verdicts = [Verdict(min(1.0, 0.2 * text.count("Reverse it.")), "more hints") for text, _ in pairs]
        return Scored(SimpleNamespace(texts=["x"] * len(pairs)), verdicts, 0)

    cfg = FastConfig(population=2, budget=30, val_size=4, minibatch=2)
    channel = FastChannel(sampler, cfg, canned_reflector, seed=0, max_new_tokens=6, version=lambda: 0)
    rnd = channel.run_round(echo_task())
    assert rnd.rollouts <= 30 and rnd.error is None
    assert rnd.accepted >= 1 and "Reverse it." in channel.best["echo"]  # acceptances before the cap survive


def _scripted(score):
    """A sampler whose reward is ``score(prompt text, problem)``."""
    from types import SimpleNamespace

    from fastslow.rollout import Scored
    from fastslow.tasks import Verdict

    def sampler(task, pairs, **kw):
        return Scored(SimpleNamespace(texts=["x"] * len(pairs)), [Verdict(score(t, p), "fb") for t, p in pairs], 0)

    return sampler


def test_a_proposal_no_better_than_its_parent_on_validation_is_not_accepted_and_the_population_is_filled():
    # The SmolLM2 case: a proposal wins on GEPA's 2-problem minibatch but scores 0 on validation like the seed.
    # The old code accepted it and kept a population of 1 (a front of 1); now it is rejected and fills slot 2.
    import random

    from fastslow.util import derive_seed

    task = echo_task()
    val = {p.id for p in random.Random(derive_seed(0, "gepa-round", 0)).sample(list(task.problems("train")), 4)}
    cfg = FastConfig(population=2, budget=40, val_size=4, minibatch=2)
    channel = FastChannel(_scripted(lambda t, p: float("Reverse it." in t and p.id not in val)), cfg,
                          canned_reflector, seed=0, max_new_tokens=6, version=lambda: 0)
    rnd = channel.run_round(task)
    assert rnd.metrics["fast/proposals_rejected_on_val"] >= 1
    assert rnd.accepted == 0 and rnd.metrics["fast/accepted"] == 0.0
    assert rnd.metrics["fast/val_flat"] == 1.0 and rnd.val_flat and rnd.front_size == 1
    assert len(set(channel.population)) == 2 == rnd.population == rnd.metrics["fast/population"]
    assert channel.population[0] == channel.best["echo"] == task.seed_prompt  # a filler never becomes the best
    assert "Reverse it." in channel.population[1] and rnd.metrics["fast/filled"] == 1.0
    # the flat set grows for the next round (fast.val_growth 2, at most 4 x val_size), but re-scoring the seed and
    # the 2 carried prompts may take at most half the budget: 40 // (2 * 3) = 6 problems
    assert channel.val_size == 6 and channel.state_dict()["val_size"] == 6
    assert channel.run_round(task).metrics["fast/val_size"] == 6.0
    roomy = FastChannel(_scripted(lambda t, p: float("Reverse it." in t and p.id not in val)),
                        cfg.model_copy(update={"budget": 48}), canned_reflector, seed=0, max_new_tokens=6,
                        version=lambda: 0)
    roomy.run_round(task)
    assert roomy.val_size == 8  # 48 // 6: doubling fits


def test_only_strict_validation_gains_are_accepted():
    # A hint helps on validation: proposals adding it are accepted; the front leads with the best
    cfg = FastConfig(population=2, budget=40, val_size=4, minibatch=2)
    channel = FastChannel(_scripted(lambda t, p: min(1.0, 0.3 * t.count("Reverse it."))), cfg, canned_reflector,
                          seed=0, max_new_tokens=6, version=lambda: 0)
    rnd = channel.run_round(echo_task())
    assert rnd.accepted >= 1 and not rnd.val_flat and "Reverse it." in channel.best["echo"]
    assert rnd.front_size >= 1 and rnd.population == 2


@pytest.mark.slow
def test_groups_mix_k_distinct_prompts_on_a_smollm2_shaped_config(tiny_model, tmp_path, monkeypatch):
    """configs/smollm2-cpu.yaml's fast settings (K=2, G=4, val 4, minibatch 2, budget 24, LoRA) on the tiny
    model: every round keeps K prompts and every slow group after the first round mixes K distinct prompts."""
    from conftest import small_config

    from fastslow.loop import train
    from fastslow.rollout import PolicySampler

    groups = []
    real = PolicySampler.__call__

    def spy(self, task, pairs, **kw):
        if kw["temperature"] > 0:  # the slow step's 4 problems x G=4 (GEPA and the evaluation are greedy)
            groups.extend({ctx for ctx, _ in pairs[i:i + 4]} for i in range(0, 16, 4))
        return real(self, task, pairs, **kw)

    monkeypatch.setattr(PolicySampler, "__call__", spy)
    cfg = small_config(tiny_model, tmp_path / "run", steps=4, extra=[
        "fast.population=2", "fast.val_size=4", "fast.minibatch=2", "fast.budget=24",
        "model.lora={r: 8, alpha: 16, target_modules: all-linear}"])
    summary = train(cfg)
    assert summary["fast"]["round_population"] == [2, 2] and summary["eval_n"] == 8
    assert len(summary["fast"]["round_front_size"]) == 2 and len(summary["prompts"]) == 2
    assert len(groups) == 4 * 4 and all(len(g) == 2 for g in groups)


def test_a_round_short_of_k_prompts_scores_worse_proposals_to_fill_but_never_lets_them_lead():
    # Every proposal is worse than the seed on every problem: GEPA alone would score none of them on validation
    calls = []

    def reflector(prompt):  # a new hint each call, so proposals differ
        calls.append(1)
        current = (prompt if isinstance(prompt, str) else prompt[-1]["content"]).split("```", 2)[1].strip()
        return f"```\n{current} Hint{len(calls)}.\n```"

    cfg = FastConfig(population=3, budget=60, val_size=4, minibatch=2)
    channel = FastChannel(_scripted(lambda t, p: 0.8 if "Hint" not in t else 0.05 * int(t.split("Hint")[1][0])),
                          cfg, reflector, seed=0, max_new_tokens=6, version=lambda: 0)
    rnd = channel.run_round(echo_task())
    assert rnd.accepted == 0 and rnd.front_size == 1 and channel.best["echo"] == echo_task().seed_prompt
    assert rnd.population == 3 == len(set(channel.population)) and rnd.metrics["fast/filled"] == 2.0
    hints = [int(t.split("Hint")[1][0]) for t in channel.population[1:]]
    assert hints == sorted(hints, reverse=True)  # fillers by validation score


def test_rescoring_the_carried_prompts_is_one_sampler_call_with_the_scores_of_separate_ones(tiny_model):
    channel, policy = _channel(tiny_model)
    task = echo_task()
    valset = list(task.problems("train"))[:4]
    texts = [task.seed_prompt, "Repeat the word.", "Say it back."]
    calls = []

    def counting(task, pairs, **kw):
        calls.append(len(pairs))
        return PolicySampler(policy)(task, pairs, **kw)

    adapter = FastAdapter(counting, task, version=lambda: 0, temperature=0.0, max_new_tokens=6, seed=1)
    state = fast.seeded_state(texts, adapter, valset)
    assert calls == [3 * 4] and adapter.generated == 12
    alone = FastAdapter(PolicySampler(policy), task, version=lambda: 0, temperature=0.0, max_new_tokens=6, seed=1)
    for i, text in enumerate(texts):
        separate = alone.evaluate(valset, {COMPONENT: text})
        assert list(state.prog_candidate_val_subscores[i].values()) == separate.scores
        assert adapter.evaluate(valset, {COMPONENT: text}).outputs == separate.outputs  # memoised: no new call
    assert calls == [12]

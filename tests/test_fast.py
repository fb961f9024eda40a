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

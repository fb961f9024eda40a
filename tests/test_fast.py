import torch
from conftest import canned_reflector, echo_task

import fastslow.fast as fast
from fastslow.config import FastConfig, ModelConfig
from fastslow.fast import COMPONENT, FastAdapter, FastChannel
from fastslow.policy import Policy


def _channel(tiny_model, **kw) -> FastChannel:
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    cfg = FastConfig(population=2, budget=8, val_size=4, **kw)
    return FastChannel(policy, cfg, canned_reflector, seed=0, max_new_tokens=6)


def test_round_rescores_carried_candidates_with_the_current_weights(tiny_model, monkeypatch):
    channel = _channel(tiny_model)
    task = echo_task()
    channel.population = ["stale prompt one", "stale prompt two"]
    seen = {}
    original = fast.seeded_state

    def spy(candidates, adapter, valset):
        state = original(candidates, adapter, valset)
        seen["candidates"], seen["valset"], seen["version"] = candidates, valset, adapter.policy.version
        seen["scores"] = [dict(s) for s in state.prog_candidate_val_subscores]
        return state

    monkeypatch.setattr(fast, "seeded_state", spy)
    # the weights move between rounds: scores from before are stale
    with torch.no_grad():
        for p in channel.policy.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    channel.policy.version = 7
    metrics = channel.run_round(task)
    assert seen["candidates"] == [task.seed_prompt, "stale prompt one", "stale prompt two"]
    fresh = FastAdapter(channel.policy, task, temperature=0.0, max_new_tokens=6, seed=1)
    for text, scores in zip(seen["candidates"], seen["scores"]):
        assert list(scores.values()) == fresh.evaluate(seen["valset"], {COMPONENT: text}).scores
    assert metrics["fast/rescore_rollouts"] == 3 * 4  # seed + two carried, each on the whole Pareto set
    assert 1 <= len(channel.population) <= 2 and channel.best[task.name] == channel.population[0]


def test_round_seed_changes_each_round_and_rollouts_are_counted(tiny_model, monkeypatch):
    channel = _channel(tiny_model)
    seeds = []
    real = fast.gepa.optimize

    def spy(**kwargs):
        seeds.append(kwargs["seed"])
        assert kwargs["cache_evaluation"] is False and kwargs["logger"] is not None
        return real(**kwargs)

    monkeypatch.setattr(fast.gepa, "optimize", spy)
    m1 = channel.run_round(echo_task())
    channel.run_round(echo_task())
    assert len(set(seeds)) == 2
    assert m1["fast/round_rollouts"] >= m1["fast/rescore_rollouts"] > 0
    assert m1["fast/proposals"] >= 1


def test_a_failing_reflector_keeps_the_population(tiny_model):
    def broken(prompt):
        raise ConnectionError("model down")

    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    channel = FastChannel(policy, FastConfig(population=2, budget=40, val_size=4, reflection_retries=1), broken,
                          seed=0, max_new_tokens=6)
    channel.population = ["kept prompt"]
    metrics = channel.run_round(echo_task())
    assert metrics["fast/reflection_errors"] >= 2  # retried
    assert metrics["fast/accepted"] == 0
    assert set(channel.population) <= {"kept prompt", echo_task().seed_prompt}

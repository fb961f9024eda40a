import json

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file

from fastslow.checkpoint import list_checkpoints
from fastslow.loop import RunDirError, Trainer, train


class Crash(Exception):
    pass


def _rows(run):
    return (run / "metrics.jsonl").read_text().splitlines()


def _weights(run):
    last = list_checkpoints(run / "checkpoints")[-1]
    return load_file(last / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fst", "rl"])
def test_resume_equals_uninterrupted(tiny_model, tmp_path, method):
    full = tmp_path / "full"
    train(small_config(tiny_model, full, method=method, steps=5))

    broken = tmp_path / "broken"

    def crash_at_3(done, total, row):
        if done == 3:  # after the step-2 checkpoint and the step-3 row: the row must be discarded
            raise Crash

    with pytest.raises(Crash):
        Trainer(small_config(tiny_model, broken, method=method, steps=5), on_step=crash_at_3).run()
    assert len(_rows(broken)) == 4  # rows 0..3 were written before the crash
    train(small_config(tiny_model, broken, method=method, steps=5), resume=True)

    assert _rows(broken) == _rows(full)
    a, b = _weights(full), _weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, broken))
    assert sa == sb


@pytest.mark.slow
def test_same_seed_same_metrics_and_other_seed_differs(tiny_model, tmp_path):
    train(small_config(tiny_model, tmp_path / "a", method="rl", steps=2))
    train(small_config(tiny_model, tmp_path / "b", method="rl", steps=2))
    train(small_config(tiny_model, tmp_path / "c", method="rl", steps=2, extra=["seed=1"]))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert _rows(tmp_path / "a") != _rows(tmp_path / "c")


def test_existing_run_is_not_overwritten_without_resume_or_force(tiny_model, tmp_path):
    train(small_config(tiny_model, tmp_path / "run", method="rl", steps=1))
    before = _rows(tmp_path / "run")
    with pytest.raises(RunDirError, match="--resume"):
        Trainer(small_config(tiny_model, tmp_path / "run", method="rl", steps=1))
    assert _rows(tmp_path / "run") == before


def test_gepa_method_keeps_weights_frozen_and_counts_fast_rollouts(tiny_model, tmp_path):
    summary = train(small_config(tiny_model, tmp_path / "run", method="gepa", steps=3))
    assert summary["rollouts"] == 0 and summary["fast_rollouts"] > 0
    assert summary["drift"]["kl_rev"] == 0.0 and summary["drift"]["weight_l2"] == 0.0
    assert summary["prompts"]


def test_summary_has_the_documented_fields(tiny_model, tmp_path):
    summary = train(small_config(tiny_model, tmp_path / "run", method="fst", steps=2))
    for key in ("method", "seed", "steps", "rollouts", "fast_rollouts", "stages", "final", "drift", "matrix", "cl",
                "prompts", "matrix_agnostic", "cl_agnostic", "fast_kind"):
        assert key in summary
    assert summary["cl"]["scenario"] == "task-aware" and summary["cl_agnostic"]["scenario"] == "task-agnostic"
    assert set(summary["drift"]) >= {"kl_rev", "kl_fwd", "weight_l2", "entropy"}
    assert summary["final"]["vowel"].keys() == {"reward", "reward_seed_prompt", "reward_agnostic"}
    rows = [json.loads(r) for r in _rows(tmp_path / "run")]
    assert all({"step", "rollouts", "fast_rollouts"} <= r.keys() for r in rows)
    assert any("fast/front_size" in r for r in rows) and any("slow/reward_mean" in r for r in rows)


@pytest.mark.slow
def test_a_format_2_checkpoint_resumes_as_the_run_that_wrote_it(tiny_model, tmp_path):
    """Format 2 kept the fast channel's state and the weights' version in state.json (no engine.json)."""
    from fastslow.checkpoint import MANIFEST

    full = tmp_path / "full"
    train(small_config(tiny_model, full, method="fst", steps=5))
    old = tmp_path / "old"

    def crash_at_3(done, total, row):
        if done == 3:
            raise Crash

    with pytest.raises(Crash):
        Trainer(small_config(tiny_model, old, method="fst", steps=5), on_step=crash_at_3).run()
    ckpt = list_checkpoints(old / "checkpoints")[-1]
    engine = json.loads((ckpt / "engine.json").read_text())
    state = json.loads((ckpt / "state.json").read_text())
    assert engine["fast"]["population"] and "fast" not in state
    state["fast"], state["loop"]["policy_version"] = engine["fast"], engine["policy_version"]
    (ckpt / "engine.json").unlink()
    (ckpt / "state.json").write_text(json.dumps(state))
    meta = json.loads((ckpt / MANIFEST).read_text())
    meta["format"] = 2
    meta["files"] = {rel: __import__("hashlib").sha256((ckpt / rel).read_bytes()).hexdigest()
                     for rel in meta["files"] if (ckpt / rel).is_file()}
    (ckpt / MANIFEST).write_text(json.dumps(meta))
    train(small_config(tiny_model, old, method="fst", steps=5), resume=True)
    assert _rows(old) == _rows(full)


def test_greedy_evaluation_decodes_its_views_in_one_call_with_the_rewards_of_separate_ones(tiny_model, tmp_path,
                                                                                           monkeypatch):
    from fastslow.rollout import PolicySampler, score_prompt

    trainer = Trainer(small_config(tiny_model, tmp_path / "run", method="fst", steps=2))
    task = next(iter(trainer.tasks.values()))
    trainer.fast.population = ["Answer with the vowels only.", task.seed_prompt]
    trainer.fast.best[task.name] = "Count the vowels."
    calls = []
    real = PolicySampler.__call__

    def spy(self, task, pairs, **kw):
        calls.append(len({ctx for ctx, _ in pairs}))
        return real(self, task, pairs, **kw)

    monkeypatch.setattr(PolicySampler, "__call__", spy)
    row = trainer._evaluate(step=0)
    assert calls == [3]  # seed, task-aware and task-agnostic contexts: 3 x eval.n rows in one call
    for key, prompt in (("reward_seed_prompt", task.seed_prompt), ("reward", "Count the vowels."),
                        ("reward_agnostic", "Answer with the vowels only.")):
        alone = score_prompt(trainer.engine.sample, task, prompt, 8, max_new_tokens=8, seed=0)
        assert row[f"eval/{task.name}/{key}"] == alone.mean_reward
    trainer.run()  # the run goes on from there

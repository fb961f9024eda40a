"""The weight-dominant task family: hidden contents the instruction language cannot state."""

import pytest

from fastslow.tasks import load_task
from fastslow.world.check import WEIGHT_MAX_TEXT_GAIN, check_world, regime_properties
from fastslow.world.language import FORMATS, TRANSFORMS
from fastslow.world.tasks import MICRO_TASKS, WEIGHT_HELDOUT, WEIGHT_STREAM, WEIGHT_TASKS, micro_task


def test_family_lists():
    assert set(WEIGHT_STREAM) | {WEIGHT_HELDOUT} <= set(WEIGHT_TASKS) and WEIGHT_HELDOUT not in WEIGHT_STREAM
    assert not set(WEIGHT_TASKS) & set(MICRO_TASKS)
    assert {micro_task(n).regime for n in WEIGHT_TASKS} == {"weight"}
    assert {micro_task(n).regime for n in MICRO_TASKS} == {"prompt"}
    assert load_task(f"micro/{WEIGHT_STREAM[0]}").name == WEIGHT_STREAM[0]


@pytest.mark.parametrize("name", WEIGHT_TASKS)
def test_no_sentence_of_the_language_states_the_content(name):
    task = micro_task(name)
    problems = list(task.problems("eval"))[:50]
    assert len(task.problems("train")) >= 2000 and not {p.prompt for p in task.problems("train")} & {
        p.prompt for p in task.problems("eval")}
    for p in problems[:5]:
        assert task.verify(p, p.answer).reward == 1.0
    # every rule the language can state gets at most a minority of the answers right
    for transform in TRANSFORMS.values():
        for fmt in FORMATS.values():
            hits = sum(fmt.wrap(transform.apply(p.prompt)) == p.answer for p in problems)
            assert hits <= 0.2 * len(problems), (transform.name, fmt.name)
    # content carries most of the reward: the right content in a wrong wrapper still scores 1 - format share
    p = problems[0]
    fmt = next(f for f in FORMATS.values() if f.unwrap(p.answer) is not None and (f.prefix or f.suffix))
    other = next(f for f in FORMATS.values() if f.name != fmt.name)
    assert task.verify(p, other.wrap(fmt.unwrap(p.answer))).reward == pytest.approx(1 - task.format_weight)


@pytest.mark.slow
def test_text_gives_little_on_the_base_model():
    report = check_world(n=24, tasks=[*WEIGHT_STREAM, WEIGHT_HELDOUT])
    for name, row in report.items():
        assert row["regime"] == "weight"
        assert row["properties"]["text_gain"] <= WEIGHT_MAX_TEXT_GAIN + 0.05, name  # small n: a little slack
        assert row["properties"]["rl_reaches_target"] is None  # not measured without rl_steps
        # the strict bound (any sentence of the language) is reported, and is never below the check's own text
        assert row["language_best"]["reward"] >= row["rule"] - 1e-9


def test_regime_properties_logic():
    assert regime_properties("prompt", {"seed": 0.1, "rule": 0.6, "reflector": 0.5})["holds"] is True
    assert regime_properties("prompt", {"seed": 0.1, "rule": 0.2, "reflector": 0.2})["holds"] is False
    weak = {"seed": 0.1, "rule": 0.2, "reflector": 0.15}
    assert regime_properties("weight", weak) == {"text_gain": 0.1, "rl_reaches_target": None, "holds": True}
    assert regime_properties("weight", {**weak, "rl_peak": 0.5, "rl_steps_to_target": None})["holds"] is False
    assert regime_properties("weight", {**weak, "rl_peak": 0.8, "rl_steps_to_target": 150})["holds"] is True
    assert regime_properties("weight", {**weak, "rl_peak": 0.8, "rl_steps_to_target": 400})["holds"] is False
    assert regime_properties("weight", {**weak, "rule": 0.5})["holds"] is False


def test_stream_tasks_conflict_and_formats_the_seed_prompt_writes():
    # stream tasks differ in format (weights that absorb one convention lose the previous one) and none uses
    # `dot`, which the seed prompt almost never writes (stating it would alone lift the reward by ~0.15)
    formats = [micro_task(n)._format for n in WEIGHT_STREAM]
    assert len(set(formats)) == len(formats)
    assert "dot" not in {micro_task(n)._format for n in WEIGHT_TASKS}


def test_cli_check_restricted_to_tasks(monkeypatch):
    import json

    from typer.testing import CliRunner

    import fastslow.world as world
    from fastslow.cli import app

    seen = {}

    def fake_check(model, n, seed, rl_steps, tasks):
        seen.update(tasks=tasks, rl_steps=rl_steps)
        return {t: {"regime": "weight"} for t in tasks or WEIGHT_TASKS}

    monkeypatch.setattr(world, "check_world", fake_check)
    result = CliRunner().invoke(app, ["world", "check", "--task", WEIGHT_HELDOUT, "--task", "mirror",
                                      "--rl-steps", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"tasks": [WEIGHT_HELDOUT, "mirror"], "rl_steps": 3}
    assert set(json.loads(result.output)) == {WEIGHT_HELDOUT, "mirror"}
    bad = CliRunner().invoke(app, ["world", "check", "--task", "nope"])
    assert bad.exit_code == 2 and "unknown micro task" in bad.output and "Traceback" not in bad.output

"""``fastslow world check``: does the micro world have the properties the design asks for?

For every micro task it measures the base model's mean reward on eval problems with
(a) the task-agnostic seed prompt, (b) the task's true rule text, (c) the offline reflector's
proposal made from 10 failed seed-prompt rollouts on train problems, rendered exactly as
GEPA 0.1.4's default reflection prompt. Decoding is greedy; ``seed_sampled`` adds the mean reward
of one temperature-1 sample per problem under the seed prompt (what RL starts from). For weight-dominant
tasks ``language_best`` also scores every sentence the language has (each transform, or none, with the
task's format): a stricter bound than the reflector's text, reported for information (not a property).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastslow.config import ModelConfig
from fastslow.policy import Policy
from fastslow.rollout import PolicySampler, Scored, rollout, score_prompt
from fastslow.tasks import Problem
from fastslow.util import derive_seed
from fastslow.world.language import TRANSFORMS, rule_text
from fastslow.world.reflector import MicroReflector
from fastslow.world.tasks import ALL_TASKS, MicroTask, micro_task

MAX_NEW_TOKENS = 18
# Regime properties, on the baselines only (gepa = best text on frozen weights, rl = RL from the seed prompt).
PROMPT_MIN_TEXT_GAIN = 0.3  # prompt-dominant: the rule text alone lifts the base by at least this much
WEIGHT_MAX_TEXT_GAIN = 0.15  # weight-dominant: the best text the reflector (or the language) writes gives at most this
WEIGHT_MIN_RL_REWARD, WEIGHT_RL_STEPS = 0.7, 300  # ... while RL from the seed prompt reaches this within these steps


def load_policy(model_path: str | None = None) -> Policy:
    """The shipped base model (or ``model_path``) on CPU; never downloads."""
    return Policy.load(ModelConfig(path=model_path or "micro", device="cpu"))


def scored(policy: Policy, task: MicroTask, context: str, problems: Sequence[Problem],
           temperature: float = 0.0, seed: int = 0) -> Scored:
    """Rollouts of ``context`` on ``problems``; greedy unless ``temperature`` > 0."""
    return rollout(policy, task, [(context, p) for p in problems], temperature=temperature,
                   max_new_tokens=MAX_NEW_TOKENS, seed=derive_seed(seed, "world-check", task.name, context))


def mean_reward(policy: Policy, task: MicroTask, context: str, n: int, temperature: float = 0.0,
                seed: int = 0) -> float:
    """Mean reward of ``context`` on the first ``n`` eval problems (the project's one evaluation)."""
    seed = derive_seed(seed, "world-check", task.name, context)
    return score_prompt(PolicySampler(policy), task, context, n, temperature=temperature,
                        max_new_tokens=MAX_NEW_TOKENS, seed=seed).mean_reward


def reflection_prompt(instruction: str, records: Sequence[dict[str, str]]) -> str:
    """GEPA 0.1.4's default reflection prompt for ``records`` (keys Inputs / Generated Outputs / Feedback)."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    rendered = InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": instruction, "dataset_with_feedback": list(records)}
    )
    assert isinstance(rendered, str)
    return rendered


def failure_records(policy: Policy, task: MicroTask, n_failures: int = 10) -> list[dict[str, str]]:
    """Reflective records of the first ``n_failures`` failed greedy seed-prompt rollouts on train problems."""
    problems = list(task.problems("train"))[: max(64, 4 * n_failures)]
    texts = scored(policy, task, task.seed_prompt, problems).batch.texts
    records = []
    for problem, completion in zip(problems, texts, strict=False):
        verdict = task.verify(problem, completion)
        if verdict.reward < 1.0:
            records.append({"Inputs": problem.prompt, "Generated Outputs": completion, "Feedback": verdict.feedback})
        if len(records) == n_failures:
            break
    return records


def propose_from_failures(policy: Policy, task: MicroTask, n_failures: int = 10) -> str:
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    prompt = reflection_prompt(task.seed_prompt, failure_records(policy, task, n_failures))
    return InstructionProposalSignature.output_extractor(MicroReflector()(prompt))["new_instruction"]


def rl_baseline(name: str, steps: int, seed: int = 0, model_path: str | None = None,
                eval_every: int = 25, eval_n: int = 64) -> dict[str, Any]:
    """RL from the seed prompt on ``micro/<name>`` with the demo's slow settings: eval curve (greedy),
    its peak and the first step reaching :data:`WEIGHT_MIN_RL_REWARD` (None if never)."""
    import json
    import tempfile
    from pathlib import Path

    from fastslow.config import config_from_dict
    from fastslow.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({
            "method": "rl", "model": {"path": model_path or "micro", "device": "cpu"},
            "stages": [{"task": f"micro/{name}", "steps": steps}],
            "slow": {"batch_problems": 8, "group_size": 8, "lr": 3e-4, "warmup_steps": 5, "max_new_tokens": 20},
            "eval": {"every": eval_every, "n": eval_n}, "drift": {"every": steps}, "checkpoint_every": steps,
            "seed": seed, "out": str(Path(tmp) / "rl"),
        })
        train(cfg, log=lambda _: None)
        rows = [json.loads(line) for line in (Path(tmp) / "rl" / "metrics.jsonl").read_text().splitlines()]
    key = f"eval/{name}/reward"
    curve = [(r["step"], round(r[key], 4)) for r in rows if key in r]
    reach = next((s for s, r in curve if r >= WEIGHT_MIN_RL_REWARD), None)
    return {"rl_peak": max(r for _, r in curve), "rl_steps_to_target": reach, "rl_curve": curve}


def language_best(policy: Policy, task: MicroTask, n: int, known: dict[str, float] | None = None) -> dict[str, Any]:
    """The best context the instruction language can write with the task's format (any transform sentence
    or none), its reward and its gain over the seed prompt; greedy, first ``n`` eval problems. ``known``:
    contexts already scored the same way (e.g. the rule text), not scored again."""
    fmt, known = task._format, known or {}
    scores = {text: known[text] if text in known else mean_reward(policy, task, text, n) for text in
              [rule_text(None, fmt), *(rule_text(t, fmt) for t in TRANSFORMS)]}
    text = max(scores, key=lambda k: scores[k])
    return {"text": text, "reward": round(scores[text], 4)}


def regime_properties(regime: str, row: dict[str, Any]) -> dict[str, Any]:
    """Whether a task shows its regime's properties (``None`` where the needed number was not measured)."""
    text_gain = max(row["rule"], row["reflector"]) - row["seed"]
    props: dict[str, Any] = {"text_gain": round(text_gain, 4)}
    if regime == "prompt":
        props["holds"] = text_gain >= PROMPT_MIN_TEXT_GAIN
        return props
    rl_ok = None
    if row.get("rl_steps_to_target") is not None or "rl_peak" in row:
        rl_ok = row.get("rl_steps_to_target") is not None and row["rl_steps_to_target"] <= WEIGHT_RL_STEPS
    props["rl_reaches_target"] = rl_ok
    props["holds"] = text_gain <= WEIGHT_MAX_TEXT_GAIN and rl_ok is not False
    return props


def check_world(model_path: str | None = None, n: int = 200, seed: int = 0,
                tasks: Sequence[str] | None = None, rl_steps: int = 0) -> dict[str, Any]:
    """Per task (all, or ``tasks``): its ``regime``, ``seed`` / ``rule`` / ``reflector`` rewards (greedy),
    ``seed_sampled``, the proposal text, ``recovered`` = (reflector - seed) / (rule - seed), ``properties``
    (the regime's baseline properties; with ``rl_steps`` > 0 weight-dominant tasks also get an RL baseline
    run) and, for weight-dominant tasks, ``language_best`` (information only)."""
    policy = load_policy(model_path)
    report: dict[str, Any] = {}
    for name in tasks or ALL_TASKS:
        task = micro_task(name)
        problems = list(task.problems("eval"))[:n]
        proposal = propose_from_failures(policy, task)
        row = {
            "seed": mean_reward(policy, task, task.seed_prompt, n),
            "rule": mean_reward(policy, task, task.rule_text, n),
            "reflector": mean_reward(policy, task, proposal, n),
            "seed_sampled": mean_reward(policy, task, task.seed_prompt, n, temperature=1.0, seed=seed),
        }
        gain = row["rule"] - row["seed"]
        row["recovered"] = (row["reflector"] - row["seed"]) / gain if gain > 0 else None
        if rl_steps > 0 and task.regime == "weight":
            row.update(rl_baseline(name, rl_steps, seed=seed, model_path=model_path))
        report[name] = {"regime": task.regime, **{k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in row.items()}}
        report[name].update({"properties": regime_properties(task.regime, row), "n": len(problems),
                             "proposal": proposal, "rule_text": task.rule_text})
        if task.regime == "weight":
            best = language_best(policy, task, n, known={task.rule_text: row["rule"], proposal: row["reflector"]})
            report[name]["language_best"] = {**best, "gain": round(best["reward"] - row["seed"], 4)}
    return report

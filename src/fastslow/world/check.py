"""``fastslow world check``: does the micro world have the properties the design asks for?

For every micro task it measures the base model's mean reward on eval problems with
(a) the task-agnostic seed prompt, (b) the task's true rule text, (c) the offline reflector's
proposal made from 10 failed seed-prompt rollouts on train problems, rendered exactly as
GEPA 0.1.4's default reflection prompt. Decoding is greedy; ``seed_sampled`` adds the mean reward
of one temperature-1 sample per problem under the seed prompt (what RL starts from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastslow.config import ModelConfig
from fastslow.policy import Policy
from fastslow.rollout import Scored, rollout
from fastslow.tasks import Problem
from fastslow.util import derive_seed
from fastslow.world.reflector import MicroReflector
from fastslow.world.tasks import MICRO_TASKS, MicroTask, micro_task

MAX_NEW_TOKENS = 18


def load_policy(model_path: str | None = None) -> Policy:
    """The shipped base model (or ``model_path``) on CPU; never downloads."""
    return Policy.load(ModelConfig(path=model_path or "micro", device="cpu"))


def scored(policy: Policy, task: MicroTask, context: str, problems: Sequence[Problem],
           temperature: float = 0.0, seed: int = 0) -> Scored:
    """Rollouts of ``context`` on ``problems``; greedy unless ``temperature`` > 0."""
    return rollout(policy, task, [(context, p) for p in problems], temperature=temperature,
                   max_new_tokens=MAX_NEW_TOKENS, seed=derive_seed(seed, "world-check", task.name, context))


def mean_reward(policy: Policy, task: MicroTask, context: str, problems: Sequence[Problem],
                temperature: float = 0.0, seed: int = 0) -> float:
    return scored(policy, task, context, problems, temperature, seed).mean_reward


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


def check_world(model_path: str | None = None, n: int = 200, seed: int = 0,
                tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Per task: ``seed`` / ``rule`` / ``reflector`` rewards (greedy), ``seed_sampled``, the proposal text,
    and ``recovered`` = (reflector - seed) / (rule - seed)."""
    policy = load_policy(model_path)
    report: dict[str, Any] = {}
    for name in tasks or MICRO_TASKS:
        task = micro_task(name)
        problems = list(task.problems("eval"))[:n]
        proposal = propose_from_failures(policy, task)
        row = {
            "seed": mean_reward(policy, task, task.seed_prompt, problems),
            "rule": mean_reward(policy, task, task.rule_text, problems),
            "reflector": mean_reward(policy, task, proposal, problems),
            "seed_sampled": mean_reward(policy, task, task.seed_prompt, problems, temperature=1.0, seed=seed),
        }
        gain = row["rule"] - row["seed"]
        row["recovered"] = (row["reflector"] - row["seed"]) / gain if gain > 0 else None
        report[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        report[name].update({"n": len(problems), "proposal": proposal, "rule_text": task.rule_text})
    return report

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

import torch

from fastslow.tasks import Problem
from fastslow.world import base_model_path
from fastslow.world.reflector import MicroReflector
from fastslow.world.tasks import MICRO_TASKS, MicroTask, micro_task

MAX_NEW_TOKENS = 18


def load_model(model_path: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory (the shipped base model by default); never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path or base_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tok


def chat_prompts(tok: Any, contexts: Sequence[str], inputs: Sequence[str]) -> list[str]:
    return [
        tok.apply_chat_template(
            [{"role": "system", "content": c}, {"role": "user", "content": x}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for c, x in zip(contexts, inputs, strict=False)
    ]


@torch.no_grad()
def generate(
    model: Any,
    tok: Any,
    contexts: Sequence[str],
    inputs: Sequence[str],
    sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 128,
) -> list[str]:
    """Completions (special tokens stripped) for each (context, input), batched with left padding."""
    texts = chat_prompts(tok, contexts, inputs)
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def mean_reward(
    model: Any, tok: Any, task: MicroTask, context: str, problems: Sequence[Problem], sample: bool = False
) -> float:
    completions = generate(model, tok, [context] * len(problems), [p.prompt for p in problems], sample=sample)
    return sum(task.verify(p, c).reward for p, c in zip(problems, completions, strict=False)) / max(1, len(problems))


def reflection_prompt(instruction: str, records: Sequence[dict[str, str]]) -> str:
    """GEPA 0.1.4's default reflection prompt for ``records`` (keys Inputs / Generated Outputs / Feedback)."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    rendered = InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": instruction, "dataset_with_feedback": list(records)}
    )
    assert isinstance(rendered, str)
    return rendered


def failure_records(model: Any, tok: Any, task: MicroTask, n_failures: int = 10) -> list[dict[str, str]]:
    """Reflective records of the first ``n_failures`` failed greedy seed-prompt rollouts on train problems."""
    problems = list(task.problems("train"))[: max(64, 4 * n_failures)]
    completions = generate(model, tok, [task.seed_prompt] * len(problems), [p.prompt for p in problems])
    records = []
    for problem, completion in zip(problems, completions, strict=False):
        verdict = task.verify(problem, completion)
        if verdict.reward < 1.0:
            records.append({"Inputs": problem.prompt, "Generated Outputs": completion, "Feedback": verdict.feedback})
        if len(records) == n_failures:
            break
    return records


def propose_from_failures(model: Any, tok: Any, task: MicroTask, n_failures: int = 10) -> str:
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    prompt = reflection_prompt(task.seed_prompt, failure_records(model, tok, task, n_failures))
    return InstructionProposalSignature.output_extractor(MicroReflector()(prompt))["new_instruction"]


def check_world(model_path: str | None = None, n: int = 200, seed: int = 0,
                tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Per task: ``seed`` / ``rule`` / ``reflector`` rewards (greedy), ``seed_sampled``, the proposal text,
    and ``recovered`` = (reflector - seed) / (rule - seed)."""
    torch.manual_seed(seed)
    model, tok = load_model(model_path)
    report: dict[str, Any] = {}
    for name in tasks or MICRO_TASKS:
        task = micro_task(name)
        problems = list(task.problems("eval"))[:n]
        proposal = propose_from_failures(model, tok, task)
        row = {
            "seed": mean_reward(model, tok, task, task.seed_prompt, problems),
            "rule": mean_reward(model, tok, task, task.rule_text, problems),
            "reflector": mean_reward(model, tok, task, proposal, problems),
            "seed_sampled": mean_reward(model, tok, task, task.seed_prompt, problems, sample=True),
        }
        gain = row["rule"] - row["seed"]
        row["recovered"] = (row["reflector"] - row["seed"]) / gain if gain > 0 else None
        report[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        report[name].update({"n": len(problems), "proposal": proposal, "rule_text": task.rule_text})
    return report

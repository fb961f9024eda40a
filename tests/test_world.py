"""The micro world: tokenizer, shipped model, pretraining determinism, tasks, verifier, reflector."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastslow.tasks import load_task
from fastslow.world import base_model_path, build_base
from fastslow.world import reflector as reflector_module
from fastslow.world.check import reflection_prompt
from fastslow.world.language import FORMATS, SEED_PROMPT, TRANSFORMS, edit_context, parse_context
from fastslow.world.reflector import MicroReflector
from fastslow.world.tasks import HELDOUT, MICRO_TASKS, STREAM, micro_task


def test_tokenizer_round_trip_and_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_path(), local_files_only=True)
    text = "Reverse it. Answer in [ ]. xyz"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Sort it."}, {"role": "user", "content": "cab"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "<|system|>Sort it.<|user|>cab<|assistant|>"
    full = tok.apply_chat_template(
        [{"role": "system", "content": "Sort it."}, {"role": "user", "content": "cab"},
         {"role": "assistant", "content": "abc"}],
        tokenize=False,
    )
    assert full.endswith("abc" + tok.eos_token)
    assert tok.pad_token_id is not None and tok.eos_token_id != tok.pad_token_id


def test_shipped_model_loads_and_follows_rules():
    from fastslow.world.check import load_policy

    policy = load_policy()
    assert 2e5 < sum(p.numel() for p in policy.model.parameters()) < 2e6
    prompts = [policy.format("Reverse it. Answer in [ ].", "abcd"),
               policy.format("Uppercase it. End with a period.", "dog")]
    outs = policy.generate(prompts, temperature=0.0, max_new_tokens=18, seed=0).texts
    # The base model is deliberately imperfect on content; the stated format it follows reliably.
    assert outs[0].startswith("[") and outs[0].endswith("]") and outs[1].endswith(".") and outs[1].isupper()


@pytest.mark.slow  # builds the micro model twice from scratch (~15 s)
def test_build_base_is_deterministic(tmp_path: Path):
    torch.set_num_threads(2)
    a = build_base(tmp_path / "a", seed=1, steps=3)
    b = build_base(tmp_path / "b", seed=1, steps=3)
    assert a["steps"] == 3 and a["final_loss"] == b["final_loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_task_lists_and_loading():
    assert len(MICRO_TASKS) >= 4 and len(STREAM) == 3 and HELDOUT in MICRO_TASKS and HELDOUT not in STREAM
    task = load_task(f"micro/{STREAM[0]}")
    assert task.name == STREAM[0] and task.seed_prompt == SEED_PROMPT
    # Stream tasks conflict: different rule texts.
    assert len({micro_task(n).rule_text for n in STREAM}) == 3


@pytest.mark.parametrize("name", MICRO_TASKS)
@pytest.mark.slow
def test_tasks_deterministic_and_verifier(name: str):
    task, again = micro_task(name), micro_task(name)
    train, evals = task.problems("train"), task.problems("eval")
    assert len(train) >= 2000 and len(evals) >= 200
    assert list(train) == list(again.problems("train")) and list(evals) == list(again.problems("eval"))
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    p = evals[0]
    right = task.verify(p, p.answer)
    assert right.reward == 1.0 and "Correct" in right.feedback
    # Right content in a wrong wrapper, and a half-wrong content: partial credit.
    transform, fmt, _ = parse_context(task.rule_text)
    content = TRANSFORMS[transform].apply(p.prompt)
    other = next(f for f in FORMATS.values() if f.name != fmt)
    wrong_format = task.verify(p, other.wrap(content))
    assert 0.0 < wrong_format.reward < 1.0 and "format is wrong" in wrong_format.feedback
    half = FORMATS[fmt].wrap(content[: len(content) // 2] + "#" * (len(content) - len(content) // 2))
    assert 0.0 < task.verify(p, half).reward < 1.0
    garbage = task.verify(p, "??")
    assert garbage.reward < 0.31 and p.answer in garbage.feedback
    for verdict in (wrong_format, garbage):  # feedback (past the two answer lines) never names the hidden rule
        remarks = "\n".join(verdict.feedback.lower().splitlines()[2:])
        assert remarks and transform not in remarks and fmt not in remarks
        assert not any(s.lower() in remarks for s in task.rule_text.split(". ")[1:])


def _failure_prompt(name: str, n: int = 10) -> str:
    """A reflection prompt as GEPA renders it, from deliberately wrong outputs on task ``name``."""
    task = micro_task(name)
    records = []
    for i, p in enumerate(task.problems("train")[:n]):
        wrong = FORMATS["square" if i % 2 else "dot"].wrap(p.prompt[::-1] if i % 3 else p.prompt.upper())
        records.append({"Inputs": p.prompt, "Generated Outputs": wrong, "Feedback": task.verify(p, wrong).feedback})
    return reflection_prompt(task.seed_prompt, records)


@pytest.mark.parametrize("name", MICRO_TASKS)
def test_reflector_recovers_rule(name: str):
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    out = MicroReflector()(_failure_prompt(name))
    proposal = InstructionProposalSignature.output_extractor(out)["new_instruction"]
    assert parse_context(proposal)[:2] == parse_context(micro_task(name).rule_text)[:2]
    assert proposal.startswith(SEED_PROMPT)  # incremental edit keeps the unrelated sentence


def test_reflector_leaves_uninformative_input_unchanged():
    reflector = MicroReflector()
    prompt = reflection_prompt("Be nice. Sort it.", [{"Inputs": "abc", "Generated Outputs": "x", "Feedback": "bad"}])
    assert reflector(prompt) == "```\nBe nice. Sort it.\n```"
    assert reflector.batch_complete(["no blocks here"]) == ["```\n\n```"]
    messages = [{"role": "user", "content": prompt}]
    assert reflector(messages) == "```\nBe nice. Sort it.\n```"


def test_edit_context_keeps_other_sentences():
    edited = edit_context("Be brief. Sort it. Answer in [ ].", "reverse", None)
    assert edited == "Be brief. Reverse it. Answer in [ ]."


def test_reflector_never_reads_task_specs():
    source = inspect.getsource(reflector_module)
    for forbidden in ("world.tasks", "_SPECS", "._transform", "._format", "rule_text"):
        assert forbidden not in source
    code = "import sys, fastslow.world.reflector; print('fastslow.world.tasks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

import pytest
import torch

from fastslow.config import LoraConfig, ModelConfig
from fastslow.drift import weight_l2
from fastslow.policy import Policy


def test_logprobs_of_padded_batch_match_each_sequence_alone(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = [policy.format("Answer.", "abc"), policy.format("A much longer system prompt.", "cab")]
    batch = policy.generate(prompts, temperature=1.0, max_new_tokens=6, seed=3)
    with torch.no_grad():
        together = Policy.token_logprobs(policy.completion_logits(batch), batch.completion_ids)
        for i in range(2):
            row = batch.select([i])
            # strip this row's own padding: the result must not depend on its batch-mates
            keep = row.prompt_mask[0].bool()
            row.prompt_ids, row.prompt_mask = row.prompt_ids[:, keep], row.prompt_mask[:, keep]
            alone = Policy.token_logprobs(policy.completion_logits(row), row.completion_ids)
            m = row.completion_mask[0].bool()
            assert torch.allclose(together[i][m], alone[0][m], atol=1e-5)


def test_generation_is_seeded_and_stops_at_eos(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = [policy.format("Answer.", "abc")] * 4
    a = policy.generate(prompts, temperature=1.0, max_new_tokens=8, seed=1)
    b = policy.generate(prompts, temperature=1.0, max_new_tokens=8, seed=1)
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    eos = policy.tokenizer.eos_token_id
    for ids, mask in zip(a.completion_ids, a.completion_mask):
        hits = (ids == eos).nonzero()
        if len(hits):  # nothing counts after the first eos
            assert mask[hits[0, 0] + 1 :].sum() == 0


def test_lora_trains_only_the_adapter_and_its_base_is_the_disabled_model(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model), lora=LoraConfig(r=2, alpha=4)))
    names = [n for n, _ in policy.trainable_parameters()]
    assert names and all("lora_" in n for n in names)
    assert weight_l2(policy) == 0.0
    batch = policy.generate([policy.format("Answer.", "abc")], temperature=1.0, max_new_tokens=4, seed=0)
    with torch.no_grad():
        for _, p in policy.trainable_parameters():
            p.add_(0.1)
        moved = policy.completion_logits(batch)
        base = policy.completion_logits(batch, use_base=True)
    assert not torch.allclose(moved, base)
    assert weight_l2(policy) > 0


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        Policy.load(ModelConfig(path="/no/such/dir"))


def test_given_completions_are_scored_exactly(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = [policy.format("Answer.", "abc"), policy.format("Longer prompt here.", "b")]
    batch = policy.make_batch(prompts, ["cba", "b"])
    with torch.no_grad():
        got = Policy.token_logprobs(policy.completion_logits(batch), batch.completion_ids)
        for i, (prompt, completion) in enumerate(zip(prompts, ["cba", "b"])):
            p = policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = policy.tokenizer(completion, add_special_tokens=False)["input_ids"] + [policy.tokenizer.eos_token_id]
            logits = policy.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            want = torch.log_softmax(logits, -1)[torch.arange(len(c)), torch.tensor(c)]
            assert torch.allclose(got[i, : len(c)], want, atol=1e-5)
            assert int(batch.completion_mask[i].sum()) == len(c)

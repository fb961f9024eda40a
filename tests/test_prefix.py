"""Shared-prefix sampling and scoring: each shared prompt token runs once, with the same results as one copy per row."""

import torch

from fastslow.config import LoraConfig, ModelConfig
from fastslow.policy import Policy, share_prefixes

LONG = "Add the two numbers and answer with the sum only, nothing else."


def _prompts(policy):
    # 2 contexts x 2 problems x 3 rollouts: a slow step's group layout; every prompt starts with '<s>' + LONG's head
    rows = []
    for problem in ("abc", "ba"):
        for ctx in (LONG, LONG + " Think first."):
            rows += [policy.format(ctx, problem)] * 3
    return rows


class TokenCounter:
    """Counts the input tokens the model runs (a forward pre-hook on the embedding)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        self.tokens += args[0].numel()


def _naive_logits(policy, batch, model=None):
    """Logits of the completion tokens from one full forward per batch (every row runs its own prompt)."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return (model or policy.model)(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, p - 1 : p - 1 + c]


def test_sharing_finds_the_common_head_and_the_repeated_prompts(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    ids, mask = policy._encode_prompts(_prompts(policy))
    shared = share_prefixes(ids, mask, policy.tokenizer.pad_token_id)
    assert shared is not None
    assert len(shared.tail_ids) == 4  # 2 contexts x 2 problems
    assert shared.inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert shared.shared.shape[1] >= len(LONG)  # '<s>' + LONG is common to every row (char tokens)
    # the layout holds each row's own prompt tokens
    rows, rmask = shared.row_ids(), shared.row_mask()
    for i in range(len(ids)):
        assert rows[i][rmask[i].bool()].tolist() == ids[i][mask[i].bool()].tolist()
    distinct = [policy.format(LONG[:3] + str(i), "x") for i in range(3)]
    assert share_prefixes(*policy._encode_prompts(distinct), policy.tokenizer.pad_token_id) is None


def test_sampling_runs_each_shared_token_once_and_draws_the_same_text(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = _prompts(policy)
    counter = TokenCounter(policy.model)
    for temperature in (1.0, 0.0):
        counter.tokens = 0
        batch = policy.generate(prompts, temperature=temperature, max_new_tokens=6, seed=5)
        shared_tokens = counter.tokens
        torch.manual_seed(5)
        counter.tokens = 0
        ids, mask = policy._encode_prompts(prompts)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": None} if temperature else {
            "do_sample": False}
        with torch.no_grad():
            out = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                        eos_token_id=policy.tokenizer.eos_token_id,
                                        pad_token_id=policy.tokenizer.pad_token_id, **sampling)
        naive_tokens = counter.tokens
        completion = out[:, ids.shape[1]:]
        width = batch.completion_ids.shape[1]
        m = batch.completion_mask.bool()
        assert torch.equal(batch.completion_ids[m], completion[:, :width][m])
        # prompt tokens: 4 distinct tails + one shared head instead of 12 full prompts
        assert shared_tokens < naive_tokens - ids.numel() // 2, (shared_tokens, naive_tokens)


def test_scoring_with_shared_prefixes_matches_one_copy_per_row_and_its_gradients(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model), lora=LoraConfig(r=2, alpha=4)))
    with torch.no_grad():
        for _, p in policy.trainable_parameters():
            p.add_(0.05)  # LoRA B starts at 0: move it so the adapter matters
    batch = policy.generate(_prompts(policy), temperature=1.0, max_new_tokens=5, seed=2)
    mask = batch.completion_mask.bool()
    counter = TokenCounter(policy.model)
    got = policy.completion_logits(batch)
    assert counter.tokens < batch.prompt_ids.numel()  # the prompts were not run once per row
    want = _naive_logits(policy, batch)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    weights = torch.randn(got.shape[:2])

    def grads(logits):
        policy.model.zero_grad()
        (Policy.token_logprobs(logits, batch.completion_ids) * weights * mask).sum().backward()
        return [p.grad.clone() for _, p in policy.trainable_parameters()]

    for a, b in zip(grads(policy.completion_logits(batch)), grads(_naive_logits(policy, batch)), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        base = policy.completion_logits(batch, use_base=True)
        with policy.model.disable_adapter():
            want_base = _naive_logits(policy, batch)
    assert torch.allclose(base[mask], want_base[mask], atol=1e-5)


def test_token_logprobs_equal_log_softmax():
    logits = torch.randn(3, 4, 11)
    ids = torch.randint(0, 11, (3, 4))
    want = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(Policy.token_logprobs(logits, ids), want, atol=1e-6)


def test_an_update_in_several_passes_equals_one_pass(tiny_model, monkeypatch):
    import fastslow.policy as policy_module
    from fastslow.config import SlowConfig
    from fastslow.slow import Rollouts, SlowLearner

    results = []
    for budget in (1 << 40, 1):  # one pass; one pass per group
        monkeypatch.setattr(policy_module, "PASS_BYTES", budget)
        policy = Policy.load(ModelConfig(path=str(tiny_model)))
        batch = policy.generate(_prompts(policy), temperature=1.0, max_new_tokens=5, seed=2)
        group = torch.arange(4).repeat_interleave(3)
        assert len(policy.passes(batch, group)) == (1 if budget > 1 else 4)
        learner = SlowLearner(policy, SlowConfig(lr=0.05, warmup_steps=0, kl_coef=0.1, updates_per_batch=2))
        rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
        metrics = learner.step(Rollouts(batch, rewards), measure_k3=True)
        results.append((metrics, [p.detach().clone() for _, p in policy.trainable_parameters()]))
    (one, w1), (many, w2) = results
    assert one.keys() == many.keys()
    for k in one:
        assert abs(one[k] - many[k]) < 1e-5 * max(1.0, abs(one[k])), (k, one[k], many[k])
    # Adam steps by ~lr whatever the gradient's scale: 1e-4 is 0.2% of one step of lr 0.05
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(w1, w2, strict=True))

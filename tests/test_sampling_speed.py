"""The sampler's and the loop's shortcuts change no output: decoding runs only rows still generating, prompts are
tokenized once, and greedy evaluations of unchanged weights and contexts are reused."""

import contextlib
import json

import pytest
import torch
from conftest import small_config

import fastslow.policy as policy_module
from fastslow.config import LoraConfig, ModelConfig
from fastslow.loop import Trainer
from fastslow.policy import MIN_LIVE_ROWS, Policy


def _models(policy: Policy) -> list:
    return [policy.model] + ([policy._base] if policy._base is not None else [])  # full weights: a frozen copy


class DecodedRows:
    """Counts the rows of the one-token forwards (decoding steps) through the models' input embeddings."""

    def __init__(self, policy: Policy) -> None:
        self.rows = 0
        for model in _models(policy):
            model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        if args[0].shape[1] == 1:
            self.rows += args[0].shape[0]


def _stop_often(policy: Policy) -> None:
    """The eos logit raised (a fixed bias, the same in both paths), so rows stop at different steps."""
    eos = policy.tokenizer.eos_token_id

    def hook(_module, _inputs, out):
        out[..., eos] += 2.5
        return out

    for model in _models(policy):
        model.get_output_embeddings().register_forward_hook(hook)


def _prompts(policy: Policy) -> list[str]:
    # a slow step's layout (groups of one prompt: shared prefixes) and distinct short prompts (no sharing)
    grouped = [policy.format("Answer with the letters reversed, nothing else.", w) for w in ("abc", "ba", "cab")
               for _ in range(6)]
    return grouped + [policy.format("", w) for w in ("x", "yy", "zzz", "q", "rs", "tuv", "w", "ab")]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.slow
def test_decoding_only_live_rows_draws_what_every_row_draws(tiny_model, monkeypatch, lora):
    policy = Policy.load(ModelConfig(path=str(tiny_model), lora=LoraConfig(r=2, alpha=4) if lora else None))
    if lora:
        with torch.no_grad():
            for _, p in policy.trainable_parameters():
                p.add_(0.05)  # LoRA B starts at 0: move it so the base view differs from the policy
    _stop_often(policy)
    counter = DecodedRows(policy)
    prompts = _prompts(policy)
    assert len(prompts) > 2 * MIN_LIVE_ROWS
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.0}, {"temperature": 0.7, "top_p": 0.9},
                   {"temperature": 1.0, "use_base": True}):
        for sample in (prompts, prompts[18:], prompts[:4]):  # with and without shared prefixes; a small batch
            outs, rows = [], []
            for live in (True, False):
                with monkeypatch.context() as m:
                    if not live:
                        m.setattr(policy_module, "live_rows", lambda *a: contextlib.nullcontext())
                    counter.rows = 0
                    outs.append(policy.generate(sample, max_new_tokens=12, seed=3, **kwargs))
                    rows.append(counter.rows)
            fast, plain = outs
            assert torch.equal(fast.completion_ids, plain.completion_ids), kwargs
            assert torch.equal(fast.completion_mask, plain.completion_mask) and fast.texts == plain.texts
            stopped_early = bool((plain.completion_mask.sum(1) < plain.completion_mask.shape[1] - 1).any())
            if len(sample) >= 2 * MIN_LIVE_ROWS and stopped_early:
                assert rows[0] < rows[1], (kwargs, rows)  # stopped rows were not run
            else:
                assert rows[0] <= rows[1]


def test_decoding_runs_on_one_thread_under_passive_waiting_and_draws_the_same(tiny_model, monkeypatch):
    """Passive OpenMP waiting (fastslow's default) decodes on one thread, prompts keep every thread; the
    completions are those of decoding on every thread, and the thread count is restored."""
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    seen = []  # (tokens per row of a forward, torch threads during it)
    def first_layer(_m, args, kwargs):  # the decoder's first layer: after fastslow's own hook on the embeddings
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], torch.get_num_threads()))

    policy.model.model.layers[0].register_forward_pre_hook(first_layer, with_kwargs=True)
    prompts = _prompts(policy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = {}
        for wait in ("PASSIVE", "ACTIVE"):
            monkeypatch.setenv("OMP_WAIT_POLICY", wait)
            seen.clear()
            outs[wait] = policy.generate(prompts, temperature=1.0, max_new_tokens=8, seed=5)
            assert torch.get_num_threads() == 2
            decode = {n for width, n in seen if width == 1}
            prompt = {n for width, n in seen if width > 1}
            assert decode == ({1} if wait == "PASSIVE" else {2}) and prompt == {2}, (wait, seen)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs["PASSIVE"].completion_ids, outs["ACTIVE"].completion_ids)
    assert outs["PASSIVE"].texts == outs["ACTIVE"].texts


def test_prompts_tokenized_once_pad_as_the_tokenizer(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    prompts = [policy.format("Sys.", "abc"), policy.format("", "a"), "", policy.format("Sys.", "abc"), "xyz"]
    want = policy.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    for _ in range(2):  # tokenized, then from the memo
        ids, mask = policy._encode_prompts(prompts)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert set(policy._token_ids) == set(prompts)


def test_greedy_evaluations_of_frozen_weights_are_reused_with_the_same_numbers(tiny_model, tmp_path, monkeypatch):
    """gepa keeps the weights: from the second evaluation on, the seed prompt's view is not sampled again."""

    def run(out, memo: bool):
        trainer = Trainer(small_config(tiny_model, out, method="gepa", steps=4), log=lambda _: None)
        if not memo:
            monkeypatch.setattr(trainer, "_eval_memo", NeverRemembers())
        sampled = []
        sample = trainer.engine.sample

        def counting(task, pairs, **kwargs):
            sampled.append(tuple(context for context, _ in pairs))
            return sample(task, pairs, **kwargs)

        trainer.engine.sample = counting
        summary = trainer.run()
        seed_views = sampled.count((trainer.tasks[next(iter(trainer.tasks))].seed_prompt,) * 8)
        return (out / "metrics.jsonl").read_text(), summary, seed_views

    rows, summary, seed_views = run(tmp_path / "memo", True)
    rows_plain, summary_plain, seed_views_plain = run(tmp_path / "plain", False)
    assert rows == rows_plain
    assert json.dumps(summary, sort_keys=True) == json.dumps(summary_plain, sort_keys=True)
    assert seed_views == 1 and seed_views_plain == 3  # evaluations at steps 0, 2 and 4


class NeverRemembers(dict):
    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)

    def __contains__(self, key) -> bool:
        return False


def test_token_counts_are_the_tokenizers(tiny_model):
    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    for text in ("", "abc", policy.format("Sys.", "xy"), "abc"):
        assert policy.count_tokens(text) == len(policy.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("half_registered", [False, True])
def test_live_rows_leave_another_threads_forwards_on_the_same_model_alone(tiny_model, half_registered):
    """Serving samples on a second view of the same weights in another thread: while one thread decodes with live
    rows, a forward of that module from another thread keeps its own batch and its own logits.

    half_registered: torch adds a hook to the module before marking it as taking kwargs (and unmarks it on removal),
    with no lock, so the other thread may call live_rows' hooks without kwargs; they must run (serve failed a
    request on it: "before() missing 1 required positional argument: 'kwargs'")."""
    import threading

    from fastslow.policy import _generating_module

    policy = Policy.load(ModelConfig(path=str(tiny_model)))
    _stop_often(policy)
    lm = _generating_module(policy.model)
    probe = policy.tokenizer(["ab"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = policy.model(input_ids=probe).logits
    seen: list = []

    def other_thread() -> None:
        try:
            with torch.no_grad():
                seen.append(policy.model(input_ids=probe).logits)
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            seen.append(exc)

    def during_decoding(_module, args) -> None:
        if args[0].shape[1] == 1 and not seen:  # a decoding step of the main thread's generate
            marks = [(d, dict(d)) for d in (lm._forward_pre_hooks_with_kwargs, lm._forward_hooks_with_kwargs)]
            if half_registered:
                for d, _ in marks:
                    d.clear()
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            for d, saved in marks:
                d.update(saved)

    policy.model.get_input_embeddings().register_forward_pre_hook(during_decoding)
    policy.generate(_prompts(policy), max_new_tokens=12, seed=3, temperature=1.0)
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor), seen
    assert torch.equal(seen[0], want)

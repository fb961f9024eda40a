"""Build the micro world's base model: a character tokenizer and a tiny Llama pretrained on rule documents.

Documents are chats: system = a context (full rule, partial rule or no rule), user = an input string,
assistant = the output. Where the context leaves a part of the rule open, the output follows a
random convention for it, so the base model learns a *mixture* that a context (or RL) can steer.
Inputs are at most ``PRETRAIN_MAX_LEN`` letters (rarely longer): longer task inputs are the
procedural part that only weight updates can learn.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from fastslow.world.language import (
    ALPHABET,
    FORMATS,
    GENERIC_PHRASES,
    TRANSFORMS,
    apply_rule,
    rule_sentences,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Every character the language, the inputs and the outputs can contain (plus common ASCII for robustness).
CHARS = sorted(set(" " + ALPHABET + ALPHABET.upper() + "0123456789" + ".,:;!?'\"-+=*/()[]<>{}_#@&%$|~^`\\"))

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_SHAPE = dict(hidden_size=96, intermediate_size=288, num_hidden_layers=4, num_attention_heads=4)
PRETRAIN_MIN_LEN, PRETRAIN_MAX_LEN = 2, 8
RARE_LONG_LEN, RARE_LONG_P = 10, 0.08  # a few longer inputs so length generalisation is learnable by RL
DEFAULT_STEPS = 1500
BATCH = 96
LR = 3e-3


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` with chat special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character; the Fuse decoder joins them back without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="left",
        model_max_length=256,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=MODEL_SHAPE["num_attention_heads"],
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **MODEL_SHAPE,
    )


def sample_document(rng: random.Random) -> tuple[str, str, str]:
    """One pretraining document (context, input, output) drawn from the rule mixture."""
    n = rng.randint(PRETRAIN_MIN_LEN, PRETRAIN_MAX_LEN)
    if rng.random() < RARE_LONG_P:
        n = rng.randint(PRETRAIN_MAX_LEN + 1, RARE_LONG_LEN)
    text = "".join(rng.choice(ALPHABET) for _ in range(n))
    transform = rng.choice(list(TRANSFORMS))
    fmt = rng.choice(list(FORMATS))
    u = rng.random()
    # Which parts of the rule the context states: both / transform only / format only / none.
    show_t, show_f = (True, True) if u < 0.45 else (True, False) if u < 0.65 else (False, True) if u < 0.8 else (
        False, False)
    sentences = rule_sentences(transform if show_t else None, fmt if show_f else None, variant=rng.randrange(3))
    rng.shuffle(sentences)
    if not sentences or rng.random() < 0.5:
        generic = rng.choice([*GENERIC_PHRASES, GENERIC_PHRASES[0], ""])
        if generic:
            sentences.insert(0 if rng.random() < 0.8 else len(sentences), generic)
    return " ".join(sentences), text, apply_rule(transform, fmt, text)


def encode_document(tok: Any, context: str, text: str, output: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (loss only on the assistant turn, including its end token)."""
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": context}, {"role": "user", "content": text}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batch(tok: Any, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    docs = [encode_document(tok, *sample_document(rng)) for _ in range(size)]
    width = max(len(ids) for ids, _ in docs)
    ids = torch.full((size, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (doc_ids, doc_labels) in enumerate(docs):
        # Right padding for training: positions start at 0 for every document.
        ids[i, : len(doc_ids)] = torch.tensor(doc_ids)
        labels[i, : len(doc_labels)] = torch.tensor(doc_labels)
        mask[i, : len(doc_ids)] = 1
    return ids, labels, mask


def build_base(out_dir: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Pretrain the micro base model deterministically from ``seed`` and save it (safetensors) + tokenizer.

    Returns stats: wall seconds, parameter count, steps, final loss (mean of the last 50 steps).
    """
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    out_dir = Path(out_dir)
    steps = DEFAULT_STEPS if steps is None else steps
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(model_config(tok))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        # Linear warm-up, then cosine decay to 5% of the peak.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    for step in range(steps):
        ids, labels, mask = _batch(tok, rng, BATCH)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    torch.use_deterministic_algorithms(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    stats = {
        "seed": seed,
        "steps": steps,
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (out_dir / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

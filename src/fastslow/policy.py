"""The policy: a Hugging Face causal LM (+ optional LoRA) with its tokenizer, and a frozen base.

Rows are laid out as ``[left-padded prompt | right-padded completion]`` so every completion starts
at the same column; logits for completion tokens are then one slice for the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from fastslow.config import ModelConfig
from fastslow.threads import WAIT

# peft 0.21 calls transformers' deprecated is_gradient_checkpointing on every LoRA load (a warning in every run's log,
# the CLI's and the benchmarks' alike); not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def resolve_model_path(path: str) -> str:
    """A registered alias (``micro``, ...) -> its local directory; other paths unchanged."""
    from fastslow import registry

    return registry.resolve_model(path)


@dataclass
class Batch:
    """Prompts and sampled completions of one generation call; row i of every tensor belongs together."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded; includes the eos token when one was produced
    completion_mask: torch.Tensor  # [B, C]
    texts: list[str]  # decoded completions, special tokens removed
    logprobs: torch.Tensor | None = None  # [B, C] the sampler's log-probs of the completion tokens, when it gives them

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Batch:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Batch(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            [self.texts[i] for i in idx.tolist()],
            None if self.logprobs is None else self.logprobs[idx],
        )


class Policy:
    """A causal LM being trained, a frozen view of its base, and a ``version`` bumped on every update."""

    def __init__(self, model, tokenizer, device: torch.device, base_model=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.is_lora = hasattr(model, "disable_adapter")
        # Full fine-tuning keeps a frozen copy; LoRA reuses the weights with the adapter disabled.
        self._base = base_model
        self.version = 0
        self.trained_start = False  # loaded from trained weights (a checkpoint), not the model's own
        # Prompt tokens shared by rows are run once; off where every forward is a collective (sharded weights):
        # ranks holding different prompts would run different numbers of forwards and wait on each other.
        self.share_prompts = True
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        # Prompts recur (a group's rollouts, every evaluation's problems): each text is tokenized once.
        self._token_ids: dict[str, list[int]] = {}
        self._counts: dict[str, int] = {}
        self._specials = tuple(sorted(tokenizer.special_tokens_map.items(), key=str))  # a chat template may use them

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: ModelConfig, weights: str | Path | None = None) -> Policy:
        """Load ``cfg.path``; ``weights`` (a checkpoint's ``model/`` dir) replaces the trained part."""
        hf_logging.disable_progress_bar()  # per-shard bars would break our own progress display
        path = resolve_model_path(cfg.path)
        if cfg.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        if not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
            raise FileNotFoundError(f"model path not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        if cfg.lora is not None:
            from peft import LoraConfig, PeftModel, get_peft_model

            if weights is not None:
                model = PeftModel.from_pretrained(base, str(weights), is_trainable=True)
            else:
                lcfg = LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=cfg.lora.target_modules,
                    task_type="CAUSAL_LM",
                )
                model = get_peft_model(base, lcfg)
            policy = cls(model, tokenizer, device)
            policy.trained_start = weights is not None
            return policy
        frozen = copy.deepcopy(base).eval().requires_grad_(False)
        if weights is not None:
            base = AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype).to(device)
        policy = cls(aligned(base), tokenizer, device, base_model=frozen)
        policy.trained_start = weights is not None
        return policy

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's whole state, where it must be gathered first (sharded weights); None: :meth:`save` reads it.

        Called on every process of a run (a collective under sharding), before the main process saves.
        """
        return None

    def weights_sha256(self, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        """sha256 of the whole weights (``state_dict``, else the model's own), names and bytes in name order."""
        state = self.model.state_dict() if state_dict is None else state_dict
        digest = hashlib.sha256()
        for name in sorted(state):
            t = state[name].detach()
            t = t.to_local() if hasattr(t, "to_local") else t  # a sharded parameter: this rank's shard
            digest.update(name.encode())
            digest.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Weights (the adapter alone under LoRA) and tokenizer, loadable by ``from_pretrained``."""
        self.model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
        self.tokenizer.save_pretrained(str(out))

    # ---- prompts ------------------------------------------------------------------------------
    def format(self, system: str, user: str) -> str:
        """The prompt text: the chat template when the tokenizer has one, else plain text."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return f"{system}\n\n{user}\n" if system else f"{user}\n"
        # Memoised across policies of a process: a benchmark worker formats the same problems run after run.
        key = (template, self._specials, system, user)
        text = _FORMATTED.get(key)
        if text is None:
            messages = [{"role": "user", "content": user}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            _bound(_FORMATTED, 1 << 17)
            _FORMATTED[key] = text
        return text

    def count_tokens(self, text: str) -> int:
        """The number of tokens of ``text`` (no special tokens added), memoised."""
        n = self._counts.get(text)
        if n is None:
            n = len(self._token_ids.get(text) or self.tokenizer(text, add_special_tokens=False)["input_ids"])
            _bound(self._counts, 1 << 16)
            self._counts[text] = n
        return n

    def _encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``prompts``, left-padded, and their mask (as the tokenizer pads them)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._token_ids]
        if new:
            _bound(self._token_ids, extra=len(new))
            self._token_ids.update(zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"], strict=True))
        rows = [self._token_ids[p] for p in prompts]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long).view(len(rows), width)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids.to(self.device), mask.view(len(rows), width).to(self.device)

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        seed: int,
        use_base: bool = False,
        max_batch: int = 256,
        streamer=None,
    ) -> Batch:
        """Sample one completion per prompt (repeat a prompt for a group). ``temperature=0`` is greedy.

        Seeded per call so that a run (and a resumed run) draws the same samples on CPU. Prompt tokens
        shared by rows are run once (:func:`share_prefixes`); the draws are the same as without sharing.
        ``streamer`` (a transformers ``BaseStreamer``) receives each step's new tokens, one per row (the
        server's SSE streams).
        """
        torch.manual_seed(seed)
        model = self.base_model if use_base else self.model
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        parts = []
        for start in range(0, len(prompts), max_batch):
            ids, mask = self._encode_prompts(prompts[start : start + max_batch])
            inputs = {"input_ids": ids, "attention_mask": mask}
            with self._eval_mode(model):
                shared = share_prefixes(ids, mask, pad) if self.share_prompts else None
                cache = None
                if shared is not None:
                    # The cache holds every prompt token but the last, which generate runs as its first step.
                    inputs = {"input_ids": shared.row_ids(), "attention_mask": shared.row_mask()}
                    cache = prefill(model, shared, drop_last=True)[0]
                cache = inputs["past_key_values"] = cache if cache is not None else DynamicCache()
                with live_rows(model, cache, eos), decode_threads(model):
                    out = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        eos_token_id=eos,
                        pad_token_id=pad,
                        **(sampling if temperature > 0 else {"do_sample": False}),
                        **({"streamer": streamer} if streamer is not None else {}),
                    )
            completion = out[:, inputs["input_ids"].shape[1] :]
            # Tokens after the first eos are padding; the eos itself is the policy's choice to stop.
            is_eos = completion == eos
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            cmask = (~after_eos).long()
            completion = completion.masked_fill(after_eos, pad)
            parts.append((ids, mask, completion, cmask))
        prompt_ids, prompt_mask = _pad_cat([p[0] for p in parts], [p[1] for p in parts], pad, left=True)
        comp_ids, comp_mask = _pad_cat([p[2] for p in parts], [p[3] for p in parts], pad, left=False)
        texts = self.tokenizer.batch_decode(comp_ids.masked_fill(comp_mask == 0, pad), skip_special_tokens=True)
        return Batch(prompt_ids, prompt_mask, comp_ids, comp_mask, texts)

    # ---- scoring ------------------------------------------------------------------------------
    def make_batch(self, prompts: Sequence[str], completions: Sequence[str], *,
                   add_eos: bool | Sequence[bool] = True) -> Batch:
        """A Batch of given (formatted prompt, completion text) pairs, to score completions not sampled here.

        ``add_eos``: end every completion (or, one flag per row, those that stopped) with the eos token."""
        prompt_ids, prompt_mask = self._encode_prompts(prompts)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ends = [add_eos] * len(completions) if isinstance(add_eos, bool) else list(add_eos)
        rows = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + ([eos] if end else [])
                for c, end in zip(completions, ends, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return Batch(prompt_ids, prompt_mask, ids.to(self.device), mask.to(self.device), list(completions))


    def completion_logits(self, batch: Batch, *, use_base: bool = False) -> torch.Tensor:
        """Logits [B, C, V] (float32) predicting each completion token, given prompt and earlier tokens.

        Gradients flow unless called under ``torch.no_grad()`` or with ``use_base``. Only completion
        positions get logits, and prompt tokens shared by rows are run once (:func:`share_prefixes`);
        gradients through a shared prefix sum over its rows, as they would with one copy per row.
        """
        p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        with contextlib.ExitStack() as stack:
            model = self.model
            if use_base:
                stack.enter_context(torch.no_grad())
                model = self.base_model
            if not torch.is_grad_enabled():  # the policy's weights too when they are the base's (LoRA, aliases)
                stack.enter_context(_frozen(self.model))
            # Rows repeating a prompt share it; a head common to distinct prompts is not split off here: scoring
            # distinct rows (drift probes, evaluation) keeps the one-forward kernels, which the drift meter's
            # base == policy check at step 0 compares bit for bit across engines.
            shared = (share_prefixes(batch.prompt_ids, batch.prompt_mask, self.tokenizer.pad_token_id, head=False)
                      if self.share_prompts else None)
            if shared is None:
                ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
                mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
                position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions start at 0
                # logits_to_keep: the [B, P, V] prompt logits would be thrown away (and dominate memory)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               logits_to_keep=c + 1).logits[:, :-1]
            else:
                cache, first = prefill(model, shared, drop_last=False)  # first: logits of completion token 0
                logits = first
                if c > 1:
                    mask = torch.cat([shared.row_mask(), batch.completion_mask[:, :-1]], dim=1)
                    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -(c - 1) :]
                    rest = model(input_ids=batch.completion_ids[:, :-1], attention_mask=mask,
                                 position_ids=position_ids, past_key_values=cache).logits
                    logits = torch.cat([first, rest], dim=1)
        assert logits.shape[1] == c, (logits.shape, p, c)
        return logits.float()

    @staticmethod
    def token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
        """log pi(y_t | ...) for the sampled tokens: [B, C].

        As ``log_softmax(logits).gather(y)``, without keeping a second [B, C, V] tensor for the backward pass.
        """
        picked = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    def passes(self, batch: Batch, group: torch.Tensor) -> list[torch.Tensor]:
        """Rows of ``batch`` split into forward/backward passes of whole groups (``group``: each row's group, rows
        of a group adjacent), each pass's activations within :data:`PASS_BYTES` (on CPU; one pass elsewhere).

        The update's memory is its activations, proportional to the tokens of a pass; gradients of the
        passes add up to the whole batch's.
        """
        rows = torch.arange(len(batch))
        cfg = getattr(self.model, "config", None)
        hidden, layers = getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None)
        if self.device.type != "cpu" or not hidden or not layers:
            return [rows]
        c = batch.completion_ids.shape[1]
        per_row = batch.prompt_mask.sum(1) + c  # tokens each row runs (an upper bound under shared prefixes)
        row_bytes = per_row * hidden * layers * ACTIVATION_FLOATS * 4 + c * cfg.vocab_size * 4 * 3
        passes, current, used = [], [], 0
        for g in torch.unique_consecutive(group):
            members = rows[group == g]
            cost = int(row_bytes[members].sum())
            if current and used + cost > PASS_BYTES:
                passes.append(torch.cat(current))
                current, used = [], 0
            current.append(members)
            used += cost
        return [*passes, torch.cat(current)] if current else [rows]

    # ---- base and parameters ------------------------------------------------------------------
    @property
    def base_model(self):
        if self._base is not None:
            return self._base
        return _AdapterDisabled(self.model)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def finite(self) -> bool:
        """True when every trainable parameter is finite (a sharded one is checked shard by shard)."""
        return all(bool(torch.isfinite(p).all()) for _, p in self.trainable_parameters())

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """Base values of the trainable parameters (zeros for LoRA's B matrices: the adapter starts at 0)."""
        if self._base is None:
            return {}
        return dict(self._base.named_parameters())

    @contextlib.contextmanager
    def _eval_mode(self, model) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


_FORMATTED: dict[tuple, str] = {}  # Policy.format's texts


@contextlib.contextmanager
def decode_threads(model) -> Iterator[None]:
    """Forwards of one token per row (decoding) on one torch thread when idle OpenMP threads sleep (passive
    waiting, fastslow's default); forwards of whole prompts keep every thread.

    A decode step is hundreds of small kernels; waking sleeping threads for each costs more than they add
    (SmolLM2-135M, 16 rows x 32 tokens on 2 cores: 12.3 s on 2 passive threads, 7.8 s on one, 7.2 s on 2
    spinning ones, which in turn lose 3x beside other work). Acts only on the thread that entered.
    """
    n = torch.get_num_threads()
    if n == 1 or os.environ.get(WAIT, "").upper() != "PASSIVE":
        yield
        return
    owner = threading.get_ident()

    def by_width(_module, args) -> None:
        if threading.get_ident() == owner:
            torch.set_num_threads(1 if args[0].shape[-1] == 1 else n)

    handle = _generating_module(model).get_input_embeddings().register_forward_pre_hook(by_width)
    try:
        yield
    finally:
        handle.remove()
        torch.set_num_threads(n)


def _bound(memo: dict, size: int = 1 << 14, extra: int = 1) -> None:
    """Start a memo afresh before it would hold more than ``size`` entries (prompts recur within a few steps)."""
    if len(memo) + extra > size:
        memo.clear()


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    """Weights marked as not needing gradients for a no-grad forward.

    torch's matmul picks its kernel by whether the weight requires grad, even under ``no_grad``; a
    trained model must compute exactly what its frozen copy does on the same weights (KL exactly 0).
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def aligned(model):
    """The model with its weights in memory of its own (as its frozen deep copy), not in the file's mapping.

    Matrix kernels take other paths on unaligned data, so a model read from a file and its frozen copy could
    differ in the last bit on the same input: the drift meter must read exactly 0 before any update.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


class _AdapterDisabled:
    """Calls a peft model with its adapter disabled: the LoRA policy's base, without a second copy."""

    def __init__(self, peft_model) -> None:
        self._m = peft_model

    def __call__(self, *args, **kwargs):
        with self._m.disable_adapter(), torch.no_grad():
            return self._m(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._m.disable_adapter(), torch.no_grad():
            return self._m.generate(*args, **kwargs)


# The update's passes (Policy.passes): activations kept for the backward pass, in floats per token, hidden unit
# and layer (a Llama layer keeps its norms, projections, attention and MLP inputs: ~16 hidden-sized tensors),
# and the bytes one pass may hold.
ACTIVATION_FLOATS = 16
PASS_BYTES = 1 << 30

# Below this many common leading tokens a separate prefill of them costs more than it saves.
MIN_SHARED_TOKENS = 8


@dataclass
class SharedPrefixes:
    """How the rows of a left-padded prompt batch share tokens, so that each shared token is run once.

    Every row's prompt is ``shared`` (the tokens all rows start with) followed by its tail; rows with
    the same prompt (a group's G rollouts of one context and problem) share one tail. Laid out for the
    model as ``[shared | left-padded tail]``: the mask's hole between them changes nothing, since
    positions come from the mask and masked keys get no attention.
    """

    shared: torch.Tensor  # [1, L] the leading tokens of every row (L may be 0)
    inverse: torch.Tensor  # [B] row -> its distinct prompt
    tail_ids: torch.Tensor  # [U, S] each distinct prompt after the shared tokens, left-padded
    tail_mask: torch.Tensor  # [U, S]

    def row_ids(self) -> torch.Tensor:
        """[B, L + S] the rows' prompt tokens in this layout."""
        b = len(self.inverse)
        return torch.cat([self.shared.expand(b, -1), self.tail_ids[self.inverse]], dim=1)

    def row_mask(self) -> torch.Tensor:
        b, width = len(self.inverse), self.shared.shape[1]
        ones = self.tail_mask.new_ones((b, width))
        return torch.cat([ones, self.tail_mask[self.inverse]], dim=1)


def share_prefixes(ids: torch.Tensor, mask: torch.Tensor, pad: int, *, head: bool = True) -> SharedPrefixes | None:
    """The sharing in a left-padded batch, or None when no token would be run fewer times.

    Every tail keeps at least one token: generation starts from a prompt's last token, and scoring
    needs the logits at each prompt's last position.
    """
    rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids.cpu(), mask.cpu(), strict=True)]
    distinct: dict[tuple[int, ...], int] = {}
    inverse = [distinct.setdefault(r, len(distinct)) for r in rows]
    prompts = list(distinct)
    width = 0
    limit = min(len(r) for r in prompts) - 1
    while width < limit and all(r[width] == prompts[0][width] for r in prompts):
        width += 1
    if width < MIN_SHARED_TOKENS or not head:
        width = 0
    if width == 0 and len(prompts) == len(rows):
        return None
    tails = [r[width:] for r in prompts]
    s = max(len(t) for t in tails)
    tail_ids = torch.full((len(tails), s), pad, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), s), dtype=torch.long)
    for i, t in enumerate(tails):
        tail_ids[i, s - len(t) :] = torch.tensor(t, dtype=torch.long)
        tail_mask[i, s - len(t) :] = 1
    dev = ids.device
    return SharedPrefixes(torch.tensor([prompts[0][:width]], dtype=torch.long, device=dev),
                          torch.tensor(inverse, dtype=torch.long, device=dev), tail_ids.to(dev), tail_mask.to(dev))


def prefill(model, shared: SharedPrefixes, *, drop_last: bool):
    """Run the prompt tokens once each: the shared ones in one row, each distinct tail in one row; the
    KV cache is then expanded to every row. Returns (cache for the B rows, logits [B, 1, V] at each
    prompt's last position; None with ``drop_last``, which leaves each prompt's last token out)."""
    cache, width = None, shared.shared.shape[1]
    n_tails = len(shared.tail_ids)
    if width:
        cache = model(input_ids=shared.shared, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_select_indices(torch.zeros(n_tails, dtype=torch.long, device=shared.shared.device))
    ids, tmask = shared.tail_ids, shared.tail_mask
    if drop_last:
        ids, tmask = ids[:, :-1], tmask[:, :-1]
    logits = None
    if ids.shape[1]:
        mask = torch.cat([tmask.new_ones((n_tails, width)), tmask], dim=1)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, width:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits
    if cache is not None:
        cache.batch_select_indices(shared.inverse)
    return cache, (None if drop_last else logits[shared.inverse])


# Matrix kernels give a row the same numbers in any batch of at least a few rows (a handful of rows take other
# paths): decoding never drops below this many rows, so every row's logits are those of the whole batch.
MIN_LIVE_ROWS = 8


def _generating_module(model):
    """The module whose forward ``model.generate`` calls (a LoRA policy's base view wraps the peft model)."""
    lm = getattr(model, "_m", model)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


_LIVE = threading.local()  # per thread: {id(module): the state of the generate call it runs on that module}
_HOOKING = threading.Lock()


@contextlib.contextmanager
def live_rows(model, cache: DynamicCache, eos: int | None) -> Iterator[None]:
    """While ``model.generate`` runs: each decoding step runs only the rows that have not stopped yet.

    A row stops at its eos; generate then pads it whatever its logits, so they are not computed (zeros stand in:
    the sampler's draws, one per row and token of the vocabulary, are the same). Once at most 3/4 of the rows in
    the batch still run, ``cache`` keeps only those (at least :data:`MIN_LIVE_ROWS`; a smaller batch keeps all).
    """
    lm = _generating_module(model)
    if eos is None:
        yield
        return
    # The hooks stay on the module for good: serve runs forwards of the same module in a second thread, and torch
    # adds or removes a hook in unlocked steps that such a forward may meet half done. They act only on forwards of
    # a thread inside live_rows.
    with _HOOKING:
        if not getattr(lm, "_fastslow_live_rows", False):
            lm.register_forward_pre_hook(_live_before, with_kwargs=True)
            lm.register_forward_hook(_live_after, with_kwargs=True)
            lm._fastslow_live_rows = True
    states = _LIVE.__dict__.setdefault("states", {})
    states[id(lm)] = {"cache": cache, "eos": eos}
    try:
        yield
    finally:
        states.pop(id(lm), None)


def _live_before(module, args, kwargs=None):  # kwargs=None: called while torch was still adding the hook
    state = getattr(_LIVE, "states", {}).get(id(module))
    ids = None if kwargs is None else kwargs.get("input_ids")
    if state is None or args or ids is None:
        return None
    b = ids.shape[0]
    if "rows" not in state:  # the first forward (the prompt): every row
        state.update(b=b, rows=torch.arange(b, device=ids.device), done=torch.zeros(b, dtype=torch.bool,
                                                                                 device=ids.device))
        return None
    state["done"] |= ids[:, -1] == state["eos"]
    rows, done = state["rows"], state["done"]
    live = (~done[rows]).nonzero().squeeze(1)  # positions in the cache
    if b >= MIN_LIVE_ROWS and len(live) <= 3 * len(rows) // 4 and len(rows) > MIN_LIVE_ROWS:
        if len(live) < MIN_LIVE_ROWS:  # stopped rows fill up to the minimum
            stopped = done[rows].nonzero().squeeze(1)[: MIN_LIVE_ROWS - len(live)]
            live = torch.sort(torch.cat([live, stopped])).values
        state["cache"].batch_select_indices(live)
        rows = state["rows"] = rows[live]
    if len(rows) == b:
        return None
    kwargs = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
              for k, v in kwargs.items()}
    return args, kwargs


def _live_after(module, _args, *kwargs_output):  # (kwargs, output), or (output,) while torch was adding the hook
    state = getattr(_LIVE, "states", {}).get(id(module))
    rows = None if state is None else state.get("rows")
    if rows is None or len(rows) == state["b"]:
        return None
    output = kwargs_output[-1]
    logits = output.logits.new_zeros((state["b"], *output.logits.shape[1:]))
    logits[rows] = output.logits
    output.logits = logits
    return output


def _pad_cat(
    ids: list[torch.Tensor], masks: list[torch.Tensor], pad: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(t.shape[1] for t in ids)
    out_ids, out_masks = [], []
    for t, m in zip(ids, masks, strict=True):
        extra = width - t.shape[1]
        if extra:
            fill = t.new_full((t.shape[0], extra), pad)
            zeros = m.new_zeros((m.shape[0], extra))
            t, m = (torch.cat([fill, t], 1), torch.cat([zeros, m], 1)) if left else (
                torch.cat([t, fill], 1),
                torch.cat([m, zeros], 1),
            )
        out_ids.append(t)
        out_masks.append(m)
    return torch.cat(out_ids), torch.cat(out_masks)

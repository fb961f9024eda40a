"""Retrieval per problem over lesson texts and case problems (``fast.memory.retriever``).

- ``bm25``: BM25 (the ``bm25s`` library). Tokens: bm25s's word tokenizer with English stop words, no
  stemming. A corpus or query with no indexable word scores every entry 0.
- ``dense``: cosine similarity of the policy's own hidden states (:func:`hidden_state_embedder`: the current
  weights' last hidden state, mean-pooled over the text's tokens, L2-normalised; no other model). Vectors are
  cached by text (:class:`EmbeddingCache`) and the cache is emptied when the weights' version changes.
- ``hybrid``: reciprocal-rank fusion of the two, ``sum 1 / (RRF_K + rank)`` (rank 1 = best; tied scores share
  the best rank, so a retriever with no opinion, e.g. BM25 without a shared word, leaves the order to the other).

Every index covers the whole memory (BM25's is rebuilt only when the memory's texts change); a view (one task,
or every task) filters the scored entries afterwards; ties fall back to the entries' own order (utility,
recency). Any failure is a :class:`RetrievalError`: the caller ranks that query without retrieval and counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import bm25s
import numpy as np

RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009): damps the weight of the very top ranks
EMBED_MAX_TOKENS = 512  # a longer text is embedded from its first tokens
EMBED_BATCH = 32  # texts per embedding forward
EMBED_MIN_WIDTH = 8  # texts are right-padded to a power of two above their length, at least this


class RetrievalError(RuntimeError):
    """The retriever failed on a query; the caller ranks without it and counts the failure."""


class Retriever(Protocol):
    def scores(self, docs: Sequence[str], query: str) -> np.ndarray:
        """One score per doc, higher = more relevant; raises :class:`RetrievalError`."""
        ...


class BM25Index:
    """Scores of ``docs`` against a query text, BM25 (Lucene variant, bm25s defaults)."""

    def __init__(self) -> None:
        self._docs: tuple[str, ...] | None = None
        self._model: bm25s.BM25 | None = None

    def _build(self, docs: Sequence[str]) -> None:
        self._docs, self._model = tuple(docs), None
        tokens = bm25s.tokenize(list(docs), stopwords="en", show_progress=False, return_ids=False)
        if any(tokens):  # bm25s cannot index a corpus without a single word
            model = bm25s.BM25()
            model.index(tokens, show_progress=False)
            self._model = model

    def scores(self, docs: Sequence[str], query: str) -> np.ndarray:
        if not docs:
            return np.zeros(0)
        try:
            if self._docs != tuple(docs):
                self._build(docs)
            words = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
            if self._model is None or not words:
                return np.zeros(len(docs))
            out = np.asarray(self._model.get_scores(list(words)), dtype=float)
        except Exception as exc:  # noqa: BLE001 - a retriever fault costs ranking quality, never the run
            self._docs = None
            raise RetrievalError(f"bm25 retrieval failed: {type(exc).__name__}: {exc}") from None
        return np.nan_to_num(out, nan=0.0)


Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] unit vectors (a zero row: nothing to embed)


class EmbeddingCache:
    """``embed`` with its vectors kept by text; all of them are dropped when ``version()`` (the weights') moves,
    or when more than ``max_texts`` are held (they are recomputed the same: a vector never depends on its batch)."""

    def __init__(self, embed: Embed, version: Callable[[], int], max_texts: int = 8192) -> None:
        self.embed, self.version, self.max_texts = embed, version, max_texts
        self._vectors: dict[str, np.ndarray] = {}
        self._version: int | None = None
        self.embedded = 0  # texts embedded (cache misses), for tests and timing

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._version != self.version() or len(self._vectors) > self.max_texts:
            self._vectors, self._version = {}, self.version()
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = np.asarray(self.embed(missing), dtype=np.float32)
            if vectors.shape[0] != len(missing) or not np.isfinite(vectors).all():
                raise ValueError(f"embedder returned {vectors.shape} (finite: {np.isfinite(vectors).all()}) for "
                                 f"{len(missing)} texts")
            self._vectors.update(zip(missing, vectors, strict=True))
            self.embedded += len(missing)
        return np.stack([self._vectors[t] for t in texts])


class DenseIndex:
    """Cosine similarity of the docs' and the query's vectors (``embed`` gives unit vectors)."""

    def __init__(self, embed: Embed) -> None:
        self.embed = embed

    def scores(self, docs: Sequence[str], query: str) -> np.ndarray:
        if not docs:
            return np.zeros(0)
        try:
            vectors = self.embed([*docs, query])
            out = vectors[:-1].astype(np.float64) @ vectors[-1].astype(np.float64)
        except Exception as exc:  # noqa: BLE001 - a retriever fault costs ranking quality, never the run
            raise RetrievalError(f"dense retrieval failed: {type(exc).__name__}: {exc}") from None
        return out


def ranks(scores: np.ndarray) -> np.ndarray:
    """1 + the number of strictly higher scores: tied entries share the best rank."""
    return 1 + (scores[None, :] > scores[:, None]).sum(axis=1)


class HybridIndex:
    """Reciprocal-rank fusion of ``parts`` (BM25 and dense): each doc scores ``sum 1 / (RRF_K + rank)``. A part
    failing fails the query (one :class:`RetrievalError`)."""

    def __init__(self, *parts: Retriever) -> None:
        self.parts = parts

    def scores(self, docs: Sequence[str], query: str) -> np.ndarray:
        if not docs:
            return np.zeros(0)
        return sum(1.0 / (RRF_K + ranks(np.asarray(p.scores(docs, query), dtype=float))) for p in self.parts)


def make_retriever(kind: str, embed: Embed | None) -> Retriever:
    """The retriever ``fast.memory.retriever`` names; ``embed`` (the policy's, cached) for dense and hybrid."""
    if kind == "bm25":
        return BM25Index()
    if embed is None:
        raise ValueError(f"fast.memory.retriever {kind!r} needs the policy's hidden states (an embedder)")
    return DenseIndex(embed) if kind == "dense" else HybridIndex(BM25Index(), DenseIndex(embed))


def hidden_state_embedder(policy, *, max_tokens: int = EMBED_MAX_TOKENS, batch: int = EMBED_BATCH) -> Embed:
    """Texts -> unit vectors from ``policy``'s current weights: the last hidden state mean-pooled over the text's
    tokens (no special tokens added), L2-normalised; no gradients, dropout off.

    Any causal LM that returns ``hidden_states`` (the policy's own model: no other is loaded). Rows are
    right-padded to a width set by their own length alone (the next power of two, at least one pad: a forward
    with padding takes the same kernels as one without would not) and batched by width, so a text's vector is
    bit for bit the same whichever texts it is embedded with (a resumed run, its cache empty, reads the same
    contexts); its tokens never attend to a pad (causal). ``max_tokens``: at most this many, within the model's
    context.
    """
    import torch

    from fastslow.checks import context_limit

    tokenizer, model = policy.tokenizer, policy.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = context_limit(policy)
    cap = max(1, min(max_tokens, limit - 1) if limit else max_tokens)

    def width(n: int) -> int:
        w = max(EMBED_MIN_WIDTH, 1 << n.bit_length())  # > n
        return min(w, limit) if limit else w  # n < limit: one pad still fits

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        rows = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=cap)["input_ids"] for t in texts]
        out: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r:
                groups.setdefault(width(len(r)), []).append(i)
        was_training = model.training
        model.eval()
        try:
            for w, members in sorted(groups.items()):
                for start in range(0, len(members), batch):
                    chunk = members[start : start + batch]
                    ids = torch.full((len(chunk), w), pad, dtype=torch.long)
                    mask = torch.zeros((len(chunk), w), dtype=torch.long)
                    for j, i in enumerate(chunk):
                        ids[j, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                        mask[j, : len(rows[i])] = 1
                    ids, mask = ids.to(policy.device), mask.to(policy.device)
                    h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                              logits_to_keep=1).hidden_states[-1].float()
                    m = mask.unsqueeze(-1).to(h.dtype)
                    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                    for j, i in enumerate(chunk):
                        out[i] = pooled[j].cpu().numpy()
        finally:
            model.train(was_training)
        dim = next((v.shape[0] for v in out if v is not None), getattr(model.config, "hidden_size", 1))
        zero = np.zeros(dim, dtype=np.float32)  # a text without a token: similar to nothing
        return np.stack([v if v is not None else zero for v in out])

    return embed

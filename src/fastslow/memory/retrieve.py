"""Retrieval per problem: BM25 (the ``bm25s`` library) over lesson texts and case problems.

The index covers the whole memory and is rebuilt only when the memory's texts change; a view (one task, or
every task) filters the scored entries afterwards. A corpus or query with no indexable word scores every
entry 0 (ranking then falls back to the entries' own order: utility, recency). Tokens: bm25s's word
tokenizer with English stop words, no stemming.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np


class RetrievalError(RuntimeError):
    """The retriever failed on a query; the caller ranks without it and counts the failure."""


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

"""Tasks for the two-process failure tests: a verifier that fails in one process only."""

from __future__ import annotations

import os

from conftest import VowelTask


class Rank0BrokenTask(VowelTask):
    """Vowel rewards, except that the verifier raises in the process of rank 0 (its share of every batch)."""

    def verify(self, problem, completion):
        if os.environ.get("RANK", "0") == "0":
            raise RuntimeError("verifier backend unreachable from this host")
        return super().verify(problem, completion)


def rank0_broken_task() -> Rank0BrokenTask:
    return Rank0BrokenTask("vowel")

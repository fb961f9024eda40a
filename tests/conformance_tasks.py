"""The conformance suite's task: fastslow.conformance's vowel task, whose verifier kills the training process with
SIGKILL once a given checkpoint exists (a kill -9 at a known point of the run, on every rank)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from fastslow.conformance import VowelTask


class KillableVowelTask(VowelTask):
    def __init__(self) -> None:
        super().__init__()
        self.owner = os.getpid()  # the training process (a verifier may run in a worker it forked)

    def verify(self, problem, completion):
        marker = os.environ.get("FASTSLOW_TEST_KILL_AFTER")
        if marker and Path(marker).is_dir():
            os.kill(self.owner, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)  # a forked verifier worker goes with it
        return super().verify(problem, completion)


def killable_vowel_task() -> KillableVowelTask:
    return KillableVowelTask()

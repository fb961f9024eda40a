"""Training runs side by side: independent configs in worker processes, each on its own share of the CPUs.

A small model's run keeps one core busy (see :func:`fastslow.threads.fit_model`); on a machine with more, the
demo's five methods and its probes need not wait for each other. Each worker gets ``share(cpus, workers)``
threads and passive waiting, so workers do not oversubscribe the machine; a run gives the same metrics in a
worker as in the main process (the same seed, the same thread count). Workers are *spawned* (not forked from a
process that may already hold OpenMP threads), and each one's steps are relayed to the caller as
``watch(label, done, total, row)`` in the calling process. As with any spawned pool, a script that uses it
needs ``if __name__ == "__main__":`` around its work (each worker imports the script's main module).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from fastslow import threads
from fastslow.config import Config

Watch = Callable[[str, int, int, dict], None]
_EVENTS = _STOP = None  # in a worker: where its steps go; set when the caller stops the pool
_END = -1  # a run's last event


def _init(n_threads: int, events, stop) -> None:
    global _EVENTS, _STOP
    threads.worker_init(n_threads)
    _EVENTS, _STOP = events, stop
    # Ctrl-C (sent to the whole process group) interrupts a run, never the worker's own loop: an idle worker that
    # died of it would break the pool for the rest
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train(cfg: dict, label: str) -> dict | None:
    from fastslow.loop import Trainer

    def on_step(done: int, total: int, row: dict) -> None:
        _EVENTS.put((label, done, total, row))

    if _STOP.is_set():  # a job the pool had already handed over when another failed
        return None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return Trainer(Config.model_validate(cfg), force=True, on_step=on_step, log=lambda _: None).run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _EVENTS.put((label, _END, _END, {}))  # its steps are all relayed once this arrives


def default_workers(jobs: int) -> int:
    """As many workers as there are CPUs for one thread each, at most one per job."""
    return max(1, min(jobs, threads.usable_cpus()))


class Workers:
    """``workers`` spawned processes for training runs, kept for several :meth:`train` calls (a worker's start,
    importing torch, costs seconds); use as a context manager."""

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.events, self.stop = ctx.Queue(), ctx.Event()
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(
            threads.share(threads.usable_cpus(), workers), self.events, self.stop))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.events.close()

    def train(self, jobs: Sequence[tuple[str, Config]], watch: Watch | None = None) -> list[dict]:
        """Train every ``(label, cfg)`` (``force``: each overwrites its run dir); their summaries, in order. The
        first failure stops the other runs and is raised here."""
        futures: dict[Future, int] = {}
        try:
            futures = {self.pool.submit(_train, cfg.model_dump(mode="json"), label): i
                       for i, (label, cfg) in enumerate(jobs)}
            pending, ended = set(futures), 0
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                ended += _relay(self.events, watch)
                for future in done:
                    future.result()  # raises the worker's error
            _relay(self.events, watch, wait_for_ends=len(jobs) - ended)
            return [future.result() for future in sorted(futures, key=futures.get)]
        except BaseException as exc:
            # Stop the rest: queued jobs are cancelled, jobs already handed to a worker return at once, and
            # running ones are interrupted as Ctrl-C would (which, when it is the cause, reached them already).
            self.stop.set()
            stop_pool(self.pool, futures, interrupt=not isinstance(exc, KeyboardInterrupt))
            raise


def stop_pool(pool: ProcessPoolExecutor, futures: Iterable[Future], *, interrupt: bool) -> None:
    """Cancel ``futures`` not yet started and, with ``interrupt``, interrupt ``pool``'s workers as Ctrl-C would
    (leave it off when Ctrl-C is the cause: it reached them already)."""
    for future in futures:
        future.cancel()
    if interrupt:
        for pid in list(getattr(pool, "_processes", None) or {}):  # no public API before Python 3.14
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)


def _relay(events, watch: Watch | None, wait_for_ends: int = 0) -> int:
    """Pass on the events waiting; returns how many runs ended among them. With ``wait_for_ends``, keep waiting
    (5 s at most per event) until that many ended: a worker's queue is flushed by a thread of its own, so its last
    steps may arrive after its result."""
    ended = 0
    while True:
        try:
            event = events.get(timeout=5) if ended < wait_for_ends else events.get_nowait()
        except queue.Empty:
            return ended
        if event[1] == _END:
            ended += 1
        elif watch is not None:
            watch(*event)

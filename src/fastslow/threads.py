"""CPU threads: how many torch uses, and how idle ones wait.

On a shared or small machine two defaults cost the most (measured on 2 cores beside other work: an eval
took 336 s with them, 54 s without):

- OpenMP threads that *spin* while waiting for work steal the cores other threads need; passive waiting
  (``OMP_WAIT_POLICY=PASSIVE``) sleeps instead. The OpenMP runtime reads it once, when torch loads, so
  :func:`hygiene` must run before ``import torch`` (the CLI does it first thing).
- torch counts the machine's cores, not the CPUs this process may run on (``taskset``, containers, a
  pool worker's share): threads beyond those only queue.

Under passive waiting, decoding steps (many small kernels) run on one thread: see
:func:`fastslow.policy.decode_threads`.

A user's own ``OMP_WAIT_POLICY`` / ``OMP_NUM_THREADS`` always win; so does ``threads:`` in a config.
This module does not import torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

WAIT = "OMP_WAIT_POLICY"
NUM = "OMP_NUM_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def share(cpus: int, workers: int) -> int:
    """Threads for each of ``workers`` processes sharing ``cpus`` (at least 1)."""
    return max(1, cpus // max(1, workers))


def choose(requested: int | None, *, cpus: int, env: Mapping[str, str], workers: int = 1) -> int:
    """The thread count: ``requested`` (``--threads`` / ``threads:``), else the user's ``OMP_NUM_THREADS``,
    else this process's share of its usable CPUs."""
    if requested:
        return requested
    value = env.get(NUM, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return share(cpus, workers)


def hygiene(env: MutableMapping[str, str] | None = None, *, workers: int = 1) -> dict[str, str]:
    """Set passive waiting and this process's thread count in ``env`` (default ``os.environ``), each
    unless already set; returns what it set. Effective for torch only if it runs before torch is imported
    (child processes inherit it either way)."""
    env = os.environ if env is None else env
    changed = {}
    if WAIT not in env:
        changed[WAIT] = "PASSIVE"
    if not env.get(NUM, "").strip():
        changed[NUM] = str(choose(None, cpus=usable_cpus(), env=env, workers=workers))
    env.update(changed)
    if env is os.environ:
        _CHOSEN.update(changed)
    return changed


_CHOSEN: dict[str, str] = {}  # what hygiene() set in this process's environment (not the user's choices)

# Below this many parameters every kernel is small: a second thread costs more than it adds (micro model, 0.5 M
# parameters, 2 quiet cores: 0.42-0.43 s per step on one thread, 0.51-0.67 s on two passive ones).
SMALL_MODEL_PARAMS = 10_000_000


def fit_model(params: int) -> int:
    """One torch thread for a small model unless the user chose the count (``OMP_NUM_THREADS``; callers skip
    it for ``--threads`` / ``threads:``); returns the thread count now in use."""
    import torch

    user_set = bool(os.environ.get(NUM, "").strip()) and NUM not in _CHOSEN
    if params < SMALL_MODEL_PARAMS and not user_set and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def apply(requested: int | None = None, *, workers: int = 1) -> int:
    """Set torch's thread count (see :func:`choose`); returns it."""
    import torch

    n = choose(requested, cpus=usable_cpus(), env=os.environ, workers=workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def worker_init(threads: int) -> None:
    """Initializer of a process-pool worker: its own share of the CPUs (``share(cpus, workers)``), for
    torch and for any process it starts."""
    os.environ[NUM] = _CHOSEN[NUM] = str(threads)  # the share, not the user's count: fit_model may lower it
    os.environ.setdefault(WAIT, "PASSIVE")
    apply(threads)


def busy(load: float, cpus: int) -> bool:
    """More runnable work than CPUs by a clear margin (a load average of 3.5 on 2 CPUs, 81 on 64)."""
    return load >= 1.25 * cpus + 1


def load_note(cpus: int | None = None) -> str | None:
    """'machine busy: N CPUs, load L' when the 1-minute load average says the CPUs are oversubscribed."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = cpus or usable_cpus()
    return f"machine busy: {cpus} CPU{'s' * (cpus > 1)}, load {load:.1f}" if busy(load, cpus) else None

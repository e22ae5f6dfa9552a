"""How many CPU threads torch uses in a gradlocate process.

torch starts one intra-op thread per core. When other work shares the machine, those
threads oversubscribe the cores: a thread waits at every parallel section for a sibling
that the operating system has parked, and a run gets several times slower instead of
faster. Measured on a 2-core machine busy with other jobs (``benchmarks/bench_threads.py``,
``benchmarks/results/threads.md``; a fresh ``gradlocate select`` process each, SmolLM2,
8 ZsRE edits), torch's default of 2 threads took 127 s and 73 s for GradRatio where
1 thread took 40 s and 17 s, and 56 s against 19 s for LGA; the one run that met a
quiet moment gained 17 % from the second thread (8.0 s against 9.6 s). Losing at most
that against losing 3x, gradlocate's default is half of the cores this process may run
on, at most 4 (models of gradlocate's size gain little from more): 1 thread on a 2-core
machine, 2 on 4 cores, 4 on 8 or more.

The count, the first of these that is given:

1. ``set_threads(n)`` (the command line's ``--threads N``);
2. the environment variable ``GRADLOCATE_THREADS``;
3. ``OMP_NUM_THREADS``: torch follows it already, and it is left as it is;
4. :func:`default_threads`.

Example:
    >>> import torch
    >>> from gradlocate.threads import set_threads
    >>> before = torch.get_num_threads()
    >>> set_threads(1)
    1
    >>> set_threads(before) == before
    True
"""

from __future__ import annotations

import os

import torch

__all__ = ["ENV", "available_cores", "default_threads", "threads_from_env", "set_threads"]

#: The environment variable that sets the thread count of every gradlocate command.
ENV = "GRADLOCATE_THREADS"
#: The most threads the default gives.
MAX_DEFAULT = 4


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's limit),
    else the machine's logical CPU count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, n)


def default_threads() -> int:
    """Half of :func:`available_cores`, at least 1 and at most ``MAX_DEFAULT`` (4)."""
    return max(1, min(MAX_DEFAULT, available_cores() // 2))


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a whole number of threads >= 1, got {value!r}")
    return value


def threads_from_env() -> int | None:
    """The count ``GRADLOCATE_THREADS`` gives, or None when it is unset or empty."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        value: object = int(raw)
    except ValueError:
        value = raw
    return _count(value, f"{ENV}={raw!r}")


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count for this process: ``n``, else
    ``$GRADLOCATE_THREADS``, else nothing when ``OMP_NUM_THREADS`` is set (torch follows
    it already), else :func:`default_threads`. Returns the count torch now uses.

    Raises ``ValueError`` for a count below 1 (or a ``GRADLOCATE_THREADS`` that is not
    a whole number).
    """
    count = _count(n, "threads") if n is not None else threads_from_env()
    if count is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            return torch.get_num_threads()
        count = default_threads()
    torch.set_num_threads(count)
    return torch.get_num_threads()

"""Where independent cells run: in this process, or as tasks on Ray.

The single-edit matrix is thousands of independent (layer, edits) jobs. :func:`run_jobs`
runs ``work(job)`` for each and hands every result to ``done(job, result)`` in *this*
process, as it arrives, so the caller's record store stays the single source of truth:
whatever a worker computed counts once it is written there, and a job whose worker died
before that is simply run again.

    run_jobs(work, jobs, done, engine="local")     one after another, here
    run_jobs(work, jobs, done, engine="ray")       Ray tasks: every core of this machine
                                                   (a local Ray instance), or a cluster
                                                   with address="ray://head:10001" / "auto"
    run_jobs(work, jobs, done)                     "auto": Ray where it is installed

A job that raises is handed to ``done`` as its exception (the caller records it in its
place and the rest still runs); a worker process that dies has its job re-run by Ray, up to
``retries`` times. ``work`` and the jobs must pickle for Ray (a module-level function; the
model as a name :func:`~gradlocate.models.load_model` knows, or a model object, which
is put in Ray's object store once and loaded once per worker: :func:`shared`).

Example:
    >>> got = {}
    >>> run_jobs(abs, [-1, 2, -3], lambda job, r: got.__setitem__(job, r), engine="local", progress=False)
    3
    >>> got
    {-1: 1, 2: 2, -3: 3}
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

__all__ = ["ENGINES", "run_jobs", "ray_available", "shared", "resolve_engine"]

ENGINES = ("auto", "local", "ray")
J = TypeVar("J", bound=Hashable)


def ray_available() -> bool:
    """Whether Ray is installed (``pip install "gradlocate[ray]"``)."""
    return importlib.util.find_spec("ray") is not None


def resolve_engine(engine: str, address: str | None = None) -> str:
    """``"local"`` or ``"ray"`` for ``engine``; ``"auto"`` is Ray where it is installed.

    Example:
        >>> resolve_engine("local")
        'local'
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "local" and address is not None:
        raise ValueError("address= names a Ray cluster: use engine='ray' (or 'auto') with it")
    if engine == "ray" and not ray_available():
        raise ImportError('engine="ray" needs Ray: pip install "gradlocate[ray]" (or engine="local")')
    if engine == "auto":
        return "ray" if ray_available() else "local"
    return engine


def run_jobs(work: Callable[[J], Any], jobs: Sequence[J], done: Callable[[J, Any], None], *, engine: str = "auto",
             address: str | None = None, workers: int | None = None, threads: int = 1, retries: int = 3,
             progress: bool | None = None, desc: str = "jobs") -> int:
    """Run ``work(job)`` for every job and call ``done(job, result_or_exception)`` here as
    each finishes; returns the number of jobs run.

    Args:
        work: the job's computation (for Ray: a module-level function, it is pickled).
        jobs: independent, hashable jobs.
        done: receives each job's result, or the exception it raised.
        engine: ``"local"``, ``"ray"`` or ``"auto"`` (Ray where installed).
        address: a Ray cluster to join (``None``: start a local instance for the call).
        workers: Ray workers on a local instance (default: every core).
        threads: torch threads per Ray worker.
        retries: re-runs of a job whose worker process died.
        progress: a progress bar (``None``: on a terminal only).
    """
    from tqdm.auto import tqdm

    kind = resolve_engine(engine, address)
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=None if progress is None else not progress)
    try:
        if kind == "local":
            for job in jobs:
                done(job, _attempt(work, job))
                bar.update()
        else:
            _on_ray(work, jobs, done, address, workers, threads, retries, bar)
    finally:
        bar.close()
    return len(jobs)


def _attempt(work: Callable[[J], Any], job: J) -> Any:
    try:
        return work(job)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - handed to done(): reported in the job's place, the rest runs
        return e


def _on_ray(work: Callable[[J], Any], jobs: Sequence[J], done: Callable[[J, Any], None], address: str | None,
            workers: int | None, threads: int, retries: int, bar: Any) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance for this call only
        ray.init(address=address, num_cpus=None if address else (workers or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=1, max_retries=retries)(_in_worker)
        pending = {task.remote(work, job, threads): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised inside work(): the original exception
                    result = e.as_instanceof_cause()
                except ray.exceptions.RayError as e:  # the worker died more often than retries allow
                    result = e
                done(job, result)
                bar.update()
    finally:
        if started:
            ray.shutdown()


def _in_worker(work: Callable[[Any], Any], job: Any, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return work(job)


_SHARED: dict[str, Any] = {}


def shared(key: str, make: Callable[[], Any]) -> Any:
    """``make()`` once per process under ``key`` (a worker loads the model once, not per job).

    Example:
        >>> shared("doc-example", lambda: [1, 2]) is shared("doc-example", lambda: [3])
        True
    """
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]

"""The thread count of a gradlocate process: the default rule, and which setting wins."""

from __future__ import annotations

import pytest
import torch

from gradlocate import threads


@pytest.fixture(autouse=True)
def _keep_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    for v in ("GRADLOCATE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (16, 4), (128, 4)])
def test_default_is_half_the_cores_at_most_four(cores, expected, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.default_threads() == expected


def test_available_cores_is_the_affinity_mask():
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.available_cores() == expected >= 1


def test_precedence_explicit_then_env_then_omp_then_default(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)  # default: 2
    assert threads.set_threads() == 2 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)  # what torch does at start-up with OMP_NUM_THREADS=3
    assert threads.set_threads() == 3  # left as it is
    monkeypatch.setenv("GRADLOCATE_THREADS", "1")
    assert threads.set_threads() == 1 == torch.get_num_threads()
    assert threads.set_threads(2) == 2 == torch.get_num_threads()


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_bad_environment_value_names_the_variable(raw, monkeypatch):
    monkeypatch.setenv("GRADLOCATE_THREADS", raw)
    with pytest.raises(ValueError, match=f"GRADLOCATE_THREADS={raw!r}: expected a whole number of threads >= 1"):
        threads.set_threads()


def test_empty_environment_value_is_unset(monkeypatch):
    monkeypatch.setenv("GRADLOCATE_THREADS", " ")
    assert threads.threads_from_env() is None


@pytest.mark.parametrize("n", [0, -1, True])
def test_bad_count_is_refused(n):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="threads: expected a whole number of threads >= 1"):
        threads.set_threads(n)
    assert torch.get_num_threads() == before

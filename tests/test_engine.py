"""The matrix's engine: jobs here or as Ray tasks, results written by the caller, a dead
worker's job re-run, a failing job reported in its place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gradlocate.golden import engine
from gradlocate.golden.matrix import matrix
from gradlocate.golden.store import RecordStore
from gradlocate.models import tiny

EDITS = [{"prompt": "2 + 2 =", "target_new": "5"}, {"prompt": "The sky is", "target_new": "green"},
         {"prompt": "a b", "target_new": "c"}]
FAST = {"lr": 1e-2, "epochs": 3}


def _square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative job {x}")
    return x * x


def _die_once(job: tuple[str, int]) -> int:
    """Kills its worker process the first time it sees ``job`` (a marker file remembers)."""
    marker = Path(job[0]) / f"seen{job[1]}"
    if not marker.exists():
        marker.write_text("1")
        os._exit(1)
    return job[1] * 10


def test_local_jobs_report_failures_in_place():
    got: dict[int, object] = {}
    n = engine.run_jobs(_square_or_fail, [2, -1, 3], got.__setitem__, engine="local", progress=False)
    assert n == 3 and got[2] == 4 and got[3] == 9
    assert isinstance(got[-1], ValueError) and "negative job -1" in str(got[-1])


def test_engine_names_and_refusals():
    assert engine.resolve_engine("local") == "local"
    assert engine.resolve_engine("auto") == ("ray" if engine.ray_available() else "local")
    with pytest.raises(ValueError, match="engine must be one of"):
        engine.resolve_engine("spark")
    with pytest.raises(ValueError, match="address= names a Ray cluster"):
        engine.resolve_engine("local", "ray://head:10001")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")  # the [ray] extra; the test extra installs it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # workers import this file's job functions by name: put tests/ on their path
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_ray_jobs_failures_and_dead_workers(ray_instance, tmp_path):
    got: dict[object, object] = {}
    engine.run_jobs(_square_or_fail, [4, -2], got.__setitem__, engine="ray", progress=False)
    assert got[4] == 16 and isinstance(got[-2], ValueError) and "negative job -2" in str(got[-2])
    jobs = [(str(tmp_path), k) for k in range(3)]
    dead: dict[object, object] = {}
    engine.run_jobs(_die_once, jobs, dead.__setitem__, engine="ray", retries=2, progress=False)
    assert {j[1]: r for j, r in dead.items()} == {0: 0, 1: 10, 2: 20}  # each job's worker died once, re-run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seen0", "seen1", "seen2"]


def test_matrix_on_ray_equals_in_process(ray_instance, tmp_path):
    model, _ = tiny("llama", n_layers=2, d_model=32)
    here = matrix(model, EDITS, hparams=FAST, chunk=2, progress=False)
    there = matrix(model, EDITS, hparams=FAST, chunk=2, progress=False, engine="ray", out=tmp_path / "m.jsonl")
    for m in here.scores:
        np.testing.assert_allclose(there.scores[m], here.scores[m], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(there.capability, here.capability, atol=1e-6, equal_nan=True)
    # the caller wrote every cell: the record file is the single source of truth, and resumes
    assert len(RecordStore(tmp_path / "m.jsonl").read()) == 6
    again = matrix(model, EDITS, hparams=FAST, chunk=2, progress=False, engine="ray", out=tmp_path / "m.jsonl")
    np.testing.assert_array_equal(again.overall(), there.overall())

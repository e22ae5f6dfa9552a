"""The benchmarks' recorded results agree with their plain-PyTorch references: every
``benchmarks/results/*.json`` that records agreement checks has all of them passed (each
benchmark also exits non-zero when one fails, so a failing run is never recorded as
good). Speed targets are reported separately and are not checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CHECKED = ["gradients", "interventions", "locft", "tracing", "samplewise", "atp", "rome", "matrix_speed"]


@pytest.mark.parametrize("name", [n for n in CHECKED if (RESULTS / f"{n}.json").exists()])
def test_recorded_agreement_checks_all_passed(name):
    d = json.loads((RESULTS / f"{name}.json").read_text())
    checks = d.get("checks")
    assert isinstance(checks, dict) and checks, f"{name}.json records no agreement checks"
    failed = [k for k, ok in checks.items() if ok is not True]
    assert not failed, f"{name}.json records failed agreement checks: {failed}"


def test_the_core_benchmarks_have_results():
    missing = [n for n in ("gradients", "interventions", "locft", "tracing") if not (RESULTS / f"{n}.json").exists()]
    assert not missing, f"run the benchmarks that wrote these: {missing}"

"""Faults: an exception, a KeyboardInterrupt or a NaN injected at a random point of
LocFT-BF, a sweep or a comparison leaves every weight and buffer bit for bit as it
was, requires_grad flags and train/eval modes as they were, and no hook or nnsight
instrumentation behind. An interrupted sweep resumes from its JSONL file without
redoing finished layers."""

from __future__ import annotations

import math

import json
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.golden.sweep import SweepResult, sweep
from robust_helpers import numbers, EDITS, TRAINER, assert_same_state, call, model_state, no_instrumentation

KINDS = ("exception", "interrupt", "nan")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)
INJECTED: Counter = Counter()  # faults that fired, per scenario and kind (for the closing note)


class Injected(RuntimeError):
    pass


class Fault:
    """A forward hook that, at its ``k``-th call, raises an exception or a
    KeyboardInterrupt, or turns the module's output into NaN (k=0: only counts)."""

    def __init__(self, k: int = 0, kind: str = "exception"):
        self.k, self.kind, self.n, self.fired = k, kind, 0, False

    def __call__(self, module, args, out):
        self.n += 1
        if self.n != self.k:
            return None
        self.fired = True
        if self.kind == "exception":
            raise Injected(f"injected fault at call {self.k}")
        if self.kind == "interrupt":
            raise KeyboardInterrupt
        hidden = out[0] if isinstance(out, tuple) else out
        bad = torch.full_like(hidden, float("nan"))
        return (bad,) + tuple(out[1:]) if isinstance(out, tuple) else bad


@pytest.fixture(scope="module")
def model_tok():
    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, n_ctx=64, seed=4)


@pytest.fixture(scope="module", autouse=True)
def _report_injected():
    yield
    # Shown with `pytest -s`: the faults that fired (each example asserts that its fault fired).
    print("\nfaults injected:", dict(INJECTED), "total", sum(INJECTED.values()))


_COUNTS: dict = {}
_CLEAN: dict = {}


def _clean_run(key, run, after=None):
    """The fault-free result of ``run()`` (computed once)."""
    if key not in _CLEAN:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CLEAN[key] = run()
        if after is not None:
            after()
    return _CLEAN[key]


def _n_calls(key, model, run):
    """How many times the last decoder block runs in ``run()`` (computed once)."""
    if key not in _COUNTS:
        counter = Fault()
        h = model.model.layers[-1].register_forward_hook(counter)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
        finally:
            h.remove()
        _COUNTS[key] = counter.n
    return _COUNTS[key]


def _run_with_fault(model, run, k, kind):
    """Run with the fault armed at the k-th call of the last block; the outcome."""
    fault = Fault(k, kind)
    h = model.model.layers[-1].register_forward_hook(fault)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = run()
                return "completed", result, fault.fired
            except KeyboardInterrupt:
                return "interrupt", None, fault.fired
            except Injected:
                return "exception", None, fault.fired
            except (gl.NonFiniteLossError, gl.EditTrainingError) as e:
                return "nan-detected", e, fault.fired
    finally:
        h.remove()


def _expect(kind, outcome, result=None, clean=None):
    """An injected interrupt always propagates. An injected exception or NaN propagates
    (or is detected), unless it is caught by design - and then the run says so: a probe
    of a fast path that the fault ruled out (the trainer's cache or head mode differs from
    the fault-free run's), or one layer / one selector of a multi-part run reported in its
    place. A completed run's numbers are all finite."""
    if kind == "interrupt":
        assert outcome == "interrupt"
        return
    assert outcome in (("exception",) if kind == "exception" else ("nan-detected",)) + ("completed",)
    if outcome != "completed":
        return
    assert all(math.isfinite(x) for x in numbers(result)), "a completed run reports non-finite numbers"
    assert _reported(result, clean), "the fault was swallowed: the run completed as if nothing had happened"


def _modes(result):
    """Per trained layer: the executor the trainer chose, and any error reported."""
    if isinstance(result, gl.FitResult):
        return {result.layer: (result.cache_mode, result.head_mode)}
    if isinstance(result, gl.SweepResult):
        return {r.layer: (r.train.get("cache_mode"), r.train.get("head_mode"), r.error) for r in result.records}
    if isinstance(result, gl.Comparison):
        return {**_modes(result.sweep), **{r.selector: r.error for r in result.rows}}
    return {}


def _reported(result, clean):
    return _modes(result) != _modes(clean)


# --------------------------------------------------------------------------- LocFT-BF


@settings(max_examples=12, **SETTINGS)
@given(layer=st.integers(0, 3), kind=st.sampled_from(KINDS), data=st.data())
def test_fit_fault_in_any_forward_restores(model_tok, layer, kind, data):
    model, tok = model_tok
    ft = gl.LocFTBF(model, layer, tokenizer=tok, progress=False, **TRAINER)
    clean = _clean_run(("fit", layer), lambda: ft.fit(EDITS), ft.restore)
    total = _n_calls(("fit", layer), model, lambda: ft.fit(EDITS) and ft.restore())
    k = data.draw(st.integers(1, total), label="call")
    before = model_state(model)
    outcome, result, fired = _run_with_fault(model, lambda: ft.fit(EDITS), k, kind)
    assert fired
    INJECTED["LocFT-BF forward", kind] += 1
    _expect(kind, outcome, result, clean)
    if outcome == "completed":
        assert torch.isfinite(ft.handle.parameter).all()
        ft.restore()
    assert_same_state(before, model)
    assert no_instrumentation(model)


@settings(max_examples=12, **SETTINGS)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_fit_fault_at_any_step_restores(model_tok, kind, data):
    """The fault at the k-th optimizer step, from the callback: an exception, an
    interrupt, or a NaN written into the trained weight (the next loss is NaN, or - at
    the last step - the trained weight itself is checked)."""
    model, tok = model_tok
    n_steps = TRAINER["epochs"] * (len(EDITS) // TRAINER["edits_per_step"])
    k = data.draw(st.integers(1, n_steps), label="step")
    ft = gl.LocFTBF(model, 2, tokenizer=tok, progress=False, **TRAINER)
    calls = []

    def callback(step):
        calls.append((step.epoch, step.batch))
        if len(calls) == k:
            INJECTED["LocFT-BF step", kind] += 1
            if kind == "exception":
                raise Injected("injected")
            if kind == "interrupt":
                raise KeyboardInterrupt
            with torch.no_grad():
                ft.handle.parameter[0, 0] = float("nan")

    ft.callback = callback
    before = model_state(model)
    exc = {"exception": Injected, "interrupt": KeyboardInterrupt, "nan": gl.EditTrainingError}[kind]
    try:
        with pytest.raises(exc):
            ft.fit(EDITS)
        assert len(calls) == k
        assert_same_state(before, model)
        assert no_instrumentation(model)
    finally:
        ft.restore()  # a failing example must not break the next ones


# --------------------------------------------------------------------------- sweep and compare


@settings(max_examples=6, **SETTINGS)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_sweep_fault_anywhere_restores(model_tok, kind, data, tmp_path_factory):
    model, tok = model_tok
    total = _n_calls("sweep", model, lambda: call("sweep", model, tokenizer=tok))
    k = data.draw(st.integers(1, total), label="call")
    out = tmp_path_factory.mktemp("sweep") / "sweep.jsonl"
    clean = _clean_run("sweep", lambda: call("sweep", model, tokenizer=tok))
    before = model_state(model)
    outcome, result, fired = _run_with_fault(model, lambda: call("sweep", model, tokenizer=tok, out=out), k, kind)
    assert fired
    INJECTED["sweep", kind] += 1
    _expect(kind, outcome, result, clean)
    assert_same_state(before, model)
    assert no_instrumentation(model)


@settings(max_examples=6, **SETTINGS)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_compare_fault_anywhere_restores(model_tok, kind, data):
    model, tok = model_tok
    total = _n_calls("compare", model, lambda: call("compare", model, tokenizer=tok))
    clean = _clean_run("compare", lambda: call("compare", model, tokenizer=tok))
    k = data.draw(st.integers(1, total), label="call")
    before = model_state(model)
    outcome, result, fired = _run_with_fault(model, lambda: call("compare", model, tokenizer=tok), k, kind)
    assert fired
    INJECTED["compare", kind] += 1
    _expect(kind, outcome, result, clean)
    assert_same_state(before, model)
    assert no_instrumentation(model)


# --------------------------------------------------------------------------- resume


def test_interrupted_sweep_resumes_without_redoing_layers(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    layers = [0, 1, 2, 3]
    out = tmp_path / "sweep.jsonl"
    trained: list[int] = []
    real_fit = gl.LocFTBF.fit

    def counting_fit(self, edits):
        trained.append(self.layer)
        if self.layer == 2 and interrupt[0]:
            raise KeyboardInterrupt  # half way: layers 0 and 1 are finished
        return real_fit(self, edits)

    monkeypatch.setattr(gl.LocFTBF, "fit", counting_fit)
    interrupt = [True]
    before = model_state(model)
    with pytest.raises(KeyboardInterrupt):
        call("sweep", model, tokenizer=tok, layers=layers, out=out)
    assert_same_state(before, model)
    done = [json.loads(line)["layer"] for line in out.read_text().splitlines()]
    assert done == [0, 1] and trained == [0, 1, 2]
    # A line cut short by the interruption is tolerated.
    with out.open("a") as f:
        f.write('{"fingerprint": "abc", "lay')
    interrupt[0] = False
    trained.clear()
    resumed = call("sweep", model, tokenizer=tok, layers=layers, out=out)
    assert trained == [2, 3]  # only the unfinished layers
    assert_same_state(before, model)
    trained.clear()
    fresh = call("sweep", model, tokenizer=tok, layers=layers)
    assert trained == layers
    for a, b in zip(resumed.records, fresh.records):
        assert a.layer == b.layer and a.teacher_forced == pytest.approx(b.teacher_forced)
    assert SweepResult.load(out).layers == layers

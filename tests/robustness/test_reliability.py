"""Reliability, second round: one model used by two callers, gradient contexts,
corrupted or foreign sweep files, and unclear errors at the public boundary."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from robust_helpers import EDITS, TEXTS, assert_same_state, model_state

import gradlocate as gl
from gradlocate.cli import main
from gradlocate.models import tiny
from gradlocate.golden.store import StoreError
from gradlocate.golden.sweep import sweep

TRAINER = {"epochs": 2, "lr": 1e-2, "edits_per_step": 2}


@pytest.fixture(scope="module")
def model_tok():
    return tiny("gpt2", n_layers=3, d_model=32, seed=11)


# --------------------------------------------------------------------------- two callers on one model

CALLS = {
    "gradratio": lambda m: gl.gradratio(m, EDITS, TEXTS, min_layer=0, progress=False),
    "lga": lambda m: gl.lga(m, EDITS, progress=False),
    "fit": lambda m: gl.LocFTBF(m, 1, progress=False, **TRAINER).fit(EDITS),
    "causal_trace": lambda m: gl.causal_trace(m, "Paris is the capital of", "Paris", samples=2, progress=False),
}


@pytest.mark.parametrize("pair", [("gradratio", "gradratio"), ("fit", "fit"), ("lga", "causal_trace")])
def test_two_threads_on_one_model_get_a_clear_error_and_leave_it_unchanged(model_tok, pair):
    """Many races: each call either finishes or is refused at once with ModelBusyError;
    no other error, and the model's state is bit for bit what it was."""
    model, _ = model_tok
    before = model_state(model)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        try:
            CALLS[name](model)
            result = "done"
        except gl.ModelBusyError as e:
            assert "in use by another thread" in str(e)
            result = "busy"
        except BaseException as e:  # noqa: BLE001 - the test reports any other outcome
            result = f"{type(e).__name__}: {e}"
        with lock:
            outcomes.append(result)

    # fit restores nothing by itself: the racing fits run inside LocFTBF's undo context below
    for _ in range(12):
        threads = [threading.Thread(target=worker, args=(n,)) for n in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if "fit" in pair:  # a finished fit leaves its edit: put the weight back between rounds
            with torch.no_grad():
                for (n, p) in model.named_parameters():
                    p.copy_(before["params"][n]["bits"].view(p.dtype))
    assert all(o in ("done", "busy") for o in outcomes), outcomes
    assert outcomes.count("done") >= 12  # at least one of each pair always runs
    assert_same_state(before, model)


def test_a_model_in_use_is_refused_before_anything_changes(model_tok):
    model, _ = model_tok
    h = gl.down_projections(model)
    from gradlocate.interventions import using

    before = model_state(model)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with using(h):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    try:
        with pytest.raises(gl.ModelBusyError, match="one caller at a time"):
            gl.gradratio(model, EDITS, TEXTS, min_layer=0, progress=False)
    finally:
        release.set()
        t.join()
    assert_same_state(before, model)


# --------------------------------------------------------------------------- gradient contexts


@pytest.mark.parametrize("name", ["fit", "gradratio", "lga", "sweep"])
def test_gradients_are_enabled_inside_no_grad(model_tok, name):
    model, _ = model_tok
    before = model_state(model)
    call = CALLS.get(name) or (lambda m: sweep(m, EDITS[:2], layers=[1], trainer=TRAINER, generation=False,
                                               capability=False, fluency=False, progress=False))
    with torch.no_grad():
        result = call(model)
    assert result is not None
    if name == "sweep":  # a layer's failure would be reported in its place, not raised
        assert [r.error for r in result.records] == [None]
    if name == "fit":  # fit keeps its edit: undo it before comparing
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before["params"][n]["bits"].view(p.dtype))
    assert_same_state(before, model)


@pytest.mark.parametrize("name", ["fit", "gradratio", "lga", "sweep", "compare", "edit_gradients"])
def test_inference_mode_is_a_clear_error(model_tok, name):
    model, _ = model_tok
    before = model_state(model)
    calls = {**CALLS, "sweep": lambda m: sweep(m, EDITS, progress=False),
             "compare": lambda m: gl.compare(m, EDITS, TEXTS, progress=False),
             "edit_gradients": lambda m: gl.edit_gradients(m, EDITS)}
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            calls[name](model)
    assert_same_state(before, model)


def test_evaluation_and_tracing_work_in_inference_mode(model_tok):
    model, _ = model_tok
    with torch.inference_mode():
        assert gl.evaluate(model, EDITS, generation=False).teacher_forced["reliability"] is not None
        assert gl.causal_trace(model, "Paris is the capital of", "Paris", samples=2, progress=False).scores.numel()


# --------------------------------------------------------------------------- corrupted or foreign sweep files


def _sweep(model, out, layers=(0, 1)):
    return sweep(model, EDITS[:2], layers=list(layers), trainer=TRAINER, generation=False, capability=False,
                 fluency=False, out=out, progress=False)


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not UTF-8"),
    (b'[1, 2, 3]\n{"layer": 0}\n', "line 1: a list, expected a record"),
    (b"null\n{}\n", "line 1: a NoneType, expected a record"),
    (b'{"layer": 0}\n', "line 1: an object without 'key' and 'fingerprint', expected a record"),
    (b'{"key": 0, "fingerprint": {}, "layer": "abc", "teacher_forced": {"reliability": 1.0}}\n{}\n',
     "line 1: 'layer' is 'abc'"),
    (b'{"key": 0, "fingerprint": {}, "layer": 0}\n{"layer": 1}\n', "line 1: layer 0 has no metrics"),
    (b'not json at all\n{"layer": 1}\n', "line 1: not a JSON record"),
])
def test_damaged_sweep_files_name_file_line_and_problem(model_tok, tmp_path, content, match):
    model, _ = model_tok
    out = tmp_path / "sweep.jsonl"
    out.write_bytes(content)
    before = model_state(model)
    with pytest.raises(StoreError, match=match) as err:
        _sweep(model, out)
    assert str(out) in str(err.value)
    assert_same_state(before, model)


def test_a_record_without_metrics_is_refused_not_dropped(model_tok, tmp_path):
    model, _ = model_tok
    out = tmp_path / "sweep.jsonl"
    _sweep(model, out)
    lines = out.read_text().splitlines()
    rec = json.loads(lines[0])
    rec.pop("teacher_forced")
    out.write_text(json.dumps(rec) + "\n" + lines[1] + "\n")
    with pytest.raises(StoreError, match="line 1: layer 0 has no metrics"):
        gl.SweepResult.load(out)


def test_damage_below_the_first_line_is_named_by_its_line(model_tok, tmp_path):
    model, _ = model_tok
    out = tmp_path / "sweep.jsonl"
    _sweep(model, out)
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n[1, 2]\n" + second + "\n")
    with pytest.raises(StoreError, match="line 2: a list, expected a record") as err:
        _sweep(model, out)
    assert str(out) in str(err.value)


def test_a_damaged_last_line_is_dropped_and_its_layer_runs_again(model_tok, tmp_path, monkeypatch):
    model, _ = model_tok
    out = tmp_path / "sweep.jsonl"
    _sweep(model, out, layers=[0])
    with out.open("a") as f:
        f.write('{"fingerprint": "x", "layer": 1, "teacher')  # cut short by an interruption
    trained = []
    real = gl.LocFTBF.fit
    monkeypatch.setattr(gl.LocFTBF, "fit", lambda self, e: (trained.append(self.layer), real(self, e))[1])
    res = _sweep(model, out)
    assert trained == [1] and res.layers == [0, 1]
    assert [json.loads(x)["layer"] for x in out.read_text().splitlines()] == [0, 1]  # the damaged line is gone


def test_a_folder_as_sweep_file(model_tok, tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        _sweep(model_tok[0], tmp_path)


# --------------------------------------------------------------------------- the public boundary


def test_unclear_errors_are_now_clear(model_tok, tmp_path, unchecked):
    model, tok = model_tok
    with pytest.raises(TypeError, match="edits is None"):
        gl.gradratio(model, None, TEXTS)
    with pytest.raises(TypeError, match="retain texts are one string"):
        gl.gradratio(model, EDITS, "The sky was grey all morning, and then it rained.")
    with pytest.raises(TypeError, match="callback must be callable"):
        unchecked(gl.LocFTBF)(model, 1, callback=5)
    bad = tmp_path / "edits.jsonl"
    bad.write_text(json.dumps(EDITS[0]) + "\n" + json.dumps(EDITS[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 3: not JSON"):
        gl.load_edits(bad)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 2.5"):
        unchecked(gl.load_edits)(EDITS, n=2.5)
    with pytest.raises(ValueError, match="offset must be an int >= 0, got -1"):
        gl.load_edits(EDITS, offset=-1)
    with pytest.raises(ValueError, match="is a folder"):
        gl.load_edits(tmp_path)
    ft = gl.LocFTBF(model, np.int64(1), progress=False)  # numpy ints are ints, as in layers=
    assert ft.layer == 1


def test_cli_boundary(tmp_path, capsys):
    assert main(["select", "--model", "tiny-gpt2", "--edits", str(tmp_path), "--method", "gradratio"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["select", "--model", "tiny-gpt2", "--edits", "counterfact", "-n", "2", "--offset", "-1"]) == 2
    assert "--offset must be >= 0" in capsys.readouterr().err

"""The single-edit matrix: each cell equals a single-edit LocFT-BF run scored by
evaluate(); cells are stored, resumed, split over shards, and refused when stale."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.golden import matrix as matrix_module
from gradlocate.golden.matrix import Matrix, edit_id, matrix
from gradlocate.golden.store import StoreError

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompt": "France's capital city is",
     "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"},
    {"prompt": "Water boils at", "target_new": "fifty degrees"},
    {"prompt": "My favourite colour is", "target_new": "green", "locality_prompt": "Grass is",
     "locality_ground_truth": "green"},
]
TRAINER = {"lr": 0.05, "epochs": 12, "seed": 0}
# No threshold: every epoch steps, so the batched and single runs take the same decisions.
EXACT = {"lr": 5e-3, "epochs": 12, "seed": 0, "loss_threshold": 0.0}


@pytest.fixture(scope="module")
def model():
    m, _ = tiny("gpt2", n_layers=3, d_model=32, seed=2, initializer_range=1.0)
    return m


def test_cells_equal_single_edit_locftbf_and_evaluate(model):
    h = gl.down_projections(model)
    m = matrix(h, EDITS, hparams=TRAINER, layers=[1, 2], capability_edits=0, progress=False)
    pre = gl.evaluate(h, EDITS, generation=False)
    for j, layer in enumerate([1, 2]):
        for i, e in enumerate(EDITS):
            with gl.LocFTBF(h, layer, progress=False, **TRAINER) as ft:
                fit = ft.fit([e])
                post = gl.evaluate(h, EDITS, pre=pre, generation=False)
            for metric in ("reliability", "generalization", "locality", "portability"):
                want = post.rows[i].get(f"{metric}_tf")
                got = m.scores[metric][i, j]
                assert (math.isnan(got) and want is None) or got == pytest.approx(want, abs=1e-5), (i, layer, metric)
            assert m.train["epochs"][i, j] == fit.epochs and bool(m.train["converged"][i, j]) == fit.converged


def test_capability_equals_evaluate_of_the_edit_alone(model):
    h = gl.down_projections(model)
    m = matrix(h, EDITS, hparams=EXACT, layers=[2], capability_edits=2, progress=False)
    pre = gl.evaluate(h, EDITS, generation=False, capability=True)
    assert m.capability_base == pytest.approx(pre.general["lm_loss"], rel=1e-6)
    for i in range(2):
        with gl.LocFTBF(h, 2, progress=False, **EXACT) as ft:
            ft.fit([EDITS[i]])
            post = gl.evaluate(h, EDITS, pre=pre, generation=False, capability=True)
        assert m.capability[i, 0] == pytest.approx(post.general["lm_loss_change"], rel=1e-5)  # float rounding of training
    assert np.isnan(m.capability[2, 0])  # outside the stated subsample


def test_matrix_result(model):
    m = matrix(model, EDITS, hparams=TRAINER, capability_edits=1, progress=False)
    assert isinstance(m, Matrix) and m.layers == [0, 1, 2] and m.shape == (3, 3)
    assert m.edit_ids == [edit_id(e) for e in EDITS]
    assert np.isnan(m.scores["locality"][1]).all() and np.isfinite(m.scores["locality"][0]).all()
    have = np.stack([m.scores[k] for k in ("reliability", "generalization", "locality")])
    assert "overall" not in m.scores  # every overall is computed, by gradlocate.golden.scores
    assert m.overall()[0, 0] == pytest.approx(np.nanmean(have[:, 0, 0]))  # the primary: edit-only
    curve = m.curve()
    assert m.golden() == m.layers[int(np.nanargmax(curve))]
    for i, l in enumerate(m.optimum()):
        assert m.overall()[i, m.layers.index(l)] == np.nanmax(m.overall()[i])
    d = m.to_dict()
    assert d["golden"] == m.golden() and d["capability"][1] == [None, None, None]
    assert "3 edits x 3 layers" in repr(m) and "capability on 3" in repr(m)
    import matplotlib

    matplotlib.use("Agg")
    fig = m.plot()
    assert fig.axes[1].get_xlabel() == "layer" and fig.axes[0].get_ylabel() == "edit"


def test_resume_shards_and_order(model, tmp_path, monkeypatch):
    out = tmp_path / "mx"
    a = matrix(model, EDITS, hparams=TRAINER, layers=[0], out=out, shard="a", capability_edits=1, progress=False)
    b = matrix(model, EDITS, hparams=TRAINER, layers=[1, 2], out=out, shard="b", capability_edits=1, progress=False)
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["a.jsonl", "b.jsonl"]
    assert (out / "manifest.json").exists()
    calls = []
    real = matrix_module.per_edit_deltas
    monkeypatch.setattr(matrix_module, "per_edit_deltas", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = matrix(model, list(reversed(EDITS)), hparams=TRAINER, out=out, capability_edits=0, progress=False)
    assert calls == []  # every cell was there, from two shards
    assert both.edit_ids == [edit_id(e) for e in reversed(EDITS)]
    np.testing.assert_array_equal(both.overall()[::-1], np.concatenate([a.overall(), b.overall()], axis=1))
    assert both.path == str(out)  # outside the working directory: kept absolute
    # a cell of the capability subsample without capability is redone; the others are not
    flat = tmp_path / "flat.jsonl"
    matrix(model, EDITS, hparams=TRAINER, layers=[0], out=flat, capability_edits=0, progress=False)
    calls.clear()
    again = matrix(model, EDITS[1:], hparams=TRAINER, layers=[0], out=flat, capability_edits=1, progress=False)
    assert len(calls) == 1 and np.isfinite(again.capability[0, 0])


def test_stale_cells_refused(model, tmp_path):
    out = tmp_path / "mx.jsonl"
    matrix(model, EDITS[:1], hparams=TRAINER, layers=[0], out=out, capability_edits=0, progress=False)
    with pytest.raises(StoreError, match=r"mx\.jsonl line 1: .*editor differs"):
        matrix(model, EDITS[:1], hparams={**TRAINER, "lr": 0.01}, layers=[0], out=out, capability_edits=0,
               progress=False)
    other, _ = tiny("gpt2", n_layers=3, d_model=32, seed=3, initializer_range=1.0)
    with pytest.raises(StoreError, match="model differs"):
        matrix(other, EDITS[:1], hparams=TRAINER, layers=[0], out=out, capability_edits=0, progress=False)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        matrix(model, EDITS, chunk=0)
    with pytest.raises(ValueError, match="unknown editor"):
        matrix(model, EDITS, editor="nope")
    with pytest.raises(ValueError, match="LocFT-BF has no setting 'bogus'"):
        matrix(model, EDITS, hparams={"bogus": 1})


def test_cells_equal_a_plain_pytorch_loop():
    """The matrix against benchmarks/bench_matrix.py's plain loop (Adam on one weight, full
    forwards and logits, no gradlocate kernel): the same weight changes and scores."""
    import importlib.util
    from pathlib import Path

    from gradlocate.editors import per_edit_deltas

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_matrix.py"
    spec = importlib.util.spec_from_file_location("bench_matrix", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, _ = tiny("llama", n_layers=3, d_model=32, seed=3)
    h = gl.down_projections(model)
    edits = gl.data.as_edits(EDITS)
    hp = {"lr": 5e-3, "epochs": 6, "loss_threshold": 1e-2}
    m = matrix(h, edits, hparams={"lr": 5e-3, "epochs": 6}, layers=[0, 2], capability_edits=0, progress=False)
    plain = bench.plain_matrix(model, h, edits, [0, 2], hp)
    for j, layer in enumerate([0, 2]):
        d, _ = per_edit_deltas("locft", h, layer, edits, lr=5e-3, epochs=6)
        for i in range(len(edits)):
            want = plain["deltas"][i, layer]
            assert float((d[i] - want).norm() / want.norm()) < 1e-4, (i, layer)
            for k, v in plain["scores"][i, layer].items():
                assert m.scores[k][i, j] == pytest.approx(v, abs=1e-6), (i, layer, k)


def test_chunks_group_edits_of_similar_length(model, monkeypatch):
    """Rows of a chunk are padded to its longest: edits are chunked in order of length,
    and the cells do not depend on the chunking."""
    edits = [{"prompt": "A" + " word" * n, "target_new": "x"} for n in (9, 1, 7, 2, 8, 3)]
    seen = []
    real = matrix_module.per_edit_deltas
    monkeypatch.setattr(matrix_module, "per_edit_deltas",
                        lambda name, h, layer, part, *a, **k: seen.append([e.prompt.count("word") for e in part])
                        or real(name, h, layer, part, *a, **k))
    sorted_run = matrix(model, edits, hparams=TRAINER, layers=[1], chunk=3, capability_edits=0, progress=False)
    assert seen == [[1, 2, 3], [7, 8, 9]]
    one = matrix(model, edits, hparams=TRAINER, layers=[1], chunk=6, capability_edits=0, progress=False)
    np.testing.assert_allclose(sorted_run.overall(), one.overall(), atol=1e-6)

"""Each edit alone at each layer: each batched row equals a single-edit LocFT-BF run, each
edit's scores equal evaluate() of the model edited by that row alone, and
sweep(per_sample=True) is the single-edit matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.editors.locft_rows import train_per_sample
from gradlocate.golden.matrix import Matrix, matrix

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompt": "France's capital city is",
     "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"},
    {"prompt": "Water boils at", "target_new": "fifty degrees"},
    {"prompt": "My favourite colour is", "target_new": "green", "locality_prompt": "Grass is",
     "locality_ground_truth": "green"},
]
TRAINER = {"lr": 0.05, "epochs": 12, "seed": 0}
# No threshold: every epoch steps, so the two runs take the same discrete decisions and
# their weights can be compared to float rounding.
EXACT = {"lr": 5e-3, "epochs": 12, "seed": 0, "loss_threshold": 0.0}


@pytest.fixture(scope="module", params=["gpt2", "gemma3_text"])
def model_tok(request):
    # gpt2: a residual-additive block (cached site input); gemma3: a post-MLP norm (cached stream).
    return tiny(request.param, n_layers=3, d_model=32, seed=2, initializer_range=1.0 if request.param == "gpt2"
                else 0.3)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layer", [1, 2])
def test_each_row_equals_a_single_edit_locftbf_run(model_tok, layer):
    model, _ = model_tok
    h = gl.down_projections(model)
    w0 = h[layer].weight.clone()
    delta, _ = train_per_sample(h, layer, gl.data.as_edits(EDITS), **EXACT)
    for i, e in enumerate(EDITS):
        with gl.LocFTBF(h, layer, progress=False, **EXACT) as ft:
            ft.fit([e])
            single = h[layer].weight.clone()
        assert _rel(w0 + delta[i], single) < 1e-5, (i, _rel(w0 + delta[i], single))
    assert torch.equal(h[layer].weight, w0)  # the model itself never changed


def test_thresholds_and_convergence_as_a_single_run(model_tok):
    """With the real threshold a row skips steps and stops on its own, as its own run."""
    model, _ = model_tok
    h = gl.down_projections(model)
    w0 = h[2].weight.clone()
    delta, summaries = train_per_sample(h, 2, gl.data.as_edits(EDITS), **TRAINER)
    for i, e in enumerate(EDITS):
        with gl.LocFTBF(h, 2, progress=False, **TRAINER) as ft:
            r = ft.fit([e])
            single = h[2].weight.clone()
        assert summaries[i]["epochs"] == r.epochs and summaries[i]["converged"] == r.converged
        assert summaries[i]["steps"] == sum(r.steps)
        assert summaries[i]["final_loss"] == pytest.approx(r.final_loss, rel=1e-3, abs=1e-5)
        assert _rel(w0 + delta[i], single) < 1e-3


def test_scores_equal_evaluate_of_each_edit_alone(model_tok):
    model, _ = model_tok
    h = gl.down_projections(model)
    s = matrix(h, EDITS, layers=[2], hparams=TRAINER, capability_edits=0, progress=False)
    pre = gl.evaluate(h, EDITS, generation=False)
    for i, e in enumerate(EDITS):
        with gl.LocFTBF(h, 2, progress=False, **TRAINER) as ft:
            ft.fit([e])
            post = gl.evaluate(h, EDITS, pre=pre, generation=False)
        for m in ("reliability", "generalization", "locality"):
            assert s.value(m, 2)[i] == pytest.approx(post.rows[i][f"{m}_tf"]), (i, m)


def test_sample_sweep_result_and_paired_test():
    model, _ = tiny("gpt2", n_layers=3, d_model=32, seed=2, initializer_range=1.0)
    s = gl.sweep(model, EDITS, per_sample=True, trainer={"lr": 0.05, "epochs": 4}, progress=False)
    assert isinstance(s, Matrix) and s.layers == [0, 1, 2] and s.n_edits == 3
    assert np.isnan(s.capability).all()  # the per-sample sweep measures the edit metrics only
    opt = s.optimum()
    for i, l in enumerate(opt):
        assert s.value("edit-only", l)[i] == max(s.value("edit-only", k)[i] for k in s.layers)
    v = s.versus(golden=1)
    assert v["edit-only"]["optimum"] >= v["edit-only"]["golden"]
    assert v["edit-only"]["n"] == 3
    with pytest.raises(ValueError, match=r"layer 99 is not among this matrix's layers"):
        s.versus(golden=99)
    import matplotlib

    matplotlib.use("Agg")
    assert s.plot(golden=1).axes[1].get_xlabel() == "layer"
    assert "3 edits x 3 layers" in repr(s) and s.to_dict()["optimum"] == opt

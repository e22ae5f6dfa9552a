"""The golden-layer sweep: metrics per layer, golden layer, exact restore, resume."""

from __future__ import annotations

import json

import pytest
import torch

from gradlocate.editors.locft import LocFTBF
from gradlocate.evaluation import evaluate
from gradlocate.models import tiny
from gradlocate.golden.sweep import SweepResult, sweep

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompt": "France's capital city is",
     "locality_prompt": "The capital of Spain is", "locality_ground_truth": "Madrid"},
    {"prompt": "Water boils at", "target_new": "50 degrees", "rephrase_prompt": "The boiling point of water is",
     "locality_prompt": "Ice melts at", "locality_ground_truth": "0 degrees"},
    {"prompt": "The sky is", "target_new": "green", "rephrase_prompt": "On a clear day the sky looks",
     "locality_prompt": "Grass is", "locality_ground_truth": "green"},
]
TRAINER = {"lr": 5e-3, "epochs": 4}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def model():
    return tiny("gpt2", n_layers=3, d_model=32, seed=1)[0]


def test_sweep_metrics_golden_and_restore(model):
    before = _state(model)
    res = sweep(model, EDITS, layers=[0, 2], trainer=TRAINER, generation=False, progress=False)
    assert _same(before, _state(model)), "the sweep left the model changed"
    assert res.layers == [0, 2]
    # Independent recomputation of layer 2's record with the trainer and evaluator.
    pre = evaluate(model, EDITS, generation=False)
    with LocFTBF(model, 2, progress=False, **TRAINER) as ft:
        ft.fit(EDITS)
        ev = evaluate(model, EDITS, pre=pre, generation=False)
    assert res.at(2).teacher_forced == ev.teacher_forced
    # Overall = mean of reliability, generalization and locality; golden = its argmax.
    edit_only = res.with_overall("edit-only").overall
    for r, got in zip(res.records, edit_only):
        tf = r.teacher_forced
        assert got == pytest.approx((tf["reliability"] + tf["generalization"] + tf["locality"]) / 3)
    ov = res.overall
    assert res.golden == res.layers[max(range(len(ov)), key=lambda i: (ov[i], -i))]
    assert set(res.best_layers()) >= {"reliability", "generalization", "locality", "overall"}
    md = res.to_markdown()
    assert "| 0 " in md and "golden" in md
    d = res.to_dict()
    assert json.loads(json.dumps(d, default=float))["golden"] == res.golden
    assert "golden=" in repr(res)


def test_sweep_resume_skips_finished_layers(model, tmp_path, monkeypatch):
    out = tmp_path / "sweep.jsonl"
    sweep(model, EDITS, layers=[0], trainer=TRAINER, generation=False, progress=False, out=out)
    assert len(out.read_text().splitlines()) == 1
    fitted = []
    real_fit = LocFTBF.fit
    monkeypatch.setattr(LocFTBF, "fit", lambda self, e: (fitted.append(self.layer), real_fit(self, e))[1])
    res = sweep(model, EDITS, layers=[0, 1], trainer=TRAINER, generation=False, progress=False, out=out)
    assert fitted == [1]
    assert res.layers == [0, 1]
    assert SweepResult.load(out).layers == [0, 1]
    with pytest.raises(ValueError, match="trainer differs"):
        sweep(model, EDITS, layers=[0], trainer={"lr": 1e-3, "epochs": 4}, generation=False, progress=False, out=out)


def test_interrupted_sweep_restores_and_resumes(model, tmp_path):
    out = tmp_path / "sweep.jsonl"
    before = _state(model)
    calls = {"n": 0}

    def boom(step):
        calls["n"] += 1
        if calls["n"] > 14:  # 3 edits x 4 epochs = 12 steps for layer 0: this is layer 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(model, EDITS, layers=[0, 1], trainer={**TRAINER, "edits_per_step": 1, "callback": boom},
              generation=False, progress=False, out=out)
    assert _same(before, _state(model))
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["layer"] for l in lines] == [0]
    res = sweep(model, EDITS, layers=[0, 1], trainer={**TRAINER, "edits_per_step": 1}, generation=False,
                progress=False, out=out)
    assert res.layers == [0, 1]


def test_sweep_bad_input(model):
    with pytest.raises(ValueError, match="out of range"):
        sweep(model, EDITS, layers=[5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        sweep(model, [], progress=False)
    with pytest.raises(ValueError, match="scoring"):
        sweep(model, EDITS, scoring="vibes", progress=False)


def test_sweep_plot(model):
    import matplotlib

    matplotlib.use("Agg")
    res = sweep(model, EDITS[:1], layers=[1, 2], trainer={"epochs": 1}, generation=False, progress=False)
    ax = res.plot()
    assert ax.get_xlabel() == "edited layer"

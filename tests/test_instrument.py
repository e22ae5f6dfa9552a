"""The matrix's instrument (issue 42, items 1-2): every stored per-token value equals a
plain PyTorch forward of the edited weight; old records still load; replicate tables by
seeds and by prompt halves equal a hand construction; ties are broken uniformly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

import gradlocate as gl
from gradlocate.golden import matrix as matrix_module
from gradlocate.golden import scores
from gradlocate.evaluation import locality_reference
from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.instrument import instrument
from gradlocate.golden.matrix import edit_id, matrix
from gradlocate.golden.replicates import ReplicateError, prompt_replicates, seed_replicates
from gradlocate.golden.table import CONTINUOUS_METRICS, MATRIX_METRICS, Matrix
from gradlocate.losses import IGNORE, tokenize_edits
from gradlocate.models import tiny

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris",
     "rephrase_prompt": "France's capital city is", "locality_prompt": "The capital of Spain is",
     "locality_ground_truth": "Madrid"},
    {"prompt": "Water boils at", "target_new": "fifty degrees"},
]
# several prompts of a kind: prompt halves exist
MANY = [gl.data.EditRequest("A cat says", "woof", ground_truth="meow",
                            rephrase_prompts=("The cat says", "Cats say", "A kitten says"),
                            locality=(("A dog says", "woof"), ("A cow says", "moo"))),
        gl.data.EditRequest("Snow is", "black", rephrase_prompts=("The snow is",))]
HP = {"lr": 0.05, "epochs": 4}


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", n_layers=2, d_model=32, seed=3)


def _plain_logprobs(model, tok, prompt, answer):
    """log_softmax of model(...).logits at the answer positions, the answer's ids, and the argmax."""
    b = tokenize_edits(tok, [prompt], [answer])
    with torch.no_grad():
        logits = model(input_ids=b.input_ids).logits[0, :-1].float()
    keep = b.labels[0, 1:] != IGNORE
    return logits.log_softmax(-1)[keep], b.labels[0, 1:][keep], logits[keep].argmax(-1)


def _records(folder):
    recs = {}
    for f in sorted((Path(folder) / "cells").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[(r["edit"], r["layer"], r.get("seed", 0))] = r
    return recs


def test_stored_values_equal_a_plain_forward_of_the_edited_weight(llama, tmp_path, monkeypatch):
    model, tok = llama
    deltas = {}
    real = matrix_module.per_edit_deltas

    def keep(name, h, layer, part, *a, **k):
        d, s = real(name, h, layer, part, *a, **k)
        for e, row in zip(part, d):
            deltas[(edit_id(e), layer)] = row.clone()
        return d, s

    monkeypatch.setattr(matrix_module, "per_edit_deltas", keep)
    m = matrix(model, EDITS, hparams=HP, out=tmp_path / "f", capability_edits=0, progress=False)
    h = gl.down_projections(model)
    recs = _records(tmp_path / "f")
    assert len(recs) == 4
    for (eid, layer, _), rec in recs.items():
        e = gl.data.as_edits(EDITS)[m.edit_ids.index(eid)]
        w = model.get_submodule(h[layer].path).weight
        before = {p: _plain_logprobs(model, tok, p, a) for p, a in e.locality}
        w.data += deltas[(eid, layer)]
        try:
            _check_record(rec, e, model, tok, before)
        finally:
            w.data -= deltas[(eid, layer)]
        assert len(rec["train"]["trajectory"]) == rec["train"]["epochs"] >= rec["train"]["steps"]


def _check_record(rec, e, model, tok, before):
    tol = dict(rtol=2e-5, atol=2e-5)  # stored to 6 significant digits
    for kind, prompts in (("rewrite", [e.prompt]), ("rephrase", list(e.rephrase_prompts))):
        for j, prompt in enumerate(prompts):
            lp, ids, pred = _plain_logprobs(model, tok, prompt, e.target_new)
            got = rec["prompts"][kind][j]
            new = lp.gather(-1, ids[:, None])[:, 0]
            assert got["acc"] == (pred == ids).long().tolist()
            np.testing.assert_allclose(got["logprob"], new.numpy(), **tol)
            if e.old_answer is None:
                assert "margin" not in got and "old_logprob" not in got
                continue
            olp, oids, _ = _plain_logprobs(model, tok, prompt, e.old_answer)
            old = olp.gather(-1, oids[:, None])[:, 0]
            np.testing.assert_allclose(got["old_logprob"], old.numpy(), **tol)
            assert got["margin"] == pytest.approx(float(new.mean() - old.mean()), abs=5e-5)
    _, ids, pred = _plain_logprobs(model, tok, e.prompt, e.target_new)
    assert rec["scores"]["reliability"] == pytest.approx(float((pred == ids).float().mean()))
    rw = rec["prompts"]["rewrite"][0]
    assert rec["continuous"]["reliability_logprob"] == pytest.approx(float(np.mean(rw["logprob"])), rel=1e-5)
    assert ("reliability_margin" in rec["continuous"]) == (e.old_answer is not None)
    for k, (p, a) in enumerate(e.locality):
        ref_lp, _, ref_pred = before[p]
        lp, _, pred = _plain_logprobs(model, tok, p, a)
        got = rec["prompts"]["locality"][k]
        assert got["acc"] == (pred == ref_pred).long().tolist()
        np.testing.assert_allclose(got["logprob"], lp.gather(-1, ref_pred[:, None])[:, 0].numpy(), **tol)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0)
        np.testing.assert_allclose(got["kl"], kl.numpy(), rtol=1e-4, atol=1e-5)
        assert min(got["kl"]) > 0  # the edit moved the distribution


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_instrument_equals_a_plain_forward_on_other_architectures(arch):
    """GPT-2 (a transposed Conv1D site) and Gemma-3 (post-MLP norm, its own logit
    processing): a random weight change per edit, against the model with W + delta."""
    model, tok = tiny(arch, n_layers=2, d_model=32, seed=1)
    h = gl.down_projections(model)
    edits = gl.data.as_edits([*EDITS, *MANY])
    ref = locality_reference(h, edits, generation=False).tokens
    delta = torch.randn(len(edits), *h[1].weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    cells = instrument(h, 1, edits, delta, ref)
    for e, d, rec in zip(edits, delta, cells):
        before = {p: _plain_logprobs(model, tok, p, a) for p, a in e.locality}
        h[1].weight.add_(d)
        try:
            _check_record(rec, e, model, tok, before)
        finally:
            h[1].weight.sub_(d)


def test_unedited_model_has_zero_kl_and_matching_scores(llama):
    model, _ = llama
    h = gl.down_projections(model)
    ref = locality_reference(h, MANY, generation=False).tokens
    cells = instrument(h, 1, MANY, None, ref)
    assert all(v == 0.0 for p in cells[0]["prompts"]["locality"] for v in p["kl"])
    assert cells[0]["scores"]["locality"] == 1.0 and len(cells[0]["prompts"]["rephrase"]) == 3
    ev = gl.evaluate(h, MANY, generation=False)
    for i, c in enumerate(cells):
        for mt in ("reliability", "generalization"):
            assert c["scores"][mt] == pytest.approx(ev.rows[i][f"{mt}_tf"])
    zero = torch.zeros(len(MANY), *h[1].weight.shape)
    assert instrument(h, 1, MANY, zero, ref) == cells  # a zero change: exactly the unedited values


def test_record_is_compact_and_every_float_has_six_digits(llama, tmp_path):
    model, _ = llama
    matrix(model, MANY, hparams=HP, layers=[1], out=tmp_path / "f", capability_edits=0, progress=False)
    for rec in _records(tmp_path / "f").values():
        floats = [x for sec in rec["prompts"].values() for p in sec for k, v in p.items() if k != "acc"
                  for x in (v if isinstance(v, list) else [v])] + list(rec["continuous"].values()) \
            + rec["train"]["trajectory"]
        assert floats and all(float(f"{x:.6g}") == x for x in floats)
        assert set(rec["continuous"]) <= set(CONTINUOUS_METRICS) and set(rec["scores"]) == set(MATRIX_METRICS)


def test_old_records_still_load(tmp_path):
    """A committed study of metrics version 1 (no per-prompt values; migrated from schema 0):
    it loads, its token-accuracy tables as stored, the continuous ones NaN, and prompt
    halves are refused."""
    src = Path(__file__).resolve().parents[1] / "studies" / "smollm2-counterfact-r-rome"
    dst = tmp_path / "old"
    (dst / "cells").mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst)
    lines = (src / "cells" / "shard0of1.jsonl").read_text().splitlines()[:60]
    (dst / "cells" / "shard0of1.jsonl").write_text("\n".join(lines) + "\n")
    m, _ = StudyFolder.open(dst).load(complete_only=False)
    got = {(json.loads(l)["edit"], json.loads(l)["layer"]): json.loads(l)["scores"] for l in lines}
    for (eid, layer), s in got.items():
        i, j = m.edit_ids.index(eid), m.layers.index(layer)
        assert m.scores["reliability"][i, j] == s["reliability"] and m.scores["locality"][i, j] == s["locality"]
    assert all(np.isnan(m.scores[k]).all() for k in CONTINUOUS_METRICS)
    assert all(p is None for p in m.prompts.ravel()) and m.per_prompt("generalization")[0, 0] is None
    with pytest.raises(ReplicateError, match="before metrics version 2"):
        prompt_replicates(m, "generalization")


def test_prompt_half_replicates_equal_a_hand_construction(llama, tmp_path):
    model, _ = llama
    matrix(model, MANY, hparams=HP, out=tmp_path / "f", capability_edits=0, progress=False)
    f = StudyFolder.open(tmp_path / "f")
    m, _ = f.load()
    recs = _records(tmp_path / "f")
    for metric, kind, field in (("generalization", "rephrase", "acc"), ("locality_kl", "locality", "kl"),
                                ("generalization_margin", "rephrase", "margin")):
        r = f.replicates(metric, by="prompts")
        assert r.by == "prompts" and r.estimand.startswith("new prompts") and r.n_replicated == 1
        sign = -1.0 if metric == "locality_kl" else 1.0
        for (eid, layer, _), rec in recs.items():
            i, j = m.edit_ids.index(eid), m.layers.index(layer)
            items = rec["prompts"].get(kind, [])
            v = [p[field] if field == "margin" else sum(p[field]) / len(p[field]) for p in items if field in p]
            if len(v) < 2:
                assert np.isnan(r.select[i, j]) and np.isnan(r.score[i, j])
                continue
            assert r.select[i, j] == pytest.approx(sign * np.mean(v[0::2]))
            assert r.score[i, j] == pytest.approx(sign * np.mean(v[1::2]))
    with pytest.raises(ReplicateError, match="one rewrite prompt"):
        f.replicates("edit-only", by="prompts")


def test_no_replicate_for_one_prompt_and_a_deterministic_editor(llama, tmp_path):
    model, _ = llama
    matrix(model, EDITS, hparams=HP, layers=[1], seeds=[0, 1], out=tmp_path / "f", capability_edits=0,
           progress=False)
    f = StudyFolder.open(tmp_path / "f")
    with pytest.raises(ReplicateError, match="same 'edit-only' table: the editor \\(locft\\) has no randomness"):
        f.replicates()  # auto: the folder has two seeds
    with pytest.raises(ReplicateError, match="no edit has two rephrase prompts"):
        f.replicates("generalization", by="prompts")
    with pytest.raises(ReplicateError, match="two of the folder's seeds"):
        f.replicates(by="seeds", seeds=(0, 5))


def test_seed_replicates_equal_a_hand_construction(tmp_path):
    """Two seeds' cells of a folder (records written as the matrix writes them) against
    the tables built by hand; the overall is built per seed; KL is negated."""
    rng = np.random.default_rng(0)
    ids, layers = ["a", "b", "c"], [0, 1]
    vals = rng.random((2, 3, 2, 3))  # seed, edit, layer, metric
    cells = [{(e, l): {"scores": {"reliability": vals[s, i, j, 0], "generalization": vals[s, i, j, 1],
                                  "locality": None, "portability": None},
                       "continuous": {"locality_kl": vals[s, i, j, 2]}}
              for i, e in enumerate(ids) for j, l in enumerate(layers)} for s in (0, 1)]
    a, b = (Matrix.from_cells(layers, ids, c, "rome") for c in cells)
    r = seed_replicates(a, b, "edit-only", (0, 1))
    np.testing.assert_allclose(r.select, vals[0, ..., :2].mean(-1))
    np.testing.assert_allclose(r.score, vals[1, ..., :2].mean(-1))
    assert r.estimand.startswith("the same prompts, re-measured") and r.detail == {"seeds": [0, 1]}
    k = seed_replicates(a, b, "locality_kl")
    np.testing.assert_allclose(k.score, -vals[1, ..., 2])
    assert k.sign == -1.0 and np.isfinite(k.oracle_gain(n_boot=50).gain)
    with pytest.raises(ReplicateError, match="same 'reliability' table"):
        seed_replicates(a, a, "reliability")


def test_ties_broken_uniformly_with_a_seed():
    rel = np.array([[1.0, 1.0, 1.0, 0.2, 1.0], [1.0, 1.0, 1.0, 0.9, 1.0]])
    m = Matrix([10, 11, 12, 13, 14], ["a", "b"], {"reliability": rel})
    assert m.golden("reliability", ties="lowest") == 10 == m.layers[scores.golden_layer(rel)]
    assert m.golden("reliability", seed=3) == m.golden("reliability", seed=3)
    picks = [m.golden("reliability", seed=s) for s in range(800)]
    counts = [picks.count(l) for l in (10, 11, 12, 14)]
    assert sum(counts) == 800 and sps.chisquare(counts).pvalue > 1e-3
    rows = np.array([m.optimum("reliability", seed=s) for s in range(800)])
    assert 13 not in rows and sps.chisquare([int((rows[:, 0] == l).sum()) for l in (10, 11, 12, 14)]).pvalue > 1e-3
    assert np.mean(rows[:, 0] == rows[:, 1]) < 0.4  # each edit drawn independently (0.25 expected)
    c = m.choose("reliability", margin=0.5)
    assert c.tied == [10, 11, 12, 14] and c.near == [10, 11, 12, 13, 14] and c.layer in c.tied
    one = m.optimum_choices("reliability", margin=0.05)
    assert [x.layer for x in one] == m.optimum("reliability") and one[1].near == [10, 11, 12, 14]
    kl = Matrix([0, 1], ["a"], {"locality_kl": np.array([[0.3, 0.1]])})
    assert kl.golden("locality_kl") == 1 and kl.choose("locality_kl").value == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ties must be one of"):
        m.golden(ties="first")


def test_a_rank_one_editor_gives_seed_replicates(tmp_path):
    """R-ROME samples its context templates with the replicate seed: two seeds are two
    replicate tables, read back as the folder's two seeds' matrices; v*'s trajectory is stored."""
    model, _ = tiny("llama", n_layers=2, d_model=32, seed=0)
    edits = [{"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome",
              "rephrase_prompt": "Where is the Eiffel Tower? In"}]
    hp = {"v_num_grad_steps": 2, "context_template_length_params": [(4, 5)], "mom2_adjustment": False}
    matrix(model, edits, editor="r-rome", hparams=hp, layers=[0], seeds=[0, 1], out=tmp_path / "f",
           capability_edits=0, progress=False)
    f = StudyFolder.open(tmp_path / "f")
    r = f.replicates("reliability_logprob")
    a, b = f.load(seed=0)[0], f.load(seed=1)[0]
    np.testing.assert_array_equal(r.select, a.scores["reliability_logprob"])
    np.testing.assert_array_equal(r.score, b.scores["reliability_logprob"])
    assert r.by == "seeds" and r.detail == {"seeds": [0, 1]} and not np.array_equal(r.select, r.score)
    for rec in _records(tmp_path / "f").values():
        assert len(rec["train"]["trajectory"]) == rec["train"]["steps"] >= 1

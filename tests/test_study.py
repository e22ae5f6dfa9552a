"""The golden-layer study on the single-edit matrix: the judgment equals a recomputation
from the study's own matrix, the selectors saw only the proxy edits, resuming, and the
batch regime beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradlocate as gl
from gradlocate.golden.folder import proxy_split
from gradlocate.golden.study import Study, study
from gradlocate.models import tiny

EDITS = [{"prompt": f"The code word number {i} is", "target_new": w, "ground_truth": "red", "subject": f"number {i}",
          "rephrase_prompt": f"Code word {i} is", "locality_prompt": "The sky is", "locality_ground_truth": "blue"}
         for i, w in enumerate(["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "lemon"])]
TEXTS = ["A general text about the weather and the sea.", "Another one, about trains."]
HP = {"lr": 2e-2, "epochs": 3}
SMALL = {"n_boot": 30}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model, _ = tiny("gpt2", n_layers=4, d_model=32, seed=5, initializer_range=0.5)
    out = tmp_path_factory.mktemp("study")
    s = study(model, EDITS, TEXTS, n_proxy=3, hparams=HP, selectors=("gradratio (no l_min)", "lga", "cma"),
              capability_edits=2, batch=True, out_dir=out, progress=False, **SMALL)
    return model, s, out


def test_golden_equals_a_recomputation_from_the_matrix(result):
    _, s, _ = result
    proxy = proxy_split(len(EDITS), 3, seed=0)[0]
    test = [i for i in range(len(EDITS)) if i not in proxy]
    m = s.matrix
    cells = np.nanmean(np.stack([m.scores[k][test] for k in ("reliability", "generalization", "locality")]), 0)
    means = cells.mean(0)
    r = s.judgment.definition("edit-only")
    np.testing.assert_allclose(r.layer_mean, means)
    allowed = s.judgment.gate.allowed
    assert r.golden == m.layers[int(np.flatnonzero(allowed)[np.argmax(means[allowed])])]
    for row in s.judgment.selectors:
        sel = s.selections.scores[row.name]
        assert row.layer == sel.selected
        j = m.layers.index(sel.selected)
        assert row.regret["edit-only"][0] == pytest.approx(means[allowed].max() - means[j])


def test_selectors_saw_only_the_proxy_edits(result):
    _, s, _ = result
    proxy = proxy_split(len(EDITS), 3, seed=0)[0]
    assert s.params["proxy_prompts"] == [gl.data.as_edits(EDITS)[i].prompt for i in proxy]
    assert s.judgment.proxy == proxy and s.matrix.n_edits == len(EDITS)
    assert s.batch is not None and s.batch.sweep.records[0].n_edits == len(EDITS) - 3
    assert s.batch.golden in s.matrix.layers


def test_resume_reads_selections_and_matrix_back(result):
    model, s, out = result
    again = study(model, EDITS, TEXTS, n_proxy=3, hparams=HP, selectors=("gradratio (no l_min)", "lga", "cma"),
                  capability_edits=2, out_dir=out, progress=False, **SMALL)
    assert again.golden == s.golden
    for k, v in s.selections.scores.items():
        assert again.selections.scores[k].scores == pytest.approx(v.scores)
    np.testing.assert_allclose(again.matrix.overall(), s.matrix.overall())
    assert json.dumps(again.to_dict(), default=float)
    assert "Golden layer by definition" in again.to_markdown() and "Batch regime" in s.to_markdown()
    # the folder holds everything, and loads without a model: the same judgment
    assert (out / "judgment.json").exists() and (out / "report.md").exists() and (out / "batch").is_dir()
    loaded = Study.load(out, n_boot=SMALL["n_boot"])
    assert loaded.golden == s.golden and loaded.judgment.proxy == s.judgment.proxy
    assert {r.name: r.layer for r in loaded.judgment.selectors} == {r.name: r.layer for r in s.judgment.selectors}
    assert loaded.batch is not None and loaded.batch.golden == s.batch.golden


def test_a_given_matrix_of_other_edits_is_refused(result):
    model, s, _ = result
    with pytest.raises(ValueError, match="edit_id"):
        study(model, EDITS[::-1], TEXTS, n_proxy=3, matrix=s.matrix, selectors=("lga",), progress=False, **SMALL)


def test_the_proxy_rule_checks_its_sizes():
    with pytest.raises(ValueError, match="n_proxy"):
        proxy_split(5, 4)
    assert proxy_split(8)[0] == proxy_split(8, 2, 0)[0]  # a quarter by default

"""The golden-layer study: its judgements against independent recomputations from the
sweep records, its intervals, a selector that cannot run, and resuming."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import kendalltau, spearmanr

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.golden.store import StoreError
from gradlocate.golden.study import study

EDITS = [{"prompt": f"The code word number {i} is", "target_new": w, "ground_truth": "red", "subject": f"number {i}",
          "rephrase_prompt": f"Code word {i} is", "locality_prompt": "The sky is", "locality_ground_truth": "blue"}
         for i, w in enumerate(["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "lemon"])]
TEXTS = ["A general text about the weather and the sea.", "Another one, about trains."]
TRAINER = {"lr": 2e-2, "epochs": 3}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model, _ = tiny("gpt2", n_layers=4, d_model=32, seed=5, initializer_range=0.5)
    out = tmp_path_factory.mktemp("study")
    s = study(model, EDITS, TEXTS, n_proxy=3, n_test=5, n_sample=3, sample_layers=[1, 3], trainer=TRAINER,
              selectors=("gradratio (no l_min)", "lga", "lga (negative)", "cma"), bootstrap=50, out_dir=out,
              progress=False)
    return model, s, out


def test_judgements_equal_a_recomputation_from_the_sweep(result):
    _, s, _ = result
    overall = dict(zip(s.sweep.layers, s.sweep.overall))
    golden = max(overall, key=lambda l: (overall[l], -l))
    assert s.golden == golden
    for r in s.rows:
        sel = s.selections[r.selector]
        assert r.layer == sel.selected
        assert r.regret == pytest.approx(overall[golden] - overall[r.layer])
        # judged by what the selector maximises: LGA's sign convention flips or folds S
        sign = sel.params.get("sign", "signed") if sel.method == "lga" else "signed"
        key = {"signed": lambda v: v, "negative": lambda v: -v, "abs": abs}[sign]
        scores = [key(dict(zip(sel.layers, sel.scores))[l]) for l in s.sweep.layers]
        ov = [overall[l] for l in s.sweep.layers]
        if len(set(scores)) > 1 and len(set(ov)) > 1:
            assert r.spearman == pytest.approx(spearmanr(scores, ov).statistic)
            assert r.kendall == pytest.approx(kendalltau(scores, ov).statistic)
        lo, hi = r.regret_ci
        assert lo <= hi and lo >= -1e-9  # a regret is never negative


def test_selectors_saw_only_the_proxy_edits_and_the_split_is_exact(result):
    _, s, _ = result
    proxy = s.params["proxy_prompts"]
    assert len(proxy) == 3 and s.sweep.records[0].n_edits == 5
    test_prompts = {e.prompt for e in gl.data.as_edits(EDITS)} - set(proxy)
    assert len(test_prompts) == 5
    assert all(sel.params.get("n_edits") == 3 for sel in s.selections.values())


def test_transfer_and_samplewise_parts(result):
    _, s, _ = result
    assert s.transfer["proxy_golden"] == s.proxy_sweep.golden and s.transfer["test_golden"] == s.golden
    po = dict(zip(s.sweep.layers, s.sweep.overall))
    assert s.transfer["regret"] == pytest.approx(po[s.golden] - po[s.proxy_sweep.golden])
    assert s.samples.layers == sorted({1, 3, s.golden}) and s.samples.n_edits == 3
    assert set(s.versus) >= {"reliability", "overall"}
    md = s.to_markdown()
    assert "| selector |" in md and "paired t-test" in md and "Proxy-to-test transfer" in md
    d = json.loads(json.dumps(s.to_dict(), default=float))  # what benchmarks/report.py writes
    assert d["samples"]["layers"] == s.samples.layers and d["samples"]["optimum"] == s.samples.optimum()
    import matplotlib

    matplotlib.use("Agg")
    assert len(s.plot().axes) == 3


def test_resume_runs_nothing_again(result, monkeypatch):
    model, s, out = result
    calls = []
    real = gl.LocFTBF.fit
    monkeypatch.setattr(gl.LocFTBF, "fit", lambda self, e: (calls.append(self.layer), real(self, e))[1])
    again = study(model, EDITS, TEXTS, n_proxy=3, n_test=5, n_sample=3, sample_layers=[1, 3], trainer=TRAINER,
                  selectors=("gradratio (no l_min)", "lga", "lga (negative)", "cma"), bootstrap=50, out_dir=out,
                  progress=False)
    assert calls == []
    assert again.golden == s.golden and [r.layer for r in again.rows] == [r.layer for r in s.rows]
    # the parts' times are what the work took, read back from the files, not the re-read's
    assert again.timings == pytest.approx(s.timings) and all(v > 0 for v in s.timings.values())


def test_other_retain_texts_do_not_reuse_stored_selections(result):
    """selections.jsonl is fingerprinted by the retain texts too: stale GradRatio scores are refused."""
    model, _, out = result
    with pytest.raises(StoreError, match=r"selections\.jsonl line 1: .*retain differs"):
        study(model, EDITS, TEXTS[:1], n_proxy=3, n_test=5, n_sample=3, sample_layers=[1, 3], trainer=TRAINER,
              selectors=("gradratio (no l_min)",), bootstrap=50, out_dir=out, progress=False)


def test_a_selector_that_cannot_run_is_a_row_and_the_rest_runs():
    model, _ = tiny("gpt2", n_layers=3, d_model=32, seed=5)
    no_subject = [{k: v for k, v in e.items() if k != "subject"} for e in EDITS]
    s = study(model, no_subject, TEXTS, n_proxy=2, n_test=3, n_sample=0, transfer=False, trainer=TRAINER,
              selectors=("lga", "cma"), bootstrap=10, progress=False)
    cma = next(r for r in s.rows if r.selector == "cma")
    assert cma.layer is None and "no subject" in cma.error
    assert next(r for r in s.rows if r.selector == "lga").layer is not None
    assert "could not run" in s.to_markdown()
    assert math.isfinite(s.sweep.overall[0])

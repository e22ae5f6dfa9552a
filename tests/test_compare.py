"""Selectors judged against the sweep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradlocate as gl
from gradlocate.golden.compare import compare, spearman, split_edits
from gradlocate.models import tiny


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 60), st.floats(0.01, 0.99), st.integers(0, 5))
def test_split_is_a_partition(n, frac, seed):
    items = list(range(n))
    proxy, test = split_edits(items, frac, seed)
    assert sorted(proxy + test) == items
    assert len(test) >= 1 and len(proxy) >= 1 and len(proxy) <= n - 1
    assert split_edits(items, frac, seed) == (proxy, test)


def test_spearman_matches_formula():
    a = [0.1, 0.5, 0.3, 0.9, 0.7]
    b = [1.0, 3.0, 2.0, 4.0, 6.0]
    ra = [sorted(a).index(x) + 1 for x in a]
    rb = [sorted(b).index(x) + 1 for x in b]
    n = len(a)
    expect = 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))
    assert spearman(a, b) == pytest.approx(expect)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


EDITS = [
    {"prompt": f"{name} lives in", "target_new": city, "subject": name,
     "rephrase_prompt": f"The home of {name} is", "locality_prompt": "The sun rises in the",
     "locality_ground_truth": "east", "ground_truth": "Paris"}
    for name, city in [("Alice", "Oslo"), ("Bob", "Lima"), ("Carol", "Kyiv"), ("Dave", "Rome"), ("Erin", "Bern")]
]


def test_compare_end_to_end():
    import matplotlib

    matplotlib.use("Agg")
    model, _ = tiny("llama", n_layers=3, d_model=32, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cmp = compare(model, EDITS, ["a plain sentence about the weather and the sea", "another general text here"],
                  selectors=("gradratio", "lga", "cma"), proxy=0.4, trainer={"lr": 5e-3, "epochs": 3},
                  generation=False, progress=False,
                  selector_kwargs={"gradratio": {"min_layer": 0}, "cma": {"samples": 3, "progress": False}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (cmp.n_proxy, cmp.n_test) == (2, 3)  # max(1, round(0.4 * 5)) proxy edits, the rest test
    # The golden layer is the sweep's best overall (lowest layer on ties).
    ov = dict(zip(cmp.sweep.layers, cmp.sweep.overall))
    assert cmp.golden == max(ov, key=lambda l: (ov[l], -l))
    # The selectors saw only the proxy edits; the sweep only the test edits, and together all of them.
    proxy, test = split_edits(gl.data.as_edits(EDITS), 0.4, 0)
    assert all(sel.params["n_edits"] == len(proxy) == 2 for sel in cmp.selections.values())
    assert cmp.sweep.records[0].n_edits == len(test) == 3
    assert {e.prompt for e in proxy} | {e.prompt for e in test} == {e["prompt"] for e in EDITS}
    assert not {e.prompt for e in proxy} & {e.prompt for e in test}
    assert [r.selector for r in cmp.rows] == ["gradratio", "lga", "cma"]
    overall = dict(zip(cmp.sweep.layers, cmp.sweep.overall))
    for r in cmp.rows:
        sel = cmp.selections[r.selector]
        assert r.error is None
        assert r.layer == sel.selected and r.layer in cmp.sweep.layers
        assert r.regret == pytest.approx(overall[cmp.golden] - overall[r.layer])
        assert r.regret >= 0
        assert r.time_s > 0 and r.time_vs_sweep == pytest.approx(r.time_s / cmp.sweep_time_s)
    md = cmp.to_markdown()
    assert md.count("\n") == 2 + len(cmp.rows) and "golden (sweep)" in md
    assert cmp.plot().axes
    assert cmp.to_dict()["golden"] == cmp.golden


def test_compare_errors():
    model, _ = tiny("gpt2", n_layers=2, d_model=16)
    with pytest.raises(ValueError, match="unknown selectors"):
        compare(model, EDITS, selectors=("magic",), progress=False)
    with pytest.raises(ValueError, match="at least 2 edits"):
        compare(model, EDITS[:1], selectors=("lga",), progress=False)
    with pytest.raises(ValueError, match="fraction"):
        compare(model, EDITS, selectors=("lga",), proxy=1.5, progress=False)

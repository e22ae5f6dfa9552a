"""gradlocate.golden.draws: selectors over several proxy draws, against plain numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradlocate.golden.draws import Draws, over_draws
from gradlocate.golden.matrix import Matrix
from gradlocate.results import LayerScores

LAYERS = [10, 11, 12, 13]


def _pick(layer, layers=LAYERS):
    return LayerScores("x", [0.0] * len(layers), [True] * len(layers), layer, layers=list(layers))


@pytest.fixture(scope="module")
def matrix():
    rng = np.random.default_rng(3)
    rel = np.clip(np.array([0.3, 0.6, 0.8, 0.5]) + rng.normal(scale=0.2, size=(20, 4)), 0, 1)
    loc = np.clip(np.array([0.9, 0.8, 0.6, 0.4]) + rng.normal(scale=0.1, size=(20, 4)), 0, 1)
    gen = np.clip(rel - 0.1 + rng.normal(scale=0.05, size=(20, 4)), 0, 1)
    return Matrix(LAYERS, [f"e{i}" for i in range(20)], {"reliability": rel, "locality": loc, "generalization": gen})


def test_each_draw_is_judged_on_its_own_test_rows(matrix):
    draws = [(1, [0, 1, 2, 3, 4], {"lga": _pick(12), "cma": _pick(10)}),
             (2, [5, 6, 7, 8, 9], {"lga": _pick(11), "cma": _pick(11)}),
             (3, [15, 16, 17, 18, 19], {"lga": _pick(13), "cma": _pick(12)})]
    d = over_draws(matrix, draws, definitions=["edit-only"], n_boot=200)
    edit_only = (matrix.scores["reliability"] + matrix.scores["locality"] + matrix.scores["generalization"]) / 3
    for (seed, proxy, sel), got in zip(draws, d.draws):
        test = np.setdiff1d(np.arange(20), proxy)
        means = edit_only[test].mean(0)
        for name, ls in sel.items():
            want = means.max() - means[LAYERS.index(ls.selected)]
            assert got.regret[name]["edit-only"][0] == pytest.approx(want)
            lo, hi = got.regret[name]["edit-only"][1:]
            assert lo <= hi
        diff = got.difference["edit-only"]
        want = means[LAYERS.index(sel["cma"].selected)] - means[LAYERS.index(sel["lga"].selected)]
        assert diff.value == pytest.approx(want) and (diff.a, diff.b) == ("lga", "cma")
        assert got.seed == seed and got.proxy == sorted(proxy)
    assert d.picks("lga") == [12, 11, 13] and d.picks("cma") == [10, 11, 12]
    np.testing.assert_allclose(d.regrets("lga", "edit-only"), [x.regret["lga"]["edit-only"][0] for x in d.draws])
    assert d.draws[1].difference["edit-only"].value == 0  # draw 2: the same layer
    md = d.to_markdown()
    r = d.regrets("lga", "edit-only")
    assert f"| lga | 12, 11, 13 | {r.mean():.3f} [{r.min():.3f}, {r.max():.3f}] |" in md
    assert "lower in" not in md and "draws" not in md.split("|")[-1]  # means, never counts of draws won
    assert "3 proxy draws of 5/20 edits" in repr(d)


def test_round_trip_missing_layers_and_errors(matrix):
    off = _pick(14, LAYERS + [14])  # a layer the matrix does not have
    d = over_draws(matrix, [(0, [0, 1, 2], {"lga": _pick(12), "cma": off})], definitions=["reliability", "weighted"],
                   n_boot=30)
    assert d.draws[0].regret["cma"]["reliability"] is None and d.draws[0].difference["weighted"] is None
    assert np.isnan(d.regrets("cma", "reliability")).all() and "| cma | 14 | n/a |" in d.to_markdown()
    back = Draws.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back.to_dict() == d.to_dict() and back.to_markdown() == d.to_markdown()
    with pytest.raises(ValueError, match="at least one"):
        over_draws(matrix, [])
    with pytest.raises(ValueError, match="same number of proxy rows"):
        over_draws(matrix, [(0, [0, 1], {}), (1, [0, 1, 2], {})])
    with pytest.raises(ValueError, match="0..19"):
        over_draws(matrix, [(0, [0, 20], {})])


def test_damaging_layers_cannot_be_golden(matrix):
    cap = np.full((20, 4), np.nan)
    cap[:4] = [0.0, 0.0, 2.0, 0.0]  # layer 12 raises the held-out loss by 2 nats: damaging
    m = Matrix(LAYERS, matrix.edit_ids, matrix.scores, capability=cap)
    d = over_draws(m, [(0, [0, 1, 2, 3], {"lga": _pick(12), "cma": _pick(11)})], definitions=["reliability"],
                   n_boot=50)
    means = m.scores["reliability"][4:].mean(0)
    best = max(means[i] for i in (0, 1, 3))  # the golden layer among the allowed ones
    assert d.draws[0].regret["cma"]["reliability"][0] == pytest.approx(best - means[1])
    assert d.draws[0].regret["lga"]["reliability"][0] == pytest.approx(best - means[2])


def test_plot_draws_one_line_per_selector(matrix):
    import matplotlib

    matplotlib.use("Agg")
    d = over_draws(matrix, [(0, [0, 1, 2], {"lga": _pick(12), "cma": _pick(10)}),
                            (1, [3, 4, 5], {"lga": _pick(13), "cma": _pick(10)})], definitions=["reliability"], n_boot=20)
    fig = d.plot()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["lga", "cma"]


def test_among_limits_the_choice_to_given_layers():
    """``LayerScores.among``: the best eligible layer of the given ones by what the selector
    maximises (LGA negative: the most negative S), checked against a hand argmax."""
    rng = np.random.default_rng(3)
    for sign in ("signed", "negative", "abs"):
        s = rng.normal(size=12).tolist()
        ok = (rng.random(12) > 0.3).tolist()
        r = LayerScores("lga", s, ok, 0, params={"sign": sign})
        keep = [1, 4, 5, 9, 11]
        key = {"signed": lambda x: x, "negative": lambda x: -x, "abs": abs}[sign]
        want = [l for l in keep if ok[l]]
        if not want:
            with pytest.raises(ValueError, match="is eligible"):
                r.among(keep)
            continue
        sub = r.among(keep)
        assert sub.selected == max(want, key=lambda l: key(s[l]))
        assert sub.layers == keep and sub.scores == [s[l] for l in keep] and sub.params["among"] == keep
    with pytest.raises(ValueError, match="none of layers \\[40\\] was scored"):
        LayerScores("cma", [0.1, 0.2], [True, True], 1).among([40])


def test_layer_scores_plot_legends_what_is_drawn_and_cuts_outliers():
    """An excluded outlier (LGA's 3512 beside eligible ~50) does not set the scale; the
    legend names only the kinds drawn (no 'excluded' where nothing was)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [20.0, 35.0, 3512.0, 50.0, 41.0, 80.0]
    ax = LayerScores("lga", s, [True, True, False, True, True, False], 3).plot()
    assert ax.get_ylim()[1] < 100 and ax.get_ylim()[1] > 50
    top = ax.get_ylim()[1]  # every bar the axis cuts is labelled (80 too, although not far out)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.3g}" for v in s if v > top)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["eligible", "excluded", "selected",
                                                                   "excluded, cut at the axis"]
    assert any(t.get_text() == "3.51e+03" for t in ax.texts)
    plt.close("all")
    ax = LayerScores("cma", [0.1, 0.3, 0.2], [True] * 3, 1).plot()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["eligible", "selected"]
    assert ax.get_ylim()[1] >= 0.3
    plt.close("all")

"""gradlocate.stats against independent computations on hand-built matrices.

References are written here with plain numpy loops, brute-force enumeration or scipy
called directly; matrices cover ties, NaNs, rows with all-equal scores, and pure noise.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from gradlocate.golden import arrays, inference, scores

NAN = math.nan


# --------------------------------------------------------------------------- overall


def test_edit_only_is_the_mean_of_the_edit_metrics_present():
    rel = np.array([[1.0, 0.0, NAN], [0.5, NAN, NAN]])
    gen = np.array([[0.0, 1.0, NAN], [NAN, NAN, NAN]])
    loc = np.array([[0.5, 0.5, 0.2], [1.0, NAN, NAN]])
    por = np.ones((2, 3))  # portability is not an edit-only metric
    got = scores.overall({"reliability": rel, "generalization": gen, "locality": loc, "portability": por})
    want = np.full((2, 3), NAN)
    for i, l in itertools.product(range(2), range(3)):
        vals = [m[i, l] for m in (rel, gen, loc) if not math.isnan(m[i, l])]
        if vals:
            want[i, l] = sum(vals) / len(vals)
    np.testing.assert_allclose(got, want, equal_nan=True)
    assert math.isnan(got[1, 1])  # nothing present: NaN, never 0


def test_weighted_overall_broadcasts_per_layer_capability_and_skips_absent_cells():
    rel = np.array([[1.0, 0.0], [1.0, 1.0]])
    loc = np.array([[NAN, 0.5], [0.25, 1.0]])
    cap = np.array([0.5, 1.0])
    w = {"reliability": 2.0, "locality": 1.0, "capability": 1.0, "fluency": 1.0}  # no fluency given
    got = scores.overall({"reliability": rel, "locality": loc, "capability": cap}, "weighted", weights=w)
    for i, l in itertools.product(range(2), range(2)):
        pairs = [(rel[i, l], 2.0), (loc[i, l], 1.0), (cap[l], 1.0)]
        pairs = [(v, k) for v, k in pairs if not math.isnan(v)]
        assert got[i, l] == pytest.approx(sum(v * k for v, k in pairs) / sum(k for _, k in pairs))
    default = scores.overall({"reliability": rel, "capability": cap}, "weighted")
    np.testing.assert_allclose(default, (rel + cap[None, :]) / 2)


def test_single_metric_definition_returns_that_metric():
    por = np.array([[0.1, NAN], [0.3, 0.4]])
    np.testing.assert_array_equal(scores.overall({"portability": por, "reliability": np.ones((2, 2))}, "portability"),
                                  por)


def _sweep_golden_layers(rel, loc, lm_loss):
    from gradlocate.golden.sweep import LayerRecord, SweepResult

    recs = [LayerRecord(layer=l, teacher_forced={"reliability": float(np.mean(rel[:, l])),
                                                 "locality": float(np.mean(loc[:, l]))},
                        general={"lm_loss": float(lm_loss[l])}) for l in range(rel.shape[1])]
    return SweepResult(recs, overall_kind="golden-layers").overall


def test_golden_layers_overall_averages_to_the_sweeps_definition():
    rng = np.random.default_rng(3)
    rel, loc = rng.random((6, 5)), rng.random((6, 5))
    lm_loss = np.array([3.0, 3.2, 2.9, 3.5, 3.1])
    s = scores.overall({"reliability": rel, "locality": loc, "lm_loss": lm_loss}, "golden-layers")
    np.testing.assert_allclose(s.mean(0), _sweep_golden_layers(rel, loc, lm_loss), rtol=1e-12)
    # each metric on its own: min-max of the layer means, lower-is-better negated
    only_loss = scores.overall({"lm_loss": lm_loss, "x": rel}, "golden-layers")[0]
    np.testing.assert_allclose(only_loss, (lm_loss.max() - lm_loss) / (lm_loss.max() - lm_loss.min()))
    flat = scores.overall({"reliability": np.full((2, 3), 0.7)}, "golden-layers")
    np.testing.assert_array_equal(flat, np.ones((2, 3)))  # equal at every layer: 1, as the sweep


def test_overall_errors():
    with pytest.raises(ValueError, match="definition must be one of"):
        scores.overall({"reliability": np.ones((2, 2))}, "best")
    with pytest.raises(ValueError, match="shape"):
        scores.overall({"reliability": np.ones((2, 2)), "locality": np.ones((3, 2))})
    with pytest.raises(ValueError, match="at least one of its metrics"):
        scores.overall({"portability": np.ones((2, 2))}, "edit-only")
    with pytest.raises(ValueError, match="2-d"):
        scores.overall({"capability": np.ones(3)})
    with pytest.raises(ValueError, match="no metrics"):
        scores.overall({})


# --------------------------------------------------------------------------- golden layer, own optimum


def ref_golden(s, allowed=None):
    best, best_l = -math.inf, None
    for l in range(s.shape[1]):
        if allowed is not None and l not in allowed:
            continue
        col = [v for v in s[:, l] if not math.isnan(v)]
        if col and sum(col) / len(col) > best + 1e-15:
            best, best_l = sum(col) / len(col), l
    return best_l


def test_golden_layer_ties_nans_and_allowed():
    s = np.array([[0.2, 0.8, 0.8, NAN], [0.4, 0.6, 0.6, 1.0]])
    assert scores.golden_layer(s) == 3 == ref_golden(s)  # NaN cells left out of the mean
    s[1, 3] = NAN
    assert scores.golden_layer(s) == 1 == ref_golden(s)  # an all-NaN column is never golden; tie -> lowest
    assert scores.golden_layer(s, allowed=[0, 2]) == 2 == ref_golden(s, {0, 2})
    assert scores.golden_layer(s, allowed=np.array([True, False, False, True])) == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.integers(0, 3, (5, 4)).astype(float)  # many ties
        assert scores.golden_layer(m) == ref_golden(m)
    with pytest.raises(ValueError, match="no allowed layer"):
        scores.golden_layer(s, allowed=[3])
    with pytest.raises(ValueError, match="out of range"):
        scores.golden_layer(s, allowed=[7])
    with pytest.raises(ValueError, match="2-d"):
        scores.golden_layer([0.1, 0.2])


def test_own_optimum_ties_equal_rows_nans():
    s = np.array([[0.1, 0.5, 0.5], [0.3, 0.3, 0.3], [NAN, NAN, 0.2], [0.9, NAN, 0.9]])
    o = scores.own_optimum(s)
    assert o.layers.tolist() == [1, 0, 2, 0] and o.values.tolist() == [0.5, 0.3, 0.2, 0.9]
    assert scores.own_optimum(s, allowed=[1, 2]).layers.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        scores.own_optimum(s, allowed=[0, 1])


def test_selection_gain_by_hand():
    s = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.2, 0.0, 0.4]])
    g = ref_golden(s)
    want = np.mean([max(r) - r[g] for r in s])
    assert scores.selection_gain(s) == pytest.approx(want)


# --------------------------------------------------------------------------- selection bias


def test_held_out_optimum_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.random((7, 4)), rng.random((7, 4))
    h = inference.held_out_optimum(a, b)
    picks = [int(np.argmax(r)) for r in a]
    g = ref_golden(a)
    assert h.layers.tolist() == picks
    assert h.held_out == pytest.approx(np.mean([b[i, p] for i, p in enumerate(picks)]))
    assert h.in_sample == pytest.approx(np.mean(b.max(1)))
    assert h.golden == pytest.approx(b[:, g].mean())
    assert h.gain == pytest.approx(h.held_out - h.golden) and h.bias == pytest.approx(h.in_sample - h.held_out)
    same = inference.held_out_optimum(a, a)
    assert same.bias == 0 and same.gain == pytest.approx(scores.selection_gain(a))
    with pytest.raises(ValueError, match="same shape"):
        inference.held_out_optimum(a, b[:, :3])


def test_held_out_removes_the_winners_curse_on_noise():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
    h = inference.held_out_optimum(a, b)
    assert h.bias > 0.8  # in-sample optimum of noise is far above ...
    assert abs(h.gain) < 0.15  # ... what selecting on one replicate buys on another: nothing


# --------------------------------------------------------------------------- paired tests


def brute_sign_flip_p(d):
    obs = abs(sum(d) / len(d))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        total += 1
        hits += abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= obs - 1e-12
    return hits / total


def test_paired_t_matches_ttest_rel_and_the_formula():
    rng = np.random.default_rng(7)
    a, b = rng.random(12), rng.random(12)
    r = inference.paired_tests(a, b)
    ref = sps.ttest_rel(a, b)
    assert r.t == pytest.approx(ref.statistic) and r.p_t == pytest.approx(ref.pvalue)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert r.t == pytest.approx(t) and r.p_t == pytest.approx(2 * sps.t.sf(abs(t), len(d) - 1))
    assert r.mean_diff == pytest.approx(d.mean()) and r.n == 12


def test_wilcoxon_drops_zero_differences_and_matches_scipy():
    a = np.array([0.9, 0.8, 0.7, 0.9, 0.6, 0.5, 0.75, 0.3])
    b = np.array([0.5, 0.6, 0.7, 0.4, 0.5, 0.5, 0.5, 0.4])
    r = inference.paired_tests(a, b)
    d = a - b
    assert r.n_zero == 2
    ref = sps.wilcoxon(a, b, zero_method="wilcox")
    assert r.w == pytest.approx(ref.statistic) and r.p_wilcoxon == pytest.approx(ref.pvalue)
    nz = d[d != 0]  # the statistic by hand: the smaller signed-rank sum of the nonzero differences
    ranks = sps.rankdata(np.abs(nz))
    assert r.w == pytest.approx(min(ranks[nz > 0].sum(), ranks[nz < 0].sum()))
    zero = inference.paired_tests([0.5, 0.5, 0.2], [0.5, 0.5, 0.2])
    assert (zero.w, zero.p_wilcoxon, zero.p_permutation, zero.n_zero) == (0.0, 1.0, 1.0, 3)


@pytest.mark.parametrize("d", [[0.4, 0.2, 0.0, 0.5, 0.1], [0.3, -0.1, 0.2, 0.2, -0.05, 0.4, 0.1],
                               [1.0, -1.0, 1.0, -1.0], [0.2, 0.2, 0.2]])
def test_sign_flip_test_equals_brute_force_enumeration(d):
    b = np.zeros(len(d))
    r = inference.paired_tests(np.array(d), b)
    assert r.exact and r.p_permutation == pytest.approx(brute_sign_flip_p(d))


def test_monte_carlo_sign_flip_approximates_the_exact_p():
    rng = np.random.default_rng(8)
    d = rng.normal(0.3, 1.0, size=14)
    exact = inference.paired_tests(d, np.zeros(14))
    mc = inference.paired_tests(d, np.zeros(14), exact_max=5, n_permutations=20000, seed=1)
    assert exact.exact and not mc.exact
    assert mc.p_permutation == pytest.approx(exact.p_permutation, abs=0.01)


def test_paired_tests_drop_nan_pairs_and_check_input():
    r = inference.paired_tests([0.9, NAN, 0.7, 0.8], [0.5, 0.6, NAN, 0.1])
    assert (r.n, r.dropped) == (2, 2)
    with pytest.raises(ValueError, match="pair up"):
        inference.paired_tests([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 complete pairs"):
        inference.paired_tests([1.0, NAN], [0.0, 1.0])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_unambiguous_golden_layer():
    rng = np.random.default_rng(9)
    rel = np.clip(np.array([0.2, 0.9, 0.4]) + rng.normal(scale=0.05, size=(40, 3)), 0, 1)
    b = inference.bootstrap({"reliability": rel}, "reliability", selectors={"gr": 2, "gold": 1}, n=300)
    assert b.golden == 1 and b.p_golden == 1.0 and b.golden_freq.tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(b.layer_mean, rel.mean(0))
    assert all(lo <= m <= hi for lo, m, hi in zip(b.layer_lo, b.layer_mean, b.layer_hi))
    assert b.regret["gold"] == (0.0, 0.0, 0.0)
    point, lo, hi = b.regret["gr"]
    assert point == pytest.approx(rel[:, 1].mean() - rel[:, 2].mean()) and 0.4 < lo <= point <= hi < 0.6


def test_bootstrap_ambiguous_golden_layer_splits():
    rng = np.random.default_rng(10)
    s = rng.normal(size=(40, 3)) + np.array([0.0, 1.0, 1.0])  # layers 1 and 2 tie in expectation
    b = inference.bootstrap({"x": s}, "x", n=400, seed=2)
    assert b.golden_freq[0] == 0.0 and b.golden_freq[1] > 0.1 and b.golden_freq[2] > 0.1
    assert b.golden_freq.sum() == pytest.approx(1.0) and b.p_golden < 0.9


def test_bootstrap_resamples_edits_jointly_across_metrics():
    rng = np.random.default_rng(11)
    r = rng.random((30, 1)) * np.ones((1, 4))
    # per edit, reliability + locality is the same at every layer: resampled jointly the
    # edit-only overall is constant, so every resample's layer means are exactly equal
    metrics = {"reliability": r, "locality": 1.0 - r + np.array([0.0, 0.1, 0.2, 0.3])}
    b = inference.bootstrap(metrics, "edit-only", n=100)
    np.testing.assert_allclose(b.layer_hi - b.layer_lo, 0.0, atol=1e-12)
    assert b.golden == 3 and b.p_golden == 1.0


def test_bootstrap_golden_layers_definition_is_renormalised_and_respects_allowed():
    rng = np.random.default_rng(12)
    m = {"reliability": rng.random((20, 4)), "lm_loss": np.array([3.0, 2.5, 2.0, 9.0])}
    b = inference.bootstrap(m, "golden-layers", allowed=[0, 1], n=50)
    assert b.golden in (0, 1) and b.golden_freq[2:].sum() == 0
    np.testing.assert_allclose(b.layer_mean, scores.overall(m, "golden-layers").mean(0))
    with pytest.raises(ValueError, match="selectors"):
        inference.bootstrap(m, selectors={"x": 4})


def test_bootstrap_regret_difference_is_paired_over_the_same_resamples():
    rng = np.random.default_rng(13)
    # layers 1 and 2 share a large per-edit difficulty, 1 ahead by 0.02; layers 0 and 3 are
    # better and noisy: the two regret intervals overlap, the paired difference's does not cover 0
    shared = rng.normal(size=(60, 1))
    s = np.hstack([rng.normal(size=(60, 1)) + 0.7, shared + 0.52, shared + 0.5, rng.normal(size=(60, 1)) + 0.7])
    s[:, 1:3] += rng.normal(scale=0.01, size=(60, 2))
    b = inference.bootstrap({"x": s}, "x", selectors={"one": 1, "two": 2, "zero": 0}, n=400, seed=5)
    one, two = b.regret["one"], b.regret["two"]
    assert one[1] < two[2] and two[1] < one[2]  # separate intervals overlap
    d = b.difference("one", "two")
    # reference: the same resamples drawn by hand, the regret difference per resample
    ref_rng = np.random.default_rng(5)
    ref = []
    for _ in range(400):
        rows = ref_rng.integers(0, 60, 60)
        means = s[rows].mean(0)
        ref.append((means.max() - means[1]) - (means.max() - means[2]))
    ref = np.array(ref)
    assert d.value == pytest.approx(one[0] - two[0])
    assert d.value == pytest.approx(s[:, 2].mean() - s[:, 1].mean())
    assert (d.lo, d.hi) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])))
    assert d.p_a_lower == pytest.approx(np.mean(ref < 0)) and d.p_b_lower == pytest.approx(np.mean(ref > 0))
    assert d.hi < 0 and d.p_a_lower == 1.0
    # either order; flipping negates and swaps
    r = b.difference("two", "one")
    assert (r.a, r.value, r.lo, r.hi, r.p_a_lower) == ("two", -d.value, -d.hi, -d.lo, d.p_b_lower)
    assert set(b.differences) == {"one - two", "one - zero", "two - zero"}
    assert b.difference("one", "zero").value == pytest.approx(s[:, 0].mean() - s[:, 1].mean())
    with pytest.raises(KeyError, match="selectors are"):
        b.difference("one", "lga")
    assert json.loads(json.dumps(b.to_dict()))["differences"]["one - two"]["a"] == "one"


# --------------------------------------------------------------------------- transfer


def test_transfer_is_perfect_when_every_edit_has_the_same_best_layer():
    rng = np.random.default_rng(13)
    s = rng.random((30, 5)) * 0.5
    s[:, 3] = 0.9 + rng.random(30) * 0.1
    t = inference.transfer(s, n_proxy=10)
    assert t.agreement == 1.0 and t.regret_mean == 0.0 and t.regret_interval == (0.0, 0.0)
    assert t.n_splits == 200 and (t.n_proxy, t.n_test) == (10, 20) and t.proxy_freq[3] == 1.0


def test_transfer_on_noise_is_one_in_L_on_average_over_matrices():
    rng = np.random.default_rng(14)
    L = 5
    rates = [inference.transfer(rng.normal(size=(40, L)), n_proxy=20, n_splits=40, seed=k).agreement for k in range(200)]
    assert abs(np.mean(rates) - 1 / L) < 0.05  # the sd over matrices is ~0.22: standard error ~0.015
    # ... but one matrix's rate scatters: its complementary halves are anti-correlated
    assert min(rates) < 0.1 and max(rates) > 0.3


def test_transfer_null_agreement_is_this_matrixs_chance_level():
    rng = np.random.default_rng(16)
    noise = rng.normal(size=(40, 5))
    signal = noise * 0.2 + np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    ts = inference.transfer(signal, n_proxy=20, n_null=20)
    assert ts.agreement == 1.0 and ts.null_agreement < 0.35 and ts.p_null == pytest.approx(1 / 21)
    t = inference.transfer(noise, n_proxy=20)
    assert t.regret_mean > 0 and t.regret_interval[0] >= 0.0  # regret is never negative
    assert math.isnan(t.null_agreement) and math.isnan(t.p_null)


def test_transfer_p_null_is_calibrated_on_noise():
    rng = np.random.default_rng(17)
    ps = np.array([inference.transfer(rng.normal(size=(40, 5)), n_proxy=20, n_splits=20, n_null=19, seed=k).p_null
                   for k in range(60)])
    assert np.mean(ps <= 0.1) < 0.25 and 0.35 < ps.mean() < 0.7


def test_transfer_errors():
    with pytest.raises(ValueError, match="n_proxy"):
        inference.transfer(np.ones((4, 2)), n_proxy=4)
    with pytest.raises(ValueError, match="n_splits"):
        inference.transfer(np.ones((4, 2)), n_proxy=2, n_splits=0)


# --------------------------------------------------------------------------- rank agreement


def ref_kendall_tau_b(x, y):
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx == dy:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def ref_spearman(x, y):
    return float(np.corrcoef(sps.rankdata(x), sps.rankdata(y))[0, 1])


def test_rank_agreement_against_brute_force():
    x = np.array([3.0, 1.0, 2.0, 2.0, 0.5, NAN, 4.0])
    y = np.array([0.9, 0.1, 0.5, 0.6, 0.6, 0.3, 0.7])
    r = inference.rank_agreement(x, y, allowed=[2, 3, 4, 5, 6])
    k = ~np.isnan(x)
    assert r.n == 6 and r.spearman == pytest.approx(ref_spearman(x[k], y[k]))
    assert r.kendall == pytest.approx(ref_kendall_tau_b(x[k], y[k]))
    sub = np.array([2, 3, 4, 6])
    assert r.n_allowed == 4 and r.spearman_allowed == pytest.approx(ref_spearman(x[sub], y[sub]))
    assert r.kendall_allowed == pytest.approx(ref_kendall_tau_b(x[sub], y[sub]))
    few = inference.rank_agreement([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], allowed=[1])
    assert few.spearman == pytest.approx(1.0) and math.isnan(few.spearman_allowed) and few.n_allowed == 1
    with pytest.raises(ValueError, match="one value per layer"):
        inference.rank_agreement([1.0, 2.0], [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- damage gate


def test_damage_gate_per_layer_per_cell_and_with_the_golden_layer():
    g = scores.damage_gate([0.99, 0.6, NAN, 0.95], threshold=0.9)
    assert g.damaging == [1] and g.allowed.tolist() == [True, False, True, True]
    rise = np.array([[0.01, 0.5, 0.02], [0.03, 0.7, 0.4]])  # held-out LM loss rise, nats
    cost = scores.damage_gate(rise, threshold=0.1, higher_is_better=False)
    np.testing.assert_allclose(cost.values, rise.mean(0))
    assert cost.damaging == [1, 2]
    score = np.array([[0.5, 0.99, 0.9], [0.6, 0.98, 0.95]])
    assert scores.golden_layer(score) == 1 and scores.golden_layer(score, cost.allowed) == 0
    with pytest.raises(ValueError, match="capability must be"):
        scores.damage_gate(np.ones((2, 2, 2)), 0.5)


def _friedman_by_hand(x):
    """Friedman's chi-square without ties: ranks within each edit, then the textbook formula."""
    n, k = x.shape
    ranks = np.argsort(np.argsort(x, axis=1), axis=1) + 1.0
    stat = 12.0 / (n * k * (k + 1)) * (ranks.sum(0) ** 2).sum() - 3.0 * n * (k + 1)
    return stat, sps.chi2.sf(stat, k - 1)


def test_layer_effect_is_friedmans_test_over_the_complete_edits():
    rng = np.random.default_rng(21)
    x = rng.normal(0, 1e-3, (9, 5))
    x[:, 3] += 0.01  # one layer differs in every edit
    with_gaps = np.vstack([x, [NAN, 0.0, 0.1, 0.2, 0.3]])  # an edit without every layer is left out
    e = scores.layer_effect(with_gaps)
    stat, p = _friedman_by_hand(x)
    assert e.n_edits == 9 and e.n_layers == 5
    assert e.statistic == pytest.approx(stat) and e.p_value == pytest.approx(p) and p < 0.01
    assert e.spread == pytest.approx(np.ptp(x.mean(0)))
    assert np.isnan(scores.layer_effect(x[:, :2]).p_value)  # two layers: no Friedman test
    assert scores.layer_effect(np.zeros((4, 3))).p_value == 1.0  # no layer differs at all


def test_layer_effect_p_value_is_calibrated_on_noise():
    rng = np.random.default_rng(3)
    ps = np.array([scores.layer_effect(rng.normal(size=(8, 6))).p_value for _ in range(400)])
    assert 0.02 < (ps < 0.05).mean() < 0.09  # the null rejects at about its level


# --------------------------------------------------------------------------- result objects


def test_results_serialise_and_print():
    rng = np.random.default_rng(15)
    s = rng.random((10, 4))
    objs = [scores.own_optimum(s), inference.held_out_optimum(s, rng.random((10, 4))),
            inference.paired_tests(s[:, 0], s[:, 1]), inference.bootstrap({"x": s}, "x", n=5, selectors={"a": 0}),
            inference.transfer(s, 5, n_splits=5), inference.rank_agreement(s[0], s[1]), scores.damage_gate(s, 0.5), scores.layer_effect(s)]
    for o in objs:
        d = json.loads(json.dumps(o.to_dict()))
        assert set(d) == set(o.__dataclass_fields__)
        text = repr(o)
        assert text.startswith(type(o).__name__ + "(") and "array(" not in text and len(text) < 600

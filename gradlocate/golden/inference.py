"""The study's inference: paired tests, the bootstrap over edits, proxy -> test transfer,
rank agreement, and the own optimum scored on a replicate.

Pure functions of single-edit matrices, as :mod:`gradlocate.golden.scores` (whose
definitions of overall and golden layer they use):

* :func:`held_out_optimum` - the own optimum chosen on one replicate and scored on
  another (one direction; :func:`gradlocate.golden.oracle.oracle_gain` cross-fits both,
  with an interval). The permutation-null "selection bias" that stood beside it is
  withdrawn: it treated real per-edit optima as noise and subtracted them (see
  docs/statistics.md).
* :func:`paired_tests` - paired t, Wilcoxon signed-rank and sign-flip permutation tests.
* :func:`bootstrap` - edits resampled jointly across every metric matrix; selectors'
  regrets and their paired differences (:meth:`Bootstrap.difference`).
* :func:`transfer` - proxy -> test agreement of the golden layer over random splits (the
  study judges transfer by test regret instead: :mod:`gradlocate.golden.regret`).
* :func:`rank_agreement` - Spearman and Kendall between a selector's scores and the truth.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from gradlocate.golden.arrays import Result, as_matrix, interval, layer_mask, layer_means, seeded
from gradlocate.golden.scores import _metric_matrices, golden_layer, overall, own_optimum

__all__ = ["held_out_optimum", "paired_tests", "bootstrap", "transfer", "rank_agreement",
           "HeldOut", "PairedTests", "Bootstrap", "RegretDifference", "Transfer", "RankAgreement"]


# --------------------------------------------------------------------------- selection bias


@dataclass(repr=False)
class HeldOut(Result):
    """The own optimum chosen on one replicate and scored on another.

    Attributes:
        layers: each row's layer chosen on the selection replicate.
        held_out: mean over rows of the evaluation score at that layer (unbiased by selection).
        in_sample: mean over rows of the evaluation replicate's own optimum (biased up).
        golden: mean evaluation score at the golden layer chosen on the selection replicate.
        gain: ``held_out - golden``: what per-edit selection buys on fresh noise.
        bias: ``in_sample - held_out``: the winner's curse seen on this data.
        n: rows used (finite at both chosen layers).
    """

    layers: np.ndarray
    held_out: float
    in_sample: float
    golden: float
    gain: float
    bias: float
    n: int


def held_out_optimum(select_scores: Any, eval_scores: Any, allowed: Any = None) -> HeldOut:
    """Each row's optimum chosen on ``select_scores`` and scored on ``eval_scores`` (a
    second replicate: same edits, another seed or prompt), with the golden layer treated
    the same way (chosen on one, scored on the other). Selection and evaluation noise are
    independent, so ``held_out`` carries no winner's curse; it is a lower bound of the
    true per-edit optimum (a noisy choice can miss), ``in_sample`` an upper bound. With
    two replicates, run it both ways and average (cross-fitting) to use all the data.

    Raises:
        ValueError: shapes differ, or NaN-only rows.

    Example:
        >>> sel = [[1.0, 0.0], [0.0, 1.0]]
        >>> ev = [[0.8, 0.6], [0.7, 0.5]]
        >>> h = held_out_optimum(sel, ev)
        >>> h.layers.tolist(), round(h.held_out, 3), round(h.in_sample, 3), round(h.gain, 3)
        ([0, 1], 0.65, 0.75, -0.1)
    """
    a, b = as_matrix(select_scores, "select_scores"), as_matrix(eval_scores, "eval_scores")
    if a.shape != b.shape:
        raise ValueError(f"select_scores {a.shape} and eval_scores {b.shape} must have the same shape")
    layers = own_optimum(a, allowed).layers
    g = golden_layer(a, allowed)
    rows = np.arange(len(a))
    picked, at_g = b[rows, layers], b[:, g]
    keep = ~np.isnan(picked) & ~np.isnan(at_g)
    if not keep.any():
        raise ValueError("no row has evaluation scores at both its chosen layer and the golden layer")
    best = own_optimum(b[keep], allowed).values
    ho, gold = float(picked[keep].mean()), float(at_g[keep].mean())
    ins = float(best.mean())
    return HeldOut(layers, ho, ins, gold, ho - gold, ins - ho, int(keep.sum()))


# --------------------------------------------------------------------------- paired tests


@dataclass(repr=False)
class PairedTests(Result):
    """Paired comparisons of ``a`` and ``b`` (two-sided).

    Attributes:
        n: pairs used (both finite); dropped: pairs with a NaN.
        mean_diff: mean of ``a - b``.
        t, p_t: paired t-test (``scipy.stats.ttest_rel``; NaN if the differences are all equal).
        w, p_wilcoxon, n_zero: Wilcoxon signed-rank (zero differences dropped, Wilcoxon's
            own treatment; ``n_zero`` of them) - ``w`` is the smaller signed-rank sum.
        p_permutation: sign-flip permutation test of the mean difference.
        exact: whether the permutation p-value enumerates all ``2^n`` sign flips.
    """

    n: int
    dropped: int
    mean_diff: float
    t: float
    p_t: float
    w: float
    p_wilcoxon: float
    n_zero: int
    p_permutation: float
    exact: bool


def _sign_flip_p(d: np.ndarray, n_permutations: int, seed: int, exact_max: int) -> tuple[float, bool]:
    """Two-sided sign-flip p-value of ``|mean(d)|``: exact when ``len(d) <= exact_max``
    (``#{|mean(s d)| >= |mean(d)|} / 2^n``), else Monte Carlo ``(1 + hits) / (1 + N)``."""
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))
    if len(d) <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= obs - tol)), True
    signs = seeded(seed).choice((1.0, -1.0), size=(n_permutations, len(d)))
    hits = int(np.sum(np.abs(signs @ d / len(d)) >= obs - tol))
    return (1 + hits) / (1 + n_permutations), False


def paired_tests(a: Any, b: Any, *, n_permutations: int = 10000, seed: int = 0, exact_max: int = 16) -> PairedTests:
    """Paired t, Wilcoxon signed-rank and sign-flip permutation tests of ``a`` vs ``b``
    (e.g. each edit's score at its held-out optimum vs at the golden layer).

    Pairs with a NaN on either side are dropped. Wilcoxon: zero differences are dropped
    before ranking (``zero_method="wilcox"``) - a zero says nothing about the sign - and
    scipy's ``method="auto"`` chooses the exact or normal null; if every difference is
    zero, ``w = 0`` and ``p_wilcoxon = 1``. The permutation test flips the signs of the
    differences (their exchangeability under H0: no difference), exactly for
    ``n <= exact_max``, else with ``n_permutations`` random flips.

    Raises:
        ValueError: lengths differ, or fewer than 2 complete pairs.

    Example:
        >>> r = paired_tests([0.9, 0.8, 0.7, 0.9, 0.6], [0.5, 0.6, 0.7, 0.4, 0.5])
        >>> r.n, r.n_zero, round(r.mean_diff, 3), r.exact, round(r.p_permutation, 4)
        (5, 1, 0.24, True, 0.125)
    """
    x, y = as_matrix(a, "a", ndim=1), as_matrix(b, "b", ndim=1)
    if x.shape != y.shape:
        raise ValueError(f"a and b must pair up: lengths {x.size} and {y.size}")
    keep = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        raise ValueError(f"paired tests need at least 2 complete pairs, got {x.size}")
    d = x - y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = sps.ttest_rel(x, y)
    nz = d[d != 0]
    if nz.size:
        wil = sps.wilcoxon(nz, zero_method="wilcox")
        w, pw = float(wil.statistic), float(wil.pvalue)
    else:
        w, pw = 0.0, 1.0
    pp, exact = _sign_flip_p(d, n_permutations, seed, exact_max)
    return PairedTests(int(x.size), int((~keep).sum()), float(d.mean()), float(t.statistic), float(t.pvalue),
                       w, pw, int(d.size - nz.size), pp, exact)


# --------------------------------------------------------------------------- bootstrap


@dataclass(repr=False)
class RegretDifference(Result):
    """Paired bootstrap of ``regret(a) - regret(b)``: both regrets on the **same** resamples.

    The resample's golden layer cancels, so this is the difference of the two chosen layers'
    mean overalls (b's minus a's), resampled jointly over edits: negative when ``a`` is better.

    Attributes:
        a, b: the two selectors.
        value: the full data's difference; lo, hi: its percentile interval.
        p_a_lower, p_b_lower: fractions of resamples where a's (b's) regret is strictly lower.
    """

    a: str
    b: str
    value: float
    lo: float
    hi: float
    p_a_lower: float
    p_b_lower: float

    def flipped(self) -> RegretDifference:
        """The same comparison as ``regret(b) - regret(a)``."""
        return RegretDifference(self.b, self.a, -self.value, -self.hi, -self.lo, self.p_b_lower, self.p_a_lower)


@dataclass(repr=False)
class Bootstrap(Result):
    """Edits resampled with replacement, jointly across every metric matrix.

    Attributes:
        golden: the golden layer of the full data.
        golden_freq: per layer, the fraction of resamples whose golden layer it is.
        p_golden: ``golden_freq[golden]``: how often the resample agrees.
        layer_mean: the full data's mean overall per layer; layer_lo, layer_hi: its intervals.
        golden_value: the best layer mean; golden_value_interval: the best mean's interval.
        regret: name -> (full-data regret, lo, hi) of each given layer: the resample's best
            layer mean minus the mean at that layer (0 when it is the golden layer).
        differences: ``"a - b"`` -> :class:`RegretDifference` for each pair of selectors
            (in the order given); read them with :meth:`difference`.
        n, level: resamples and interval level (percentile intervals).
    """

    golden: int
    golden_freq: np.ndarray
    p_golden: float
    layer_mean: np.ndarray
    layer_lo: np.ndarray
    layer_hi: np.ndarray
    golden_value: float
    golden_value_interval: tuple[float, float]
    regret: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    differences: dict[str, RegretDifference] = field(default_factory=dict)
    n: int = 0
    level: float = 0.95

    def difference(self, a: str, b: str) -> RegretDifference:
        """``regret(a) - regret(b)``, paired over the same resamples (either order given).

        Raises:
            KeyError: ``a`` or ``b`` is not a selector of this bootstrap.
        """
        if f"{a} - {b}" in self.differences:
            return self.differences[f"{a} - {b}"]
        if f"{b} - {a}" in self.differences:
            return self.differences[f"{b} - {a}"].flipped()
        raise KeyError(f"no regret for {a!r} and {b!r} together: the selectors are {list(self.regret)}")


def _summary(metrics: dict[str, np.ndarray], definition: str, weights: Any, allowed: np.ndarray,
             chosen: Mapping[str, int]) -> tuple[int, np.ndarray, float, np.ndarray]:
    """(golden, layer means, best mean, regret per chosen layer) of one (re)sample."""
    s = overall(metrics, definition, weights)
    means = layer_means(s)
    g = golden_layer(s, allowed)
    regrets = np.array([means[g] - means[c] for c in chosen.values()])
    return g, means, float(means[g]), regrets


def bootstrap(metrics: Mapping[str, Any], definition: str = "edit-only", *, weights: Mapping[str, float] | None = None,
              selectors: Mapping[str, int] | None = None, allowed: Any = None, n: int = 1000, seed: int = 0,
              level: float = 0.95) -> Bootstrap:
    """Bootstrap over edits: rows are resampled with replacement **jointly** across every
    metric matrix (an edit keeps all its metrics at all layers), and the overall
    (re-normalised for ``"golden-layers"``), the layer means, the golden layer and each
    selector's regret are recomputed on every resample.

    Args:
        metrics: name -> ``[edits, layers]`` (or ``[layers]``), as in :func:`overall`.
        definition: the overall's definition, as in :func:`overall`.
        weights: the ``"weighted"`` overall's weights, as in :func:`overall`.
        selectors: name -> the column a selector chose; its regret is reported.
        allowed: layers eligible as golden (e.g. :attr:`DamageGate.allowed`).
        n: resamples.
        seed: the resampling seed.
        level: the percentile intervals' level.

    Example:
        >>> rel = np.tile([0.2, 0.9, 0.4], (30, 1))
        >>> b = bootstrap({"reliability": rel}, "reliability", selectors={"first": 0}, n=50)
        >>> b.golden, b.p_golden, [round(v, 3) for v in b.regret["first"]]
        (1, 1.0, [0.7, 0.7, 0.7])
    """
    m = _metric_matrices(metrics)
    n_rows, n_layers = next(iter(m.values())).shape
    if n < 1:
        raise ValueError(f"n (resamples) must be >= 1, got {n}")
    chosen = dict(selectors or {})
    bad = {k: v for k, v in chosen.items() if not 0 <= int(v) < n_layers}
    if bad:
        raise ValueError(f"selectors {bad}: layer indices must be in 0..{n_layers - 1}")
    mask = layer_mask(allowed, n_layers)
    g0, means0, best0, reg0 = _summary(m, definition, weights, mask, chosen)
    rng = seeded(seed)
    goldens, means, bests, regs = np.empty(n, int), np.empty((n, n_layers)), np.empty(n), np.empty((n, len(chosen)))
    for k in range(n):
        rows = rng.integers(0, n_rows, n_rows)
        goldens[k], means[k], bests[k], regs[k] = _summary({a: v[rows] for a, v in m.items()}, definition,
                                                           weights, mask, chosen)
    lohi = np.array([interval(means[:, l], level) for l in range(n_layers)])
    freq = np.bincount(goldens, minlength=n_layers) / n
    regret = {name: (float(reg0[j]), *interval(regs[:, j], level)) for j, name in enumerate(chosen)}
    diffs = {}
    for (i, a), (j, b) in itertools.combinations(enumerate(chosen), 2):
        d = regs[:, i] - regs[:, j]
        diffs[f"{a} - {b}"] = RegretDifference(a, b, float(reg0[i] - reg0[j]), *interval(d, level),
                                               float(np.mean(d < 0)), float(np.mean(d > 0)))
    return Bootstrap(g0, freq, float(freq[g0]), means0, lohi[:, 0], lohi[:, 1], best0, interval(bests, level),
                     regret, diffs, n, level)


# --------------------------------------------------------------------------- transfer


@dataclass(repr=False)
class Transfer(Result):
    """Proxy -> test transfer of the golden layer over random splits of the edits.

    Attributes:
        agreement: fraction of splits where the proxy's golden layer is the test's.
        regret_mean: mean test regret of using the proxy's golden layer (test best layer
            mean minus the test mean at the proxy's layer).
        regret_interval: its percentile interval over splits.
        proxy_freq: per layer, how often the proxy picks it.
        null_agreement: the agreement with the same split sizes on ``n_null`` matrices
            whose rows are permuted across layers (no layer better than another): the
            chance level *for this matrix* (NaN when ``n_null=0``).
        p_null: ``(1 + #{null matrices' agreement >= agreement}) / (1 + n_null)``: the
            chance agreement scatters as widely as the observed, so judge by this.
        n_proxy, n_test, n_splits: split sizes and count.
    """

    agreement: float
    regret_mean: float
    regret_interval: tuple[float, float]
    proxy_freq: np.ndarray
    null_agreement: float
    p_null: float
    n_proxy: int
    n_test: int
    n_splits: int


def _splits(s: np.ndarray, n_proxy: int, n_splits: int, rng: np.random.Generator,
            mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per random split: (proxy golden == test golden, test regret of the proxy's, proxy's pick)."""
    agree, regret, picks = np.empty(n_splits, bool), np.empty(n_splits), np.empty(n_splits, int)
    for k in range(n_splits):
        order = rng.permutation(len(s))
        proxy, test = s[order[:n_proxy]], s[order[n_proxy:]]
        picks[k], g_test = golden_layer(proxy, mask), golden_layer(test, mask)
        tm = layer_means(test)
        agree[k], regret[k] = picks[k] == g_test, tm[g_test] - tm[picks[k]]
    return agree, regret, picks


def transfer(score: Any, n_proxy: int, n_splits: int = 200, seed: int = 0, allowed: Any = None,
             level: float = 0.95, n_null: int = 0) -> Transfer:
    """Split the rows at random ``n_splits`` times into ``n_proxy`` proxy edits and the
    rest as test edits; on each split compare the proxy's golden layer with the test's.
    Use at least 200 splits (the default) for a stable rate.

    If every edit has the same best layer, agreement is 1. On pure noise it is ``1 / L``
    in expectation over noise matrices, but **not for one matrix**: proxy and test are
    complementary parts of a fixed whole (``proxy sum + test sum`` is fixed per layer),
    so a layer high in the proxy tends to be low in the test, and one matrix's rate
    scatters widely around ``1 / L`` (from near 0 to well above). Judge a rate by
    ``p_null`` (``n_null > 0``): ``n_null`` matrices made from this one by permuting each
    row's scores across the allowed layers, split the same way.

    Raises:
        ValueError: ``n_proxy`` not in ``1 .. edits - 1``, or ``n_splits < 1``.

    Example:
        >>> s = np.tile([0.1, 0.8, 0.3], (10, 1))
        >>> t = transfer(s, n_proxy=4)
        >>> t.agreement, t.regret_mean, t.proxy_freq.tolist()
        (1.0, 0.0, [0.0, 1.0, 0.0])
    """
    s = as_matrix(score)
    n_rows, n_layers = s.shape
    if not 1 <= n_proxy < n_rows:
        raise ValueError(f"n_proxy must be in 1..{n_rows - 1} (the test split needs an edit), got {n_proxy}")
    if n_splits < 1 or n_null < 0:
        raise ValueError(f"n_splits must be >= 1 and n_null >= 0, got {n_splits} and {n_null}")
    mask = layer_mask(allowed, n_layers)
    rng = seeded(seed)
    agree, regret, picks = _splits(s, n_proxy, n_splits, rng, mask)
    null = []
    for _ in range(n_null):
        shuffled = s.copy()
        cols = np.flatnonzero(mask)
        shuffled[:, cols] = np.take_along_axis(s[:, cols], np.argsort(rng.random((n_rows, cols.size)), 1), 1)
        null.append(_splits(shuffled, n_proxy, n_splits, rng, mask)[0].mean())
    rate = float(agree.mean())
    p = float((1 + sum(x >= rate - 1e-12 for x in null)) / (1 + n_null)) if null else math.nan
    return Transfer(rate, float(np.nanmean(regret)), interval(regret, level),
                    np.bincount(picks, minlength=n_layers) / n_splits, float(np.mean(null)) if null else math.nan,
                    p, n_proxy, n_rows - n_proxy, n_splits)


# --------------------------------------------------------------------------- rank agreement


@dataclass(repr=False)
class RankAgreement(Result):
    """Rank correlations of a selector's per-layer scores with the truth (the sweep's
    per-layer overall), over all layers and over the selector's allowed layers."""

    spearman: float
    kendall: float
    n: int
    spearman_allowed: float
    kendall_allowed: float
    n_allowed: int


def _ranks(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return math.nan, math.nan, int(keep.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan
        rho = sps.spearmanr(x[keep], y[keep]).statistic
        tau = sps.kendalltau(x[keep], y[keep]).statistic
    return float(rho), float(tau), int(keep.sum())


def rank_agreement(selector_scores: Any, truth: Any, allowed: Any = None) -> RankAgreement:
    """Spearman's rho and Kendall's tau-b (scipy) between what a selector maximises per
    layer and the true per-layer score, over all layers and over ``allowed`` (the layers
    the selector may pick: GradRatio's ``l >= l_min``, LGA's inside-the-fences).
    Layers with a NaN on either side are left out; fewer than 2 layers give NaN.

    Example:
        >>> r = rank_agreement([3.0, 1.0, 2.0, 0.0], [0.9, 0.1, 0.5, 0.8], allowed=[0, 1, 2])
        >>> round(r.spearman, 3), r.spearman_allowed, r.n_allowed
        (0.4, 1.0, 3)
    """
    x, y = as_matrix(selector_scores, "selector_scores", ndim=1), as_matrix(truth, "truth", ndim=1)
    if x.shape != y.shape:
        raise ValueError(f"selector_scores and truth need one value per layer each: {x.size} vs {y.size}")
    m = layer_mask(allowed, x.size)
    return RankAgreement(*_ranks(x, y), *_ranks(x[m], y[m]))



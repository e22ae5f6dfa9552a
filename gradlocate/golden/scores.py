"""The study's scores: every definition of "overall", the golden layer, each edit's own
optimum, the damage gate, and whether a measure differs between layers at all.

Pure functions of single-edit matrices (``[edits, layers]`` arrays, NaN where absent; a
per-layer metric may be given as ``[layers]`` and is broadcast over the edits). Layers are
**column indices** ``0 .. L-1``; map them to model layers with the matrix's layer list.
Each concept is defined here once: the matrix, the batch sweep (a one-row table per
layer), the judgment and the report all call these.

* :func:`overall` - every definition of "overall" per cell; :data:`DEFINITIONS`.
* :func:`golden_layer`, :func:`own_optimum`, :func:`selection_gain` - the fixed best
  layer, each edit's own best layer, and how much the second beats the first in-sample.
* :func:`damage_gate` - layers whose edits cost too much capability, excluded.
* :func:`layer_effect` - whether a per-cell measure differs between layers (Friedman).

Example:
    >>> import numpy as np
    >>> rel = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 0.0]])
    >>> loc = np.array([[0.2, 0.9, 1.0], [0.4, 0.9, 1.0]])
    >>> s = overall({"reliability": rel, "locality": loc}, "edit-only")
    >>> s.tolist(), golden_layer(s)
    ([[0.6, 0.95, 0.5], [0.7, 0.7, 0.5]], 1)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from gradlocate.golden.arrays import Result, as_matrix, layer_mask, layer_means

__all__ = ["EDIT_METRICS", "WEIGHTS", "GOLDEN_LAYERS_METRICS", "LOWER_IS_BETTER", "DEFINITIONS", "PRIMARY", "overall",
           "golden_layer", "own_optimum", "selection_gain", "damage_gate", "layer_effect", "Optimum", "DamageGate",
           "LayerEffect"]

#: The edit metrics: the "edit-only" overall is their mean per cell.
EDIT_METRICS = ("reliability", "generalization", "locality")
#: The "weighted" overall's default weights (gradlocate's sweep default, ``OVERALL_WEIGHTS``).
WEIGHTS = {"reliability": 1.0, "generalization": 1.0, "locality": 1.0, "capability": 1.0, "fluency": 1.0}
#: What the "golden-layers" overall averages, where given (``lm_loss``: lower is better).
GOLDEN_LAYERS_METRICS = ("reliability", "generalization", "locality", "fluency", "lm_loss")
#: Metrics where lower is better (negated before min-max normalisation).
LOWER_IS_BETTER = ("lm_loss",)
#: The overall definitions besides a single metric's name.
DEFINITIONS = ("edit-only", "weighted", "golden-layers")
#: The primary score, declared before the studies were run: the mean of reliability,
#: generalization and locality ("edit-only"), judged with the damage gate. The others are
#: sensitivity analyses; "golden-layers" (min-max normalised per layer) is gradlocate's
#: construction, not a definition the Golden Layers paper gives.
PRIMARY = "edit-only"


# --------------------------------------------------------------------------- overall


def _metric_matrices(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every metric as ``[edits, layers]`` (``[layers]`` broadcast); shapes must agree."""
    if not metrics:
        raise ValueError("no metrics given: pass a dict name -> [edits, layers] array")
    arrs = {k: np.array(v, dtype=np.float64) for k, v in metrics.items()}
    full = [a.shape for a in arrs.values() if a.ndim == 2]
    if not full:
        raise ValueError("at least one metric must be a 2-d [edits, layers] matrix")
    shape = full[0]
    out = {}
    for k, a in arrs.items():
        if a.shape != shape and not (a.ndim == 1 and a.shape[0] == shape[1]):
            raise ValueError(f"metric {k!r} has shape {a.shape}; expected {shape} or ({shape[1]},) "
                             f"like the other metrics")
        out[k] = as_matrix(np.broadcast_to(a, shape), k)
    return out


def _weighted_mean(cells: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """Per cell: the weighted mean of the values present (NaN where none is)."""
    num = sum(np.where(np.isnan(v), 0.0, v) * w for v, w in cells)
    den = sum(np.where(np.isnan(v), 0.0, w) for v, w in cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _minmax_cells(v: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Cells mapped by the affine map that sends the layer means' min to 0 and max to 1."""
    s = -v if lower_is_better else v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(s, axis=0)
    got = means[np.isfinite(means)]
    if got.size == 0:
        return np.full_like(v, np.nan)
    lo, hi = float(got.min()), float(got.max())
    if hi == lo:
        return np.where(np.isnan(s), np.nan, 1.0)
    return (s - lo) / (hi - lo)


def overall(metrics: Mapping[str, Any], definition: str = "edit-only",
            weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The overall score of every cell ``[edits, layers]`` under one definition.

    * a metric's name (``"reliability"``, ``"portability"``, ...): that metric alone.
    * ``"edit-only"``: the mean of reliability, generalization and locality over those
      present in the cell (an absent metric is left out, never counted as 0).
    * ``"weighted"``: gradlocate's capability-aware overall, the weighted mean of the
      metrics in ``weights`` (default :data:`WEIGHTS`: reliability, generalization,
      locality, capability, fluency, each 1) present in the cell.
    * ``"golden-layers"``: each of :data:`GOLDEN_LAYERS_METRICS` present is min-max
      normalised across the layers (``lm_loss`` negated first), then the cell's mean is
      taken. The normalisation is the affine map sending the smallest **layer mean** to 0
      and the largest to 1 (a metric equal at every layer maps to 1), applied to every
      cell, so the mean over edits of this overall is exactly ``SweepResult.metric
      ("overall")`` of the sweep's per-layer means (``overall_kind="golden-layers"``); single cells
      can fall outside ``[0, 1]``.
      What the paper says: Golden Layers (Datta, Liu & Chhabra, arXiv 2602.20207) judges
      a layer by the editing metrics of EasyEdit/KnowEdit (rewrite and rephrase accuracy,
      locality, fluency) reported side by side; the copies of the paper we could read
      (abstract and introduction) do not define a single normalised overall, so this
      definition is gradlocate's (``sweep.py``), not a quotation of the paper. Its value
      depends on which layers are swept, and bootstrap resamples re-normalise.

    Args:
        metrics: name -> ``[edits, layers]`` (or ``[layers]``, broadcast); NaN = absent.
        definition: one of :data:`DEFINITIONS` or a key of ``metrics``.
        weights: for ``"weighted"``: name -> weight (metrics not given are ignored).

    Raises:
        ValueError: unknown definition, disagreeing shapes, no metric of the definition given.

    Example:
        >>> rel = [[1.0, 0.0], [1.0, 1.0]]
        >>> cap = [0.5, 1.0]                       # per layer, broadcast over edits
        >>> overall({"reliability": rel, "capability": cap}, "weighted").tolist()
        [[0.75, 0.5], [0.75, 1.0]]
        >>> overall({"reliability": rel, "lm_loss": [3.0, 2.0]}, "golden-layers").tolist()
        [[0.5, 0.0], [0.5, 1.0]]
    """
    m = _metric_matrices(metrics)
    if definition in m:
        return m[definition].copy()
    if definition == "edit-only":
        cells = [(m[k], 1.0) for k in EDIT_METRICS if k in m]
    elif definition == "weighted":
        w = dict(WEIGHTS if weights is None else weights)
        cells = [(m[k], float(x)) for k, x in w.items() if k in m and x]
    elif definition == "golden-layers":
        cells = [(_minmax_cells(m[k], k in LOWER_IS_BETTER), 1.0) for k in GOLDEN_LAYERS_METRICS if k in m]
    else:
        raise ValueError(f"definition must be one of {DEFINITIONS} or a metric given ({sorted(m)}), "
                         f"got {definition!r}")
    if not cells:
        raise ValueError(f"the {definition!r} overall needs at least one of its metrics; got {sorted(m)}")
    return _weighted_mean(cells)




# --------------------------------------------------------------------------- golden layer and own optimum


def golden_layer(score: Any, allowed: Any = None) -> int:
    """The golden layer: the column with the best mean over edits (NaN cells left out),
    among the ``allowed`` ones (a bool mask ``[layers]`` or column indices, e.g.
    :attr:`DamageGate.allowed`); ties go to the lowest layer.

    Raises:
        ValueError: not a 2-d matrix, or no allowed layer with any value.

    Example:
        >>> golden_layer([[0.2, 0.9, 0.9], [0.4, 0.7, 0.7]])
        1
        >>> golden_layer([[0.2, 0.9, 0.9], [0.4, 0.7, 0.7]], allowed=[0, 2])
        2
    """
    s = as_matrix(score)
    means = layer_means(s)
    ok = layer_mask(allowed, s.shape[1]) & np.isfinite(means)
    if not ok.any():
        raise ValueError("no allowed layer has a score: every allowed column is NaN (or none is allowed)")
    return int(np.flatnonzero(ok)[np.argmax(means[ok])])  # argmax: the first of ties


@dataclass(repr=False)
class Optimum(Result):
    """Each edit's own best layer (column) and its score there (ties: the lowest layer)."""

    layers: np.ndarray
    values: np.ndarray


def own_optimum(score: Any, allowed: Any = None) -> Optimum:
    """Each row's own optimum: the allowed column with the row's best score (NaN cells
    left out; ties go to the lowest layer).

    Raises:
        ValueError: a row with no score in any allowed layer (the message names it).

    Example:
        >>> own_optimum([[0.1, 0.5, 0.5], [0.3, 0.3, 0.3], [0.9, float("nan"), 0.2]])
        Optimum(layers=[1, 0, 0], values=[0.5, 0.3, 0.9])
    """
    s = as_matrix(score)
    ok = layer_mask(allowed, s.shape[1])
    x = np.where(ok[None, :] & ~np.isnan(s), s, -np.inf)
    empty = np.flatnonzero(np.isneginf(x).all(axis=1))
    if empty.size:
        raise ValueError(f"rows {empty.tolist()[:10]} have no score in any allowed layer (NaN-only rows)")
    layers = np.argmax(x, axis=1)
    return Optimum(layers, x[np.arange(len(x)), layers])


def selection_gain(score: Any, allowed: Any = None) -> float:
    """In-sample gain of the own optimum over the golden layer: the mean over rows of
    (row's best score - its score at the golden layer), rows with a NaN at the golden
    layer left out. Biased upward by selection (the winner's curse; estimated without it from
    two replicates by :func:`gradlocate.golden.oracle.oracle_gain`).

    Example:
        >>> round(selection_gain([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), 4)
        0.3333
    """
    s = as_matrix(score)
    g = golden_layer(s, allowed)
    best = own_optimum(s, allowed).values
    at_g = s[:, g]
    keep = ~np.isnan(at_g)
    return float(np.mean(best[keep] - at_g[keep]))



# --------------------------------------------------------------------------- damage gate


@dataclass(repr=False)
class DamageGate(Result):
    """Which layers' edits cost more capability than allowed.

    Attributes:
        allowed: per layer, not damaging (pass it to :func:`golden_layer` and friends).
        damaging: the damaging layers' indices.
        values: the per-layer value judged (mean over edits of a per-cell matrix).
        threshold, higher_is_better: the rule.
    """

    allowed: np.ndarray
    damaging: list[int]
    values: np.ndarray
    threshold: float
    higher_is_better: bool


def damage_gate(capability: Any, threshold: float, higher_is_better: bool = True) -> DamageGate:
    """Flag layers whose edits damage the model: with ``higher_is_better`` (a capability
    score, e.g. held-out perplexity before / after) a layer is damaging when its value
    is below ``threshold``; otherwise (a cost, e.g. the held-out LM loss rise in nats) when
    it is above. ``capability`` is per layer ``[layers]`` or per cell ``[edits, layers]``
    (judged on the mean over edits). A layer with no value is not flagged.

    Example:
        >>> g = damage_gate([0.99, 0.60, 0.97], threshold=0.9)
        >>> g.damaging, g.allowed.tolist()
        ([1], [True, False, True])
        >>> damage_gate([[0.05, 0.6], [0.15, 0.2]], threshold=0.3, higher_is_better=False).damaging
        [1]
    """
    c = np.array(capability, dtype=np.float64)
    if c.ndim not in (1, 2) or c.size == 0:
        raise ValueError(f"capability must be [layers] or [edits, layers], got shape {c.shape}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    v = layer_means(c) if c.ndim == 2 else c
    bad = (v < threshold) if higher_is_better else (v > threshold)
    bad &= np.isfinite(v)
    return DamageGate(~bad, np.flatnonzero(bad).tolist(), v, float(threshold), bool(higher_is_better))


# --------------------------------------------------------------------------- layer effect


@dataclass(repr=False)
class LayerEffect(Result):
    """Whether a per-cell measure differs between layers (Friedman's rank test, edits as blocks).

    Attributes:
        statistic, p_value: Friedman's chi-square and its p-value (NaN when fewer than 2
            complete edits or 3 layers).
        n_edits: edits with a value at every layer (the blocks tested).
        n_layers: layers (the treatments).
        spread: max - min of the per-layer means over those edits (the measure's units).
    """

    statistic: float
    p_value: float
    n_edits: int
    n_layers: int
    spread: float


def layer_effect(cells: Any) -> LayerEffect:
    """Friedman's test of "no difference between layers" on ``cells [edits, layers]``
    (e.g. the held-out loss change of the capability subsample), over the edits with a
    value at every layer. A min-max normalised overall (``golden-layers``) stretches a
    metric's spread to ``[0, 1]`` whatever its size; a large ``p_value`` says the
    stretched differences are noise.

    Example:
        >>> e = layer_effect([[0.0, 1.0, 2.0], [0.1, 1.1, 2.1], [0.2, 1.2, 2.2]])
        >>> round(e.p_value, 4), e.n_edits, round(e.spread, 3)
        (0.0498, 3, 2.0)
    """
    c = as_matrix(cells, "cells")
    done = c[np.isfinite(c).all(axis=1)]
    n, k = done.shape
    if n < 2 or k < 3:
        return LayerEffect(float("nan"), float("nan"), int(n), int(k), float("nan"))
    spread = float(np.ptp(done.mean(axis=0)))
    if np.all(done == done[:, :1]):  # no layer differs from another in any edit: no ranks to test
        return LayerEffect(0.0, 1.0, int(n), int(k), spread)
    res = sps.friedmanchisquare(*done.T)
    return LayerEffect(float(res.statistic), float(res.pvalue), int(n), int(k), spread)

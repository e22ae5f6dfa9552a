"""Each edit's own optimum against the golden layer, as the judgment reports it.

The question "is the golden layer as good as each edit's own best layer?" compares a
choice per edit with one fixed choice, both made from noisy cells.

* **With a replicate** (a second table of the same edits and layers with independent
  noise: another seed, or the other half of each edit's prompts) the gain is estimated
  without the winner's curse by cross-fitting (:func:`gradlocate.golden.oracle.oracle_gain`):
  its estimand (:data:`gradlocate.golden.oracle.ESTIMAND`), a bootstrap interval over edits
  and the one-sided p of "gain <= 0"; beside it the equivalence test the claim calls for
  (TOST on the bootstrap, margin :data:`gradlocate.golden.oracle.EQUIVALENCE_MARGIN`,
  declared before any study was run) and the Golden Layers paper's paired t-test of the
  cross-fit per-edit differences.
* **With one table** the own optimum cannot be estimated: chosen and scored on the same
  cells, each edit's best layer wins by its own noise. Only the in-sample gain is shown,
  labelled as biased upward, and no p-value is given (:data:`NOT_ESTIMABLE`).

(The permutation-null "correction" that stood here before is withdrawn: it subtracted
real per-edit optima as bias and returned impossible negative "lower bounds"; see
docs/statistics.md.)

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> mu = np.tile([0.2, 0.8, 0.5], (40, 1)); mu[:20] = [0.9, 0.3, 0.5]
    >>> a, b = mu + rng.normal(0, 0.05, mu.shape), mu + rng.normal(0, 0.05, mu.shape)
    >>> v = own_optimum_vs_golden(a, np.ones(3, bool), b, n_boot=200)
    >>> v.estimable, round(v.oracle.gain, 1), v.in_sample_gain >= v.oracle.gain
    (True, 0.3, True)
    >>> own_optimum_vs_golden(a, np.ones(3, bool)).estimable
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlocate.golden import arrays, scores
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN, Equivalence, OracleGain, oracle_gain

__all__ = ["OwnOptimum", "own_optimum_vs_golden", "NOT_ESTIMABLE", "ALPHA"]

#: What the page says when a study has one replicate.
NOT_ESTIMABLE = ("not estimable without a replicate: each edit's own optimum, chosen and scored on the same cells, "
                 "wins by its own noise (the winner's curse), so the in-sample gain is biased upward and no test is "
                 "given; a second seed or the other half of each edit's prompts makes it estimable")
#: The level of every one-sided test the page reports (TOST: each of its two tests).
ALPHA = 0.05
#: The oracle's arrays left out of ``to_dict`` (per edit and per resample: kept on the object).
_BULKY = ("per_edit", "optimum_scores", "golden_scores", "boot")


@dataclass(repr=False)
class OwnOptimum(arrays.Result):
    """Each edit's own optimum vs the golden layer on one score (see the module doc).

    Attributes:
        n: edits compared (a score at the golden layer and at an allowed layer).
        golden_mean, optimum_mean: the in-sample means at the golden layer and at each
            edit's own best layer (both chosen and scored on the same table).
        in_sample_gain: ``optimum_mean - golden_mean``: >= 0 by construction, biased upward.
        optimum_layers: per column, how many edits have their in-sample best there.
        oracle: the cross-fit :class:`~gradlocate.golden.oracle.OracleGain` (``None``: one replicate).
        equivalence: its bootstrap TOST at ``margin`` with the paper's paired t beside it (``None``: one replicate).
        note: what the page says when ``oracle`` is ``None``.
    """

    n: int
    golden_mean: float
    optimum_mean: float
    in_sample_gain: float
    optimum_layers: list[int]
    oracle: OracleGain | None = None
    equivalence: Equivalence | None = None
    note: str = ""

    @property
    def estimable(self) -> bool:
        return self.oracle is not None

    def tests(self) -> dict[str, float]:
        """The one-sided p-values this result presents as tests (none with one replicate):
        ``"oracle gain > 0"`` and ``"equivalent within the margin"`` (TOST)."""
        if self.oracle is None or self.equivalence is None:
            return {}
        return {"oracle gain > 0": self.oracle.p, f"equivalent within {self.equivalence.margin:g} (TOST)":
                self.equivalence.p_tost}

    def to_dict(self) -> dict[str, Any]:
        oracle = None if self.oracle is None else {k: v for k, v in self.oracle.to_dict().items() if k not in _BULKY}
        return {"n": self.n, "golden_mean": self.golden_mean, "optimum_mean": self.optimum_mean,
                "in_sample_gain": self.in_sample_gain, "optimum_layers": arrays.plain(self.optimum_layers),
                "estimable": self.estimable, "oracle": oracle,
                "equivalence": None if self.equivalence is None else self.equivalence.to_dict(), "note": self.note}

    def __repr__(self) -> str:
        if self.oracle is None:
            return f"OwnOptimum(n={self.n}, not estimable; in-sample gain {self.in_sample_gain:.4g}, biased upward)"
        o, e = self.oracle, self.equivalence
        eq = "" if e is None else f"; TOST at {e.margin:g}: p {e.p_tost:.3g}"
        return f"OwnOptimum(n={self.n}, oracle gain {o.gain:.4g} [{o.ci[0]:.4g}, {o.ci[1]:.4g}], p {o.p:.3g}{eq})"


def own_optimum_vs_golden(score: Any, allowed: Any, replicate: Any = None, *, margin: float = EQUIVALENCE_MARGIN,
                          alpha: float = ALPHA, n_boot: int = 2000, seed: int = 0) -> OwnOptimum:
    """Each edit's own optimum against the golden layer on ``score`` ``[edits, layers]``
    over the ``allowed`` layers (e.g. the damage gate's), cross-fit with ``replicate`` (the
    same edits and layers, independent noise) when given.

    Raises:
        ValueError: ``replicate`` of another shape, or no edit with an allowed score.
    """
    s = arrays.as_matrix(score)
    mask = arrays.layer_mask(allowed, s.shape[1])
    g = scores.golden_layer(s, mask)
    keep = np.isfinite(s[:, g]) & np.isfinite(s[:, mask]).any(1)
    if not keep.any():
        raise ValueError("no edit has a score at the golden layer and an allowed layer")
    opt = scores.own_optimum(s[keep], mask)
    gold = float(s[keep, g].mean())
    counts = np.bincount(opt.layers, minlength=s.shape[1]).tolist()
    base = dict(n=int(keep.sum()), golden_mean=gold, optimum_mean=float(opt.values.mean()),
                in_sample_gain=float(opt.values.mean()) - gold, optimum_layers=counts)
    if replicate is None:
        return OwnOptimum(**base, note=NOT_ESTIMABLE)
    r = arrays.as_matrix(replicate, "replicate")
    if r.shape != s.shape:
        raise ValueError(f"the replicate {r.shape} must hold the same edits and layers as the score {s.shape}")
    og = oracle_gain(s, r, allowed=mask, n_boot=n_boot, seed=seed)
    return OwnOptimum(**base, oracle=og, equivalence=og.equivalence(margin, alpha))

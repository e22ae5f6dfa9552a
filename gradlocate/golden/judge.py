"""The golden-layer judgment: everything derived from one single-edit :class:`~gradlocate.golden.matrix.Matrix`.

One instrument, one matrix ``[edits, layers]`` (every edit edited alone at every layer),
answers every question of the study, so no number mixes two experiments:

* per **definition of "overall"**: the primary score :data:`~gradlocate.golden.oracle.PRIMARY`
  (``edit-only``: the mean of reliability, generalization and locality, damage-gated),
  declared before any study was run, and the sensitivity analyses (each metric alone,
  gradlocate's capability-aware ``weighted``, and ``golden-layers``: gradlocate's min-max
  construction, not the Golden Layers paper's definition;
  :func:`gradlocate.golden.scores.overall`): the golden layer over the **test rows**, with
  its bootstrap distribution (rows resampled jointly across every metric), and beside the
  argmax the layers within :data:`~gradlocate.golden.oracle.EQUIVALENCE_MARGIN` of the
  best (:func:`~gradlocate.golden.oracle.near_best`) and the exactly tied ones;
* the **damage gate**: a layer whose edits raise the held-out LM loss by more than
  ``threshold`` nats (mean over its capability cells) is damaging and cannot be golden;
  the golden layer is reported with and without the gate;
* each edit's **own optimum vs the golden layer** (:mod:`gradlocate.golden.versus`), over
  every row (no selector is involved): with a ``replicate`` (a second matrix of the same
  edits and layers) the cross-fitted oracle gain with its interval and p, the TOST
  equivalence at the declared margin and the paper's paired t; with one replicate the
  plain statement that it cannot be estimated, and the in-sample gain labelled as
  biased upward (no p-value);
* per **selector** (its :class:`~gradlocate.results.LayerScores` on the proxy edits):
  its layer, regret on this one proxy draw with a bootstrap interval over the test edits,
  Spearman/Kendall over all and over its eligible layers. Selectors and transfer over
  many proxy draws (mean test regret beside brute force and a random layer) are judged
  by :mod:`gradlocate.golden.answer` around this judgment;
* **convergence** per layer (fraction of cells converged, mean final loss).

Capability enters the ``weighted`` and ``golden-layers`` overalls per layer (it is
measured on a subsample of edits): ``capability`` = ``exp(-mean loss change)`` (the
held-out perplexity ratio before/after, 1 = unharmed) and ``lm_loss`` = the mean loss
change; the bootstrap resamples edits, not the capability subsample.

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.matrix import Matrix
    >>> rng = np.random.default_rng(0)
    >>> rel = np.clip(np.array([0.2, 0.9, 0.8]) + rng.normal(0, 0.05, (12, 3)), 0, 1)
    >>> cap = np.full((12, 3), np.nan); cap[:4] = [0.0, 1.0, 0.1]
    >>> m = Matrix([0, 1, 2], [str(i) for i in range(12)], {"reliability": rel}, capability=cap)
    >>> j = judge(m, proxy=[0, 1, 2], n_boot=50)
    >>> j.gate.damaging, j.definition("reliability").golden_ungated, j.definition("reliability").golden
    ([1], 1, 2)
    >>> j.primary, j.own_optimum.estimable
    ('edit-only', False)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradlocate.golden import arrays, inference, scores
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN, PRIMARY, near_best
from gradlocate.golden.table import MATRIX_METRICS, Matrix
from gradlocate.golden.versus import OwnOptimum, own_optimum_vs_golden

__all__ = ["judge", "Judgment", "DefinitionResult", "SelectorResult", "Convergence",
           "DAMAGE_THRESHOLD", "PRIMARY"]

#: The damage gate's default: a mean held-out loss rise above this many nats is damaging.
DAMAGE_THRESHOLD = 0.5


def _plain(v: Any) -> Any:
    return arrays.plain(v)  # the same JSON conversion as the statistics' results


@dataclass(repr=False)
class Convergence:
    """Per layer (model layer indices): cells, fraction of cells converged, mean final loss."""

    layers: list[int]
    cells: list[int]
    converged: list[float]
    final_loss: list[float]

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def __repr__(self) -> str:
        c = np.array(self.converged, dtype=float)
        return f"Convergence({len(self.layers)} layers, converged {np.nanmin(c):.2f}..{np.nanmax(c):.2f})"


def convergence(m: Matrix) -> Convergence:
    """The training summary of every layer of ``m`` (NaN where no cell says).

    Example:
        >>> m = Matrix([0, 1], ["a", "b"], {"reliability": np.ones((2, 2))},
        ...            train={"converged": np.array([[1.0, 0], [1, 1]]), "final_loss": np.array([[0.1, 2], [0.3, 0]])})
        >>> convergence(m).converged, convergence(m).final_loss
        ([1.0, 0.5], [0.2, 1.0])
    """
    conv = m.train.get("converged", np.full(m.shape, np.nan))
    loss = m.train.get("final_loss", np.full(m.shape, np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer with no summary: NaN
        c, f = np.nanmean(conv, 0), np.nanmean(loss, 0)
    cells = m.filled.sum(0)
    return Convergence(list(m.layers), cells.tolist(), [float(x) for x in c], [float(x) for x in f])


@dataclass(repr=False)
class DefinitionResult:
    """One definition of "overall" judged on the test rows (layers are model layer indices).

    Attributes:
        definition: its name; golden: the golden layer with the gate (the argmax of the
            test rows' layer means; exact ties go to the lower layer, and ``tied`` lists them);
            golden_ungated: without the gate.
        near: the allowed layers whose test mean is within ``margin`` of the best (the
            choices the data cannot tell apart at the declared margin); tied: those equal to it.
        layer_mean: the test rows' mean overall per layer; boot: :class:`gradlocate.golden.inference.Bootstrap`
            (gated; golden_freq over layers).
        versus: each edit's own optimum vs the golden layer over every row
            (:class:`~gradlocate.golden.versus.OwnOptimum`).
    """

    definition: str
    golden: int
    golden_ungated: int
    layer_mean: list[float]
    boot: inference.Bootstrap
    versus: OwnOptimum
    near: list[int] = field(default_factory=list)
    tied: list[int] = field(default_factory=list)
    margin: float = EQUIVALENCE_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {"definition": self.definition, "golden": self.golden, "golden_ungated": self.golden_ungated,
                "near": self.near, "tied": self.tied, "margin": self.margin,
                "layer_mean": _plain(self.layer_mean), "bootstrap": self.boot.to_dict(), "versus": self.versus.to_dict()}


@dataclass(repr=False)
class SelectorResult:
    """A selector judged on the test rows: its layer, regret per definition (value, lo, hi;
    ``None`` when its layer is not in the matrix), rank agreement with the primary overall."""

    name: str
    layer: int
    regret: dict[str, tuple[float, float, float] | None]
    rank: inference.RankAgreement | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "regret": _plain(self.regret),
                "rank": None if self.rank is None else self.rank.to_dict()}


def _gated_bootstrap(metrics: Mapping[str, np.ndarray], definition: str, gate: scores.DamageGate,
                    picks: Mapping[str, int], n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, inference.Bootstrap]:
    """``definition``'s score of ``metrics``, the layers it may call golden (not damaging,
    scored) and the bootstrap of the golden layer and ``picks``' regret over those layers."""
    score = scores.overall(metrics, definition)
    allowed = gate.allowed & np.isfinite(arrays.layer_means(score))
    return score, allowed, inference.bootstrap(metrics, definition, selectors=picks, allowed=allowed, n=n_boot, seed=seed)


def _versus(m: Matrix, replicate: Matrix | None, definition: str, gate: scores.DamageGate, n_boot: int,
            seed: int) -> OwnOptimum:
    """Own optimum vs golden over every row of ``m`` (cross-fit with ``replicate`` when given)."""
    score = scores.overall(m.metrics(), definition)
    rep = None if replicate is None else scores.overall(replicate.metrics(), definition)
    allowed = gate.allowed & np.isfinite(arrays.layer_means(score))
    if rep is not None:
        allowed &= np.isfinite(arrays.layer_means(rep))
    return own_optimum_vs_golden(score, allowed, rep, n_boot=n_boot, seed=seed)


def _definition(m: Matrix, definition: str, test: np.ndarray, gate: scores.DamageGate, picks: Mapping[str, int],
                n_boot: int, replicate: Matrix | None, seed: int) -> DefinitionResult:
    """One definition of overall: golden (gated, ungated), the near-best set, bootstrap, versus."""
    # golden-layers' score is normalised on the test rows
    score, allowed, boot = _gated_bootstrap(m.metrics(test), definition, gate, picks, n_boot, seed)
    ungated = m.layers[scores.golden_layer(score)]
    means = arrays.layer_means(score)
    near = [m.layers[i] for i in near_best(means, EQUIVALENCE_MARGIN, allowed=allowed)]
    tied = [m.layers[i] for i in near_best(means, 0.0, allowed=allowed)]  # near_best adds TIE_TOL
    versus = _versus(m, replicate, definition, gate, max(n_boot, 200), seed)
    return DefinitionResult(definition, m.layers[boot.golden], ungated, means.tolist(), boot, versus, near, tied)


def _picks(m: Matrix, selections: Mapping[str, Any]) -> dict[str, int]:
    """Each selector's picked layer as a column of ``m`` (selectors whose layer is not a column left out)."""
    return {k: m.layers.index(s.selected) for k, s in selections.items() if s.selected in m.layers}


def _selector(m: Matrix, name: str, sel: Any, defs: Mapping[str, DefinitionResult], primary: str) -> SelectorResult:
    """A selector's regret per definition and its rank agreement (of what it maximises,
    :attr:`~gradlocate.results.LayerScores.maximised`) with the primary overall's layer means."""
    regret = {d: r.boot.regret.get(name) for d, r in defs.items()}
    truth = np.asarray(defs[primary].layer_mean)
    by_layer = dict(zip(sel.layers or range(len(sel.scores)), sel.maximised))  # what it maximises (LGA's sign)
    ok = dict(zip(sel.layers or range(len(sel.eligible)), sel.eligible))
    x = np.array([by_layer.get(l, np.nan) for l in m.layers], dtype=float)
    x[~np.isfinite(x)] = np.nan
    allowed = np.array([bool(ok.get(l, False)) for l in m.layers])
    rank = inference.rank_agreement(x, truth, allowed) if np.isfinite(x).sum() >= 2 else None
    return SelectorResult(name, int(sel.selected), regret, rank)


def default_definitions(m: Matrix) -> list[str]:
    """Each edit metric the matrix has, then ``edit-only``, ``weighted``, ``golden-layers``."""
    have = [k for k in MATRIX_METRICS if np.isfinite(m.scores.get(k, np.full(1, np.nan))).any()]
    return [*have, *scores.DEFINITIONS]


def _check_replicate(m: Matrix, replicate: Matrix | None) -> None:
    if replicate is not None and (replicate.edit_ids != m.edit_ids or replicate.layers != m.layers):
        raise ValueError(f"the replicate must hold the same edits and layers as the matrix (in the same order): got "
                         f"{replicate.n_edits} edits x layers {replicate.layers}, expected {m.n_edits} edits x layers "
                         f"{m.layers}")


def judge(m: Matrix, proxy: Sequence[int] = (), selections: Mapping[str, Any] | None = None, *,
          definitions: Sequence[str] | None = None, primary: str = PRIMARY, threshold: float = DAMAGE_THRESHOLD,
          n_boot: int = 1000, replicate: Matrix | None = None, seed: int = 0,
          regime: Mapping[str, Any] | None = None) -> Judgment:
    """Judge the golden layer on one single-edit matrix (see the module doc).

    Args:
        m: the matrix (complete columns: give the complete layers only, see
            :meth:`gradlocate.golden.folder.StudyFolder.load`).
        proxy: row indices of the proxy edits (the selectors saw these); the rest are the
            test rows. ``()``: every row is a test row.
        selections: selector name -> :class:`~gradlocate.results.LayerScores` (on the proxy edits).
        definitions: the overalls (default :func:`default_definitions`).
        primary: the score every tallied test is on and the selectors' rank agreement is
            measured against (default :data:`~gradlocate.golden.oracle.PRIMARY`, declared
            before any study was run; the others are sensitivity analyses).
        threshold: the damage gate, nats of mean held-out loss rise.
        n_boot: bootstrap resamples (the oracle gain's: at least 200).
        replicate: a second matrix of the same edits and layers with independent noise
            (another seed; :meth:`~gradlocate.golden.folder.StudyFolder.load` ``seed=``): makes
            each edit's own optimum estimable (the cross-fitted oracle gain and the TOST).

    Raises:
        ValueError: no test row, a proxy row out of range, ``primary`` not among the
            definitions, or a replicate of other edits or layers.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    proxy_rows = sorted({int(i) for i in proxy})
    if any(not 0 <= i < m.n_edits for i in proxy_rows):
        raise ValueError(f"proxy rows must be in 0..{m.n_edits - 1}, got {proxy_rows}")
    test = np.array([i for i in range(m.n_edits) if i not in set(proxy_rows)], dtype=int)
    if test.size < 2:
        raise ValueError(f"the judgment needs at least 2 test rows, got {test.size}")
    defs_wanted = list(definitions) if definitions is not None else default_definitions(m)
    if primary not in defs_wanted:
        raise ValueError(f"primary {primary!r} must be one of the definitions {defs_wanted}")
    _check_replicate(m, replicate)
    gate = scores.damage_gate(m.capability, threshold, higher_is_better=False)
    sels = dict(selections or {})
    picks = _picks(m, sels)
    defs = {d: _definition(m, d, test, gate, picks, n_boot, replicate, seed) for d in defs_wanted}
    rows = [_selector(m, k, s, defs, primary) for k, s in sels.items()]
    effect = scores.layer_effect(m.capability) if np.isfinite(m.capability).any() else None
    extra = {"replicate": None if replicate is None else replicate.params.get("seed", "given"), **dict(regime or {})}
    return Judgment(list(m.layers), m.n_edits, proxy_rows, _regime(m, threshold, extra), gate, convergence(m),
                    defs, rows, primary, effect)


def _regime(m: Matrix, threshold: float, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    hp = dict(m.params.get("hparams", {}))
    return {"editor": m.editor, **hp, "damage_threshold_nats": threshold,
            "capability_edits": m.params.get("capability_edits"), **dict(extra or {})}


@dataclass(repr=False)
class Judgment:
    """What one matrix says about the golden layer (see the module doc)."""

    layers: list[int]
    n_edits: int
    proxy: list[int]
    regime: dict[str, Any]
    gate: scores.DamageGate
    convergence: Convergence
    definitions: dict[str, DefinitionResult]
    selectors: list[SelectorResult] = field(default_factory=list)
    primary: str = PRIMARY
    #: Does the held-out loss change differ between layers at all (Friedman over the capability subsample)?
    capability_effect: scores.LayerEffect | None = None

    def definition(self, name: str) -> DefinitionResult:
        if name not in self.definitions:
            raise KeyError(f"no definition {name!r}: judged {list(self.definitions)}")
        return self.definitions[name]

    @property
    def golden(self) -> int:
        """The golden layer under the primary definition, gated."""
        return self.definitions[self.primary].golden

    @property
    def own_optimum(self) -> OwnOptimum:
        """Each edit's own optimum vs the golden layer under the primary definition."""
        return self.definitions[self.primary].versus

    @property
    def replicated(self) -> bool:
        """Whether a replicate was given (the own optimum is then estimable)."""
        return self.own_optimum.estimable

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "n_edits": self.n_edits, "proxy": self.proxy, "regime": _plain(self.regime),
                "primary": self.primary, "gate": self.gate.to_dict(), "convergence": self.convergence.to_dict(),
                "definitions": {k: v.to_dict() for k, v in self.definitions.items()},
                "selectors": [s.to_dict() for s in self.selectors],
                "capability_effect": None if self.capability_effect is None else self.capability_effect.to_dict()}

    def __repr__(self) -> str:
        g = ", ".join(f"{k}={v.golden}" for k, v in self.definitions.items())
        return (f"Judgment({self.n_edits - len(self.proxy)} test edits x {len(self.layers)} layers; golden by "
                f"definition: {g}; damaging {[self.layers[i] for i in self.gate.damaging]})")

    def to_markdown(self) -> str:
        from gradlocate.golden.judge_report import judgment_markdown

        return judgment_markdown(self)

    def plot(self, title: str | None = None) -> Any:
        """Per definition, the test rows' mean overall per layer (normalised to its range),
        the golden layers marked, damaging layers shaded."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        for d, r in self.definitions.items():
            y = np.asarray(r.layer_mean, dtype=float)
            span = np.nanmax(y) - np.nanmin(y)
            ax.plot(self.layers, (y - np.nanmin(y)) / (span if span > 0 else 1), marker=".", label=f"{d} ({r.golden})")
        for i in self.gate.damaging:
            ax.axvspan(self.layers[i] - 0.5, self.layers[i] + 0.5, color="red", alpha=0.15)
        ax.set_xlabel("layer"), ax.set_ylabel("mean overall (min-max per definition)")
        ax.set_title(title or "golden layer by definition (red: damaging)")
        ax.legend(fontsize=7, ncol=2)
        return fig

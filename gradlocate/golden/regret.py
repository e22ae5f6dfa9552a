"""Every layer-choosing method judged by its test regret over many random proxy draws.

One proxy draw says little: the pick moves with the draw (a study's 16 committed draws give
LGA 8 and 28 on the same matrix). This module judges any method that picks a layer from
proxy edits on a stored single-edit matrix (:class:`~gradlocate.golden.matrix.Matrix`)
by its **mean test regret over many random draws**, side by side with baselines, with an
interval that covers both the edits and the draws.

**One draw.** The rows are shuffled with the draw's seed; the first ``pool`` rows are the
proxy pool, in that order (a method reads its cells from them only: brute force on ``k``
edits takes the first ``k``, the search draws them one by one), the other rows are the
test rows. A method's **regret** on the draw is the best test layer mean minus the test
mean at its pick, the best taken over the **allowed** layers (the damage gate of
:func:`gradlocate.golden.scores.damage_gate` on the matrix's capability subsample; a pick on a
damaging layer can then score a negative regret, and the table counts such picks).
Scores are :func:`gradlocate.golden.scores.overall` per cell under a declared definition
(default ``edit-only``: the mean of reliability, generalization and locality; ``weighted``
adds the per-layer capability term, measured on the matrix's capability subsample and
known to every method alike).

**Baselines on the same draws.** A random layer (its expected regret over the allowed
layers, exact); the best constant layer (the allowed layer with the best mean over **all**
rows: an oracle, a floor no proxy method can be expected to reach); brute force on ``k``
proxy edits (every layer, ``k x layers`` cells), ``k`` in 1, 2, 4, 8, 16, 24 up to the pool.

**Cost** is counted in cells, one proxy edit edited alone at one layer, with the editor
steps and seconds the stored cells record (the seconds they took when they were made).

**Interval: a two-level bootstrap.** The estimand is the expected test regret of the
method when the pool and the test rows are independent samples of the edits' population
(of the sizes used). The estimate, the mean over ``D`` draws of one study, varies with the
edits the study happens to hold (every draw reuses them) and with the draws. Each bootstrap
replicate resamples the study's rows with replacement (a pseudo-study: level one, the
edits) and repeats ``D`` fresh random draws on it (level two, the draws), re-running every
method. A random partition of an i.i.d. sample gives an independent pool and test sample,
so a replicate's mean is unbiased for the plug-in value of the estimand (the mean over
replicates estimates it), as the study's mean is for the true one: the interval is the
basic bootstrap interval around the study's mean with that plug-in value as the centre,
``[T - (q_hi - m*), T - (q_lo - m*)]``, clipped at 0 (regret over allowed picks is >= 0).
Its coverage is tested on synthetic matrices with a known mean regret. Paired differences
(a method minus the reference, by default brute force on 16 edits) use the same replicates
and draws.

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.table import Matrix
    >>> rng = np.random.default_rng(0)
    >>> rel = np.clip(np.array([0.3, 0.5, 0.8, 0.6]) + rng.normal(0, 0.2, (40, 4)), 0, 1)
    >>> m = Matrix([0, 1, 2, 3], [f"e{i}" for i in range(40)], {"reliability": rel})
    >>> r = regret_over_draws(m, definitions=["reliability"], methods=[brute_force(1), brute_force(8)],
    ...                       n_draws=40, pool=10, n_boot=20, reference="brute force k=8")
    >>> [row.name for row in r.rows["reliability"]]
    ['random layer', 'best constant layer', 'brute force k=1', 'brute force k=8']
    >>> r.row("reliability", "brute force k=8").cells
    32.0
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlocate.golden import arrays, scores
from gradlocate.golden.judge import DAMAGE_THRESHOLD
from gradlocate.golden.table import Matrix

__all__ = ["regret_over_draws", "regret_on_committed_draws", "Regrets", "MethodRegret", "Method", "Pool", "Pick", "brute_force", "searched",
           "draw_regrets", "interval", "p_below", "BRUTE_FORCE_K", "study_scores"]

#: The brute-force baselines' proxy edit counts (those up to the pool size are run).
BRUTE_FORCE_K = (1, 2, 4, 8, 16, 24)
RANDOM, CONSTANT = "random layer", "best constant layer"


# --------------------------------------------------------------------------- methods


@dataclass
class Pool:
    """What a method sees on one draw: the proxy pool's cell scores ``[pool, layers]`` in
    the draw's order, the allowed layers, and per cell the stored editor steps and seconds
    (``None``: not recorded); ``layers``: the model layer of each column."""

    scores: np.ndarray
    allowed: np.ndarray
    layers: list[int]
    steps: np.ndarray | None = None
    seconds: np.ndarray | None = None
    definition: str = "edit-only"


@dataclass
class Pick:
    """A method's answer on one draw: the column picked, the cells it cost, the editor steps
    and seconds of those cells (``None``: unknown), and its stated confidence (NaN: none)."""

    column: int
    cells: int
    steps: float | None = None
    seconds: float | None = None
    confidence: float = math.nan


@dataclass
class Method:
    """A named method: ``pick(pool) -> Pick``; ``margin``: what its confidence is about (a
    pick within ``margin`` of the best), checked against the test regret where given."""

    name: str
    pick: Callable[[Pool], Pick]
    margin: float | None = None


def _cells_sum(a: np.ndarray | None, rows: slice) -> float | None:
    return None if a is None or np.isnan(a[rows]).all() else float(np.nansum(a[rows]))


def brute_force(k: int) -> Method:
    """Brute force on ``k`` proxy edits: every layer on the pool's first ``k`` edits; the
    allowed layer with the best mean (ties: the lower layer). Cost ``k x layers`` cells.

    Example:
        >>> p = Pool(np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.9]]), np.array([True, True, True]), [0, 1, 2])
        >>> brute_force(1).pick(p).column, brute_force(2).pick(p).column, brute_force(2).pick(p).cells
        (1, 2, 6)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")

    def pick(pool: Pool) -> Pick:
        if k > pool.scores.shape[0]:
            raise ValueError(f"brute force on {k} edits needs a pool of at least {k}, got {pool.scores.shape[0]}")
        means = np.where(pool.allowed, pool.scores[:k].mean(0), -np.inf)
        return Pick(int(np.argmax(means)), k * pool.scores.shape[1], _cells_sum(pool.steps, slice(0, k)),
                    _cells_sum(pool.seconds, slice(0, k)))

    return Method(f"brute force k={k}", pick)


def searched(budget: int | None = None, *, name: str | None = None, per_layer: float | None = None,
             **settings: Any) -> Method:
    """The budgeted layer search (:func:`gradlocate.golden.search.run_policy`, the same code
    as the live search) replayed on the pool: cells read from the stored matrix.

    Args:
        budget: cells (default: :func:`~gradlocate.golden.search.default_budget` of the layers);
        per_layer: instead of ``budget``, this many cells per layer.
        settings: the policy's keywords (``eta``, ``first``, ``margin``, ``confidence``).
    """
    from gradlocate.golden.search import DEFAULT_MARGIN, ReplayCells, run_policy

    def pick(pool: Pool) -> Pick:
        src = ReplayCells(pool.scores, pool.layers, ~pool.allowed, pool.steps, pool.seconds, pool.definition)
        b = budget if per_layer is None else int(round(per_layer * len(pool.layers)))
        s = run_policy(src, b, **settings)
        return Pick(pool.layers.index(s.layer), s.cost.cells, s.cost.steps, s.cost.seconds, s.confidence)

    label = name or ("search" + ("" if budget is None and per_layer is None else
                                 f" ({budget} cells)" if per_layer is None else f" ({per_layer:g} cells/layer)"))
    return Method(label, pick, settings.get("margin", DEFAULT_MARGIN))


# --------------------------------------------------------------------------- one study's draws


def study_scores(m: Matrix, definition: str, threshold: float = DAMAGE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """The cell scores ``[edits, layers]`` under ``definition`` and the allowed layers (not
    damaging, scored), as every method and the regret see them."""
    score = scores.overall(m.metrics(), definition)
    allowed = np.isfinite(score).any(0)
    if np.isfinite(m.capability).any():
        allowed &= scores.damage_gate(m.capability, threshold, higher_is_better=False).allowed
    if np.isnan(score[:, allowed]).any():
        raise ValueError("the matrix has missing cells in allowed layers: judge complete columns only "
                         "(StudyFolder.load(complete_only=True))")
    return score, allowed


@dataclass
class _DrawOut:
    """Per draw and method: regret, cells, steps, seconds, confidence; per draw, damaging picks."""

    regret: np.ndarray
    cells: np.ndarray
    steps: np.ndarray
    seconds: np.ndarray
    confidence: np.ndarray
    damaging: np.ndarray


def _empty(n_draws: int, k: int) -> _DrawOut:
    nan = lambda: np.full((n_draws, k), np.nan)  # noqa: E731
    return _DrawOut(nan(), nan(), nan(), nan(), nan(), np.zeros((n_draws, k), bool))


def draw_regrets(score: np.ndarray, allowed: np.ndarray, layers: Sequence[int], methods: Sequence[Method],
                 n_draws: int, pool: int, rng: np.random.Generator, definition: str = "edit-only",
                 steps: np.ndarray | None = None, seconds: np.ndarray | None = None) -> _DrawOut:
    """Every method (and the random and best-constant baselines, first) on ``n_draws``
    random draws of ``score``'s rows: ``pool`` proxy rows in a random order, the rest test."""
    n, k = score.shape[0], len(methods) + 2
    out = _empty(n_draws, k)
    full = score.mean(0)
    constant = int(np.flatnonzero(allowed)[np.argmax(full[allowed])])
    for d in range(n_draws):
        perm = rng.permutation(n)
        p, test = perm[:pool], perm[pool:]
        mu = score[test].mean(0)
        best = mu[allowed].max()
        out.regret[d, 0], out.cells[d, :2] = float(np.mean(best - mu[allowed])), 0
        out.regret[d, 1] = best - mu[constant]
        view = Pool(score[p], allowed, list(layers), None if steps is None else steps[p],
                    None if seconds is None else seconds[p], definition)
        for j, meth in enumerate(methods, 2):
            pk = meth.pick(view)
            out.regret[d, j], out.cells[d, j], out.confidence[d, j] = best - mu[pk.column], pk.cells, pk.confidence
            out.steps[d, j] = np.nan if pk.steps is None else pk.steps
            out.seconds[d, j] = np.nan if pk.seconds is None else pk.seconds
            out.damaging[d, j] = not allowed[pk.column]
    return out


def interval(point: float, replicates: np.ndarray, level: float = 0.95, floor: float | None = 0.0) -> tuple[float, float]:
    """The basic bootstrap interval around ``point`` with the replicates' mean as the
    plug-in value: ``[point - (q_hi - m*), point - (q_lo - m*)]`` (see the module doc),
    the lower end clipped at ``floor`` (``None``: not clipped).

    Example:
        >>> [round(x, 6) for x in interval(0.5, np.array([0.2, 0.3, 0.4, 0.5, 0.6]), level=0.5, floor=None)]
        [0.4, 0.6]
    """
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return math.nan, math.nan
    lo_q, hi_q = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    centre = float(r.mean())
    lo, hi = point - (hi_q - centre), point - (lo_q - centre)
    return (max(floor, float(lo)) if floor is not None else float(lo)), float(hi)


def p_below(point: float, replicates: np.ndarray) -> float:
    """The one-sided p-value of H0 "the difference is >= 0" (a method's regret minus the
    reference's) that agrees with :func:`interval`: under the basic bootstrap ``point -
    theta`` is distributed as ``replicate - m*``, so ``p = (1 + #{r <= point + m*}) / (1 +
    B)``; ``p < (1 - level) / 2`` when the interval lies below 0 (up to the ``+1``).

    Example:
        >>> round(p_below(-0.1, np.array([-0.12, -0.11, -0.1, -0.09, -0.08])), 3)
        0.167
    """
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan
    return float((1 + np.sum(r <= point + r.mean() + 1e-12)) / (1 + r.size))


# --------------------------------------------------------------------------- results


@dataclass(repr=False)
class MethodRegret:
    """One method's test regret over the draws under one definition.

    Attributes:
        name: the method; mean: its mean test regret over the draws; lo, hi: the interval.
        cells, cells_max: mean and largest cost in cells; steps, seconds: mean editor steps
            and stored seconds of those cells (NaN: unknown).
        vs_reference: (mean, lo, hi) of its regret minus the reference's, paired (``None``
            for the reference itself or where not computed).
        stated, hit: where the method states a confidence (the search): its mean, and the share
            of draws whose test regret is within its margin (NaN otherwise).
        damaging: draws whose pick was a damaging layer.
        regrets: the per-draw regrets.
        p_below: the one-sided bootstrap p of H0 "its regret is at least the reference's"
            (:func:`p_below`, from the same replicates as ``vs_reference``; NaN where that is ``None``).
    """

    name: str
    mean: float
    lo: float
    hi: float
    cells: float
    cells_max: float
    steps: float
    seconds: float
    vs_reference: tuple[float, float, float] | None
    stated: float
    hit: float
    damaging: int
    regrets: np.ndarray = field(default_factory=lambda: np.empty(0))
    p_below: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "mean", "lo", "hi", "cells", "cells_max", "steps", "seconds",
                                           "vs_reference", "stated", "hit", "damaging", "p_below")}
        return arrays.plain({**d, "regrets": self.regrets.tolist()})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodRegret:
        nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
        vs = d.get("vs_reference")
        return cls(d["name"], nan(d["mean"]), nan(d["lo"]), nan(d["hi"]), nan(d["cells"]), nan(d["cells_max"]),
                   nan(d["steps"]), nan(d["seconds"]), None if vs is None else (nan(vs[0]), nan(vs[1]), nan(vs[2])),
                   nan(d["stated"]), nan(d["hit"]), int(d["damaging"]), np.array(d.get("regrets", []), float),
                   nan(d.get("p_below")))


@dataclass(repr=False)
class Regrets:
    """Every method's test regret over random proxy draws of one study (see the module doc).

    Attributes:
        study: the matrix's name or folder; n_edits, layers: its size; pool, n_test: rows per draw.
        n_draws, n_boot, level: draws, bootstrap replicates (each with ``boot_draws`` draws), level.
        reference: the method the paired differences are taken against.
        rows: definition -> one :class:`MethodRegret` per method (baselines first).
        golden: definition -> the best allowed layer over all rows.
        scheme: how the draws and the interval were made (one sentence, for the table's caption).
    """

    study: str
    n_edits: int
    layers: list[int]
    pool: int
    n_test: int
    n_draws: int
    n_boot: int
    boot_draws: int
    level: float
    reference: str | None
    rows: dict[str, list[MethodRegret]]
    golden: dict[str, int]
    scheme: str = ""

    def row(self, definition: str, name: str) -> MethodRegret:
        for r in self.rows[definition]:
            if r.name == name:
                return r
        raise KeyError(f"no method {name!r} under {definition!r}: have {[r.name for r in self.rows[definition]]}")

    def to_dict(self) -> dict[str, Any]:
        head = {k: getattr(self, k) for k in ("study", "n_edits", "layers", "pool", "n_test", "n_draws", "n_boot",
                                              "boot_draws", "level", "reference", "golden", "scheme")}
        return {**arrays.plain(head), "rows": {d: [r.to_dict() for r in rs] for d, rs in self.rows.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Regrets:
        return cls(d["study"], int(d["n_edits"]), list(d["layers"]), int(d["pool"]), int(d["n_test"]),
                   int(d["n_draws"]), int(d["n_boot"]), int(d["boot_draws"]), float(d["level"]), d.get("reference"),
                   {k: [MethodRegret.from_dict(r) for r in v] for k, v in d["rows"].items()},
                   {k: int(v) for k, v in d["golden"].items()}, d.get("scheme", ""))

    def __repr__(self) -> str:
        parts = []
        for dfn, rs in self.rows.items():
            best = min((r for r in rs if r.name not in (RANDOM, CONSTANT)), key=lambda r: r.mean, default=None)
            if best is not None:
                parts.append(f"{dfn}: lowest {best.name} {best.mean:.3f} [{best.lo:.3f}, {best.hi:.3f}]")
        return (f"Regrets({self.study}: {self.n_draws} draws of {self.pool} proxy / {self.n_test} test edits x "
                f"{len(self.layers)} layers; " + "; ".join(parts) + ")")

    def to_markdown(self, definitions: Sequence[str] | None = None) -> str:
        from gradlocate.golden.regret_report import regrets_markdown

        return regrets_markdown(self, definitions)

    def plot(self, definition: str | None = None, title: str | None = None) -> Any:
        """Mean test regret (with its interval) against the cost in cells, one point per method
        (log cells; the cost-free baselines as horizontal lines)."""
        from gradlocate.golden.regret_report import plot_regrets

        return plot_regrets(self, definition or next(iter(self.rows)), title)


# --------------------------------------------------------------------------- the harness


def _summaries(names: Sequence[str], point: _DrawOut, boot: np.ndarray, ref: int | None, level: float,
               margins: Sequence[float | None]) -> list[MethodRegret]:
    """One :class:`MethodRegret` per method from the draws and the replicates' means ``[B, methods]``."""
    rows = []
    with np.errstate(all="ignore"):
        means = np.nanmean(point.regret, 0)
    for j, name in enumerate(names):
        lo, hi = interval(float(means[j]), boot[:, j], level)
        vs, p = None, math.nan
        if ref is not None and j != ref:
            d = float(means[j] - means[ref])
            vs = (d, *interval(d, boot[:, j] - boot[:, ref], level, floor=None))
            p = p_below(d, boot[:, j] - boot[:, ref])
        rows.append(_row(name, point, j, float(means[j]), (lo, hi), vs, margins[j]))
        rows[-1].p_below = p
    return rows


def _row(name: str, point: _DrawOut, j: int, mean: float, lohi: tuple[float, float],
         vs: tuple[float, float, float] | None, margin: float | None) -> MethodRegret:
    conf = point.confidence[:, j]
    has = bool(np.isfinite(conf).any()) and margin is not None
    with np.errstate(all="ignore"):
        steps, secs = (float(np.nanmean(a[:, j])) if np.isfinite(a[:, j]).any() else math.nan
                       for a in (point.steps, point.seconds))
        stated = float(np.nanmean(conf)) if has else math.nan
        hit = float(np.mean(point.regret[:, j] <= (margin or 0.0) + 1e-12)) if has else math.nan
    return MethodRegret(name, mean, *lohi, float(point.cells[:, j].mean()), float(point.cells[:, j].max()), steps,
                        secs, vs, stated, hit, int(point.damaging[:, j].sum()), point.regret[:, j].copy())


def _default_methods(pool: int) -> list[Method]:
    return [*(brute_force(k) for k in BRUTE_FORCE_K if k <= pool), searched()]


def _load_study(study: Matrix | str | os.PathLike[str]) -> tuple[Matrix, np.ndarray | None, str]:
    from gradlocate.golden.search import _load

    m, seconds = _load(study)
    return m, seconds, (str(os.path.basename(os.fspath(study).rstrip("/"))) if not isinstance(study, Matrix)
                        else (m.path or "matrix"))


def regret_over_draws(study: Matrix | str | os.PathLike[str], *, definitions: Sequence[str] = ("edit-only", "weighted"),
                      methods: Sequence[Method] | None = None, n_draws: int = 200, pool: int = 24, n_boot: int = 200,
                      boot_draws: int | None = None, seed: int = 0, threshold: float = DAMAGE_THRESHOLD,
                      level: float = 0.95, reference: str | None = "brute force k=16") -> Regrets:
    """Every method's mean test regret over ``n_draws`` random proxy draws of a stored
    matrix, side by side with a random layer and the best constant layer, with two-level
    bootstrap intervals (see the module doc).

    Args:
        study: a :class:`~gradlocate.golden.matrix.Matrix` or a matrix folder (complete layers are used).
        definitions: the scores judged (:func:`gradlocate.golden.scores.overall`, per cell).
        methods: the methods (default: brute force on 1, 2, 4, 8, 16, 24 edits up to the pool,
            and the search at its default budget).
        n_draws: random draws (>= 200 to report).
        pool: proxy rows per draw (at most half the rows: the rest are the test rows).
        n_boot: bootstrap replicates, each with ``boot_draws`` draws (default ``n_draws``; fewer
            widen the interval: the replicates then scatter more from draw to draw than the estimate does).
        threshold: the damage gate (nats); level: the intervals' level.
        reference: the method the paired differences are against (``None``: none; a name
            not among the methods: none).

    Raises:
        ValueError: ``pool`` above half the rows or below 1, or too few draws or replicates.
    """
    m, seconds, name = _load_study(study)
    if not 1 <= pool <= m.n_edits // 2:
        raise ValueError(f"pool must be in 1..{m.n_edits // 2} (half of the {m.n_edits} rows: the rest are test "
                         f"rows), got {pool}")
    if n_draws < 1 or n_boot < 2:
        raise ValueError(f"n_draws must be >= 1 and n_boot >= 2, got {n_draws} and {n_boot}")
    methods = list(methods) if methods is not None else _default_methods(pool)
    names = [RANDOM, CONSTANT, *(x.name for x in methods)]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    ref = names.index(reference) if reference in names else None
    margins = [None, None, *(x.margin for x in methods)]
    bd = n_draws if boot_draws is None else boot_draws
    steps = m.train.get("steps")
    rows, golden = {}, {}
    for i, dfn in enumerate(definitions):
        score, allowed = study_scores(m, dfn, threshold)
        rng = np.random.default_rng([seed, i])
        point = draw_regrets(score, allowed, m.layers, methods, n_draws, pool, rng, dfn, steps, seconds)
        boot = np.empty((n_boot, len(names)))
        for b in range(n_boot):
            idx = rng.integers(0, m.n_edits, m.n_edits)
            boot[b] = draw_regrets(score[idx], allowed, m.layers, methods, bd, pool, rng, dfn).regret.mean(0)
        rows[dfn] = _summaries(names, point, boot, ref, level, margins)
        golden[dfn] = int(m.layers[int(np.flatnonzero(allowed)[np.argmax(score.mean(0)[allowed])])])
    scheme = (f"{n_draws} random draws: {pool} proxy rows (in a random order), {m.n_edits - pool} test rows; "
              f"intervals: two-level bootstrap, {n_boot} resamples of the {m.n_edits} edits x {bd} draws each, "
              f"level {level:g}")
    return Regrets(name, m.n_edits, list(m.layers), pool, m.n_edits - pool, n_draws, n_boot, bd, level,
                   names[ref] if ref is not None else None, rows, golden, scheme)


# --------------------------------------------------------------------------- the committed draws


def _committed(folder: str | os.PathLike[str]) -> tuple[list[str], list[tuple[int, list[int], dict[str, int]]]]:
    """The selectors and (seed, proxy rows, selector -> layer) of each draw of ``draws.json``."""
    import json
    from pathlib import Path

    f = Path(folder) / "draws.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: `gradlocate report {folder} --draws 16` writes a folder's proxy draws")
    d = json.loads(f.read_text())
    draws = [(int(x["seed"]), [int(i) for i in x["proxy"]], {k: int(v) for k, v in x["picks"].items()})
             for x in d["draws"]]
    if not draws:
        raise ValueError(f"{f} holds no draw")
    return list(d.get("selectors") or draws[0][2]), draws


def _fixed_picks(score: np.ndarray, allowed: np.ndarray, layers: Sequence[int], draws: Sequence[Any],
                 selectors: Sequence[str], methods: Sequence[Method], definition: str,
                 steps: np.ndarray | None, seconds: np.ndarray | None) -> tuple[np.ndarray, _DrawOut]:
    """Per draw: the test-row mask and every column's pick (random layer: -1, constant: -2),
    the proxy methods run on the draw's proxy rows in the order its seed shuffles them."""
    n, k = score.shape[0], 2 + len(selectors) + len(methods)
    masks = np.ones((len(draws), n), bool)
    out = _empty(len(draws), k)
    out.regret[:, 0], out.regret[:, 1] = -1, -2  # the picks, held in ``regret`` until scored
    out.cells[:, :2 + len(selectors)] = 0  # the selectors' cost is gradients, not cells
    for d, (seed, proxy, picks) in enumerate(draws):
        masks[d, proxy] = False
        order = [proxy[i] for i in np.random.default_rng(seed).permutation(len(proxy))]
        for j, s in enumerate(selectors, 2):
            out.regret[d, j] = layers.index(picks[s]) if picks.get(s) in layers else np.nan
        view = Pool(score[order], allowed, list(layers), None if steps is None else steps[order],
                    None if seconds is None else seconds[order], definition)
        for j, meth in enumerate(methods, 2 + len(selectors)):
            pk = meth.pick(view)
            out.regret[d, j], out.cells[d, j], out.confidence[d, j] = pk.column, pk.cells, pk.confidence
            out.steps[d, j] = np.nan if pk.steps is None else pk.steps
            out.seconds[d, j] = np.nan if pk.seconds is None else pk.seconds
    return masks, out


def _score_picks(score: np.ndarray, allowed: np.ndarray, masks: np.ndarray, picks: np.ndarray,
                 weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Regret ``[draws, methods]`` of fixed picks on the test rows weighted by ``weights``
    (the random layer, pick -1: its expected regret; the constant layer, -2: the best
    allowed layer of the weighted rows)."""
    all_mu = weights @ score / weights.sum()
    constant = int(np.flatnonzero(allowed)[np.argmax(all_mu[allowed])])
    out = np.full((len(draws), picks.shape[1]), np.nan)
    for i, d in enumerate(draws):
        w = weights * masks[d]
        mu = w @ score / w.sum()
        best = mu[allowed].max()
        for j, p in enumerate(picks[d]):
            if p == -1:
                out[i, j] = float(np.mean(best - mu[allowed]))
            elif np.isfinite(p):
                out[i, j] = best - mu[constant if p == -2 else int(p)]
    return out


def regret_on_committed_draws(folder: str | os.PathLike[str], *, definitions: Sequence[str] = ("edit-only", "weighted"),
                              methods: Sequence[Method] | None = None, n_boot: int = 1000, seed: int = 0,
                              threshold: float = DAMAGE_THRESHOLD, level: float = 0.95,
                              reference: str | None = "search") -> Regrets:
    """The published selectors' picks on a folder's committed proxy draws
    (``draws.json``: 16 draws, a quarter of the rows each), side by side with the proxy
    methods run on the same proxy rows and with the baselines, judged on the same test rows.

    Only these draws have the selectors' picks (they need the model to re-run), so the
    interval is conditional on the picks: each replicate resamples the draws with
    replacement and the study's edits with multinomial weights (one weight per edit, shared
    by every draw that holds it), and re-scores the fixed picks on the weighted test rows;
    :func:`interval` as above. Differences are paired against ``reference``.
    """
    m, seconds, name = _load_study(folder)
    selectors, draws = _committed(folder)
    n_proxy = len(draws[0][1])
    methods = list(methods) if methods is not None else _default_methods(n_proxy)
    names = [RANDOM, CONSTANT, *selectors, *(x.name for x in methods)]
    ref = names.index(reference) if reference in names else None
    margins = [None] * (2 + len(selectors)) + [x.margin for x in methods]
    rows, golden = {}, {}
    for i, dfn in enumerate(definitions):
        score, allowed = study_scores(m, dfn, threshold)
        masks, out = _fixed_picks(score, allowed, m.layers, draws, selectors, methods, dfn, m.train.get("steps"),
                                  seconds)
        picks, every = out.regret.copy(), np.arange(len(draws))
        out.regret = _score_picks(score, allowed, masks, picks, np.ones(m.n_edits), every)
        out.damaging = np.isfinite(picks) & (picks >= 0) & ~allowed[np.where(picks >= 0, picks, 0).astype(int)]
        rng = np.random.default_rng([seed, i])
        boot = np.array([np.nanmean(_score_picks(score, allowed, masks, picks,
                                                 rng.multinomial(m.n_edits, np.full(m.n_edits, 1 / m.n_edits)),
                                                 rng.integers(0, len(draws), len(draws))), 0) for _ in range(n_boot)])
        rows[dfn] = _summaries(names, out, boot, ref, level, margins)
        golden[dfn] = int(m.layers[int(np.flatnonzero(allowed)[np.argmax(score.mean(0)[allowed])])])
    scheme = (f"the {len(draws)} committed proxy draws (draws.json: {n_proxy} proxy rows each, the selectors' "
              f"picks), {m.n_edits - n_proxy} test rows; intervals: {n_boot} resamples of the draws x the edits "
              f"(multinomial weights), picks held fixed, level {level:g}")
    return Regrets(name, m.n_edits, list(m.layers), n_proxy, m.n_edits - n_proxy, len(draws), n_boot, len(draws),
                   level, names[ref] if ref is not None else None, rows, golden, scheme)

"""Which layer should I edit, found with the editor itself: a budgeted search over the layers.

The published gradient selectors (GradRatio, LGA, CMA) never see the editor, so their pick is
the same for LocFT-BF and R-ROME, although the best layer is not. The single-edit matrix
(:mod:`gradlocate.golden.matrix`) sees it, at the price of every edit at every layer.
:func:`search` spends a stated **budget** of matrix cells instead, where one unit of cost is
one proxy edit edited alone at one layer (one cell), and adapts where it spends it
(*successive halving* over the layers, the proxy edits drawn one by one in a seeded order):

1. round 0: every layer edits the first ``first`` proxy edits (``first x layers`` cells);
   a layer whose edits raise the held-out loss by more than ``threshold`` nats (the damage
   gate, on the first ``capability_edits`` edits) is dropped;
2. the best third (``1 / eta``) of the layers by their mean score **on the same edits**
   (paired: an edit's difficulty cancels) stays; the budget left is split evenly over the
   rounds left, so each survivor gets the next proxy edits in order;
3. it stops when one layer is left, when the budget is spent, when the proxy edits are used
   up, or as soon as the leading layer is within ``margin`` of the best with probability
   ``confidence`` (below).

The result (:class:`Search`) is the layer, the **contenders** (the layers the data cannot
rule out as within ``margin`` of the leader: one-sided ``confidence`` upper bound of their
paired difference to the leader >= ``-margin``), the **confidence** (a normal
approximation: the product over the other layers of ``P(layer beats the leader by more
than margin)``'s complement, with the paired differences' variance pooled over the
layers, t-distributed; a layer dropped on two edits keeps the confidence low, as it should),
and the **cost** (cells, cells edited in this run, editor steps, seconds).

Its cells ARE matrix cells: run live (``model``, ``editor``, ``hparams``), every cell is
computed by :func:`~gradlocate.golden.matrix.matrix` into the record store ``out``, so a
re-run (or a matrix over the same store) reads them back instead of editing again. Run with
``replay=`` a stored matrix or matrix folder, each cell is read from it instead: the same
policy code (:func:`run_policy`), fed by another :class:`CellSource`. That is how its regret
over many random proxy draws is measured (:mod:`gradlocate.golden.regret`).

Not here: low-fidelity cells (a few editor steps) and the gradient selectors' scores as a
prior for the order. Stored cells have no training trajectory, so a replay could not test a
low-fidelity rule, and a reduced-step cell is not a matrix cell (another fingerprint); round 0
visits every layer, so an order prior would change nothing.

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.table import Matrix
    >>> rng = np.random.default_rng(0)
    >>> rel = np.clip(np.linspace(0.3, 0.6, 9) + 0.3 * (np.arange(9) == 6) + rng.normal(0, 0.1, (24, 9)), 0, 1)
    >>> m = Matrix(list(range(9)), [f"e{i}" for i in range(24)], {"reliability": rel})
    >>> s = search(replay=m, proxy_edits=range(24), definition="reliability", budget=36)
    >>> s.layer, s.cost.cells <= 36, s.cost.edited
    (6, True, 0)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import special

from gradlocate.golden import arrays, scores
from gradlocate.editors import DEFAULT_EDITOR
from gradlocate.golden.judge import DAMAGE_THRESHOLD
from gradlocate.golden.table import MATRIX_METRICS, Matrix, edit_id, layer_span

__all__ = ["search", "run_policy", "Search", "Round", "Cost", "CellSource", "ReplayCells", "LiveCells",
           "replay_cells", "DEFAULT_MARGIN", "DEFAULT_CONFIDENCE", "default_budget"]

#: The default margin (score units): a layer within it of the best counts as good as the best.
DEFAULT_MARGIN = 0.02
#: The default confidence: early stop when the leader is within the margin with this probability.
DEFAULT_CONFIDENCE = 0.9


def default_budget(n_layers: int) -> int:
    """The default budget: 4 cells per layer, a quarter of brute force on 16 edits.

    >>> default_budget(30)
    120
    """
    return 4 * int(n_layers)


# --------------------------------------------------------------------------- cost and cell sources


@dataclass
class Cost:
    """What a search spent: ``cells`` (one proxy edit edited alone at one layer; the unit of
    the budget), ``edited`` (of those, cells edited in this run: the rest were read from the
    record store or a stored matrix), ``steps`` (the editor's optimisation steps summed over
    the cells, where the records say; ``None`` otherwise), ``seconds`` (live: this run's wall
    time; replay: what the stored cells took when they were made, where recorded, else ``None``)."""

    cells: int = 0
    edited: int = 0
    steps: float | None = None
    seconds: float | None = None

    def add(self, cells: int, edited: int, steps: float | None, seconds: float | None) -> None:
        self.cells += int(cells)
        self.edited += int(edited)
        if steps is not None:
            self.steps = (self.steps or 0.0) + float(steps)
        if seconds is not None:
            self.seconds = (self.seconds or 0.0) + float(seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        steps = "" if self.steps is None else f", {self.steps:.0f} editor steps"
        secs = "" if self.seconds is None else f", {self.seconds:.0f} s"
        return f"{self.cells} cells ({self.edited} edited here{steps}{secs})"


@runtime_checkable
class CellSource(Protocol):
    """Where the policy's cells come from. ``layers``: the model layer of each column;
    ``n_edits``: the proxy edits, in the order the policy draws them; ``block(rows, cols)``:
    the score of each (proxy edit, layer) cell ``[rows, cols]`` (the cost is counted here);
    ``damaging(col)``: the damage gate's verdict on a layer after its first cells."""

    layers: list[int]
    n_edits: int
    cost: Cost
    definition: str
    edit_ids: list[str]

    def block(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray: ...

    def damaging(self, col: int) -> bool: ...


class ReplayCells:
    """Cells read from a stored matrix: ``scores [edits, layers]`` (the proxy edits' rows in
    the order the policy draws them), the layers' damage verdicts, and per cell the editor
    steps and seconds stored with it (``None``: not recorded)."""

    def __init__(self, scores: np.ndarray, layers: Sequence[int], damaging: Sequence[bool] | np.ndarray,
                 steps: np.ndarray | None = None, seconds: np.ndarray | None = None, definition: str = "edit-only",
                 edit_ids: Sequence[str] | None = None):
        self.scores = np.asarray(scores, dtype=float)
        if self.scores.ndim != 2 or self.scores.shape[1] != len(layers):
            raise ValueError(f"scores must be [edits, layers] with {len(layers)} layers, got {self.scores.shape}")
        self.layers, self.n_edits, self.definition = [int(x) for x in layers], int(self.scores.shape[0]), definition
        self._damaging = np.asarray(damaging, dtype=bool)
        self._steps, self._seconds = steps, seconds
        self.edit_ids = list(edit_ids) if edit_ids is not None else [f"row {i}" for i in range(self.n_edits)]
        self.cost = Cost()

    def block(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        r, c = np.asarray(list(rows), dtype=int), np.asarray(list(cols), dtype=int)
        out = self.scores[np.ix_(r, c)]
        if np.isnan(out).any():
            raise ValueError(f"the stored matrix has no score for {int(np.isnan(out).sum())} requested cell(s): "
                             f"replay needs complete columns (StudyFolder.load(complete_only=True))")
        part = lambda a: None if a is None else float(np.nansum(a[np.ix_(r, c)]))  # noqa: E731
        self.cost.add(out.size, 0, part(self._steps), part(self._seconds))
        return out

    def damaging(self, col: int) -> bool:
        return bool(self._damaging[col])


class LiveCells:
    """Cells computed with the editor by :func:`~gradlocate.golden.matrix.matrix` (one call
    per block: the policy's round), written to and read back from its record store ``out``.

    Scores: :func:`gradlocate.golden.scores.overall` of the cell's metrics under ``definition``; the
    ``weighted`` overall's capability term and the damage gate come from the held-out loss
    change measured on the first ``capability_edits`` proxy edits at each layer."""

    def __init__(self, model: Any, edits: Sequence[Any], *, editor: str, hparams: Any,
                 layers: Sequence[int] | None, out: str | os.PathLike[str] | None, definition: str,
                 capability_edits: int, threshold: float, tokenizer: Any = None, chunk: int = 32,
                 progress: bool | None = None):
        from gradlocate.data import as_edits
        from gradlocate.handles import resolve

        self.h = resolve(model, tokenizer)
        self.edits = as_edits(list(edits))
        self.layers = self.h.layer_indices(list(layers) if layers is not None else None)
        self.n_edits, self.definition = len(self.edits), definition
        self.edit_ids = [edit_id(e) for e in self.edits]
        self.editor, self.hparams, self.out, self.chunk, self.progress = editor, hparams, out, chunk, progress
        self.capability_edits, self.threshold = capability_edits, threshold
        self.metrics = {k: np.full((self.n_edits, len(self.layers)), np.nan) for k in MATRIX_METRICS}
        self.capability = np.full((self.n_edits, len(self.layers)), np.nan)
        self.cost = Cost(seconds=0.0)
        if out is not None and not str(out).endswith(".jsonl"):  # a study folder of the whole proxy pool
            from gradlocate.editors import settings_for, spec
            from gradlocate.golden.folder import StudyFolder
            from gradlocate.golden.matrix import folder_manifest

            s = settings_for(spec(editor).name, hparams)
            StudyFolder.bind(out, folder_manifest(self.h, self.edits, spec(editor).name, s, [getattr(s, "seed", 0)]))

    def block(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        from gradlocate.golden.matrix import matrix

        rows, cols = sorted(int(i) for i in rows), [int(c) for c in cols]
        before = self._stored()
        t0 = time.perf_counter()
        m = matrix(self.h, [self.edits[i] for i in rows], editor=self.editor, hparams=self.hparams,
                   layers=[self.layers[c] for c in cols], out=self.out, chunk=self.chunk,
                   capability_edits=sum(i < self.capability_edits for i in rows), progress=self.progress)
        seconds = time.perf_counter() - t0
        if m.params.get("errors"):
            raise RuntimeError(f"the editor failed on some cells of layers {[self.layers[c] for c in cols]}: "
                               + "; ".join(m.params["errors"][:3]))
        r, c = np.ix_(rows, cols)
        for k in MATRIX_METRICS:
            self.metrics[k][r, c] = m.scores[k]
        self.capability[r, c] = m.capability
        keys = {f"{edit_id(self.edits[i])}/{self.layers[j]}" for i in rows for j in cols}
        steps = m.train.get("steps")
        self.cost.add(len(keys), len(keys - before) if self.out is not None else len(keys),
                      None if steps is None or np.isnan(steps).all() else float(np.nansum(steps)), seconds)
        return self.scores(rows, cols)

    def _stored(self) -> set[str]:
        from gradlocate.golden.folder import StudyFolder
        from gradlocate.golden.store import RecordStore

        if self.out is None:
            return set()
        store = RecordStore(self.out) if str(self.out).endswith(".jsonl") else \
            RecordStore(StudyFolder.open(self.out).cells_dir)
        return set(map(str, store.read()))

    def layer_capability(self, col: int) -> float:
        """The mean held-out loss change of the layer's capability cells (NaN: none measured)."""
        v = self.capability[:, col]
        return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else math.nan

    def scores(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        r, c = np.ix_(list(rows), list(cols))
        metrics: dict[str, Any] = {k: v[r, c] for k, v in self.metrics.items() if np.isfinite(v[r, c]).any()}
        cap = np.array([self.layer_capability(j) for j in cols])
        if np.isfinite(cap).all():
            metrics["capability"], metrics["lm_loss"] = np.exp(-cap), cap
        elif self.definition in ("weighted", "golden-layers"):
            raise ValueError(f"the {self.definition!r} overall needs the held-out loss change at every layer: "
                             f"give capability_edits >= 1")
        return scores.overall(metrics, self.definition)

    def damaging(self, col: int) -> bool:
        c = self.layer_capability(col)
        return bool(np.isfinite(c) and c > self.threshold)


def _definition_scores(m: Matrix, definition: str) -> np.ndarray:
    if definition == "golden-layers":
        raise ValueError("the search scores cells one by one; 'golden-layers' normalises over every layer's "
                         "mean, so it has no per-cell score: use 'edit-only', 'weighted' or one metric")
    return scores.overall(m.metrics(), definition)


def replay_cells(replay: Matrix | str | os.PathLike[str], rows: Sequence[int] | None = None, *,
                 definition: str = "edit-only", threshold: float = DAMAGE_THRESHOLD) -> ReplayCells:
    """A :class:`ReplayCells` over a stored matrix (a :class:`~gradlocate.golden.matrix.Matrix`
    or a matrix folder), its ``rows`` in the order given (default: all, in order).

    The ``weighted`` overall's capability term and the damage gate are the matrix's, per layer,
    measured on its capability subsample (as every proxy method's replay sees them)."""
    return _replay(*_load(replay), rows, definition, threshold)


def _replay(m: Matrix, seconds: np.ndarray | None, rows: Sequence[int] | None, definition: str,
            threshold: float) -> ReplayCells:
    per_cell = _definition_scores(m, definition)
    gate = scores.damage_gate(m.capability, threshold, higher_is_better=False) if np.isfinite(m.capability).any() \
        else None
    idx = np.arange(m.n_edits) if rows is None else np.asarray(list(rows), dtype=int)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= m.n_edits:
        raise ValueError(f"rows must be row indices in 0..{m.n_edits - 1}, got {list(idx)[:8]}")
    steps = m.train.get("steps")
    damaging = np.zeros(len(m.layers), bool) if gate is None else ~gate.allowed
    return ReplayCells(per_cell[idx], m.layers, damaging, None if steps is None else steps[idx],
                       None if seconds is None else seconds[idx], definition, [f"row {i}" for i in idx])


def _load(replay: Matrix | str | os.PathLike[str]) -> tuple[Matrix, np.ndarray | None]:
    """The matrix, and per cell the seconds its record says it took (``None`` for a Matrix object)."""
    if isinstance(replay, Matrix):
        return replay, None
    from gradlocate.golden.folder import StudyFolder

    folder = StudyFolder.open(replay)
    records = list(folder.records().values())
    m, _ = folder.load()
    row, col = {e: i for i, e in enumerate(m.edit_ids)}, {l: j for j, l in enumerate(m.layers)}
    seconds = np.full(m.shape, np.nan)
    for r in records:
        i, j = row.get(r["edit"]), col.get(int(r["layer"]))
        if i is not None and j is not None and r.get("timings"):
            seconds[i, j] = sum(float(v) for v in r["timings"].values())
    return m, seconds


# --------------------------------------------------------------------------- the policy


@dataclass
class Round:
    """One round of the search: the layers it evaluated, the proxy edits each had after it
    (the first ``edits`` in the draw order), the cells it cost, and the layers kept."""

    index: int
    layers: list[int]
    edits: int
    cells: int
    kept: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(repr=False)
class Search:
    """A budgeted layer search's answer (see the module doc).

    Attributes:
        layer: the chosen layer (the leader among the last round's layers).
        contenders: the layers the data cannot rule out as within ``margin`` of the leader.
        confidence: the estimated probability that no layer beats the leader by more than
            ``margin`` (NaN when no paired difference had two edits to estimate a spread).
        margin, target: the margin and the confidence that stops the search early (``None``: never).
        definition: the score the search maximised (an overall of :func:`gradlocate.golden.scores.overall`).
        layers: the model layers searched; means / edits: per layer, the mean score over its
            evaluated proxy edits and how many (0: dropped as damaging before scoring ... never evaluated);
        dropped: per layer, the round it was dropped in (``None``: kept to the end; ``-1``: damaging).
        rounds: :class:`Round` per round; cost: :class:`Cost`; budget: the budget in cells;
        stopped: why it stopped; spread: the pooled sd of paired differences to the leader.
        edit_ids: the proxy edits in the order drawn (replay: ``"row <i>"``).
    """

    layer: int
    contenders: list[int]
    confidence: float
    margin: float
    target: float | None
    definition: str
    layers: list[int]
    means: list[float]
    edits: list[int]
    dropped: list[int | None]
    rounds: list[Round]
    cost: Cost
    budget: int
    stopped: str
    spread: float
    edit_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("layer", "contenders", "confidence", "margin", "target", "definition",
                                           "layers", "means", "edits", "dropped", "budget", "stopped", "spread",
                                           "edit_ids")}
        d = arrays.plain(d)
        return {**d, "rounds": [r.to_dict() for r in self.rounds], "cost": self.cost.to_dict()}

    def __repr__(self) -> str:
        conf = "n/a" if not math.isfinite(self.confidence) else f"{self.confidence:.2f}"
        rounds = f"{len(self.rounds)} round{'s' if len(self.rounds) != 1 else ''}"
        # three lines, so it reads in a 100-column terminal
        return (f"Search(layer={self.layer}, definition={self.definition!r}: within {self.margin:g} of the best "
                f"with confidence {conf};\n       contenders {layer_span(self.contenders)}; {rounds}, "
                f"stopped: {self.stopped};\n       {self.cost} of a budget of {self.budget})")

    def plot(self, title: str | None = None, ax: Any = None) -> Any:
        """Each layer's mean score over its proxy edits (bars: +-1 pooled standard error;
        marker area: edits), coloured by the round it was dropped in; the pick starred,
        the contenders shaded. Returns the figure (drawn on ``ax`` when given)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5)) if ax is None else (ax.figure, ax)
        x, y, n = np.array(self.layers), np.array(self.means, float), np.array(self.edits)
        se = np.where(n > 0, self.spread / np.sqrt(np.maximum(n, 1)), np.nan) if math.isfinite(self.spread) else None
        for l in self.contenders:
            ax.axvspan(l - 0.5, l + 0.5, color="tab:green", alpha=0.12, lw=0)
        ax.errorbar(x, y, yerr=se, fmt="none", ecolor="0.6", lw=0.8)
        # one legend entry per fate: still in the race at the end, dropped in round r, damaging
        fates = ["in the race at the end" if d is None else ("damaging" if d < 0 else f"dropped in round {d}")
                 for d in self.dropped]
        order = sorted(set(fates), key=lambda f: (f != "in the race at the end", f == "damaging", f))
        colours = {f: f"C{i}" for i, f in enumerate(order)}
        for f in order:
            k = np.array([g == f for g in fates])
            ax.scatter(x[k], y[k], s=12 + 6 * n[k], color=colours[f], zorder=3, label=f)
        ax.scatter([self.layer], [y[self.layers.index(self.layer)]], marker="*", s=220, c="red", zorder=4,
                   label=f"pick {self.layer}")
        ax.set_xlabel("layer"), ax.set_ylabel(f"mean {self.definition} over its proxy edits")
        ax.set_title(title or f"search: {self.cost}; contenders shaded")
        ax.legend(fontsize=7)
        return fig


def _check_policy(n_layers: int, n_edits: int, budget: int, eta: int, first: int, margin: float,
                  confidence: float | None) -> None:
    for name, v, low in (("eta", eta, 2), ("first", first, 1), ("budget", budget, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if n_layers < 1 or n_edits < 1:
        raise ValueError(f"the search needs at least one layer and one proxy edit, got {n_layers} and {n_edits}")
    if not (isinstance(margin, (int, float)) and margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0 (score units), got {margin!r}")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) or None (never stop early), got {confidence!r}")
    need = n_layers * min(first, n_edits)
    if budget < need:
        raise ValueError(f"budget {budget} cells is below one round: the first {min(first, n_edits)} proxy edit(s) "
                         f"at each of the {n_layers} layers = {need} cells; give at least that, or fewer layers")


def _paired(obs: np.ndarray, edits: np.ndarray, leader: int, cols: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per layer of ``cols``: the mean paired difference (layer - leader) on the edits both
    have (a prefix of the draw order), the number of those edits, and the sum of squared deviations."""
    cols_a = np.asarray(cols, dtype=int)
    k = np.minimum(edits[cols_a], edits[leader]).astype(int)
    d_mean, ss = np.zeros(len(cols_a)), np.zeros(len(cols_a))
    for kk in np.unique(k):  # layers dropped in the same round share their edits: one array per round
        j = np.flatnonzero(k == kk)
        d = obs[:kk, cols_a[j]] - obs[:kk, [leader]]
        d_mean[j] = d.mean(0)
        ss[j] = ((d - d_mean[j]) ** 2).sum(0)
    return d_mean, k.astype(float), ss


def confidence_of(obs: np.ndarray, edits: np.ndarray, leader: int, cols: Sequence[int], margin: float,
                  level: float) -> tuple[float, list[int], float]:
    """(confidence, contender columns, pooled sd) of ``leader`` against ``cols`` (see the module doc).

    ``obs [edits, layers]``: the scores seen (the first ``edits[c]`` rows of column ``c``).

    Example:
        >>> obs = np.array([[0.9, 0.1], [0.8, 0.2], [1.0, 0.0]])
        >>> conf, contenders, sd = confidence_of(obs, np.array([3, 3]), 0, [1], margin=0.05, level=0.9)
        >>> round(conf, 3), contenders, round(sd, 3)
        (0.991, [0], 0.2)
    """
    others = [c for c in cols if c != leader]
    if not others:
        return 1.0, [leader], math.nan
    d_mean, k, ss = _paired(obs, edits, leader, others)
    df = float(np.clip(k - 1, 0, None).sum())
    if df == 0:
        return math.nan, sorted([leader, *others]), math.nan
    sd = math.sqrt(ss.sum() / df)
    se = sd / np.sqrt(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_beat = np.where(se > 0, (d_mean - margin) / se, np.where(d_mean > margin, np.inf, -np.inf))
        upper = np.where(se > 0, d_mean + float(special.stdtrit(df, level)) * se, d_mean)
    p_beat = special.stdtr(df, z_beat)  # P(layer - leader > margin), Student's t with the pooled df
    contenders = sorted([leader] + [c for c, u in zip(others, upper) if u >= -margin])
    return float(np.prod(1 - p_beat)), contenders, sd


def _rounds_needed(n_layers: int, eta: int) -> int:
    """Evaluation rounds of successive halving: until one layer is left (30 layers, eta 3: 30, 10, 4, 2)."""
    r, n = 1, n_layers
    while n > 2 and math.ceil(n / eta) > 1:
        n, r = math.ceil(n / eta), r + 1
    return r


def _next_edits(r: int, rounds: int, budget: int, spent: int, have: int, alive: int, n: int, first: int) -> int:
    """How many proxy edits each layer alive has after round ``r``: round 0 the first
    ``first`` (all of the budget if it is the only round); later rounds share the budget left evenly."""
    if r == 0:
        return min(n, first if rounds > 1 else max(first, budget // alive))
    share = (budget - spent) // max(1, rounds - r)
    return min(n, have + share // alive)


def run_policy(source: CellSource, budget: int | None = None, *, eta: int = 3, first: int = 2,
               margin: float = DEFAULT_MARGIN, confidence: float | None = DEFAULT_CONFIDENCE) -> Search:
    """The search policy (see the module doc) on any :class:`CellSource`: live or replay.

    Args:
        source: the cells (:class:`LiveCells`, :class:`ReplayCells`).
        budget: cells at most (default :func:`default_budget`).
        eta: each round keeps the best ``1 / eta`` of the layers.
        first: proxy edits per layer in round 0.
        margin, confidence: stop once the leader is within ``margin`` of the best with this
            probability (``None``: only the budget, the proxy edits or one layer left stop it).
    """
    n_layers, n = len(source.layers), source.n_edits
    budget = default_budget(n_layers) if budget is None else budget
    _check_policy(n_layers, n, budget, eta, first, margin, confidence)
    level = confidence if confidence is not None else DEFAULT_CONFIDENCE
    obs, edits = np.full((n, n_layers), np.nan), np.zeros(n_layers, int)
    dropped: list[int | None] = [None] * n_layers
    alive, rounds, spent, stopped = list(range(n_layers)), [], 0, "one layer left"
    total = _rounds_needed(n_layers, eta)
    for r in range(n * n_layers + 1):
        have = int(edits[alive[0]])
        upto = _next_edits(r, total, budget, spent, have, len(alive), n, first)
        if upto <= have:
            stopped = "proxy edits used up" if have >= n else "budget spent"
            break
        obs[have:upto, alive] = source.block(range(have, upto), alive)
        edits[alive], cells = upto, (upto - have) * len(alive)
        spent, evaluated = spent + cells, [source.layers[c] for c in alive]
        if r == 0:
            alive = _gate(source, alive, dropped)
        means = obs[:upto, alive].mean(0)
        order = [alive[j] for j in np.lexsort((alive, -means))]  # best first; ties: the lower layer
        kept = order[: max(1, math.ceil(len(order) / eta))] if len(order) > 1 else order
        rounds.append(Round(r, evaluated, upto, cells, sorted(source.layers[c] for c in kept)))
        conf = confidence_of(obs, edits, order[0], [c for c in range(n_layers) if dropped[c] != -1], margin, level)[0]
        if len(alive) > 1 and confidence is not None and conf >= confidence:
            stopped, kept = "confident", order[:1]
        for c in set(alive) - set(kept):
            dropped[c] = r
        alive = sorted(kept)
        if len(alive) == 1:
            break
    return _result(source, obs, edits, alive, dropped, rounds, budget, stopped, margin, confidence, level)


def _gate(source: CellSource, alive: list[int], dropped: list[int | None]) -> list[int]:
    """Drop the damaging layers (marked -1); every layer damaging is an error."""
    bad = [c for c in alive if source.damaging(c)]
    for c in bad:
        dropped[c] = -1
    left = [c for c in alive if c not in bad]
    if not left:
        raise ValueError(f"every layer searched is damaging (held-out loss rise above the threshold): "
                         f"{[source.layers[c] for c in bad]}; raise threshold or search other layers")
    return left


def _result(source: CellSource, obs: np.ndarray, edits: np.ndarray, alive: list[int], dropped: list[int | None],
            rounds: list[Round], budget: int, stopped: str, margin: float, target: float | None,
            level: float) -> Search:
    have = int(edits[alive].min())
    last = obs[:have, alive].mean(0)
    leader = alive[int(np.lexsort((alive, -last))[0])]
    cols = [c for c in range(len(source.layers)) if dropped[c] != -1]
    conf, contenders, sd = confidence_of(obs, edits, leader, cols, margin, level)
    seen = np.isfinite(obs)
    with np.errstate(all="ignore"):
        means = [float(v) for v in np.where(seen.any(0), np.nansum(obs, 0) / np.maximum(seen.sum(0), 1), np.nan)]
    ids = list(source.edit_ids)
    return Search(source.layers[leader], [source.layers[c] for c in contenders], conf, margin, target,
                  source.definition, list(source.layers), means, [int(e) for e in edits], dropped, rounds,
                  source.cost, budget, stopped, sd, ids)


# --------------------------------------------------------------------------- the public entry


def _order(n: int, seed: int | None) -> list[int]:
    return list(range(n)) if seed is None else [int(i) for i in np.random.default_rng(seed).permutation(n)]


def _replay_rows(m: Matrix, proxy_edits: Any) -> list[int]:
    """Proxy edits given as row indices, edit ids, or edits (matched by content id)."""
    if proxy_edits is None:
        raise ValueError("replay needs proxy_edits: the matrix rows the search may query "
                         "(row indices, edit ids, or the edits themselves)")
    items = list(proxy_edits)
    if not items:
        raise ValueError("proxy_edits is empty: give at least one proxy edit")
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        return [int(x) for x in items]
    row = {e: i for i, e in enumerate(m.edit_ids)}
    ids = [x if isinstance(x, str) else edit_id(x) for x in items]
    missing = [e for e in ids if e not in row]
    if missing:
        raise ValueError(f"{len(missing)} proxy edit(s) are not rows of the stored matrix (ids {missing[:3]})")
    return [row[e] for e in ids]


def search(model: Any = None, proxy_edits: Any = None, *, editor: str = DEFAULT_EDITOR,
           hparams: Any = None, budget: int | None = None, layers: Sequence[int] | None = None,
           out: str | os.PathLike[str] | None = None, replay: Matrix | str | os.PathLike[str] | None = None,
           definition: str = "edit-only", margin: float = DEFAULT_MARGIN,
           confidence: float | None = DEFAULT_CONFIDENCE, eta: int = 3, first: int = 2, capability_edits: int = 2,
           threshold: float = DAMAGE_THRESHOLD, seed: int | None = 0, tokenizer: Any = None, chunk: int = 32,
           progress: bool | None = None) -> Search:
    """Search the layers for the best one to edit with ``editor``, within ``budget`` cells.

    Args:
        model: the model (live); ``None`` with ``replay=``.
        proxy_edits: the edits the search may edit (live: any public form of edits; replay:
            matrix row indices, edit ids or edits).
        editor, hparams: the editor and its settings (as :func:`~gradlocate.golden.matrix.matrix`).
        budget: cells at most, one cell = one proxy edit edited alone at one layer
            (default :func:`default_budget`: 4 per layer, a quarter of brute force on 16 edits).
        layers: the model layers searched (default: all).
        out: the record store (a matrix's folder or file): cells are written there and read back.
        replay: a :class:`~gradlocate.golden.matrix.Matrix` or matrix folder to read cells from
            instead of editing (``model``, ``editor``, ``hparams``, ``out`` unused).
        definition: the score maximised: ``"edit-only"`` (the mean of reliability,
            generalization and locality), ``"weighted"`` (with capability) or one metric.
        margin, confidence: stop early once the leader is within ``margin`` of the best with
            this probability (``None``: never early).
        eta, first: each round keeps the best ``1 / eta``; round 0 edits ``first`` proxy edits per layer.
        capability_edits: live, the first this many proxy edits (in the draw order) also get
            the held-out loss change at every layer (the damage gate; ``weighted``'s capability).
        threshold: the damage gate, in nats of held-out loss rise.
        seed: the order the proxy edits are drawn in (``None``: as given).

    Returns:
        :class:`Search`.
    """
    if replay is not None:
        if model is not None or out is not None:
            raise ValueError("give either a model (live, cells edited and stored in out=) or replay= a stored "
                             "matrix (cells read from it), not both")
        m, seconds = _load(replay)
        rows = _replay_rows(m, proxy_edits)
        src = _replay(m, seconds, [rows[i] for i in _order(len(rows), seed)], definition, threshold)
        return run_policy(src, budget, eta=eta, first=first, margin=margin, confidence=confidence)
    if model is None or proxy_edits is None:
        raise ValueError("search needs a model and proxy_edits (live), or replay= a stored matrix and proxy_edits")
    from gradlocate.data import as_edits

    edits = as_edits(proxy_edits)
    ordered = [edits[i] for i in _order(len(edits), seed)]
    if isinstance(capability_edits, bool) or not isinstance(capability_edits, int) or not 0 <= capability_edits <= first:
        raise ValueError(f"capability_edits must be an int in 0..first ({first}): round 0 measures them at every "
                         f"layer; got {capability_edits!r}")
    live = LiveCells(model, ordered, editor=editor, hparams=hparams, layers=layers, out=out, definition=definition,
                     capability_edits=capability_edits, threshold=threshold, tokenizer=tokenizer, chunk=chunk,
                     progress=progress)
    budget = default_budget(len(live.layers)) if budget is None else budget
    print(f"search ({editor}): at most {budget} cells over {len(live.layers)} layers, {len(ordered)} proxy edits "
          f"(a cell: one edit alone at one layer)", flush=True)
    return run_policy(live, budget, eta=eta, first=first, margin=margin, confidence=confidence)

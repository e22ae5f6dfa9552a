"""The single-edit matrix as a table: :class:`Matrix`, every edit alone at every layer.

:func:`gradlocate.golden.matrix.matrix` fills it (with a model and an editor);
:meth:`gradlocate.golden.folder.StudyFolder.load` reads it back from a study folder without
a model. Rows are edits, identified by a digest of their content (:func:`edit_id`), so rows
of different runs line up; columns are model layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlocate.data import EditRequest, as_edits
from gradlocate.editors import DEFAULT_EDITOR
from gradlocate.golden import scores
from gradlocate.golden.arrays import layer_means
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN, LayerChoice, argmax_random, choose_layer, near_best
from gradlocate.golden.scores import PRIMARY
from gradlocate.golden.store import digest

__all__ = ["Matrix", "MATRIX_METRICS", "CONTINUOUS_METRICS", "LOWER_IS_BETTER", "PROMPT_KINDS", "TRAIN_FIELDS",
           "edit_id", "layer_span", "prompt_values"]

#: The teacher-forced metrics of a cell (every overall is computed from them: :mod:`gradlocate.golden.scores`).
MATRIX_METRICS = ("reliability", "generalization", "locality", "portability")
#: The kind of prompt each metric is measured on (the keys of a cell record's ``prompts``).
PROMPT_KINDS = {"reliability": "rewrite", "generalization": "rephrase", "locality": "locality",
                "portability": "portability"}
#: The continuous aggregates of a cell (records of metrics version 2 on; NaN in older ones):
#: ``<metric>_logprob`` the mean target-token log-probability, ``<metric>_margin`` the margin
#: of the new answer over the old one, ``locality_kl`` KL(unedited || edited) at the locality
#: answer positions. Each is the mean over the cell's prompts of its per-prompt value
#: (:func:`prompt_values`; definitions: docs/editing.md, "The matrix's instrument").
CONTINUOUS_METRICS = ("reliability_logprob", "reliability_margin", "generalization_logprob",
                      "generalization_margin", "locality_logprob", "locality_kl", "portability_logprob")
#: Cell metrics where lower is better (a layer choice maximises their negation).
LOWER_IS_BETTER = ("locality_kl",)
#: The per-cell training summary fields.
TRAIN_FIELDS = ("converged", "final_loss", "epochs", "steps")


def prompt_values(section: dict[str, Any] | None, metric: str) -> list[float]:
    """Per prompt of ``metric``'s kind, its value in a cell record's ``prompts`` section: a
    :data:`MATRIX_METRICS` name gives each prompt's token accuracy (the fraction of its
    tokens right), ``<metric>_logprob`` its mean token log-probability, ``<metric>_margin``
    its margin (prompts without one left out), ``locality_kl`` its mean KL. A cell's
    aggregate (``scores`` and ``continuous``) is the mean of these over its prompts.

    Example:
        >>> cell = {"rewrite": [{"acc": [1, 0], "logprob": [-0.5, -1.5], "old_logprob": [-2.0], "margin": 1.0}]}
        >>> prompt_values(cell, "reliability"), prompt_values(cell, "reliability_logprob"), prompt_values(cell, "locality")
        ([0.5], [-1.0], [])
    """
    base, _, stat = metric.partition("_")
    if base not in PROMPT_KINDS or stat not in ("", "logprob", "margin", "kl") or \
            (metric not in MATRIX_METRICS and metric not in CONTINUOUS_METRICS):
        raise ValueError(f"metric must be one of {MATRIX_METRICS + CONTINUOUS_METRICS}, got {metric!r}")
    items = (section or {}).get(PROMPT_KINDS[base]) or []
    if stat == "margin":
        return [float(p["margin"]) for p in items if p.get("margin") is not None]
    key = {"": "acc", "logprob": "logprob", "kl": "kl"}[stat]
    return [sum(p[key]) / len(p[key]) for p in items]

def edit_id(edit: Any) -> str:
    """A digest of an edit's content: the same edit has the same id in every run.

    Example:
        >>> edit_id({"prompt": "a", "target_new": "b"}) == edit_id({"target_new": "b", "prompt": "a"})
        True
    """
    e = edit if isinstance(edit, EditRequest) else as_edits([edit])[0]
    return digest(e.to_dict())


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def layer_span(layers: Sequence[int]) -> str:
    """Layers as a reader scans them: runs as ``a..b``, an even stride as ``a..b every s``.

    >>> layer_span([20, 21, 22]), layer_span([0, 3, 6, 9]), layer_span([4, 8, 18, 19, 20]), layer_span([])
    ('20..22', '0..9 every 3', '4, 8, 18..20', 'none')
    """
    ls = sorted(int(x) for x in layers)
    if not ls:
        return "none"
    steps = {b - a for a, b in zip(ls, ls[1:])}
    if len(ls) > 2 and len(steps) == 1 and steps != {1}:
        return f"{ls[0]}..{ls[-1]} every {steps.pop()}"
    runs: list[list[int]] = []
    for x in ls:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _nan_table(n: int, m: int) -> np.ndarray:
    return np.full((n, m), np.nan)


def _none_table(n: int, m: int) -> np.ndarray:
    return np.full((n, m), None, dtype=object)


def _num(v: Any) -> float:
    return np.nan if v is None else float(v)


#: How a layer choice breaks ties: ``"random"`` (a uniform draw seeded by ``seed``:
#: :func:`gradlocate.golden.oracle.argmax_random`) or ``"lowest"`` (the first of the tied
#: layers, as :func:`gradlocate.golden.scores.golden_layer` and ``own_optimum`` do).
TIES = ("random", "lowest")


@dataclass(repr=False)
class Matrix:
    """Every edit alone at every layer (see the module doc).

    Attributes:
        layers: the layers (columns).
        edit_ids: each edit's content digest (rows).
        scores: metric -> ``[edits, layers]`` array (NaN where absent): the teacher-forced
            :data:`MATRIX_METRICS` (token accuracy) and the :data:`CONTINUOUS_METRICS`
            (NaN in cells stored before metrics version 2). Every overall is computed from
            the first by :func:`gradlocate.golden.scores.overall` (:meth:`overall`), never stored.
        train: ``converged`` (1/0), ``final_loss``, ``epochs``, ``steps`` -> ``[edits, layers]``.
        capability: ``[edits, layers]`` held-out loss change against the unedited model
            (NaN outside the subsample).
        capability_base: the unedited model's held-out loss.
        editor, params: the editor and the settings the cells were made with.
        path: the record store, relative to the working directory when under it.
        timings: seconds the stored cells took, summed (train, score, capability).
        prompts: ``[edits, layers]`` object array: each cell's per-prompt, per-token record
            section (:mod:`gradlocate.golden.instrument`), ``None`` where absent or stored
            before metrics version 2; :meth:`per_prompt` reads it.
    """

    layers: list[int]
    edit_ids: list[str]
    scores: dict[str, np.ndarray]
    train: dict[str, np.ndarray] = field(default_factory=dict)
    capability: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    capability_base: float | None = None
    editor: str = DEFAULT_EDITOR
    params: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    prompts: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=object), repr=False)

    def __post_init__(self) -> None:
        shape = (len(self.edit_ids), len(self.layers))
        if self.capability.size == 0:  # not measured at all
            self.capability = _nan_table(*shape)
        if self.prompts.size == 0:
            self.prompts = _none_table(*shape)
        for name, table in {**self.scores, **self.train, "capability": self.capability, "prompts": self.prompts}.items():
            if table.shape != shape:
                raise ValueError(f"matrix table {name!r} has shape {table.shape}, expected [edits, layers] = {shape}")

    @classmethod
    def from_cells(cls, layers: Sequence[int], ids: Sequence[str], cells: Any, editor: str = DEFAULT_EDITOR,
                   params: dict[str, Any] | None = None, path: str | None = None) -> Matrix:
        """The matrix of ``ids`` x ``layers`` from cell records (``cells[(edit id, layer)]``,
        absent cells NaN), of any metrics version: a record without the continuous
        aggregates or the per-prompt section (version 1) leaves them NaN / ``None``."""
        shape = (len(ids), len(layers))
        scores = {m: _nan_table(*shape) for m in (*MATRIX_METRICS, *CONTINUOUS_METRICS)}
        train = {f: _nan_table(*shape) for f in TRAIN_FIELDS}
        cap, base, prompts = _nan_table(*shape), None, _none_table(*shape)
        timings: dict[str, float] = {}
        for i, eid in enumerate(ids):
            for j, layer in enumerate(layers):
                rec = cells.get((eid, layer))
                if rec is None:
                    continue
                for m in MATRIX_METRICS:
                    scores[m][i, j] = _num((rec.get("scores") or {}).get(m))
                for m in CONTINUOUS_METRICS:
                    scores[m][i, j] = _num((rec.get("continuous") or {}).get(m))
                for f in TRAIN_FIELDS:
                    train[f][i, j] = _num((rec.get("train") or {}).get(f))
                for k, v in (rec.get("timings") or {}).items():
                    timings[k] = timings.get(k, 0.0) + v
                prompts[i, j] = rec.get("prompts")
                if rec.get("capability"):
                    cap[i, j] = rec["capability"]["lm_loss_change"]
                    base = rec["capability"]["lm_loss"] - rec["capability"]["lm_loss_change"]
        return cls(list(layers), list(ids), scores, train, cap, base, editor, dict(params or {}), path, timings, prompts)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.edit_ids), len(self.layers)

    @property
    def n_edits(self) -> int:
        return len(self.edit_ids)

    @property
    def filled(self) -> np.ndarray:
        """``[edits, layers]``: the cells that hold a score."""
        return np.asarray(np.stack([np.isfinite(t) for t in self.scores.values()]).any(0))

    def metrics(self, rows: Any = None) -> dict[str, np.ndarray]:
        """The metrics :func:`gradlocate.golden.scores.overall` takes (rows ``rows``): the edit
        metrics that have a value ``[edits, layers]``, and, where capability was measured,
        per layer ``capability`` (``exp(-mean loss change)``) and ``lm_loss`` (the mean change).

        Example:
            >>> cap = np.array([[0.0, 1.0], [np.nan, np.nan]])
            >>> m = Matrix([0, 1], ["a", "b"], {"reliability": np.ones((2, 2))}, capability=cap)
            >>> {k: np.round(v, 3).tolist() for k, v in m.metrics().items() if k != "reliability"}
            {'capability': [1.0, 0.368], 'lm_loss': [0.0, 1.0]}
        """
        idx = np.arange(self.n_edits) if rows is None else np.asarray(rows, dtype=int)
        out = {k: self.scores[k][idx] for k in MATRIX_METRICS
               if k in self.scores and np.isfinite(self.scores[k][idx]).any()}
        if np.isfinite(self.capability).any():
            change = self.curve("capability")
            if np.isfinite(change).all():
                out["capability"], out["lm_loss"] = np.exp(-change), change
        return out

    def overall(self, definition: str = PRIMARY) -> np.ndarray:
        """``[edits, layers]``: every cell's overall under ``definition`` (a metric's name, or
        one of :data:`gradlocate.golden.scores.DEFINITIONS`)."""
        return scores.overall(self.metrics(), definition)

    def _table(self, metric: str) -> np.ndarray:
        if metric == "capability":
            return self.capability
        return self.scores[metric] if metric in self.scores else self.overall(metric)

    def value(self, metric: str, layer: int) -> list[float | None]:
        """Each edit's ``metric`` (or overall definition) at ``layer`` (``None`` where absent)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not among this matrix's layers {self.layers}: "
                             f"run the matrix (or sweep) with it to compare against it")
        column = self._table(metric)[:, self.layers.index(layer)]
        return [None if np.isnan(v) else float(v) for v in column]

    def at_optimum(self, metric: str, definition: str = PRIMARY) -> list[float | None]:
        """Each edit's ``metric`` at its own optimal layer (by ``definition``)."""
        return [None if l is None else self.value(metric, l)[i] for i, l in enumerate(self.optimum(definition))]

    def versus(self, golden: int, definition: str = PRIMARY) -> dict[str, dict[str, float | None]]:
        """The golden layer against each edit's own optimum, per metric: the means and a
        paired t-test (``scipy.stats.ttest_rel``) over the edits that have the metric (the
        paper's in-sample test: each difference is >= 0 by construction)."""
        from scipy.stats import ttest_rel

        out = {}
        for m in (*[k for k in MATRIX_METRICS if k in self.scores], definition):
            pairs = [(g, o) for g, o in zip(self.value(m, golden), self.at_optimum(m, definition))
                     if g is not None and o is not None]
            if not pairs:
                continue
            g, o = [p[0] for p in pairs], [p[1] for p in pairs]
            t = ttest_rel(o, g) if len(pairs) > 1 and any(a != b for a, b in pairs) else None
            out[m] = {"golden": sum(g) / len(g), "optimum": sum(o) / len(o), "n": len(pairs),
                      "t": None if t is None else float(t.statistic), "p": None if t is None else float(t.pvalue)}
        return out

    def curve(self, metric: str = PRIMARY) -> np.ndarray:
        """Per layer, the mean of ``metric`` (or of an overall definition) over the edits
        that have it (NaN if none)."""
        return layer_means(self._table(metric))

    def _oriented(self, definition: str) -> np.ndarray:
        """``definition``'s table with higher = better (capability and :data:`LOWER_IS_BETTER` negated)."""
        if definition == "capability" or definition in LOWER_IS_BETTER:
            return -self._table(definition)
        return self._table(definition)

    def golden(self, definition: str = PRIMARY, *, ties: str = "random", seed: int = 0) -> int:
        """The golden layer by ``definition``: the best mean over edits (NaN cells left out,
        ungated); ``"capability"``: the smallest held-out loss increase; a lower-is-better
        metric (:data:`LOWER_IS_BETTER`): the smallest. Ties (within
        :data:`~gradlocate.golden.oracle.TIE_TOL`): ``ties="random"`` a uniform draw seeded
        by ``seed`` (:meth:`choose` also reports the tied and near-best layers),
        ``"lowest"`` the first (:func:`gradlocate.golden.scores.golden_layer`, what
        gradlocate did before: it sends saturated tables to the lowest layer)."""
        _check_ties(ties)
        table = self._oriented(definition)
        if not np.isfinite(table).any():
            raise ValueError(f"no cell has {definition!r}: no golden layer by it")
        if ties == "lowest":
            return self.layers[scores.golden_layer(table)]
        return self.choose(definition, seed=seed).layer

    def choose(self, definition: str = PRIMARY, *, margin: float = EQUIVALENCE_MARGIN, seed: int = 0,
               allowed: Any = None) -> LayerChoice:
        """The golden layer by ``definition`` reported whole
        (:func:`gradlocate.golden.oracle.choose_layer` on the layer means): the layer (ties
        by a draw seeded with ``seed``), its mean, the tied layers and the layers within
        ``margin`` of the best, all as model layers (``allowed``: column indices or a mask).
        For a lower-is-better definition ``value`` is the mean itself, the choice its smallest.

        Example:
            >>> m = Matrix([4, 5, 6], ["a", "b"], {"reliability": np.array([[1.0, 1.0, 0.2], [1.0, 1.0, 0.9]])})
            >>> c = m.choose("reliability")
            >>> c.tied, c.near, c.layer in (4, 5)
            ([4, 5], [4, 5], True)
        """
        table = self._oriented(definition)
        if not np.isfinite(table).any():
            raise ValueError(f"no cell has {definition!r}: no golden layer by it")
        c = choose_layer(layer_means(table), margin=margin, seed=seed, allowed=allowed)
        sign = -1.0 if definition == "capability" or definition in LOWER_IS_BETTER else 1.0
        return LayerChoice(self.layers[c.layer], sign * c.value, [self.layers[j] for j in c.tied],
                           [self.layers[j] for j in c.near], c.margin, c.seed)

    def optimum(self, definition: str = PRIMARY, *, ties: str = "random", seed: int = 0) -> list[int | None]:
        """Each edit's own best layer by ``definition`` (``None`` for an edit with no score).
        Ties: ``"random"``, one draw per edit from one generator seeded by ``seed``
        (independent across edits); ``"lowest"``, the first
        (:func:`gradlocate.golden.scores.own_optimum`)."""
        _check_ties(ties)
        table = self._oriented(definition)
        have = np.isfinite(table).any(1)
        out: list[int | None] = [None] * self.n_edits
        if have.any():
            got = scores.own_optimum(table[have]).layers if ties == "lowest" else \
                argmax_random(table[have], seed)
            for i, j in zip(np.flatnonzero(have), got):
                out[int(i)] = self.layers[int(j)]
        return out

    def optimum_choices(self, definition: str = PRIMARY, *, margin: float = EQUIVALENCE_MARGIN,
                        seed: int = 0) -> list[LayerChoice | None]:
        """Each edit's own best layer reported whole: the layer of :meth:`optimum`
        (``ties="random"``, the same ``seed``), its value, the tied layers and the layers
        within ``margin`` of the edit's best, as model layers (``None``: no score).

        Example:
            >>> m = Matrix([0, 1, 2], ["a"], {"reliability": np.array([[0.5, 1.0, 0.99]])})
            >>> c = m.optimum_choices("reliability")[0]
            >>> c.layer, c.tied, c.near
            (1, [1], [1, 2])
        """
        table = self._oriented(definition)
        sign = -1.0 if definition == "capability" or definition in LOWER_IS_BETTER else 1.0
        out: list[LayerChoice | None] = [None] * self.n_edits
        for i, layer in enumerate(self.optimum(definition, seed=seed)):
            if layer is None:
                continue
            row, j = table[i], self.layers.index(layer)
            tied = near_best(row, 0.0)
            out[i] = LayerChoice(layer, sign * float(row[j]), [self.layers[k] for k in tied],
                                 [self.layers[k] for k in near_best(row, margin)], float(margin), int(seed))
        return out

    def per_prompt(self, metric: str) -> np.ndarray:
        """``[edits, layers]`` object array: each cell's per-prompt values of ``metric``
        (a list, one per prompt of the metric's kind: :func:`prompt_values`), ``None`` where
        the cell has no per-prompt record (absent, or stored before metrics version 2)."""
        prompt_values(None, metric)  # an unknown metric fails here
        out = _none_table(*self.shape)
        for (i, j), sec in np.ndenumerate(self.prompts):
            if sec is not None:
                out[i, j] = prompt_values(sec, metric)
        return out

    def to_dict(self) -> dict[str, Any]:
        as_list = lambda a: [[None if np.isnan(v) else float(v) for v in row] for row in a]  # noqa: E731
        return {"layers": self.layers, "edit_ids": self.edit_ids, "editor": self.editor,
                "scores": {m: as_list(t) for m, t in self.scores.items()},
                "train": {m: as_list(t) for m, t in self.train.items()}, "capability": as_list(self.capability),
                "capability_base": self.capability_base, "definition": PRIMARY, "golden": self.golden(),
                "golden_choice": self.choose().to_dict(), "ties": "random", "tie_seed": 0,
                "optimum": self.optimum(), "params": self.params, "path": self.path, "timings": self.timings}

    def plot(self, metric: str = PRIMARY, *, golden: int | None = None, title: str | None = None) -> Any:
        """Heatmap of ``metric`` (or an overall definition) per edit x layer, and its mean over
        edits per layer with ``golden`` marked (default: this matrix's golden layer by it)."""
        from gradlocate.plotting import plot_matrix

        return plot_matrix(self, metric, golden=golden, title=title)

    def __repr__(self) -> str:
        n, m = self.shape
        if n == 0 or m == 0:
            return f"Matrix(empty: {n} edits x {m} layers)"
        c = self.curve()
        filled = int(self.filled.sum())
        cap = int(np.isfinite(self.capability).sum())
        golden = (f"golden={self.golden()} (mean {PRIMARY} {np.nanmax(c):.3f})" if np.isfinite(c).any()
                  else "no scores")
        return (f"Matrix({n} edits x {m} layers {layer_span(self.layers)}, editor={self.editor!r}: "
                f"{golden}; {filled}/{n * m} cells, capability on {cap})")

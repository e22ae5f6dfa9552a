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
from gradlocate.golden.scores import PRIMARY
from gradlocate.golden.store import digest

__all__ = ["Matrix", "MATRIX_METRICS", "TRAIN_FIELDS", "edit_id", "layer_span"]

#: The teacher-forced metrics of a cell (every overall is computed from them: :mod:`gradlocate.golden.scores`).
MATRIX_METRICS = ("reliability", "generalization", "locality", "portability")
#: The per-cell training summary fields.
TRAIN_FIELDS = ("converged", "final_loss", "epochs", "steps")

def edit_id(edit: Any) -> str:
    """A digest of an edit's content: the same edit has the same id in every run.

    Example:
        >>> edit_id({"prompt": "a", "target_new": "b"}) == edit_id({"target_new": "b", "prompt": "a"})
        True
    """
    e = edit if isinstance(edit, EditRequest) else as_edits([edit])[0]
    return digest(e.to_dict())


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


@dataclass(repr=False)
class Matrix:
    """Every edit alone at every layer (see the module doc).

    Attributes:
        layers: the layers (columns).
        edit_ids: each edit's content digest (rows).
        scores: metric -> ``[edits, layers]`` array (NaN where absent): the teacher-forced
            :data:`MATRIX_METRICS`. Every overall is computed from them by
            :func:`gradlocate.golden.scores.overall` (:meth:`overall`), never stored.
        train: ``converged`` (1/0), ``final_loss``, ``epochs``, ``steps`` -> ``[edits, layers]``.
        capability: ``[edits, layers]`` held-out loss change against the unedited model
            (NaN outside the subsample).
        capability_base: the unedited model's held-out loss.
        editor, params: the editor and the settings the cells were made with.
        path: the record store, relative to the working directory when under it.
        timings: seconds the stored cells took, summed (train, score, capability).
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

    def __post_init__(self) -> None:
        shape = (len(self.edit_ids), len(self.layers))
        for name, table in {**self.scores, **self.train}.items():
            if table.shape != shape:
                raise ValueError(f"matrix table {name!r} has shape {table.shape}, expected [edits, layers] = {shape}")
        if self.capability.size == 0:  # not measured at all
            self.capability = _nan_table(*shape)

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

    def golden(self, definition: str = PRIMARY) -> int:
        """The golden layer (:func:`gradlocate.golden.scores.golden_layer`, ungated) by
        ``definition``; ``"capability"``: the smallest held-out loss increase."""
        table = -self.capability if definition == "capability" else self._table(definition)
        if not np.isfinite(table).any():
            raise ValueError(f"no cell has {definition!r}: no golden layer by it")
        return self.layers[scores.golden_layer(table)]

    def optimum(self, definition: str = PRIMARY) -> list[int | None]:
        """Each edit's own best layer by ``definition`` (:func:`gradlocate.golden.scores.own_optimum`;
        ``None`` for an edit with no score)."""
        table = self._table(definition)
        have = np.isfinite(table).any(1)
        out: list[int | None] = [None] * self.n_edits
        if have.any():
            got = scores.own_optimum(table[have]).layers
            for i, j in zip(np.flatnonzero(have), got):
                out[int(i)] = self.layers[int(j)]
        return out

    def to_dict(self) -> dict[str, Any]:
        as_list = lambda a: [[None if np.isnan(v) else float(v) for v in row] for row in a]  # noqa: E731
        return {"layers": self.layers, "edit_ids": self.edit_ids, "editor": self.editor,
                "scores": {m: as_list(t) for m, t in self.scores.items()},
                "train": {m: as_list(t) for m, t in self.train.items()}, "capability": as_list(self.capability),
                "capability_base": self.capability_base, "definition": PRIMARY, "golden": self.golden(),
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

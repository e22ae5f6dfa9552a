"""Replicate tables of a single-edit matrix: two ``[edits, layers]`` measurements of the
same cells with independent noise, what :func:`gradlocate.golden.oracle.oracle_gain` takes.

Two constructions, each with its estimand stated (:data:`ESTIMANDS`):

* **seeds** (:func:`seed_replicates`): every cell edited again under another replicate
  seed (``matrix(..., seeds=[0, 1])``; the rank-one editors ROME, R-ROME and EMMET draw
  their context templates with it) and scored on the same prompts: *the same prompts,
  re-measured*. The noise is the editor's.
* **prompts** (:func:`prompt_replicates`): the prompts of one kind of each cell split into
  two disjoint halves (alternating by the prompt's index: 0, 2, 4 ... and 1, 3, 5 ...),
  each table the mean of the metric over one half, under the same edited weights: *new
  prompts*. The noise is the choice of prompts. Needs the per-prompt record (metrics
  version 2) and at least two prompts of the kind.

What is refused, and why. With one prompt per kind (the shared ZsRE and CounterFact files:
one rewrite, one rephrase, one locality prompt per edit) and a deterministic editor
(LocFT-BF edits one edit without randomness: its seeds give the same table), no replicate
exists, and none is made up: halves of one answer's tokens are not independent draws (the
tokens of one answer share its prefix and its edit, and most CounterFact targets are one
token), and rewrite against rephrase compares two metrics with different expectations (the
edit is trained on its rewrite prompt), so neither table would measure the other's
expected score, which :func:`~gradlocate.golden.oracle.oracle_gain`'s unbiasedness needs.
:class:`ReplicateError` says what the data lacks.

Every table is oriented so that higher is better (:attr:`Replicates.sign` = -1 for a
lower-is-better metric such as ``locality_kl``), as ``oracle_gain`` maximises.

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.table import Matrix
    >>> cell = lambda a, b: {"rephrase": [{"acc": [a]}, {"acc": [b]}]}
    >>> prompts = np.empty((2, 2), dtype=object)
    >>> prompts[0, 0], prompts[0, 1], prompts[1, 0], prompts[1, 1] = cell(1, 0), cell(1, 1), cell(0, 0), cell(0, 1)
    >>> m = Matrix([0, 1], ["a", "b"], {"generalization": np.full((2, 2), 0.5)}, prompts=prompts)
    >>> r = prompt_replicates(m, "generalization")
    >>> r.select.tolist(), r.score.tolist(), r.by
    ([[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], 'prompts')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlocate.golden.arrays import Result
from gradlocate.golden.oracle import OracleGain, oracle_gain
from gradlocate.golden.table import CONTINUOUS_METRICS, LOWER_IS_BETTER, MATRIX_METRICS, PROMPT_KINDS, Matrix

__all__ = ["Replicates", "ReplicateError", "ESTIMANDS", "seed_replicates", "prompt_replicates", "replicates"]

#: What each construction's two tables are replicates of.
ESTIMANDS = {
    "seeds": "the same prompts, re-measured: each cell edited under two replicate seeds of the editor's randomness "
             "(rank-one editors: the sampled context templates) and scored on the same prompts; the replicate noise "
             "is the editor's, the prompts are fixed (the expected score is over the editor's seeds, for these prompts)",
    "prompts": "new prompts: each cell's prompts of one kind split into two disjoint halves (alternating by index), "
               "each table the mean over one half under the same edited weights; the replicate noise is the choice of "
               "prompts (the expected score is over prompts of that kind for the edit, a table measuring half of them)",
}


class ReplicateError(ValueError):
    """No replicate of the asked kind exists in the data: the message says what is missing."""


@dataclass(repr=False)
class Replicates(Result):
    """Two replicate tables of one metric (see the module doc).

    Attributes:
        metric: the metric or overall definition measured.
        by: ``"seeds"`` or ``"prompts"``; estimand: what the two tables replicate (:data:`ESTIMANDS`).
        select, score: the two ``[edits, layers]`` tables (NaN = absent), ``sign * metric``.
        sign: 1, or -1 for a lower-is-better metric (the tables are negated: higher = better).
        layers, edit_ids: the columns (model layers) and rows.
        n_replicated: edits with a value in both tables at some layer.
        detail: the seeds used, or the split rule and the prompt kind.
    """

    metric: str
    by: str
    estimand: str = field(repr=False)
    select: np.ndarray = field(repr=False)
    score: np.ndarray = field(repr=False)
    sign: float
    layers: list[int] = field(repr=False)
    edit_ids: list[str] = field(repr=False)
    n_replicated: int
    detail: dict[str, Any]

    def oracle_gain(self, **kwargs: Any) -> OracleGain:
        """:func:`gradlocate.golden.oracle.oracle_gain` of the two tables (``kwargs``: its
        settings; ``allowed`` as column indices or a mask over :attr:`layers`)."""
        return oracle_gain(self.select, self.score, **kwargs)


def _sign(metric: str) -> float:
    return -1.0 if metric in LOWER_IS_BETTER or metric == "capability" else 1.0


def _replicated(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.isfinite(a) & np.isfinite(b)).any(axis=1).sum())


def seed_replicates(a: Matrix, b: Matrix, metric: str, seeds: tuple[int, int] | None = None) -> Replicates:
    """``metric`` (a cell metric or an overall definition) of two matrices of the same
    study made under different replicate seeds, over their common edits and layers.

    Raises:
        ReplicateError: no common edit or layer, an overall whose ingredients one seed lacks
            (capability is measured on the first seed only), or identical tables (a
            deterministic editor: the seeds are not replicates).
    """
    ids = [e for e in a.edit_ids if e in set(b.edit_ids)]
    layers = [l for l in a.layers if l in set(b.layers)]
    if not ids or not layers:
        raise ReplicateError(f"the two seeds' matrices share no {'edit' if not ids else 'layer'}: nothing to replicate")
    ra, rb = [a.edit_ids.index(e) for e in ids], [b.edit_ids.index(e) for e in ids]
    ca, cb = [a.layers.index(l) for l in layers], [b.layers.index(l) for l in layers]
    if metric not in a.scores and sorted(a.metrics(ra)) != sorted(b.metrics(rb)):
        raise ReplicateError(f"the overall {metric!r} would be made of {sorted(a.metrics(ra))} on one seed and "
                             f"{sorted(b.metrics(rb))} on the other (capability is measured on the first seed only): "
                             f"use a definition both seeds have, e.g. 'edit-only'")
    s = _sign(metric)
    x = s * a._table(metric)[np.ix_(ra, ca)]
    y = s * b._table(metric)[np.ix_(rb, cb)]
    if np.array_equal(x, y, equal_nan=True):
        raise ReplicateError(f"the two seeds gave the same {metric!r} table: the editor ({a.editor}) has no randomness "
                             f"for a single edit (LocFT-BF has none), so its seeds are not replicates; split prompts "
                             f"instead (by='prompts', where an edit has several of a kind)")
    detail = {"seeds": list(seeds) if seeds is not None else [a.params.get("seed"), b.params.get("seed")]}
    return Replicates(metric, "seeds", ESTIMANDS["seeds"], x, y, s, layers, ids, _replicated(x, y), detail)


def prompt_replicates(m: Matrix, metric: str) -> Replicates:
    """``metric`` (a cell metric: token accuracy or a continuous one) over two disjoint
    halves of each cell's prompts of its kind: the prompts at even positions (0, 2, ...)
    and at odd positions (1, 3, ...) of the edit's list; an edit with fewer than two such
    prompts is NaN in both tables.

    Raises:
        ReplicateError: an overall definition (its reliability has one rewrite prompt per
            edit, which cannot be split), cells stored without per-prompt values (metrics
            version 1), or no edit with two prompts of the kind.
    """
    if metric not in MATRIX_METRICS + CONTINUOUS_METRICS:
        raise ReplicateError(f"prompt halves replicate one per-prompt metric ({MATRIX_METRICS + CONTINUOUS_METRICS}), "
                             f"not {metric!r}: an overall needs every ingredient split, and each edit has one "
                             f"rewrite prompt; replicate an overall by seeds")
    vals = m.per_prompt(metric)
    have = np.vectorize(lambda v: v is not None, otypes=[bool])(vals)
    if not have.any():
        raise ReplicateError(f"{m.path or 'this matrix'}: no cell has per-prompt values (cells stored before metrics "
                             f"version 2 keep only each cell's mean): rerun the matrix to split prompts")
    half = np.full((2, *m.shape), np.nan)
    for (i, j), v in np.ndenumerate(vals):
        if v is not None and len(v) >= 2:
            half[0, i, j], half[1, i, j] = np.mean(v[0::2]), np.mean(v[1::2])
    kind = PROMPT_KINDS[metric.partition("_")[0]]
    if not np.isfinite(half).any():
        raise ReplicateError(f"no edit has two {kind} prompts with {metric!r} (most have {_typical(vals)}), so its "
                             f"prompts cannot be split; with a deterministic editor (LocFT-BF) no replicate exists: "
                             f"use data with several {kind} prompts per edit, or a randomized editor (ROME, R-ROME, "
                             f"EMMET) with seeds=[0, 1]")
    s = _sign(metric)
    detail = {"kind": kind, "split": "alternating prompt indices: 0, 2, 4, ... | 1, 3, 5, ..."}
    return Replicates(metric, "prompts", ESTIMANDS["prompts"], s * half[0], s * half[1], s, list(m.layers),
                      list(m.edit_ids), _replicated(half[0], half[1]), detail)


def _typical(vals: np.ndarray) -> str:
    counts = [len(v) for v in vals.ravel() if v is not None]
    return f"{int(np.median(counts))} per cell" if counts else "none"


def replicates(m: Matrix, metric: str, other: Matrix | None = None) -> Replicates:
    """Replicate tables of ``metric``: by seeds when ``other`` (the same study under another
    seed) is given, else by prompt halves of ``m`` (see :func:`seed_replicates`,
    :func:`prompt_replicates`)."""
    return seed_replicates(m, other, metric) if other is not None else prompt_replicates(m, metric)

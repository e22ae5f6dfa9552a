"""A :class:`~gradlocate.golden.matrix.Matrix` from a folder of matrix records, possibly partial.

``benchmarks/matrix.py`` writes ``<folder>/edits.json`` (the edits, in row order, with
their content ids) and one record per (edit, layer) cell to ``<folder>/*.jsonl`` (a
:class:`~gradlocate.golden.store.RecordStore` folder) as the layers finish. :func:`load_matrix`
reads them without a model: the rows are the manifest's edits, the columns the layers
whose every row has a cell (``complete_only``), and :class:`Completeness` says how much
of the whole is there. A folder grown to more edits (``sizes`` in the manifest) shows the
earlier, complete rows until the new ones hold more cells. A stated regime (``editor``,
``hparams``) is checked against the records' editor fingerprint, so a page never labels
cells with settings they were not made with.

Example:
    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "edits.json").write_text(json.dumps({"edits": [{"id": "a"}, {"id": "b"}]}))
    >>> from gradlocate.golden.store import RecordStore
    >>> s = RecordStore(d, shard="s0")
    >>> for e, l in [("a", 0), ("b", 0), ("a", 1)]:
    ...     s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 1.0}, "train": {"converged": True}})
    >>> m, c = load_matrix(d, n_layers=3)
    >>> m.layers, c.cells, c.total, c.complete_layers
    ([0], 3, 6, [0])
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlocate.golden.matrix import MATRIX_METRICS, TRAIN_FIELDS, Matrix, layer_span
from gradlocate.golden.store import RecordStore, digest, relative_path

__all__ = ["load_matrix", "Completeness", "NoLayerYet"]


class NoLayerYet(ValueError):
    """A matrix folder with no layer to show yet (no complete layer, or no cell at all)."""


@dataclass
class Completeness:
    """How much of a matrix folder is done: cells present of ``total`` (edits x layers),
    the layers complete, the layers with some cells, and the layer count expected."""

    cells: int
    total: int
    complete_layers: list[int]
    partial_layers: list[int]
    n_layers: int
    n_edits: int
    edits_used: int | None = None  # the first rows the matrix shows (None: all n_edits)

    @property
    def done(self) -> bool:
        return self.cells >= self.total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.cells}/{self.total} cells ({self.cells / max(self.total, 1):.0%}); "
                f"{len(self.complete_layers)}/{self.n_layers} layers complete"
                + (f", {len(self.partial_layers)} partial ({layer_span(self.partial_layers)})"
                   if self.partial_layers else "")
                + (f" over the first {self.edits_used} of {self.n_edits} edits"
                   if self.edits_used is not None and self.edits_used < self.n_edits else ""))


def _manifest(folder: Path) -> tuple[list[str], list[int]]:
    """The edits' ids in row order, and the sizes the manifest has had (``sizes``: a
    folder grown from 32 to 64 edits says ``[32, 64]``)."""
    f = folder / "edits.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: a matrix folder holds edits.json (written by benchmarks/matrix.py)")
    manifest = json.loads(f.read_text())
    rows = manifest.get("edits", [])
    if not rows or any("id" not in r for r in rows):
        raise ValueError(f"{f}: expected {{'edits': [{{'id': ..., ...}}, ...]}} with an id per edit")
    sizes = sorted({int(k) for k in manifest.get("sizes", []) if 0 < int(k) < len(rows)} | {len(rows)})
    return [r["id"] for r in rows], sizes


def _check_regime(records: dict[Any, dict[str, Any]], editor: str | None, hparams: dict[str, Any] | None) -> None:
    """Every record made under one fingerprint (model, editor, metrics), and under the stated editor settings."""
    seen = {json.dumps({k: v for k, v in (r.get("fingerprint") or {}).items() if k != "cell"}, sort_keys=True)
            for r in records.values()}
    if len(seen) > 1:
        raise ValueError(f"the folder mixes records made under {len(seen)} different fingerprints: {sorted(seen)[:3]}")
    if editor is None or not records:
        return
    want = digest({"name": editor, "hparams": dict(hparams or {})})
    got = (next(iter(records.values())).get("fingerprint") or {}).get("editor")
    if got != want:
        raise ValueError(f"the records' editor fingerprint {got} is not {editor!r} with {hparams} ({want}): "
                         f"state the regime the cells were made with")


def _tables(ids: list[str], layers: list[int],
            cells: dict[tuple[str, int], dict[str, Any]]) -> tuple[dict[str, np.ndarray], float | None]:
    """The score, train and capability tables of ``ids`` x ``layers`` (NaN where absent),
    and the unedited model's held-out loss (``None`` if no cell has a capability record)."""
    shape = (len(ids), len(layers))
    t = {k: np.full(shape, np.nan) for k in (*MATRIX_METRICS, *TRAIN_FIELDS, "capability")}
    base: float | None = None
    for i, e in enumerate(ids):
        for j, l in enumerate(layers):
            rec = cells.get((e, l))
            if rec is None:
                continue
            for k in MATRIX_METRICS:
                t[k][i, j] = _num(rec.get("scores", {}).get(k))
            for k in TRAIN_FIELDS:
                t[k][i, j] = _num(rec.get("train", {}).get(k))
            cap = rec.get("capability")
            if cap:
                t["capability"][i, j] = cap["lm_loss_change"]
                base = cap["lm_loss"] - cap["lm_loss_change"]
    return t, base


def load_matrix(folder: str | os.PathLike[str], n_layers: int, *, editor: str | None = None,
                hparams: dict[str, Any] | None = None, complete_only: bool = True) -> tuple[Matrix, Completeness]:
    """The matrix stored in ``folder`` and how complete it is (see the module doc).

    Args:
        folder: a matrix folder (``edits.json`` and ``*.jsonl`` shards).
        n_layers: the model's layer count (the whole matrix is edits x ``n_layers``).
        editor, hparams: the regime the cells must have been made with (checked against
            the records' fingerprint; ``None``: not checked, and the matrix says nothing of it).
        complete_only: keep only the layers every edit has (otherwise every layer with a
            cell, NaN where absent).

    Raises:
        FileNotFoundError: no ``edits.json``; ValueError: mixed or mismatched fingerprints;
        NoLayerYet (a ValueError): no layer to show yet (a run that has only begun).
    """
    folder = Path(folder)
    ids, sizes = _manifest(folder)
    records = {k: r for k, r in RecordStore(folder).read().items() if "edit" in r and "layer" in r}
    _check_regime(records, editor, hparams)
    cells = {(r["edit"], int(r["layer"])): r for r in records.values() if r.get("edit") in set(ids)}
    every = len(ids)
    if complete_only:  # a grown manifest: its first rows may be complete before the new ones are
        ids = _best_prefix(ids, sizes, cells, n_layers)
    count = {l: sum((e, l) in cells for e in ids) for l in range(n_layers)}
    complete = [l for l, c in count.items() if c == len(ids)]
    partial = [l for l, c in count.items() if 0 < c < len(ids)]
    layers = complete if complete_only else sorted(complete + partial)
    if not layers:
        raise NoLayerYet(f"{folder}: no {'complete ' if complete_only else ''}layer yet ({len(cells)} cells)")
    t, base = _tables(ids, layers, cells)
    params = {"hparams": dict(hparams or {}), "capability_edits": int(np.isfinite(t["capability"]).any(1).sum())}
    m = Matrix(layers, ids, {k: t[k] for k in MATRIX_METRICS}, {k: t[k] for k in TRAIN_FIELDS}, t["capability"],
               base, editor or "unknown", params, relative_path(folder))
    return m, Completeness(len(cells), every * n_layers, complete, partial, n_layers, every, len(ids))


def _best_prefix(ids: list[str], sizes: list[int], cells: dict[tuple[str, int], Any], n_layers: int) -> list[str]:
    """The rows in view: of the sizes the manifest has had, the first ``k`` edits whose
    complete layers hold the most cells (the larger ``k`` on a tie). A folder grown from
    32 to 64 edits keeps its 32 complete rows in view while the new rows are filled."""
    def held(k: int) -> int:
        return k * sum(all((e, l) in cells for e in ids[:k]) for l in range(n_layers))

    return ids[:max(sorted(sizes, reverse=True), key=held)]


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)

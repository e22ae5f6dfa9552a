"""The single-edit matrix: every edit edited alone at every layer, each cell scored.

A golden layer is chosen for a set of edits; whether one layer suits each edit is a
question about cells: edit ``i`` edited *alone* at layer ``l``. :func:`matrix` fills the
``[edits, layers]`` table with any registered editor
(:func:`~gradlocate.editors.per_edit_deltas`: each edit's own weight change, computed
for a chunk of edits at once, the model never changed), and scores each cell
teacher-forced as :func:`~gradlocate.evaluation.evaluate` scores one edit:

* **reliability**, **generalization**, **portability** (where the data has it): token
  accuracy of the edit's answers with its change applied;
* **locality**: agreement with the unedited model's predictions on the edit's locality prompts;
* **overall**: the mean of those the edit has;
* **capability** on a stated subsample (the first ``capability_edits`` edits, at every
  layer): the change of the mean next-token NLL of the held-out texts
  (:func:`~gradlocate.data.heldout_texts`, the ones ``evaluate(capability=True)`` uses,
  disjoint from GradRatio's retain texts) under that edit's change, against the unedited
  model (positive: the edit made general text less likely);
* each cell's training summary (converged, final loss, epochs).

Each cell is one record in a :class:`~gradlocate.golden.store.RecordStore` (``out=``),
written as each chunk of a layer finishes; a re-run skips the cells present, and shards
written by other processes or machines are read together. Edits are identified by a
digest of their content (:func:`edit_id`), so rows of different runs line up.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5"}, {"prompt": "The sky is", "target_new": "green"}]
    >>> m = matrix(model, edits, hparams={"lr": 1e-2, "epochs": 3}, capability_edits=1, progress=False)
    >>> m.scores["reliability"].shape, m.golden() in m.layers
    ((2, 2), True)
    >>> bool(np.isnan(m.capability[1]).all()), bool(np.isfinite(m.capability[0]).all())
    (True, True)
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from gradlocate.data import EditRequest, Edits, as_edits, heldout_texts
from gradlocate.editors import DEFAULT_EDITOR, editor_class, per_edit_deltas
from gradlocate.editors.executors import row_delta
from gradlocate.evaluation import _queries, locality_reference, text_loss
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import edited, no_cache, require_gradients, run, using
from gradlocate.losses import IGNORE, logits_of, tokenize_edits
from gradlocate.state import check_materialized, input_device
from gradlocate.golden.engine import resolve_engine, run_jobs
from gradlocate.golden.store import Fingerprint, RecordStore, digest, model_identity, relative_path

__all__ = ["matrix", "Matrix", "MATRIX_METRICS", "edit_id", "score_per_sample"]

#: The teacher-forced metrics of a cell; "overall" is the mean of those an edit has.
MATRIX_METRICS = ("reliability", "generalization", "locality", "portability")
#: The per-cell training summary fields.
TRAIN_FIELDS = ("converged", "final_loss", "epochs", "steps")
#: Bumped whenever a cell metric's definition changes, so stored cells are never mixed across two.
METRICS_VERSION = 1


def edit_id(edit: Any) -> str:
    """A digest of an edit's content: the same edit has the same id in every run.

    Example:
        >>> edit_id({"prompt": "a", "target_new": "b"}) == edit_id({"target_new": "b", "prompt": "a"})
        True
    """
    e = edit if isinstance(edit, EditRequest) else as_edits([edit])[0]
    return digest(e.to_dict())


@torch.no_grad()
def score_per_sample(h: Handles, layer: int, edits: Edits, delta: Tensor | None, reference: list[list[list[int]]],
                     batch_size: int = 32) -> dict[str, list[float | None]]:
    """Each edit's teacher-forced metrics with its own weight change ``delta[i]`` at
    ``layer`` (``delta`` ``None``: the unedited model). Locality is agreement with
    ``reference``, the unedited model's predictions (as :func:`~gradlocate.evaluation.evaluate`)."""
    qs = _queries(edits)
    batch = tokenize_edits(h.require_tokenizer(), [q.prompt for q in qs], [q.answer for q in qs],
                           chat=h.chat).to(input_device(h.root))
    owner = torch.tensor([q.edit for q in qs])
    site = h[layer].path
    preds: list[list[int]] = []
    with using(h):
        for rows in torch.arange(len(batch)).split(batch_size):
            mb = batch[rows.to(batch.input_ids.device)]
            kw = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **no_cache(h.root))
            if delta is None:
                out = run(h, **kw)
            else:
                d = delta[owner[rows].to(delta.device)]
                with edited(h, site, lambda x, o: o + row_delta(x, d)):
                    out = run(h, **kw)
            pred = logits_of(out)[:, :-1].argmax(-1).cpu()
            for p_row, l_row in zip(pred, mb.labels[:, 1:].cpu()):
                preds.append(p_row[l_row != IGNORE].tolist())
    per: list[dict[str, list[float]]] = [{} for _ in edits]
    for k, q in enumerate(qs):
        target = batch.labels[k, 1:][batch.labels[k, 1:] != IGNORE].tolist()
        want = reference[q.edit][q.item] if q.kind == "locality" else target
        per[q.edit].setdefault(q.kind, []).append(sum(a == b for a, b in zip(want, preds[k])) / len(preds[k]))
    return {m: [sum(d[m]) / len(d[m]) if d.get(m) else None for d in per] for m in MATRIX_METRICS}


@torch.no_grad()
def edited_text_loss(h: Handles, layer: int, delta: Tensor | None, texts: Sequence[str]) -> float:
    """The held-out texts' mean next-token NLL (:func:`~gradlocate.evaluation.text_loss`)
    with one weight change ``delta`` ``[d_out, d_in]`` at ``layer`` (``None``: unedited)."""
    with using(h):
        if delta is None:
            return text_loss(h, texts)
        # One change for every text of the batch: x @ delta.T, as a weight change of the site.
        with edited(h, h[layer].path, lambda x, o: o + F.linear(x.to(delta.dtype), delta).to(o.dtype)):
            return text_loss(h, texts)


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
        scores: metric -> ``[edits, layers]`` array (NaN where absent); ``"overall"`` included.
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
        if "overall" not in self.scores:
            stack = np.stack([self.scores[m] for m in MATRIX_METRICS if m in self.scores])
            with np.errstate(all="ignore"):
                have = np.isfinite(stack).sum(0)
                self.scores["overall"] = np.where(have > 0, np.nansum(stack, 0) / np.maximum(have, 1), np.nan)
        if self.capability.size == 0:  # not measured at all
            self.capability = _nan_table(*shape)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.edit_ids), len(self.layers)

    @property
    def n_edits(self) -> int:
        return len(self.edit_ids)

    def value(self, metric: str, layer: int) -> list[float | None]:
        """Each edit's ``metric`` at ``layer`` (``None`` where absent)."""
        column = self.scores[metric][:, self.layers.index(layer)]
        return [None if np.isnan(v) else float(v) for v in column]

    def at_optimum(self, metric: str) -> list[float | None]:
        """Each edit's ``metric`` at its own optimal layer (by overall)."""
        return [None if l is None else self.value(metric, l)[i] for i, l in enumerate(self.optimum())]

    def versus(self, golden: int) -> dict[str, dict[str, float | None]]:
        """The golden layer against each edit's own optimum, per metric: the means and a
        paired t-test (``scipy.stats.ttest_rel``) over the edits that have the metric."""
        from scipy.stats import ttest_rel

        out = {}
        for m in (*MATRIX_METRICS, "overall"):
            pairs = [(g, o) for g, o in zip(self.value(m, golden), self.at_optimum(m)) if g is not None and o is not None]
            if not pairs:
                continue
            g, o = [p[0] for p in pairs], [p[1] for p in pairs]
            t = ttest_rel(o, g) if len(pairs) > 1 and any(a != b for a, b in pairs) else None
            out[m] = {"golden": sum(g) / len(g), "optimum": sum(o) / len(o), "n": len(pairs),
                      "t": None if t is None else float(t.statistic), "p": None if t is None else float(t.pvalue)}
        return out

    def curve(self, metric: str = "overall") -> np.ndarray:
        """Per layer, the mean of ``metric`` over the edits that have it (NaN if none)."""
        table = self.capability if metric == "capability" else self.scores[metric]
        with np.errstate(all="ignore"):
            have = np.isfinite(table).sum(0)
            return np.where(have > 0, np.nansum(table, 0) / np.maximum(have, 1), np.nan)

    def golden(self, metric: str = "overall") -> int:
        """The layer with the best mean ``metric`` over edits (lowest on ties;
        ``"capability"``: the smallest loss increase)."""
        c = self.curve(metric)
        if metric == "capability":
            c = -c
        if np.isnan(c).all():
            raise ValueError(f"no cell has {metric!r}: no golden layer by it")
        best = max(range(len(c)), key=lambda j: (-math.inf if np.isnan(c[j]) else c[j], -j))
        return self.layers[best]

    def optimum(self, metric: str = "overall") -> list[int | None]:
        """Each edit's own best layer by ``metric`` (lowest on ties; ``None`` if it has none)."""
        out: list[int | None] = []
        for row in self.scores[metric]:
            j = max(range(len(row)), key=lambda k: (-math.inf if np.isnan(row[k]) else row[k], -k))
            out.append(None if np.isnan(row).all() else self.layers[j])
        return out

    def to_dict(self) -> dict[str, Any]:
        as_list = lambda a: [[None if np.isnan(v) else float(v) for v in row] for row in a]  # noqa: E731
        return {"layers": self.layers, "edit_ids": self.edit_ids, "editor": self.editor,
                "scores": {m: as_list(t) for m, t in self.scores.items()},
                "train": {m: as_list(t) for m, t in self.train.items()}, "capability": as_list(self.capability),
                "capability_base": self.capability_base, "golden": self.golden(), "optimum": self.optimum(),
                "params": self.params, "path": self.path, "timings": self.timings}

    def plot(self, metric: str = "overall", *, golden: int | None = None, title: str | None = None) -> Any:
        """Heatmap of ``metric`` per edit x layer, and its mean over edits per layer with
        ``golden`` marked (default: this matrix's golden layer by ``metric``)."""
        from gradlocate.plotting import plot_matrix

        return plot_matrix(self, metric, golden=golden, title=title)

    def __repr__(self) -> str:
        n, m = self.shape
        if n == 0 or m == 0:
            return f"Matrix(empty: {n} edits x {m} layers)"
        c = self.curve()
        filled = int(np.isfinite(self.scores["overall"]).sum())
        cap = int(np.isfinite(self.capability).sum())
        golden = f"golden={self.golden()} (mean overall {np.nanmax(c):.3f})" if np.isfinite(c).any() else "no scores"
        return (f"Matrix({n} edits x {m} layers {layer_span(self.layers)}, editor={self.editor!r}: "
                f"{golden}; {filled}/{n * m} cells, capability on {cap})")


@dataclass
class _Plan:
    """What a matrix run works on: the model, edits and their ids, layers, settings, store."""

    h: Handles
    edits: Edits
    ids: list[str]
    layers: list[int]
    editor: str
    hparams: dict[str, Any]
    settings: dict[str, Any]
    texts: list[str]
    cap_edits: int
    store: RecordStore | None
    chunk: int
    # what an editor reuses across layers of the same unedited model (rank-one: context templates)
    memo: dict[Any, Any] = field(default_factory=dict)


def matrix(model: Any, edits: Any, *, editor: str = DEFAULT_EDITOR, hparams: dict[str, Any] | None = None,
           layers: Sequence[int] | None = None, out: str | os.PathLike[str] | None = None, chunk: int = 32,
           capability_edits: int = 8, tokenizer: Any = None, shard: str = "records",
           engine: str = "local", address: str | None = None, workers: int | None = None,
           progress: bool | None = None) -> Matrix:
    """Edit every edit alone at every layer with ``editor``; score every cell.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a bridge, or :class:`~gradlocate.handles.Handles`.
        edits: the edits (any public form, see :func:`~gradlocate.data.as_edits`).
        editor: a registered editor name (:data:`~gradlocate.editors.EDITORS`).
        hparams: the editor's settings (for ``"locft"``: ``lr``, ``epochs``, ``seed`` ...).
        layers: the layer indices (default: all).
        out: a record file or folder (:class:`~gradlocate.golden.store.RecordStore`): cells
            are appended as each chunk finishes and the cells present are skipped.
        chunk: edits edited together (memory: the editor's per-edit state for ``chunk`` edits).
        capability_edits: the first this many edits get the capability measurement, at every layer.
        shard: the file name this process writes in an ``out`` folder.
        engine: where the jobs (one per layer and chunk of edits) run: ``"local"`` (here,
            one after another), ``"ray"`` (Ray tasks: every core of this machine, or the
            cluster at ``address``; a job whose worker dies is re-run) or ``"auto"`` (Ray
            where installed). Either way this process writes every cell to ``out``: the
            record file is the single source of truth, and a re-run resumes from it.
        address: a Ray cluster to join (``None``: a local Ray instance for the call).
        workers: Ray workers on a local instance (default: every core).
        progress: a progress bar over jobs (``None``: on a terminal only).

    Returns:
        :class:`Matrix`.
    """
    plan = _plan(model, edits, editor, hparams, layers, out, chunk, capability_edits, tokenizer, shard)
    done = plan.store.read() if plan.store is not None else {}
    cells = {(r["edit"], r["layer"]): r for r in done.values()}
    errors = _fill(plan, cells, progress, engine, address, workers)
    if errors:
        warnings.warn(f"{len(errors)} job(s) of the matrix failed; their cells are missing (NaN): "
                      + "; ".join(errors[:3]), stacklevel=2)
    result = _assemble(plan, cells)
    result.params["errors"] = errors
    return result


def _plan(model: Any, edits: Any, editor: str, hparams: dict[str, Any] | None, layers: Sequence[int] | None,
          out: Any, chunk: int, capability_edits: int, tokenizer: Any, shard: str) -> _Plan:
    """Check the arguments, resolve the model, and open the store with its fingerprint."""
    require_gradients("matrix (it edits every edit at every layer)")
    for name, v, low in (("chunk", chunk, 1), ("capability_edits", capability_edits, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    edits = as_edits(edits)
    h = resolve(model, tokenizer)
    check_materialized(h.root)  # before the fingerprint reads the weights
    cand = h.layer_indices(list(layers) if layers is not None else None)
    hp = dict(hparams or {})
    editor_class(editor)(h, cand[0], **{"progress": False, **hp})  # bad settings fail before anything runs
    settings = {k: v for k, v in hp.items() if k not in ("progress", "callback")}
    texts = heldout_texts()  # also when no cell measures capability: one fingerprint for all runs
    store = None
    if out is not None:
        base = Fingerprint.of({"model": model_identity(h), "editor": {"name": editor, "hparams": settings},
                               "metrics": {"version": METRICS_VERSION, "capability_texts": texts}})
        store = RecordStore(out, lambda key: Fingerprint({**base.parts, "cell": digest(key)}), shard=shard)
    return _Plan(h, edits, [edit_id(e) for e in edits], cand, editor, hp, settings, texts,
                 min(capability_edits, len(edits)), store, chunk)


def _fill(plan: _Plan, cells: dict[tuple[str, int], dict[str, Any]], progress: bool | None,
          engine: str = "local", address: str | None = None, workers: int | None = None) -> list[str]:
    """Run the cells missing from ``cells`` (adding them and appending them to the store
    here, as each job finishes), one job per (layer, chunk of edits); returns the errors."""
    def missing(i: int, layer: int) -> bool:
        rec = cells.get((plan.ids[i], layer))
        return rec is None or (i < plan.cap_edits and rec.get("capability") is None)

    # Edits of similar length share a chunk: every row of a chunk is padded to its longest
    # (on 96 CounterFact or ZsRE edits, 1.5x the real tokens in file order, 1.2x sorted).
    length = _lengths(plan)
    jobs = [(layer, tuple(rows[k:k + plan.chunk])) for layer in plan.layers
            for rows in [sorted((i for i in range(len(plan.edits)) if missing(i, layer)), key=lambda i: (length[i], i))]
            for k in range(0, len(rows), plan.chunk)]
    if not jobs:
        return []
    errors: list[str] = []

    def done(job: tuple[int, tuple[int, ...]], result: Any) -> None:
        if isinstance(result, BaseException):  # reported in its place; the other jobs still run
            errors.append(f"layer {job[0]}, edits {list(job[1])}: {type(result).__name__}: {result}")
            return
        for rec in result:
            cells[(rec["edit"], job[0])] = rec
            if plan.store is not None:
                plan.store.append(f"{rec['edit']}/{job[0]}", rec)

    with using(plan.h):
        ref = locality_reference(plan.h, plan.edits, generation=False).tokens
        base = edited_text_loss(plan.h, plan.layers[0], None, plan.texts) if plan.cap_edits else None
        kind = resolve_engine(engine, address)
        work = partial(_job_here, plan, ref, base) if kind == "local" else \
            partial(_job_remote, _Portable.of(plan, ref, base))
        run_jobs(work, jobs, done, engine=kind, address=address, workers=workers, progress=progress,
                 desc=f"matrix ({plan.editor})")
    return errors


def _lengths(plan: _Plan) -> list[int]:
    """Each edit's token count, prompt and target (the chunks' sort key)."""
    tok = plan.h.require_tokenizer()
    return [len(tok(f"{e.prompt} {e.target_new}")["input_ids"]) for e in plan.edits]


def _job_here(plan: _Plan, ref: list[Any], base: float | None, job: tuple[int, tuple[int, ...]]) -> list[dict[str, Any]]:
    return _run_chunk(plan, job[0], list(job[1]), ref, base)


@dataclass
class _Portable:
    """A plan a Ray worker can rebuild: the model travels once through Ray's object store."""

    root: Any  # [ObjectRef] (in a list, so Ray hands the reference, not a copy per job)
    tokenizer: Any
    blocks: str
    site: str
    chat: bool
    edits: list[dict[str, Any]]
    fields: dict[str, Any]
    ref: list[Any]
    base: float | None

    @classmethod
    def of(cls, plan: _Plan, ref: list[Any], base: float | None) -> _Portable:
        import ray

        h = plan.h
        fields = {k: getattr(plan, k) for k in ("ids", "layers", "editor", "hparams", "settings", "texts",
                                                 "cap_edits", "chunk")}
        return cls([ray.put(h.root)], h.tokenizer, h.blocks_path, h.site_path, h.chat,
                   [e.to_dict() for e in plan.edits], fields, ref, base)


def _job_remote(p: _Portable, job: tuple[int, tuple[int, ...]]) -> list[dict[str, Any]]:
    """A job in a Ray worker: the model is fetched and resolved once per worker process."""
    import ray

    from gradlocate.golden.engine import shared
    from gradlocate.handles import down_projections

    key = p.root[0].hex()
    h = shared(key, lambda: down_projections(ray.get(p.root[0]), tokenizer=p.tokenizer, blocks=p.blocks,
                                             down=p.site, chat=p.chat))
    plan = _Plan(h, as_edits(p.edits), store=None, memo=shared(key + "/memo", dict), **p.fields)
    with using(h):
        return _run_chunk(plan, job[0], list(job[1]), p.ref, p.base)


def _run_chunk(plan: _Plan, layer: int, rows: list[int], ref: list[Any], base: float | None) -> list[dict[str, Any]]:
    """Edit each of ``rows`` alone at ``layer``; one cell record each."""
    part = Edits([plan.edits[i] for i in rows])
    t0 = time.perf_counter()
    delta, summaries = per_edit_deltas(plan.editor, plan.h, layer, part, memo=plan.memo, **plan.hparams)
    t1 = time.perf_counter()
    scores = score_per_sample(plan.h, layer, part, delta, [ref[i] for i in rows])
    t2 = time.perf_counter()
    out = []
    for k, i in enumerate(rows):
        cap, t3 = None, time.perf_counter()
        if i < plan.cap_edits and base is not None:
            loss = edited_text_loss(plan.h, layer, delta[k], plan.texts)
            cap = {"lm_loss": loss, "lm_loss_change": loss - base, "texts": len(plan.texts)}
        out.append({"edit": plan.ids[i], "layer": layer, "scores": {m: v[k] for m, v in scores.items()},
                    "train": summaries[k], "capability": cap,
                    "timings": {"train": (t1 - t0) / len(rows), "score": (t2 - t1) / len(rows),
                                "capability": time.perf_counter() - t3}})
    return out


def _assemble(plan: _Plan, cells: dict[tuple[str, int], dict[str, Any]]) -> Matrix:
    """The matrix of the cells of ``plan``'s edits and layers (NaN where a cell is absent)."""
    shape = (len(plan.ids), len(plan.layers))
    scores = {m: _nan_table(*shape) for m in MATRIX_METRICS}
    train = {f: _nan_table(*shape) for f in TRAIN_FIELDS}
    cap, base = _nan_table(*shape), None
    timings = {"train": 0.0, "score": 0.0, "capability": 0.0}
    for i, eid in enumerate(plan.ids):
        for j, layer in enumerate(plan.layers):
            rec = cells.get((eid, layer))
            if rec is None:
                continue
            for m in MATRIX_METRICS:
                scores[m][i, j] = _num(rec["scores"].get(m))
            for f in TRAIN_FIELDS:
                train[f][i, j] = _num(rec["train"].get(f))
            for k, v in rec.get("timings", {}).items():
                timings[k] = timings.get(k, 0.0) + v
            if rec.get("capability"):
                cap[i, j] = rec["capability"]["lm_loss_change"]
                base = rec["capability"]["lm_loss"] - rec["capability"]["lm_loss_change"]
    params = {"hparams": plan.settings, "chunk": plan.chunk, "capability_edits": plan.cap_edits,
              "capability_texts": len(plan.texts), "metrics_version": METRICS_VERSION}
    return Matrix(plan.layers, plan.ids, scores, train, cap, base, plan.editor, params,
                  relative_path(plan.store.path) if plan.store is not None else None, timings)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)

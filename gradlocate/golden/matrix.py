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
* **capability** on a stated subsample (the first ``capability_edits`` edits, at every
  layer): the change of the mean next-token NLL of the held-out texts
  (:func:`~gradlocate.data.heldout_texts`, the ones ``evaluate(capability=True)`` uses,
  disjoint from GradRatio's retain texts) under that edit's change, against the unedited
  model (positive: the edit made general text less likely);
* each cell's training summary (converged, final loss, epochs).

Each cell is one record of a study folder (:class:`~gradlocate.golden.folder.StudyFolder`,
``out=``), written as each chunk of a layer finishes; a re-run skips the cells present, and
shards written by other processes or machines are read together. Every overall is
computed from the cell metrics by :mod:`gradlocate.golden.scores` (:meth:`Matrix.overall`). Edits are identified by a
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
from gradlocate.editors import DEFAULT_EDITOR, make, per_edit_deltas, prepare, settings_for, spec
from gradlocate.editors.settings import Settings
from gradlocate.editors.executors import row_delta
from gradlocate.evaluation import _queries, locality_reference, text_loss
from gradlocate.handles import Handles, model_identity, resolve
from gradlocate.interventions import edited, no_cache, require_gradients, run, using
from gradlocate.losses import IGNORE, logits_of, tokenize_edits
from gradlocate.state import check_materialized, input_device
from gradlocate.golden.engine import resolve_engine, run_jobs
from gradlocate.golden.instrument import SIGNIFICANT, instrument
from gradlocate.golden.table import MATRIX_METRICS, Matrix, edit_id, layer_span  # noqa: F401 - layer_span: re-exported
from gradlocate.golden.folder import Manifest, StudyFolder, _edit_rows
from gradlocate.golden.store import Fingerprint, RecordStore, digest, relative_path

__all__ = ["matrix", "Matrix", "MATRIX_METRICS", "edit_id", "score_per_sample", "folder_manifest",
           "regime_fingerprint"]

#: Bumped whenever a cell metric's definition changes, so stored cells are never mixed across two.
#: 2: each cell also stores its per-prompt, per-token measurements and continuous aggregates
#: (:mod:`gradlocate.golden.instrument`); the token-accuracy ``scores`` are defined as in 1.
METRICS_VERSION = 2


def score_per_sample(h: Handles, layer: int, edits: Edits, delta: Tensor | None, reference: list[list[list[int]]],
                     batch_size: int = 32) -> dict[str, list[float | None]]:
    """Each edit's teacher-forced token-accuracy metrics with its own weight change
    ``delta[i]`` at ``layer`` (``delta`` ``None``: the unedited model). Locality is agreement
    with ``reference``, the unedited model's predictions (as :func:`~gradlocate.evaluation.evaluate`).
    The whole instrument (per prompt and token, continuous scores) is
    :func:`~gradlocate.golden.instrument.instrument`, which this reads."""
    cells = instrument(h, layer, edits, delta, reference, batch_size)
    return {m: [c["scores"][m] for c in cells] for m in MATRIX_METRICS}


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


@dataclass
class _Plan:
    """What a matrix run works on: the model, edits and their ids, layers, the editor's
    settings, the replicate seeds, the store."""

    h: Handles
    edits: Edits
    ids: list[str]
    layers: list[int]
    editor: str
    settings: Settings
    seeds: list[int]
    texts: list[str]
    cap_edits: int
    store: RecordStore | None
    chunk: int
    runtime: dict[str, Any] = field(default_factory=dict)  # the editor's non-setting arguments (covariance=)
    folder: StudyFolder | None = None
    # what an editor reuses across layers of the same unedited model (rank-one: context templates)
    memo: dict[Any, Any] = field(default_factory=dict)

    def key(self, edit: str, layer: int, seed: int) -> str:
        """A cell's record key: ``edit/layer`` for the first seed (as every earlier study
        wrote it), ``edit/layer/s<seed>`` for a replicate's."""
        return f"{edit}/{layer}" if seed == self.seeds[0] else f"{edit}/{layer}/s{seed}"


def matrix(model: Any, edits: Any, *, editor: str = DEFAULT_EDITOR, hparams: Settings | dict[str, Any] | None = None,
           layers: Sequence[int] | None = None, out: str | os.PathLike[str] | None = None,
           seeds: Sequence[int] | None = None, chunk: int = 32, capability_edits: int = 8, tokenizer: Any = None,
           shard: str = "records", engine: str = "local", address: str | None = None, workers: int | None = None,
           model_spec: str | None = None, n_proxy: int | None = None, proxy_seed: int = 0,
           planned_layers: Sequence[int] | None = None, progress: bool | None = None, **runtime: Any) -> Matrix:
    """Edit every edit alone at every layer with ``editor``; score every cell.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a bridge, or :class:`~gradlocate.handles.Handles`.
        edits: the edits (any public form, see :func:`~gradlocate.data.as_edits`).
        editor: a registered editor name (:func:`gradlocate.editors.names`).
        hparams: the editor's settings: its :class:`~gradlocate.editors.settings.Settings`
            object, or a dict of settings by name (for ``"locft"``: ``lr``, ``epochs`` ...).
        layers: the layer indices (default: all).
        out: a study folder (:class:`~gradlocate.golden.folder.StudyFolder`: made, or
            checked to hold this study; its manifest says which model, edits and regime)
            or a ``.jsonl`` record file. Cells are appended as each chunk finishes and the
            cells present are skipped: a re-run resumes, a larger edit list grows the folder.
        seeds: the replicate seeds (default: the settings' ``seed``): every cell is edited
            once per seed (the rank-one editors' context templates are drawn with it).
        chunk: edits edited together (memory: the editor's per-edit state for ``chunk`` edits).
        capability_edits: the first this many edits get the capability measurement, at every layer.
        shard: the file name this process writes in an ``out`` folder.
        engine: where the jobs (one per layer, seed and chunk of edits) run: ``"local"``
            (here, one after another), ``"ray"`` (Ray tasks: every core of this machine, or
            the cluster at ``address``; a job whose worker dies is re-run) or ``"auto"`` (Ray
            where installed). Either way this process writes every cell to ``out``: the
            record file is the single source of truth, and a re-run resumes from it.
        address: a Ray cluster to join (``None``: a local Ray instance for the call).
        workers: Ray workers on a local instance (default: every core).
        model_spec: what :func:`~gradlocate.models.load_model` takes to load this model again
            (written to a folder's manifest, so ``gradlocate report`` can run the selectors).
        n_proxy: the folder's proxy rule (:func:`~gradlocate.golden.folder.proxy_split`): the
            proxy rows (default: a quarter of the edits).
        proxy_seed: the proxy rule's seed.
        planned_layers: the layers the folder's study covers, when this call fills only some
            of them (a shard); default ``layers`` (``None``: every layer). A folder is judged
            on its planned layers.
        progress: a progress bar over jobs (``None``: on a terminal only).
        runtime: the editor's non-setting arguments (e.g. a precomputed ``covariance``).

    Returns:
        :class:`Matrix` of the first seed (the others: :meth:`StudyFolder.load` with ``seed=``).
    """
    plan = _plan(model, edits, editor, hparams, layers, seeds, chunk, capability_edits, tokenizer, runtime)
    if out is not None:
        plan_layers = planned_layers if planned_layers is not None else layers
        _open_store(plan, out, shard, model_spec, n_proxy, proxy_seed,
                    None if plan_layers is None else sorted({int(l) for l in plan_layers}))
    done = plan.store.read() if plan.store is not None else {}
    cells = {(r["edit"], r["layer"], r.get("seed", plan.seeds[0])): r for r in done.values()}
    errors = _fill(plan, cells, progress, engine, address, workers)
    if errors:
        warnings.warn(f"{len(errors)} job(s) of the matrix failed; their cells are missing (NaN): "
                      + "; ".join(errors[:3]), stacklevel=2)
    result = _assemble(plan, cells)
    result.params["errors"] = errors
    return result


def _plan(model: Any, edits: Any, editor: str, hparams: Settings | dict[str, Any] | None,
          layers: Sequence[int] | None, seeds: Sequence[int] | None, chunk: int, capability_edits: int,
          tokenizer: Any, runtime: dict[str, Any]) -> _Plan:
    """Check the arguments (before anything runs) and resolve the model."""
    require_gradients("matrix (it edits every edit at every layer)")
    for name, v, low in (("chunk", chunk, 1), ("capability_edits", capability_edits, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    edits = as_edits(edits)
    h = resolve(model, tokenizer)
    check_materialized(h.root)  # before the fingerprint reads the weights
    cand = h.layer_indices(list(layers) if layers is not None else None)
    name = spec(editor).name
    settings = settings_for(name, hparams)
    seed_list = _seeds(seeds, settings)
    make(name, h, cand[0], settings, progress=False)  # bad settings fail before anything runs
    texts = heldout_texts()  # also when no cell measures capability: one fingerprint for all runs
    return _Plan(h, edits, [edit_id(e) for e in edits], cand, name, settings, seed_list, texts,
                 min(capability_edits, len(edits)), None, chunk, dict(runtime))


def _seeds(seeds: Sequence[int] | None, settings: Settings) -> list[int]:
    own = getattr(settings, "seed", 0)
    got = [own] if seeds is None else [int(x) for x in seeds]
    if not got or len(set(got)) != len(got) or any(x < 0 for x in got):
        raise ValueError(f"seeds must be distinct ints >= 0, at least one, got {seeds!r}")
    return got


def regime_fingerprint(editor: str, settings: Settings) -> dict[str, Any]:
    """What a cell's editor fingerprint digests: the editor and every setting but the
    replicate seed (the cells of every seed of one regime share it)."""
    return {"name": editor, "hparams": {k: v for k, v in settings.to_dict().items() if k != "seed"}}


def folder_manifest(h: Handles, edits: Edits, editor: str, settings: Settings, seeds: list[int],
                    model_spec: str | None = None, n_proxy: int | None = None, proxy_seed: int = 0,
                    retain: list[str] | None = None) -> Manifest:
    """The manifest of a study folder for these edits, model and regime (``retain``: the
    selectors' retain texts, where they are not the built-in ones)."""
    return Manifest(
        model={"spec": model_spec, "class": type(h.root).__name__, "n_layers": h.n_layers, "identity": model_identity(h)},
        edits=_edit_rows(edits), data={"source": relative_path(edits.source), "sample": edits.sample},
        regime={"editor": editor, "settings": settings.to_dict(), "seeds": list(seeds),
                "fingerprint": regime_fingerprint(editor, settings)},
        proxy={"n_proxy": n_proxy, "seed": proxy_seed}, retain=retain, created_by=f"gradlocate {_version()}")


def _open_store(plan: _Plan, out: Any, shard: str, model_spec: str | None, n_proxy: int | None,
                proxy_seed: int, planned: list[int] | None = None) -> None:
    """The record store of ``out``: a study folder's ``cells/`` (the folder made, or checked to
    hold this study), or a ``.jsonl`` file; every record fingerprinted by the model, the
    regime and the metric definitions."""
    base = Fingerprint.of({"model": model_identity(plan.h), "editor": regime_fingerprint(plan.editor, plan.settings),
                           "metrics": {"version": METRICS_VERSION, "capability_texts": plan.texts}})
    expected = lambda key: Fingerprint({**base.parts, "cell": digest(key)})  # noqa: E731
    if str(out).endswith(".jsonl"):
        plan.store = RecordStore(out, expected, shard=shard)
        return
    manifest = folder_manifest(plan.h, plan.edits, plan.editor, plan.settings, plan.seeds, model_spec, n_proxy,
                               proxy_seed)
    manifest.layers = None if planned is None or planned == list(range(plan.h.n_layers)) else planned  # None: all
    plan.folder = StudyFolder.bind(out, manifest)
    plan.store = RecordStore(plan.folder.cells_dir, expected, shard=shard)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradlocate")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def _fill(plan: _Plan, cells: dict[tuple[str, int, int], dict[str, Any]], progress: bool | None,
          engine: str = "local", address: str | None = None, workers: int | None = None) -> list[str]:
    """Run the cells missing from ``cells`` (adding them and appending them to the store
    here, as each job finishes), one job per (layer, seed, chunk of edits); returns the errors."""
    jobs = _jobs(plan, cells)
    if not jobs:
        return []
    errors: list[str] = []

    def done(job: tuple[int, int, tuple[int, ...]], result: Any) -> None:
        if isinstance(result, BaseException):  # reported in its place; the other jobs still run
            errors.append(f"layer {job[0]}, seed {job[1]}, edits {list(job[2])}: {type(result).__name__}: {result}")
            return
        for rec in result:
            cells[(rec["edit"], job[0], job[1])] = rec
            if plan.store is not None:
                plan.store.append(plan.key(rec["edit"], job[0], job[1]), rec)

    n_cells = sum(len(j[2]) for j in jobs)
    _say(progress, f"matrix ({plan.editor}): {n_cells} cells to edit and score ({len(cells)} already done) in "
                   f"{len(jobs)} jobs at {len(plan.layers)} layers x {len(plan.seeds)} seed(s); the bar shows the "
                   f"time left once the first job is done")
    prepare(plan.editor, plan.h, sorted({j[0] for j in jobs}), plan.settings, progress)  # e.g. C of every layer, one pass
    with using(plan.h):
        ref = locality_reference(plan.h, plan.edits, generation=False).tokens
        base = edited_text_loss(plan.h, plan.layers[0], None, plan.texts) if plan.cap_edits else None
        kind = resolve_engine(engine, address)
        work = partial(_job_here, plan, ref, base) if kind == "local" else \
            partial(_job_remote, _Portable.of(plan, ref, base))
        run_jobs(work, jobs, done, engine=kind, address=address, workers=workers, progress=progress,
                 desc=f"matrix ({plan.editor})")
    return errors


def _jobs(plan: _Plan, cells: dict[tuple[str, int, int], dict[str, Any]]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(layer, seed, rows) of the cells still missing. Edits of similar length share a job:
    every row of a chunk is padded to its longest (on 96 CounterFact or ZsRE edits, 1.5x the
    real tokens in file order, 1.2x sorted)."""
    def missing(i: int, layer: int, seed: int) -> bool:
        rec = cells.get((plan.ids[i], layer, seed))
        return rec is None or (i < plan.cap_edits and seed == plan.seeds[0] and rec.get("capability") is None)

    length = _lengths(plan)
    return [(layer, seed, tuple(rows[k:k + plan.chunk])) for layer in plan.layers for seed in plan.seeds
            for rows in [sorted((i for i in range(len(plan.edits)) if missing(i, layer, seed)),
                                key=lambda i: (length[i], i))]
            for k in range(0, len(rows), plan.chunk)]


def _say(progress: bool | None, line: str) -> None:
    """One line before a long step (to stderr, where the bars are), when progress is shown."""
    import sys

    if progress is True or (progress is None and sys.stderr.isatty()):
        print(line, file=sys.stderr, flush=True)


def _lengths(plan: _Plan) -> list[int]:
    """Each edit's token count, prompt and target (the chunks' sort key)."""
    tok = plan.h.require_tokenizer()
    return [len(tok(f"{e.prompt} {e.target_new}")["input_ids"]) for e in plan.edits]


def _job_here(plan: _Plan, ref: list[Any], base: float | None,
              job: tuple[int, int, tuple[int, ...]]) -> list[dict[str, Any]]:
    return _run_chunk(plan, job[0], job[1], list(job[2]), ref, base)


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
        fields = {k: getattr(plan, k) for k in ("ids", "layers", "editor", "settings", "seeds", "texts",
                                                 "cap_edits", "chunk", "runtime")}
        return cls([ray.put(h.root)], h.tokenizer, h.blocks_path, h.site_path, h.chat,
                   [e.to_dict() for e in plan.edits], fields, ref, base)


def _job_remote(p: _Portable, job: tuple[int, int, tuple[int, ...]]) -> list[dict[str, Any]]:
    """A job in a Ray worker: the model is fetched and resolved once per worker process."""
    import ray

    from gradlocate.golden.engine import shared
    from gradlocate.handles import down_projections

    key = p.root[0].hex()
    h = shared(key, lambda: down_projections(ray.get(p.root[0]), tokenizer=p.tokenizer, blocks=p.blocks,
                                             down=p.site, chat=p.chat))
    plan = _Plan(h, as_edits(p.edits), store=None, memo=shared(key + "/memo", dict), **p.fields)
    with using(h):
        return _run_chunk(plan, job[0], job[1], list(job[2]), p.ref, p.base)


def _run_chunk(plan: _Plan, layer: int, seed: int, rows: list[int], ref: list[Any],
               base: float | None) -> list[dict[str, Any]]:
    """Edit each of ``rows`` alone at ``layer`` with replicate ``seed``; one cell record each."""
    part = Edits([plan.edits[i] for i in rows])
    t0 = time.perf_counter()
    settings = plan.settings.replace(seed=seed) if hasattr(plan.settings, "seed") else plan.settings
    delta, summaries = per_edit_deltas(plan.editor, plan.h, layer, part, settings, memo=plan.memo, **plan.runtime)
    t1 = time.perf_counter()
    cells = instrument(plan.h, layer, part, delta, [ref[i] for i in rows])
    t2 = time.perf_counter()
    out = []
    for k, i in enumerate(rows):
        cap, t3 = None, time.perf_counter()
        if i < plan.cap_edits and base is not None and seed == plan.seeds[0]:
            loss = edited_text_loss(plan.h, layer, delta[k], plan.texts)
            cap = {"lm_loss": loss, "lm_loss_change": loss - base, "texts": len(plan.texts)}
        out.append({"edit": plan.ids[i], "layer": layer, "seed": seed, **cells[k], "train": _compact(summaries[k]),
                    "capability": cap,
                    "timings": {name: _round(v) for name, v in (("train", (t1 - t0) / len(rows)),
                                                          ("score", (t2 - t1) / len(rows)),
                                                          ("capability", time.perf_counter() - t3))}})
    return out


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    """An editor's summary as a cell stores it: the loss trajectory rounded to
    :data:`~gradlocate.golden.instrument.SIGNIFICANT` digits (``final_loss`` kept exact)."""
    traj = summary.get("trajectory")
    if not traj:
        return summary
    return {**summary, "trajectory": [_round(x) for x in traj]}


def _assemble(plan: _Plan, cells: dict[tuple[str, int, int], dict[str, Any]]) -> Matrix:
    """The matrix of the first seed's cells of ``plan``'s edits and layers (NaN where absent)."""
    first = {(e, l): rec for (e, l, seed), rec in cells.items() if seed == plan.seeds[0]}
    params = {"hparams": plan.settings.overrides(), "settings": plan.settings.to_dict(), "seeds": plan.seeds,
              "chunk": plan.chunk, "capability_edits": plan.cap_edits, "capability_texts": len(plan.texts),
              "metrics_version": METRICS_VERSION}
    path = plan.folder.path if plan.folder is not None else (plan.store.path if plan.store is not None else None)
    m = Matrix.from_cells(plan.layers, plan.ids, first, plan.editor, params,
                          relative_path(path) if path is not None else None)
    m.timings = {"train": 0.0, "score": 0.0, "capability": 0.0, **m.timings}
    return m

"""The golden-layer sweep: edit at every candidate layer, evaluate, restore, move on.

A selector is only as good as the layer it picks; the sweep is the ground truth. For
each candidate layer ``l`` it fine-tunes layer ``l``'s site with
:class:`~gradlocate.editors.locft.LocFTBF`, scores the edited model with
:func:`~gradlocate.evaluation.evaluate`, restores the weight bit for bit, and records
one :class:`LayerRecord`, including what the edit cost the model beyond its locality
prompts (``capability``: the held-out text's perplexity before over after, capped at 1;
``fluency``: the n-gram entropy of generations after over before, capped at 1) and
whether training converged. The **overall** score of a layer (:meth:`SweepResult.overall`)
is, by default, the mean of reliability, generalization, locality, capability and
fluency, each weighted 1 (:data:`OVERALL_WEIGHTS`), over the ones the data has; the
Golden Layers paper's normalisation (each metric min-max normalised across the swept
layers, lower-is-better negated, then averaged) and the old three-metric mean are the
other two definitions. The **golden layer** is the layer with the best overall score.

This is the **batch regime**: all edits trained together at a layer. Each edit alone at
each layer is the single-edit :mod:`~gradlocate.golden.matrix` (``per_sample=True``).

A sweep is the expensive thing, so it is resumable: give ``out="sweep.jsonl"`` (a
:class:`~gradlocate.golden.store.RecordStore`, one record per layer) and a re-run skips
the layers already in the file; a record made with another model, other edits, trainer
settings or metric definitions (:data:`METRICS_VERSION`) is refused, naming which of them
differs. A last line cut short by an interruption is dropped and its layer run again; any
other damage is an error naming the file, the line and the problem. One layer that fails
is recorded with its error and the others still run.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5", "locality_prompt": "1 + 1 =",
    ...           "locality_ground_truth": "2"}]
    >>> res = sweep(model, edits, trainer={"lr": 1e-2, "epochs": 3}, progress=False, generation=False)
    >>> res.layers, res.golden in res.layers
    ([0, 1], True)
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from gradlocate.data import Edits, as_edits
from gradlocate.editors import DEFAULT_EDITOR, make, spec, split_settings
from gradlocate.editors.settings import Settings
from gradlocate.evaluation import EditEvaluation, evaluate
from gradlocate.handles import Handles, model_identity, resolve
from gradlocate.interventions import ModelBusyError, require_gradients, using
from gradlocate.state import check_materialized
from gradlocate.golden import scores
from gradlocate.golden.matrix import matrix
from gradlocate.golden.table import Matrix, layer_span
from gradlocate.golden.store import RecordStore, StoreError, relative_path

__all__ = ["sweep", "SweepResult", "LayerRecord", "OVERALL_METRICS", "OVERALL_WEIGHTS", "OVERALLS"]

#: The edit metrics (Golden Layers' rewrite / rephrase / locality): the "edit-only" overall.
OVERALL_METRICS = scores.EDIT_METRICS
#: The default overall: a weighted mean of these, over the ones the data has.
OVERALL_WEIGHTS = dict(scores.WEIGHTS)
#: The overall definitions (:data:`gradlocate.golden.scores.DEFINITIONS`).
OVERALLS = scores.DEFINITIONS
SCORINGS = ("teacher_forced", "generation")


@dataclass
class LayerRecord:
    """One swept layer.

    Attributes:
        layer: the edited layer.
        teacher_forced, generation: metric -> score under each scoring (``generation``
            is ``None`` when generation scoring was off).
        train: the trainer's :meth:`~gradlocate.editors.locft.FitResult.to_dict` summary
            (epochs, final loss, converged, steps ...).
        timings: seconds (train, evaluate, total).
        n_edits, n_eval: edits trained and evaluated.
        error: why this layer could not be edited, if it could not (then no metrics).
        general: what the edit cost beyond its locality prompts
            (:attr:`~gradlocate.evaluation.EditEvaluation.general`).
        per_edit: each evaluated edit's teacher-forced metrics (for intervals over edits).
    """

    layer: int
    teacher_forced: dict[str, float | None] = field(default_factory=dict)
    generation: dict[str, float | None] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    n_edits: int = 0
    n_eval: int = 0
    error: str | None = None
    general: dict[str, float | None] = field(default_factory=dict)
    per_edit: dict[str, list[float | None]] = field(default_factory=dict)

    def metrics(self, scoring: str) -> dict[str, float | None]:
        """The edit metrics under ``scoring``, and the capability and fluency scores."""
        out = dict((self.teacher_forced if scoring == "teacher_forced" else self.generation) or {})
        out["capability"] = self.general.get("capability")
        out["fluency"] = self.general.get("fluency_ratio")
        return out

    @property
    def converged(self) -> bool | None:
        return self.train.get("converged") if self.train else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


#: Bumped whenever a metric's definition changes (2: fluency generates a fixed length, EOS
#: masked), so a resumed sweep never mixes records made under two definitions.
METRICS_VERSION = 2


@dataclass
class SweepResult:
    """Per-layer edit metrics from a sweep, and the golden layer.

    Attributes:
        records: one :class:`LayerRecord` per swept layer, in layer order.
        scoring: which scoring the overall score and the golden layer use
            (``"teacher_forced"`` or ``"generation"``).
        path: the JSONL file the sweep was written to, if any.
    """

    records: list[LayerRecord]
    scoring: str = "teacher_forced"
    path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    overall_kind: str = "weighted"
    weights: dict[str, float] = field(default_factory=lambda: dict(OVERALL_WEIGHTS))

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.overall_kind not in OVERALLS:
            raise ValueError(f"overall must be one of {OVERALLS}, got {self.overall_kind!r}")
        if not self.records:
            raise ValueError("a sweep result needs at least one layer")
        self.records = sorted(self.records, key=lambda r: r.layer)

    @property
    def layers(self) -> list[int]:
        return [r.layer for r in self.records]

    def with_overall(self, overall: str = "weighted", weights: dict[str, float] | None = None) -> SweepResult:
        """The same sweep judged by another overall definition (nothing is re-run)."""
        return SweepResult(self.records, self.scoring, self.path, self.params, overall,
                           dict(weights or OVERALL_WEIGHTS))

    @property
    def averaged(self) -> list[str]:
        """The metrics the overall score averages here (those the data has)."""
        names = list(OVERALL_METRICS) if self.overall_kind == "edit-only" else (
            [*OVERALL_METRICS, "fluency", "lm_loss"] if self.overall_kind == "golden-layers" else list(self.weights))
        have = lambda m: any(v is not None for v in self._raw(m, self.scoring))  # noqa: E731
        return [m for m in names if have(m)]

    def _raw(self, name: str, scoring: str) -> list[float | None]:
        if name == "lm_loss":
            return [r.general.get("lm_loss") for r in self.records]
        if name == "fluency" and self.overall_kind == "golden-layers":
            return [r.general.get("fluency") for r in self.records]
        return [r.metrics(scoring).get(name) for r in self.records]

    def metric(self, name: str, scoring: str | None = None) -> list[float | None]:
        """Per-layer values of one metric (``"overall"`` included; ``None`` where absent).
        The overall is :func:`gradlocate.golden.scores.overall` of the sweep as a one-row
        table (the batch is one "edit" per layer), the same function the matrix is judged by."""
        scoring = scoring or self.scoring
        if name != "overall":
            return [r.metrics(scoring).get(name) for r in self.records]
        row = self._overall_row(scoring)
        return [None if math.isnan(v) else float(v) for v in row]

    def _overall_row(self, scoring: str) -> np.ndarray:
        names = {"edit-only": OVERALL_METRICS, "golden-layers": scores.GOLDEN_LAYERS_METRICS}.get(
            self.overall_kind, tuple(self.weights))
        table = {m: np.array([[math.nan if v is None else v for v in self._raw(m, scoring)]]) for m in names}
        table = {m: t for m, t in table.items() if np.isfinite(t).any()}
        if not table:
            return np.full(len(self.records), math.nan)
        weights = self.weights if self.overall_kind == "weighted" else None
        return scores.overall(table, self.overall_kind, weights)[0]

    @property
    def overall(self) -> list[float | None]:
        return self.metric("overall")

    @property
    def golden(self) -> int:
        """The layer with the best overall score (:func:`gradlocate.golden.scores.golden_layer`:
        the lowest such layer on ties).

        Raises:
            ValueError: no layer has an overall score (every layer failed).
        """
        return self.layers[scores.golden_layer(self._overall_row(self.scoring)[None])]

    def best_layers(self, scoring: str | None = None) -> dict[str, int]:
        """For each metric (and overall) the layer that scores best."""
        out = {}
        for m in (*OVERALL_METRICS, "portability", "overall"):
            vals = np.array([math.nan if v is None else v for v in self.metric(m, scoring)], dtype=float)
            if np.isfinite(vals).any():
                out[m] = self.layers[scores.golden_layer(vals[None])]
        return out

    def at(self, layer: int) -> LayerRecord:
        """The record of one layer."""
        for r in self.records:
            if r.layer == layer:
                return r
        raise KeyError(f"layer {layer} was not swept (swept: {self.layers})")

    @property
    def unconverged(self) -> list[int]:
        """Layers whose training stopped at its epoch budget without converging."""
        return [r.layer for r in self.records if r.converged is False]

    def to_dict(self) -> dict[str, Any]:
        golden = self.golden if any(v is not None for v in self.overall) else None
        return {"scoring": self.scoring, "overall_kind": self.overall_kind, "weights": dict(self.weights),
                "averaged": self.averaged, "golden": golden, "best": self.best_layers(), "layers": self.layers,
                "overall": self.overall, "unconverged": self.unconverged,
                "records": [r.to_dict() for r in self.records], "path": self.path, "params": self.params}

    def to_markdown(self, scoring: str | None = None) -> str:
        """Per-layer table: the metrics the data has, overall, convergence; a line saying
        what the overall averaged."""
        scoring = scoring or self.scoring
        cols = [m for m in (*OVERALL_METRICS, "portability", "capability", "fluency")
                if any(v is not None for v in self.metric(m, scoring))]
        head = (f"overall ({self.overall_kind}) = mean of {', '.join(self.averaged) or 'nothing'}"
                + (f"; did not converge: layers {self.unconverged}" if self.unconverged else "") + "\n\n"
                + "| layer | " + " | ".join(cols) + " | overall | converged |\n|---:|"
                + "---:|" * (len(cols) + 1) + ":---:|")
        rows = []
        golden = self.golden
        for i, r in enumerate(self.records):
            vals = [self.metric(m, scoring)[i] for m in cols] + [self.metric("overall", scoring)[i]]
            cells = " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals)
            mark = " **(golden)**" if r.layer == golden and scoring == self.scoring else ""
            conv = "error" if r.error else ("yes" if r.train.get("converged") else "no")
            rows.append(f"| {r.layer}{mark} | {cells} | {conv} |")
        return head + "\n" + "\n".join(rows)

    def __repr__(self) -> str:
        ov = self.overall
        best = max((v for v in ov if v is not None), default=None)
        t = sum(r.timings.get("total", 0.0) for r in self.records)
        if best is None:
            return f"SweepResult({len(self.records)} layers, no metric available)"
        return (f"SweepResult({len(self.records)} layers {layer_span(self.layers)}, golden={self.golden} "
                f"(overall {best:.3f}), scoring={self.scoring!r}, time={t:.1f}s)")

    def _repr_html_(self) -> str:
        return f"<div><b>Sweep</b>: golden layer <b>{self.golden}</b><pre>{html.escape(self.to_markdown())}</pre></div>"

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """Metrics and overall score across layers, the golden layer marked."""
        from gradlocate.plotting import plot_sweep

        return plot_sweep(self, ax=ax, title=title)

    @classmethod
    def load(cls, path: str | Path, scoring: str = "teacher_forced") -> SweepResult:
        """Read a sweep's JSONL file (the latest record of each layer)."""
        return cls(list(read_records(Path(path)).values()), scoring=scoring, path=relative_path(path))


def _check_record(d: dict[str, Any]) -> str | None:
    """What is wrong with a sweep record, if anything (the store names file and line)."""
    layer = d.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        return f"'layer' is {layer!r}, expected a layer index (an int >= 0)"
    if d.get("error") is None and not (isinstance(d.get("teacher_forced"), dict) and d["teacher_forced"]):
        return (f"layer {layer} has no metrics ('teacher_forced' is missing or empty), so it could not take part "
                f"in the golden-layer choice")
    return None


def _store(path: Path, fingerprint: dict[str, Any] | None = None) -> RecordStore:
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a sweep file (JSONL): give a file path for out=")
    return RecordStore(path, fingerprint, validate=_check_record)


def read_records(path: Path, fingerprint: dict[str, Any] | None = None) -> dict[int, LayerRecord]:
    """The records of a sweep file, the latest per layer (see :class:`~gradlocate.golden.store.RecordStore`:
    a last line cut short is dropped, any other damage or a record made with another
    model, edits or settings is a :class:`~gradlocate.golden.store.StoreError` naming the line)."""
    return _records_of(_store(path, fingerprint))


def _records_of(store: RecordStore) -> dict[int, LayerRecord]:
    return {d["layer"]: LayerRecord.from_dict(d) for d in store.read().values()}


@dataclass
class _SweepPlan:
    """What a sweep works on: the model, edits, candidate layers, settings, and its store."""

    h: Handles
    edits: Edits
    eval_edits: Edits
    layers: list[int]
    settings: Settings
    runtime: dict[str, Any]
    evaluation: dict[str, Any]
    store: RecordStore | None
    editor: str = DEFAULT_EDITOR


@dataclass
class _LayersRun:
    """The layers a sweep ran now, and the unedited model's evaluation they were judged against."""

    records: list[LayerRecord]
    pre: EditEvaluation
    pre_s: float


@overload
def sweep(model: Any, edits: Any, *, tokenizer: Any = ..., layers: Sequence[int] | None = ...,
          trainer: Settings | dict[str, Any] | None = ..., editor: str = ..., eval_edits: Any = ..., out: str | Path | None = ...,
          scoring: str = ..., generation: bool = ..., capability: bool | Sequence[str] = ..., fluency: bool = ...,
          fluency_prompts: int | None = ..., fluency_tokens: int = ..., overall: str = ...,
          weights: dict[str, float] | None = ..., per_sample: Literal[False] = ...,
          progress: bool | None = ...) -> SweepResult: ...


@overload
def sweep(model: Any, edits: Any, *, tokenizer: Any = ..., layers: Sequence[int] | None = ...,
          trainer: Settings | dict[str, Any] | None = ..., editor: str = ..., eval_edits: Any = ..., out: str | Path | None = ...,
          scoring: str = ..., generation: bool = ..., capability: bool | Sequence[str] = ..., fluency: bool = ...,
          fluency_prompts: int | None = ..., fluency_tokens: int = ..., overall: str = ...,
          weights: dict[str, float] | None = ..., per_sample: Literal[True], progress: bool | None = ...) -> Matrix: ...


def sweep(model: Any, edits: Any, *, tokenizer: Any = None, layers: Sequence[int] | None = None,
          trainer: Settings | dict[str, Any] | None = None, editor: str = DEFAULT_EDITOR, eval_edits: Any = None,
          out: str | Path | None = None,
          scoring: str = "teacher_forced", generation: bool = True, capability: bool | Sequence[str] = True,
          fluency: bool = True, fluency_prompts: int | None = 8, fluency_tokens: int = 64,
          overall: str = "weighted", weights: dict[str, float] | None = None, per_sample: bool = False,
          progress: bool | None = None) -> SweepResult | Matrix:
    """Edit with ``editor`` at each candidate layer, evaluate, restore; find the golden layer.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles` (its site is the one edited).
        edits: the edits to make (any public form, see :func:`~gradlocate.data.as_edits`).
        tokenizer: defaults to the one the model carries.
        layers: candidate layer indices (default: all).
        trainer: the editor's settings (a :class:`~gradlocate.editors.settings.Settings`, or a
            dict of settings by name, e.g. LocFT-BF's ``lr``, ``epochs``; the dict may also hold
            the editor's runtime arguments ``progress`` and ``callback``).
        editor: the editor at every layer (a name of :func:`gradlocate.editors.names`:
            ``"locft"``, ``"rome"``, ``"r-rome"``, ``"emmet"``).
        eval_edits: the edits to evaluate on (default: ``edits``).
        out: a JSONL file (a :class:`~gradlocate.golden.store.RecordStore`); each finished
            layer is appended as it comes, and layers already there are skipped (resume).
        scoring: ``"teacher_forced"`` (EasyEdit) or ``"generation"`` (exact match) for
            the overall score and the golden layer. Both are recorded when ``generation``.
        generation: also score by generation exact match (slower).
        capability: measure the language-model loss on held-out text before and after
            each edit (``True``: the built-in texts; or a list of your own).
        fluency: measure the n-gram entropy of ``fluency_tokens``-token generations from
            the first ``fluency_prompts`` edit prompts before and after each edit.
        overall: how the overall score and the golden layer are defined: ``"weighted"``
            (the weighted mean of ``weights``, default :data:`OVERALL_WEIGHTS`),
            ``"golden-layers"`` (the Golden Layers paper's min-max normalisation) or
            ``"edit-only"`` (the mean of reliability, generalization and locality).
            :meth:`SweepResult.with_overall` changes it afterwards.
        per_sample: instead, edit each edit alone at each layer and return the
            single-edit :class:`~gradlocate.golden.matrix.Matrix` (teacher-forced edit
            metrics, ``editor`` with ``trainer``, cells stored in ``out``; ``generation``,
            ``capability``, ``fluency`` and ``overall`` do not apply).
        progress: a progress bar over layers (``None``: on a terminal only).

    Returns:
        :class:`SweepResult` (``per_sample``: :class:`~gradlocate.golden.matrix.Matrix`).

    The model is restored bit for bit after each layer, also when a layer fails (its
    record then carries the error) or the sweep is interrupted (the finished layers stay
    in ``out``).
    """
    require_gradients("sweep (it edits at every layer)")
    if per_sample:  # the editor's runtime arguments (progress, callback) are for one edit at a time: not used
        return matrix(model, edits, tokenizer=tokenizer, layers=layers, editor=editor,
                      hparams=split_settings(editor, trainer)[0], out=out, capability_edits=0, progress=progress)
    plan = _plan(model, edits, tokenizer, layers, trainer, editor, eval_edits, out, scoring, overall,
                 {"generation": generation, "capability": capability, "fluency": fluency,
                  "fluency_prompts": fluency_prompts, "fluency_tokens": fluency_tokens})
    done = _records_of(plan.store) if plan.store is not None else {}
    ran = _run_layers(plan, [l for l in plan.layers if l not in done], scoring, progress)
    records = [done[l] for l in plan.layers if l in done] + ran.records
    evaluation = {k: (list(v) if k == "capability" and not isinstance(v, bool) else v)
                  for k, v in plan.evaluation.items()}
    return SweepResult(records, scoring=scoring, path=relative_path(plan.store.path) if plan.store else None,
                       params={"trainer": plan.settings.to_dict(), "editor": plan.editor, **evaluation,
                               "n_edits": len(plan.edits),
                               "n_eval": len(plan.eval_edits), "pre_eval_s": ran.pre_s, "layers": plan.layers,
                               "pre_general": ran.pre.general},
                       overall_kind=overall, weights=dict(weights or OVERALL_WEIGHTS))


def _plan(model: Any, edits: Any, tokenizer: Any, layers: Sequence[int] | None,
          trainer: Settings | dict[str, Any] | None,
          editor: str, eval_edits: Any, out: Any, scoring: str, overall: str, evaluation: dict[str, Any]) -> _SweepPlan:
    """Check the arguments (before anything runs), resolve the model, open the store."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "generation" and not evaluation["generation"]:
        raise ValueError("scoring='generation' needs generation=True")
    edits = as_edits(edits)
    eval_edits = edits if eval_edits is None else as_edits(eval_edits)
    h = resolve(model, tokenizer)
    check_materialized(h.root)  # before the fingerprint reads the weights
    cand = h.layer_indices(list(layers) if layers is not None else None)
    editor = spec(editor).name
    settings, runtime = split_settings(editor, trainer)
    runtime = {"progress": False, **runtime}
    make(editor, h, cand[0], settings, **runtime)  # a bad editor or setting fails here, before anything runs
    SweepResult([LayerRecord(0)], scoring, overall_kind=overall)  # bad overall: fail before running
    store = None
    if out is not None:
        path = Path(out)
        if not path.parent.exists():
            raise FileNotFoundError(f"folder {str(path.parent)!r} for the sweep file does not exist")
        cap = evaluation["capability"]
        store = _store(path, {
            "model": model_identity(h), "edits": [e.to_dict() for e in edits],
            "eval": [e.to_dict() for e in eval_edits],
            "trainer": settings.to_dict(),
            "editor": spec(editor).editor.__name__,
            "evaluation": {**evaluation, "capability": cap if isinstance(cap, bool) else list(cap)},
            "metrics": METRICS_VERSION})
    return _SweepPlan(h, edits, eval_edits, cand, settings, runtime, evaluation, store, editor)


def _run_layers(plan: _SweepPlan, todo: list[int], scoring: str, progress: bool | None) -> _LayersRun:
    """Evaluate the unedited model, then edit, evaluate and restore each layer of ``todo``,
    appending each record to the store as it finishes."""
    from tqdm.auto import tqdm

    records = []
    with using(plan.h):  # one caller owns the model for the whole sweep
        t0 = time.perf_counter()
        pre = evaluate(plan.h, plan.eval_edits, **plan.evaluation)
        pre_s = time.perf_counter() - t0
        bar = tqdm(todo, desc="sweep", unit="layer", disable=(None if progress is None else not progress) or not todo)
        for layer in bar:
            bar.set_postfix(layer=layer)
            rec = _sweep_layer(plan, layer, pre)
            records.append(rec)
            if plan.store is not None:
                plan.store.append(layer, rec.to_dict())
            rel = rec.metrics(scoring).get("reliability")
            bar.set_postfix(layer=layer, reliability=f"{float('nan') if rel is None else rel:.3f}")
    return _LayersRun(records, pre, pre_s)


def _sweep_layer(plan: _SweepPlan, layer: int, pre: EditEvaluation) -> LayerRecord:
    """Edit one layer, evaluate, restore. A failure of this layer (a non-finite loss, a
    structure the editor cannot handle) becomes the record's ``error``."""
    h, edits, eval_edits, ev_kw = plan.h, plan.edits, plan.eval_edits, plan.evaluation
    t1 = time.perf_counter()
    try:
        with make(plan.editor, h, layer, plan.settings, **plan.runtime) as ft:
            fit = ft.fit(edits)
            t2 = time.perf_counter()
            ev = evaluate(h, eval_edits, pre=pre, **ev_kw)
    except ModelBusyError:
        raise
    except Exception as e:  # noqa: BLE001 - reported in this layer's place; the others still run
        return LayerRecord(layer, error=f"{type(e).__name__}: {e}", n_edits=len(edits), n_eval=len(eval_edits),
                           timings={"total": time.perf_counter() - t1})
    t3 = time.perf_counter()
    return LayerRecord(layer, ev.teacher_forced, ev.generation, {**fit.to_dict(), **fit.summary()},
                       {"train": t2 - t1, "evaluate": t3 - t2, "total": t3 - t1}, len(edits), len(eval_edits),
                       general=ev.general,
                       per_edit={m: [r.get(f"{m}_tf") for r in ev.rows] for m in (*OVERALL_METRICS, "portability")})

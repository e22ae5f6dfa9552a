"""The golden-layer study on one instrument: the single-edit matrix, in one study folder.

:func:`study` answers "which layer should I edit, and which selector finds it?" on one
model and edit set, every number from the same :class:`~gradlocate.golden.table.Matrix`
(every edit edited alone at every layer), in short stages, each returning a typed part:

1. the proxy rule (:func:`~gradlocate.golden.folder.proxy_split`): **proxy** rows (the
   selectors see only these) and **test** rows;
2. :func:`~gradlocate.golden.selections.select` - every selector of
   :data:`~gradlocate.golden.selections.STUDY_SELECTORS` on the proxy edits, cached;
3. the matrix over proxy + test edits with any editor (or ``matrix=``, made before);
4. :func:`~gradlocate.golden.judge.judge` - golden layer per definition of overall with
   bootstrap and the near-best layers, damage gate, own optimum vs golden (estimable with
   a replicate), each selector's regret and rank agreement, convergence;
5. ``batch=True``: the second question, the **batch regime** - the test edits edited
   together with the same editor (:func:`~gradlocate.golden.sweep.sweep`), its own golden layer.

With ``out_dir`` every part is written to a study folder
(:class:`~gradlocate.golden.folder.StudyFolder`) as it finishes, a re-run resumes, and
:meth:`Study.load` (or ``gradlocate report``) reads the study back without a model.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=3, d_model=32, initializer_range=1.0)
    >>> edits = [{"prompt": f"{i} + {i} =", "target_new": str(3 * i), "subject": str(i), "ground_truth": str(2 * i),
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"} for i in range(1, 7)]
    >>> s = study(model, edits, ["general text here", "and more of it"], n_proxy=2, selectors=("gradratio", "lga"),
    ...           hparams={"lr": 1e-2, "epochs": 2}, n_boot=20, progress=False)
    >>> [r.name for r in s.judgment.selectors], s.golden in s.matrix.layers
    (['gradratio', 'lga'], True)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlocate.data import Edits, as_edits
from gradlocate.editors import DEFAULT_EDITOR, settings_for, spec
from gradlocate.editors.settings import Settings
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import require_gradients, using
from gradlocate.golden.folder import Completeness, NoLayerYet, StudyFolder, proxy_split
from gradlocate.golden.judge import DAMAGE_THRESHOLD, Judgment, SelectorResult, judge
from gradlocate.golden.matrix import folder_manifest, matrix as run_matrix
from gradlocate.golden.selections import STUDY_SELECTORS, Selections, select
from gradlocate.golden.store import RecordStore
from gradlocate.golden.sweep import LayerRecord, SweepResult, sweep
from gradlocate.golden.table import Matrix, edit_id, layer_span

__all__ = ["study", "Study", "Batch", "StudyRow", "BATCH_EVALUATION", "judge_folder", "replicate_of", "NotJudgedYet",
           "MIN_JUDGED_SHARE"]

#: A selector's row of a study (the name the old study used).
StudyRow = SelectorResult

#: How the batch regime is evaluated (teacher-forced, with the held-out loss change for the
#: damage gate; no generation, no fluency): the study and ``gradlocate matrix --batch`` alike.
BATCH_EVALUATION: dict[str, Any] = {"generation": False, "capability": True, "fluency": False, "overall": "edit-only"}


@dataclass
class Batch:
    """The second question: the test edits edited together (dataset-level sweep), its golden layer."""

    sweep: SweepResult
    golden: int
    converged: dict[int, bool | None]

    def to_dict(self) -> dict[str, Any]:
        return {"golden": self.golden, "converged": self.converged, "sweep": self.sweep.to_dict()}

    @classmethod
    def read(cls, folder: StudyFolder) -> Batch | None:
        """The batch regime stored in ``folder`` (``None`` if it has none)."""
        if not folder.batch_dir.is_dir():
            return None
        recs = [LayerRecord.from_dict(r) for r in RecordStore(folder.batch_dir).read().values()]
        recs = [r for r in recs if r.error is None]
        if not recs:
            return None
        sw = SweepResult(recs, overall_kind="edit-only", path=str(folder.batch_dir))
        return cls(sw, sw.golden, {r.layer: r.converged for r in sw.records})


@dataclass(repr=False)
class Study:
    """What :func:`study` found (see the module doc): the judgment of the single-edit
    matrix, the selections it judged, the matrix, and the batch regime beside it."""

    name: str
    judgment: Judgment
    selections: Selections
    matrix: Matrix
    batch: Batch | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def golden(self) -> int:
        """The single-edit matrix's golden layer (primary definition, damage-gated)."""
        return self.judgment.golden

    @classmethod
    def load(cls, folder: str | Path, **judge_kw: Any) -> Study:
        """The study in a study folder, read without a model: its complete layers judged with
        the selections cached there (``judge_kw``: :func:`judge_folder`'s settings, e.g.
        ``n_boot``). ``gradlocate report`` computes what is missing."""
        return judge_folder(StudyFolder.open(folder), **judge_kw)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "golden": self.golden, "judgment": self.judgment.to_dict(),
                "selections": self.selections.to_dict(), "matrix": self.matrix.to_dict(),
                "batch": None if self.batch is None else self.batch.to_dict(), "params": self.params,
                "timings": self.timings}

    def to_markdown(self) -> str:
        lines = [f"### {self.name}", "", self.judgment.to_markdown()]
        for sel, err in self.selections.errors.items():
            lines.append(f"- {sel} could not run: {err}")
        if self.batch is not None:
            conv = sum(bool(v) for v in self.batch.converged.values())
            lines += ["", f"**Batch regime** (the second question: the {self.params.get('n_test')} test edits edited "
                      f"together, dataset-level sweep): golden layer **{self.batch.golden}**; training converged at "
                      f"{conv}/{len(self.batch.converged)} layers."]
        return "\n".join(lines)

    def plot(self, title: str | None = None) -> Any:
        return self.judgment.plot(title or self.name)

    def __repr__(self) -> str:
        b = f", batch golden {self.batch.golden}" if self.batch is not None else ""
        return f"Study({self.name!r}: {self.judgment!r}{b})"


def study(model: Any, edits: Any, retain: Any = None, *, tokenizer: Any = None, name: str = "study",
          n_proxy: int | None = None, seed: int = 0, layers: Sequence[int] | None = None,
          selectors: Sequence[str] | None = None, editor: str = DEFAULT_EDITOR,
          hparams: Settings | dict[str, Any] | None = None, matrix: Matrix | None = None, capability_edits: int = 8,
          batch: bool = False, threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000,
          out_dir: str | Path | None = None, model_spec: str | None = None,
          progress: bool | None = None) -> Study:
    """The golden-layer study on one model and edit set (see the module doc).

    Args:
        edits: every edit (any public form); the proxy rule draws the proxy rows.
        retain: general texts for GradRatio (default: the built-in retain texts, 16).
        n_proxy: proxy rows (default: a quarter of the edits), drawn with ``seed``.
        layers: the matrix's layers (default: all).
        selectors: names of :data:`~gradlocate.golden.selections.STUDY_SELECTORS` (default: all).
        editor: the editor that fills the matrix and edits the batch (:func:`gradlocate.editors.names`).
        hparams: the editor's settings (a Settings object or a dict by name).
        matrix: a matrix of these edits made before (rows matched by :func:`~gradlocate.golden.table.edit_id`).
        capability_edits: the first this many edits get the capability measurement (damage gate).
        batch: also edit the test edits together at every layer (the batch regime), reported beside.
        threshold: the damage gate: a layer whose edits raise the held-out loss by more nats cannot be golden.
        n_boot: bootstrap resamples of the test edits.
        out_dir: a study folder: the manifest, ``selections/``, ``cells/``, ``batch/``,
            ``judgment.json`` and ``report.md`` written as each finishes (a re-run resumes).
        model_spec: how :func:`~gradlocate.models.load_model` loads this model (for the manifest).
    """
    require_gradients("study")
    h, edits = resolve(model, tokenizer), as_edits(edits)
    editor = spec(editor).name
    settings = settings_for(editor, hparams)
    proxy_rows, test_rows = proxy_split(len(edits), n_proxy, seed)
    texts = retain if isinstance(retain, list) and all(isinstance(t, str) for t in retain) else None
    folder = StudyFolder.bind(out_dir, folder_manifest(h, edits, editor, settings, [getattr(settings, "seed", 0)],
                                                       model_spec, n_proxy, seed, texts)) if out_dir is not None else None
    t0 = time.perf_counter()
    with using(h):
        picked = select(h, [edits[i] for i in proxy_rows], retain, selectors, progress=progress,
                        out=folder.selections_path(len(edits), seed) if folder else None)
        t1 = time.perf_counter()
        m = _matrix(h, edits, matrix, editor, settings, layers, capability_edits, folder, model_spec, n_proxy, seed,
                    progress)
        t2 = time.perf_counter()
        b = _batch(h, [edits[i] for i in test_rows], m.layers, editor, settings, folder, progress) if batch else None
    t3 = time.perf_counter()
    j = judge(m, proxy_rows, picked.scores, threshold=threshold, n_boot=n_boot, seed=seed)
    params = {"n_proxy": len(proxy_rows), "n_test": len(test_rows), "seed": seed, "editor": editor,
              "hparams": settings.to_dict(), "threshold": threshold,
              "proxy_prompts": [edits[i].prompt for i in proxy_rows]}
    timings = {"selectors": t1 - t0, "matrix": t2 - t1, "batch": t3 - t2, "judge": time.perf_counter() - t3}
    result = Study(name, j, picked, m, b, params, timings)
    if folder is not None:
        folder.judgment_path.write_text(json.dumps(j.to_dict(), default=float, indent=1))
        (folder.path / "report.md").write_text(result.to_markdown() + "\n")
    return result


def _matrix(h: Handles, edits: Edits, given: Matrix | None, editor: str, settings: Settings,
            layers: Sequence[int] | None, capability_edits: int, folder: StudyFolder | None, model_spec: str | None,
            n_proxy: int | None, seed: int, progress: bool | None) -> Matrix:
    """The single-edit matrix of ``edits`` (rows in their order): ``given``, checked, or computed."""
    if given is not None:
        ids = [edit_id(e) for e in edits]
        if given.edit_ids != ids:
            raise ValueError(f"matrix= has rows for {given.n_edits} edits that are not these {len(ids)} edits in "
                             f"this order (rows are matched by edit_id)")
        return given
    return run_matrix(h, edits, editor=editor, hparams=settings, layers=layers, capability_edits=capability_edits,
                      out=folder.path if folder is not None else None, model_spec=model_spec, n_proxy=n_proxy,
                      proxy_seed=seed, progress=progress)


def _batch(h: Handles, test: list[Any], layers: list[int], editor: str, settings: Settings,
           folder: StudyFolder | None, progress: bool | None) -> Batch:
    """The test edits edited together at every matrix layer, with the study's editor and settings."""
    out = None
    if folder is not None:
        folder.batch_dir.mkdir(exist_ok=True)
        out = folder.batch_dir / "records.jsonl"
    ev = BATCH_EVALUATION
    sw = sweep(h, test, layers=layers, trainer=settings, editor=editor, progress=progress, out=out,
               generation=ev["generation"], capability=ev["capability"], fluency=ev["fluency"], overall=ev["overall"])
    return Batch(sw, sw.golden, {r.layer: r.converged for r in sw.records})


#: A partial matrix is judged once this share of the model's layers is complete: a golden
#: layer, a regret or a transfer figure among fewer layers says little about the model.
MIN_JUDGED_SHARE = 0.5


class NotJudgedYet(NoLayerYet):
    """A partial folder with too few complete layers to judge (see :data:`MIN_JUDGED_SHARE`)."""


def _judgeable(done: Completeness) -> None:
    need = int(math.ceil(MIN_JUDGED_SHARE * done.n_layers))
    if not done.done and len(done.complete_layers) < need:
        got = layer_span(done.complete_layers) if done.complete_layers else "none"
        raise NotJudgedYet(f"{done}; complete layers: {got}. A partial matrix is judged once {need} of its "
                           f"{done.n_layers} layers are complete")


def _model(folder: StudyFolder, model: Any) -> tuple[Any, Any]:
    """(model, tokenizer) to run missing selectors with: the one given, or the manifest's
    loaded; ``(None, None)`` when neither is there (then only cached selections are read)."""
    if isinstance(model, tuple):  # what load_model returns
        return model[0], model[1]
    if model is not None or not folder.manifest.model.get("spec"):
        return model, None
    from gradlocate.models import load_model

    return load_model(folder.manifest.model["spec"])


def _names(selectors: bool | Sequence[str], cma: bool) -> list[str]:
    if selectors is False:
        return []
    names = list(STUDY_SELECTORS) if selectors is True else list(selectors)
    return [n for n in names if cma or n != "cma"]


def replicate_of(folder: StudyFolder, m: Matrix) -> tuple[Matrix | None, str]:
    """The folder's second replicate seed as a matrix of ``m``'s edits and layers (for
    :func:`~gradlocate.golden.judge.judge`'s ``replicate``), or ``None`` and why not: the
    folder has one seed, or the second seed's cells do not cover ``m``."""
    seeds = folder.manifest.regime.get("seeds", [])
    if len(seeds) < 2:
        return None, "none: one replicate seed"
    try:
        r, _ = folder.load(seed=seeds[1], complete_only=False)
    except NoLayerYet:
        return None, f"none: replicate seed {seeds[1]} has no cell yet"
    if r.edit_ids[:m.n_edits] != m.edit_ids or not set(m.layers) <= set(r.layers):
        return None, f"none: replicate seed {seeds[1]} does not hold every judged edit and layer"
    rows, cols = list(range(m.n_edits)), [r.layers.index(l) for l in m.layers]
    pick = {k: v[np.ix_(rows, cols)] for k, v in r.scores.items()}
    sub = Matrix(list(m.layers), list(m.edit_ids), pick, {k: v[np.ix_(rows, cols)] for k, v in r.train.items()},
                 r.capability[np.ix_(rows, cols)], r.capability_base, r.editor, r.params)
    if (m.filled & ~sub.filled).any():
        return None, f"none: replicate seed {seeds[1]} is incomplete on the judged cells"
    return sub, f"seed {seeds[1]}"


def judge_folder(folder: StudyFolder | str | os.PathLike[str], *, model: Any = None,
                 selectors: bool | Sequence[str] = True, cma: bool = True, threshold: float = DAMAGE_THRESHOLD,
                 n_boot: int = 1000, compute: bool = False, write: bool = False) -> Study:
    """The study in ``folder``: its complete layers judged on the test rows of its proxy rule,
    with the selectors' scores on the proxy rows (read from ``selections/``; with ``compute``,
    missing ones are run with ``model`` or the manifest's), and the folder's second
    replicate seed, where it has one covering the judged cells, as the replicate
    (:func:`replicate_of`). ``write``: also ``judgment.json``.

    Raises:
        NotJudgedYet: fewer than :data:`MIN_JUDGED_SHARE` of the layers complete.
    """
    folder = folder if isinstance(folder, StudyFolder) else StudyFolder.open(folder)
    try:
        m, done = folder.load()
    except NotJudgedYet:
        raise
    except NoLayerYet as e:
        need = int(math.ceil(MIN_JUDGED_SHARE * folder.manifest.n_layers))
        raise NotJudgedYet(f"{e}; a partial matrix is judged once {need} of its {folder.manifest.n_layers} layers "
                           f"are complete") from None
    _judgeable(done)
    man = folder.manifest
    names = _names(selectors, cma)
    try:
        proxy = man.proxy_rows(m.n_edits)
    except ValueError as e:  # too few edits to set a proxy apart: judged on all of them, no selector
        if names:
            raise ValueError(f"{folder.path.name}: {e}; judge it without selectors (selectors=False, "
                             f"`gradlocate report --no-selectors`): every edit is then a test edit") from None
        proxy = []
    picked = None
    if names:
        mdl, tok = _model(folder, model) if compute else (None, None)
        edits = folder.edits(m.n_edits)
        picked = select(mdl, [edits[i] for i in proxy], man.retain, names, out=folder.selections_path(m.n_edits),
                        tokenizer=tok, identity=man.model.get("identity"), progress=False)
    rep, why = replicate_of(folder, m)
    extra = {"model": man.model.get("spec"), "data": man.data.get("source"), "loss_threshold": _loss_threshold(),
             "replicate": why}
    j = judge(m, proxy, picked.scores if picked else None, threshold=threshold, n_boot=n_boot, replicate=rep,
              regime=extra)
    if write:
        folder.judgment_path.write_text(json.dumps({"completeness": done.to_dict(), **j.to_dict()}, default=float,
                                                   indent=1))
    params = {"n_proxy": len(proxy), "n_test": m.n_edits - len(proxy), "editor": man.regime["editor"],
              "hparams": man.regime["settings"], "threshold": threshold, "completeness": done}
    return Study(folder.path.name, j, picked or Selections(), m, Batch.read(folder), params)


def _loss_threshold() -> float:
    from gradlocate.editors.locft import LOSS_THRESHOLD

    return LOSS_THRESHOLD

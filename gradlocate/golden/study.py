"""The golden-layer study on one instrument: the single-edit matrix.

:func:`study` answers "which layer should I edit, and which selector finds it?" on one
model and edit set, every number from the same :class:`~gradlocate.golden.matrix.Matrix`
(every edit edited alone at every layer), in short stages, each returning a typed part:

1. :func:`split_rows` - a seeded split of the edits into **proxy** rows (the selectors
   see only these) and **test** rows;
2. :func:`select` - every selector of :data:`STUDY_SELECTORS` on the proxy edits,
   stored in ``selections.jsonl`` (fingerprinted by the model, the proxy edits, the
   retain texts and the selector's settings) so a re-run reads them back;
3. the matrix over proxy + test edits with any editor (or ``matrix=``, made before);
4. :func:`~gradlocate.golden.judge.judge` - golden layer per definition of overall with
   bootstrap, damage gate, own optimum vs golden with the winner's curse handled,
   proxy -> test transfer, each selector's regret and rank agreement, convergence;
5. ``batch=True``: the second question, the **batch regime** - the test edits edited
   together (:func:`~gradlocate.golden.sweep.sweep`), with its own golden layer, reported beside.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=3, d_model=32, initializer_range=1.0)
    >>> edits = [{"prompt": f"{i} + {i} =", "target_new": str(3 * i), "subject": str(i), "ground_truth": str(2 * i),
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"} for i in range(1, 7)]
    >>> s = study(model, edits, ["general text here", "and more of it"], n_proxy=2, selectors=("gradratio", "lga"),
    ...           hparams={"lr": 1e-2, "epochs": 2}, n_boot=20, n_null=20, n_splits=20, progress=False)
    >>> [r.name for r in s.judgment.selectors], s.golden in s.matrix.layers
    (['gradratio', 'lga'], True)
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.data import Edits, as_edits, default_retain_texts, load_texts
from gradlocate.editors import DEFAULT_EDITOR
from gradlocate.gradients import LayerGradients
from gradlocate.handles import Handles, model_identity, resolve
from gradlocate.interventions import ModelBusyError, require_gradients, using
from gradlocate.results import LayerScores
from gradlocate.golden.compare import run_selector
from gradlocate.golden.judge import DAMAGE_THRESHOLD, Judgment, SelectorResult, judge
from gradlocate.golden.matrix import Matrix, edit_id, matrix as run_matrix
from gradlocate.golden.store import RecordStore
from gradlocate.golden.sweep import SweepResult, sweep

__all__ = ["study", "Study", "Selections", "Batch", "select", "split_rows", "STUDY_SELECTORS", "StudyRow"]

#: The selectors a study compares: name -> (selector, its keyword arguments). The
#: defaults are the papers' (answer tokens only, Tukey's k = 1.5); each variant where a
#: definition could decide the answer is its own row: GradRatio's l_min, LGA's sign
#: convention, the fences' k = 2.2 (Hoaglin, Iglewicz & Tukey 1986's recommendation),
#: and EOS scored after each answer (EasyEdit's LocFT-BF loss does; the selectors' papers do not).
STUDY_SELECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradratio": ("gradratio", {}),
    "gradratio (no l_min)": ("gradratio", {"min_layer": 0}),
    "gradratio (EOS)": ("gradratio", {"append_eos": True}),
    "lga": ("lga", {"sign": "signed"}),
    "lga (negative)": ("lga", {"sign": "negative"}),
    "lga (abs)": ("lga", {"sign": "abs"}),
    "lga (k 2.2)": ("lga", {"sign": "signed", "k": 2.2}),
    "lga (EOS)": ("lga", {"sign": "signed", "append_eos": True}),
    "cma": ("cma", {}),
}

#: A selector's row of a study (the name the old study used).
StudyRow = SelectorResult


def split_rows(n: int, n_proxy: int, seed: int = 0) -> list[int]:
    """The proxy rows of ``n`` edits: ``n_proxy`` of them, drawn with ``seed`` (sorted).

    Example:
        >>> split_rows(10, 3, seed=0) == split_rows(10, 3, seed=0), len(split_rows(10, 3))
        (True, 3)
    """
    if not 1 <= n_proxy <= n - 2:
        raise ValueError(f"n_proxy must be in 1..{n - 2} (the test rows need at least 2 edits), got {n_proxy}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_proxy])


@dataclass
class Selections:
    """Each selector's scores on the proxy edits, or why it could not run, and its seconds."""

    scores: dict[str, LayerScores] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scores": {k: v.to_dict() for k, v in self.scores.items()}, "errors": dict(self.errors),
                "seconds": dict(self.seconds)}

    def __repr__(self) -> str:
        picks = ", ".join(f"{k}={v.selected}" for k, v in self.scores.items())
        return f"Selections({picks}{'; failed: ' + ', '.join(self.errors) if self.errors else ''})"


def _selection_store(h: Handles, proxy: Edits, retain: Any, out: str | Path) -> RecordStore:
    base = {"model": model_identity(h), "proxy": [e.to_dict() for e in proxy], "retain": retain}
    return RecordStore(out, lambda key: {**base, "selector": list(STUDY_SELECTORS[str(key)])})


def select(model: Any, proxy: Any, retain: Any = None, selectors: Sequence[str] | None = None, *,
           out: str | Path | None = None, tokenizer: Any = None, progress: bool | None = None) -> Selections:
    """Run each selector (names of :data:`STUDY_SELECTORS`, default all) on the ``proxy``
    edits, or read it back from the record file ``out`` (when made with the same model,
    proxy edits, retain texts and settings). A selector that cannot run is reported in
    ``errors``; the others still run.

    Raises:
        ValueError: an unknown selector name.
    """
    names = list(STUDY_SELECTORS) if selectors is None else list(selectors)
    unknown = [s for s in names if s not in STUDY_SELECTORS]
    if unknown:
        raise ValueError(f"unknown study selectors {unknown}: choose from {list(STUDY_SELECTORS)}")
    h, proxy, retain = resolve(model, tokenizer), as_edits(proxy), _retain(retain)
    store = _selection_store(h, proxy, retain, out) if out is not None else None
    saved = store.read() if store is not None else {}
    got = Selections()
    for sel in names:
        if sel in saved:
            got.scores[sel] = LayerScores(**saved[sel]["scores"])
            got.seconds[sel] = sum(got.scores[sel].timings.values())
            continue
        kind, kw = STUDY_SELECTORS[sel]
        t0 = time.perf_counter()
        try:
            got.scores[sel] = run_selector(kind, h, proxy, retain, progress=progress, **kw)
        except ModelBusyError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in its place; the rest still runs
            got.errors[sel] = f"{type(e).__name__}: {e}"
            continue
        finally:
            got.seconds[sel] = time.perf_counter() - t0
        if store is not None:
            store.append(sel, {"scores": _scores_dict(got.scores[sel])})
    return got


@dataclass
class Batch:
    """The second question: the test edits edited together (dataset-level sweep), its golden layer."""

    sweep: SweepResult
    golden: int
    converged: dict[int, bool | None]

    def to_dict(self) -> dict[str, Any]:
        return {"golden": self.golden, "converged": self.converged, "sweep": self.sweep.to_dict()}


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
          n_proxy: int = 16, seed: int = 0, layers: Sequence[int] | None = None,
          selectors: Sequence[str] | None = None, editor: str = DEFAULT_EDITOR, hparams: dict[str, Any] | None = None,
          matrix: Matrix | None = None, capability_edits: int = 8, batch: bool = False,
          threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000, n_null: int = 1000, n_splits: int = 200,
          out_dir: str | Path | None = None, progress: bool | None = None) -> Study:
    """The golden-layer study on one model and edit set (see the module doc).

    Args:
        edits: every edit (any public form); ``n_proxy`` of them, drawn with ``seed``, are the proxy rows.
        retain: general texts for GradRatio (default: the built-in retain texts, 16).
        layers: the matrix's layers (default: all).
        selectors: names of :data:`STUDY_SELECTORS` (default: all of them).
        editor: the editor that fills the matrix (:data:`~gradlocate.editors.EDITORS`).
        hparams: the editor's settings.
        matrix: a matrix of these edits made before (rows matched by :func:`~gradlocate.golden.matrix.edit_id`).
        capability_edits: the first this many edits get the capability measurement (damage gate).
        batch: also sweep the test edits together (the batch regime), reported beside.
        threshold: the damage gate: a layer whose edits raise the held-out loss by more nats cannot be golden.
        n_boot: bootstrap resamples of the test edits.
        n_null: permutations of the selection-bias null.
        n_splits: random proxy/test splits for transfer.
        out_dir: ``selections.jsonl``, ``matrix/`` and ``batch.jsonl`` written as each finishes (resume).
    """
    require_gradients("study")
    h, edits = resolve(model, tokenizer), as_edits(edits)
    proxy_rows = split_rows(len(edits), n_proxy, seed)
    out = _out(out_dir)
    t0 = time.perf_counter()
    with using(h):
        picked = select(h, [edits[i] for i in proxy_rows], retain, selectors, out=out and out / "selections.jsonl",
                        progress=progress)
        t1 = time.perf_counter()
        m = _matrix(h, edits, matrix, editor, hparams, layers, capability_edits, out, progress)
        t2 = time.perf_counter()
        test = [e for i, e in enumerate(edits) if i not in set(proxy_rows)]
        b = _batch(h, test, m.layers, hparams, out, progress) if batch else None
    t3 = time.perf_counter()
    j = judge(m, proxy_rows, picked.scores, threshold=threshold, n_boot=n_boot, n_null=n_null, n_splits=n_splits,
              seed=seed)
    params = {"n_proxy": n_proxy, "n_test": len(edits) - n_proxy, "seed": seed, "editor": editor,
              "hparams": dict(hparams or {}), "threshold": threshold, "proxy_prompts": [edits[i].prompt for i in proxy_rows]}
    timings = {"selectors": t1 - t0, "matrix": t2 - t1, "batch": t3 - t2, "judge": time.perf_counter() - t3}
    return Study(name, j, picked, m, b, params, timings)


def _out(out_dir: Any) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _matrix(h: Handles, edits: Edits, given: Matrix | None, editor: str, hparams: dict[str, Any] | None,
            layers: Sequence[int] | None, capability_edits: int, out: Path | None, progress: bool | None) -> Matrix:
    """The single-edit matrix of ``edits`` (rows in their order): ``given``, checked, or computed."""
    if given is not None:
        ids = [edit_id(e) for e in edits]
        if given.edit_ids != ids:
            raise ValueError(f"matrix= has rows for {given.n_edits} edits that are not these {len(ids)} edits in "
                             f"this order (rows are matched by edit_id)")
        return given
    return run_matrix(h, edits, editor=editor, hparams=hparams, layers=layers, capability_edits=capability_edits,
                      out=out / "matrix" if out is not None else None, progress=progress)


def _batch(h: Handles, test: list[Any], layers: list[int], hparams: dict[str, Any] | None, out: Path | None,
           progress: bool | None) -> Batch:
    """The test edits edited together at every matrix layer (LocFT-BF with ``hparams``)."""
    sw = sweep(h, test, layers=layers, trainer=dict(hparams or {}), generation=False, capability=False,
               fluency=False, overall="edit-only", progress=progress, out=out / "batch.jsonl" if out else None)
    return Batch(sw, sw.golden, {r.layer: r.converged for r in sw.records})


def _retain(retain: Any) -> Any:
    """The retain texts, read once (they are part of the selections' fingerprint); a
    precomputed :class:`~gradlocate.gradients.LayerGradients` passes through."""
    if retain is None:
        return default_retain_texts(16)
    return retain if isinstance(retain, LayerGradients) else load_texts(retain)


def _scores_dict(s: LayerScores) -> dict[str, Any]:
    d = s.to_dict()
    return {"method": d["method"], "scores": d["scores"], "eligible": d["eligible"], "selected": d["selected"],
            "params": d["params"], "extras": d["extras"], "timings": d["timings"], "layers": d["layers"]}

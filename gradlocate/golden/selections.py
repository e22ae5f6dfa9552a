"""The selectors a study judges, run on the proxy edits once and cached in the study folder.

:func:`select` runs each selector of :data:`STUDY_SELECTORS` on the proxy edits, or reads
it back from a record file (fingerprinted by the model, the proxy edits, the retain texts
and the selector's settings), so a study, a report and the proxy draws never run a
selector twice. A folder's cached selections read without a model
(``identity=``: the manifest's model identity checks them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.data import Edits, as_edits, default_retain_texts, load_texts
from gradlocate.gradients import LayerGradients
from gradlocate.handles import model_identity, resolve
from gradlocate.interventions import ModelBusyError
from gradlocate.results import LayerScores
from gradlocate.golden.compare import run_selector
from gradlocate.golden.store import Fingerprint, RecordStore

__all__ = ["STUDY_SELECTORS", "Selections", "select"]

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


def _selection_store(identity: Any, proxy: Edits, retain: Any, out: str | Path) -> RecordStore:
    base = {"model": identity, "proxy": [e.to_dict() for e in proxy], "retain": retain}
    if identity is None:  # a folder whose manifest does not know the model's identity: every other part is checked
        return RecordStore(out, lambda key: _without_model({**base, "selector": list(STUDY_SELECTORS[str(key)])}))
    return RecordStore(out, lambda key: {**base, "selector": list(STUDY_SELECTORS[str(key)])})


class _AnyModel(Fingerprint):
    """A fingerprint that accepts any model part (the identity is unknown), checks the rest."""

    def differs(self, parts: Any) -> list[str]:
        return [p for p in super().differs(parts) if p != "model"]


def _without_model(inputs: dict[str, Any]) -> Fingerprint:
    return _AnyModel(Fingerprint.of(inputs).parts)


def select(model: Any, proxy: Any, retain: Any = None, selectors: Sequence[str] | None = None, *,
           out: str | Path | None = None, tokenizer: Any = None, identity: Any = None,
           progress: bool | None = None) -> Selections:
    """Run each selector (names of :data:`STUDY_SELECTORS`, default all) on the ``proxy``
    edits, or read it back from the record file ``out`` (when made with the same model,
    proxy edits, retain texts and settings). A selector that cannot run is reported in
    ``errors``; the others still run. ``model=None`` reads the cached ones only (``identity``:
    the model identity they must have been made with, e.g. a study folder's; ``None``: any);
    the rest are reported as not computed.

    Raises:
        ValueError: an unknown selector name.
    """
    names = list(STUDY_SELECTORS) if selectors is None else list(selectors)
    unknown = [s for s in names if s not in STUDY_SELECTORS]
    if unknown:
        raise ValueError(f"unknown study selectors {unknown}: choose from {list(STUDY_SELECTORS)}")
    h = resolve(model, tokenizer) if model is not None else None
    proxy, retain = as_edits(proxy), _retain(retain)
    ident = model_identity(h) if h is not None else identity
    store = _selection_store(ident, proxy, retain, out) if out is not None else None
    saved = store.read() if store is not None and Path(store.path).exists() else {}
    got = Selections()
    for sel in names:
        if sel in saved:
            got.scores[sel] = LayerScores(**saved[sel]["scores"])
            got.seconds[sel] = sum(got.scores[sel].timings.values())
        elif h is None:
            got.errors[sel] = "not computed yet (no model given to run it)"
        elif _run(got, sel, h, proxy, retain, progress) and store is not None:
            store.append(sel, {"scores": _scores_dict(got.scores[sel])})
    return got


def _run(got: Selections, sel: str, h: Any, proxy: Edits, retain: Any, progress: bool | None) -> bool:
    """Run one selector into ``got``; whether it ran (a failure is reported in its place)."""
    kind, kw = STUDY_SELECTORS[sel]
    t0 = time.perf_counter()
    try:
        got.scores[sel] = run_selector(kind, h, proxy, retain, progress=progress, **kw)
        return True
    except ModelBusyError:
        raise
    except Exception as e:  # noqa: BLE001 - reported in its place; the rest still runs
        got.errors[sel] = f"{type(e).__name__}: {e}"
        return False
    finally:
        got.seconds[sel] = time.perf_counter() - t0


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

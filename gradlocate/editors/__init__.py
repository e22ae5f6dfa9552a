"""Editors: change one layer's site in place, with exact undo.

An **editor** edits one resolved model at one layer's site (the MLP down-projection,
unless ``down_projections(..., down=)`` named another), in place:

    Editor(model, layer, **hparams)    made for one layer; nothing changes yet
    editor.fit(edits) -> result        edit; the result is typed, with .to_dict()
    editor.edited / editor.delta       whether the weight changed, and by how much
    editor.restore() / editor.commit() undo bit for bit, or keep
    with Editor(...) as e: ...         restores on exit unless committed, also on errors

and, for the single-edit matrix, each edit alone at one layer, all at once:

    per_edit_deltas(name, h, layer, edits, **hparams) -> (delta [edits, d_model, d_mlp], summaries)

``delta[i]`` is the weight change editing edit ``i`` alone makes; the model is not
changed. A ``memo`` dict kept across calls on the same unedited model lets an editor
reuse what does not depend on the layer (the rank-one editors' context templates).
:data:`EDITORS` names the editors (``"locft"`` is LocFT-BF, the default; ``"rome"``,
``"r-rome"`` and ``"emmet"`` the closed-form editors of :mod:`gradlocate.editors.rome`
and :mod:`gradlocate.editors.emmet`).

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> with editor_class("locft")(model, 1, lr=1e-2, epochs=2, progress=False) as ed:
    ...     r = ed.fit([{"prompt": "a b", "target_new": "c"}])
    ...     ed.edited
    True
    >>> ed.edited
    False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxtyping import Float
from torch import Tensor

from gradlocate.data import as_edits
from gradlocate.editors.emmet import EMMET, emmet_per_edit
from gradlocate.editors.locft import LocFTBF
from gradlocate.editors.locft_rows import train_per_sample
from gradlocate.editors.rome import ROME, RROME, rome_per_edit, rrome_per_edit
from gradlocate.handles import Handles

__all__ = ["EDITORS", "DEFAULT_EDITOR", "editor_class", "per_edit_deltas"]

DEFAULT_EDITOR = "locft"
#: name -> editor class (made as ``cls(model, layer, **hparams)``).
EDITORS: dict[str, type] = {"locft": LocFTBF, "rome": ROME, "r-rome": RROME, "emmet": EMMET}
#: name -> ``fn(h, layer, edits, **hparams) -> (delta, summaries)``: each edit alone.
_PER_EDIT: dict[str, Callable[..., tuple[Tensor, list[dict[str, Any]]]]] = {
    "locft": train_per_sample, "rome": rome_per_edit, "r-rome": rrome_per_edit, "emmet": emmet_per_edit}


def _known(name: str) -> str:
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    key = {"locft-bf": "locft", "rrome": "r-rome"}.get(key, key)
    if key not in EDITORS:
        raise ValueError(f"unknown editor {name!r}: choose one of {sorted(EDITORS)}")
    return key


def editor_class(name: str) -> type:
    """The editor class called ``name`` (see :data:`EDITORS`).

    Example:
        >>> editor_class("locft").__name__
        'LocFTBF'
    """
    return EDITORS[_known(name)]


def per_edit_deltas(name: str, h: Handles, layer: int, edits: Any, *, memo: dict[Any, Any] | None = None,
                    **hparams: Any) -> tuple[Float[Tensor, "edits d_model d_mlp"], list[dict[str, Any]]]:
    """Each edit edited alone at ``layer`` by editor ``name``: the weight changes
    ``[edits, d_model, d_mlp]`` (float32, canonical layout) and one summary per edit
    (e.g. epochs, final loss, converged). The model is left as it was.

    ``memo``: a dict the caller keeps across calls on the same, unedited model; editors
    store there what does not depend on the layer (the rank-one editors: the context
    templates, sampled from the model), so a run over many layers samples them once."""
    key = _known(name)
    extra = {} if memo is None or key == "locft" else {"memo": memo}  # LocFT-BF has nothing layer-independent
    return _PER_EDIT[key](h, layer, as_edits(edits), **extra, **hparams)

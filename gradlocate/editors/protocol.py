"""The editor protocol: what every editor is, reports and registers.

An editor edits one resolved model at one layer's site in place, with exact undo::

    Editor(model, layer, settings=None, *, tokenizer=None, progress=None, callback=None, **overrides)
    editor.fit(edits) -> result                result.summary(): the shared summary fields for the fit
    editor.edited / editor.delta               whether the weight changed, and by how much
    editor.restore() / editor.commit()         undo bit for bit, or keep
    with Editor(...) as e: ...                 restores on exit unless committed, also on errors

``settings`` is the editor's typed :class:`~gradlocate.editors.settings.Settings`;
``overrides`` change single settings by name. Every editor calls ``callback`` with one
:class:`TrainStep` per optimisation step, and summarises each edit with the same fields
(:data:`SUMMARY_FIELDS`: converged, final loss, steps, the loss trajectory), so a matrix
cell, a sweep layer and a plot read every editor alike.

An :class:`EditorSpec` registers an editor (the registry, :mod:`gradlocate.editors`,
collects every ``SPECS`` list of the package's editor modules): its class, its settings
class, ``per_edit`` (each edit edited alone at one layer, for the single-edit matrix:
weight changes ``[edits, d_model, d_mlp]`` and one summary per edit, the model unchanged)
and ``prepare`` (what can be computed once for many layers before any cell: the rank-one
editors' second moments of every layer in one pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradlocate.editors.settings import Settings

__all__ = ["TrainStep", "EditorSpec", "SUMMARY_FIELDS", "summary"]

#: The fields every editor's per-edit summary has (``trajectory``: the loss at every step;
#: ``converged``: the editor's own stopping rule was met, not the step budget).
SUMMARY_FIELDS = ("converged", "final_loss", "steps", "trajectory")


@dataclass(frozen=True)
class TrainStep:
    """One optimisation step, as every editor reports it to ``callback``.

    Attributes:
        step: the step's index within this fit (0-based; LocFT-BF counts mini-batches
            across epochs, the rank-one editors count v* steps of one edit).
        loss: the loss before the step (LocFT-BF: the mini-batch's mean; v*: the total).
        epoch: LocFT-BF's epoch (``None`` for the rank-one editors).
        batch: LocFT-BF's mini-batch within its epoch.
        edit: the rank-one editors' edit (its index in the list given to ``fit``).
    """

    step: int
    loss: float
    epoch: int | None = None
    batch: int | None = None
    edit: int | None = None


def summary(trajectory: Sequence[float], converged: bool, steps: int | None = None, **extra: Any) -> dict[str, Any]:
    """One edit's summary with the shared fields (:data:`SUMMARY_FIELDS`) and ``extra``.

    Example:
        >>> summary([2.0, 0.5, 0.01], True)["final_loss"]
        0.01
    """
    traj = [float(x) for x in trajectory]
    return {"converged": bool(converged), "final_loss": traj[-1] if traj else None,
            "steps": len(traj) if steps is None else int(steps), "trajectory": traj, **extra}


@dataclass(frozen=True)
class EditorSpec:
    """One registered editor (see the module doc).

    Attributes:
        name: the registry key (``"locft"``, ``"r-rome"`` ...); aliases: other spellings.
        label: the name people write (``"LocFT-BF"``).
        editor: the class, made as ``editor(model, layer, settings, **kwargs)``.
        settings: its settings class.
        per_edit: ``fn(h, layer, edits, settings, memo=None, **runtime) -> (delta, summaries)``.
        prepare: ``fn(h, layers, settings, progress) -> None`` or ``None``.
        description: one line for listings.
    """

    name: str
    label: str
    editor: type
    settings: type[Settings]
    per_edit: Callable[..., tuple[Tensor, list[dict[str, Any]]]]
    prepare: Callable[..., None] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""

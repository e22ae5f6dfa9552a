"""Editors: change one layer's site in place, with exact undo - and the one registry of them.

The protocol every editor follows is :mod:`gradlocate.editors.protocol`; each editor's
typed settings are in :mod:`gradlocate.editors.settings`. This module is the registry:
every editor module of this package lists its :class:`~gradlocate.editors.protocol.EditorSpec`
in a module-level ``SPECS``, and :func:`registry` collects them, so adding an editor
touches its own module (and its tests) only. The CLI reads its ``--editor`` choices and
each editor's settings from here.

    spec("r-rome")                                 the EditorSpec (aliases: "rrome", "R-ROME")
    settings_for("locft", {"lr": 1e-3})            typed settings, unknown names refused
    make("rome", model, layer, settings)           the editor, made at one layer
    per_edit_deltas("locft", h, layer, edits)      each edit alone: ([edits, d_model, d_mlp], summaries)
    prepare("r-rome", h, layers, settings)         one-pass statistics for many layers (C of every layer)

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> with make("locft", model, 1, settings_for("locft", {"lr": 1e-2, "epochs": 2}), progress=False) as ed:
    ...     r = ed.fit([{"prompt": "a b", "target_new": "c"}])
    ...     ed.edited, {"converged", "final_loss", "steps", "trajectory"} <= set(r.summary())
    (True, True)
    >>> ed.edited
    False
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from gradlocate.data import as_edits
from gradlocate.editors.protocol import EditorSpec
from gradlocate.editors.settings import Settings
from gradlocate.handles import Handles

__all__ = ["DEFAULT_EDITOR", "registry", "spec", "names", "settings_for", "split_settings", "make", "per_edit_deltas",
           "prepare", "editor_class"]

DEFAULT_EDITOR = "locft"
_REGISTRY: dict[str, EditorSpec] = {}


def registry() -> dict[str, EditorSpec]:
    """Every registered editor by name, collected once from the ``SPECS`` of this package's modules."""
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            for s in getattr(module, "SPECS", ()):
                if s.name in _REGISTRY:
                    raise RuntimeError(f"editor {s.name!r} is registered twice ({module.__name__})")
                _REGISTRY[s.name] = s
    return dict(sorted(_REGISTRY.items()))


def names() -> list[str]:
    """The registered editors' names (the CLI's ``--editor`` choices).

    Example:
        >>> names()
        ['emmet', 'locft', 'r-rome', 'rome']
    """
    return list(registry())


def spec(name: str) -> EditorSpec:
    """The editor registered as ``name`` (any case; ``_`` for ``-``; an alias such as ``"rrome"``).

    Example:
        >>> spec("LocFT-BF").label, spec("rrome").name
        ('LocFT-BF', 'r-rome')
    """
    specs = registry()
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    for s in specs.values():
        if key == s.name or key in s.aliases:
            return s
    raise ValueError(f"unknown editor {name!r}: choose one of {list(specs)}")


def settings_for(name: str, values: Settings | Mapping[str, Any] | None = None) -> Settings:
    """Editor ``name``'s settings: ``values`` as a dict of settings (unknown names refused),
    or a settings object, checked to be this editor's kind."""
    cls = spec(name).settings
    if isinstance(values, Settings):
        if not isinstance(values, cls):
            raise TypeError(f"{spec(name).label} takes {cls.__name__}, got {type(values).__name__}")
        return values
    return cls.from_dict(values)


def split_settings(name: str, values: Settings | Mapping[str, Any] | None) -> tuple[Settings, dict[str, Any]]:
    """Editor ``name``'s settings from ``values``, and what is left over: a dict may mix
    settings with the editor's runtime arguments (``progress``, ``callback``, ``covariance``),
    which are returned apart (the editor refuses any it does not take).

    Example:
        >>> s, rest = split_settings("locft", {"lr": 1e-3, "progress": False})
        >>> s.lr, rest
        (0.001, {'progress': False})
    """
    if values is None or isinstance(values, Settings):
        return settings_for(name, values), {}
    if not isinstance(values, Mapping):
        raise TypeError(f"{spec(name).label}'s settings: give a Settings object or a dict, got {type(values).__name__}")
    known = set(spec(name).settings().to_dict())
    return (settings_for(name, {k: v for k, v in values.items() if k in known}),
            {k: v for k, v in values.items() if k not in known})


def editor_class(name: str) -> type:
    """The editor class registered as ``name``.

    Example:
        >>> editor_class("locft").__name__
        'LocFTBF'
    """
    return spec(name).editor


def make(name: str, model: Any, layer: int, settings: Settings | Mapping[str, Any] | None = None,
         **kwargs: Any) -> Any:
    """Editor ``name`` at ``layer`` of ``model`` with ``settings`` (``kwargs``: the class's
    runtime arguments, e.g. ``progress``, ``callback``, ``tokenizer``)."""
    return spec(name).editor(model, layer, settings_for(name, settings), **kwargs)


def per_edit_deltas(name: str, h: Handles, layer: int, edits: Any, settings: Settings | Mapping[str, Any] | None = None,
                    *, memo: dict[Any, Any] | None = None,
                    **runtime: Any) -> tuple[Float[Tensor, "edits d_model d_mlp"], list[dict[str, Any]]]:
    """Each edit edited alone at ``layer`` by editor ``name``: the weight changes
    ``[edits, d_model, d_mlp]`` (float32, canonical layout) and one summary per edit (the
    protocol's fields: converged, final loss, steps, trajectory). The model is left as it was.

    ``memo``: a dict the caller keeps across calls on the same, unedited model; editors
    store there what does not depend on the layer (the rank-one editors' context
    templates), so a run over many layers samples them once. ``runtime``: single settings
    by name (overriding ``settings``) and the editor's other arguments (e.g. a precomputed
    ``covariance``); an argument the editor does not take is refused."""
    s = spec(name)
    chosen = settings_for(name, settings)
    named = {k: v for k, v in runtime.items() if k in chosen.to_dict()}  # settings given by name, as overrides
    rest = {k: v for k, v in runtime.items() if k not in named}
    return s.per_edit(h, layer, as_edits(edits), chosen.replace(**named), memo=memo, **rest)


def prepare(name: str, h: Handles, layers: Sequence[int], settings: Settings | Mapping[str, Any] | None = None,
            progress: bool | None = None) -> None:
    """What editor ``name`` can compute once for all of ``layers`` before editing any
    (the rank-one editors: the second moments of every layer in one pass, cached);
    nothing for an editor without such a step."""
    s = spec(name)
    if s.prepare is not None:
        s.prepare(h, list(layers), settings_for(name, settings), progress)

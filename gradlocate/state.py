"""Tiny context managers that change a model's state for one computation and always
put it back (in the spirit of ROME's ``nethook``).

Example:
    >>> from gradlocate.models import tiny
    >>> from gradlocate.handles import down_projections
    >>> model, _ = tiny("gpt2", n_layers=2, d_model=16)
    >>> hs = down_projections(model)
    >>> with grad_only(model, hs.parameters()):
    ...     sum(p.requires_grad for p in model.parameters())
    2
    >>> all(p.requires_grad for p in model.parameters())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["grad_only", "eval_mode", "preserved", "input_device", "check_materialized", "snapshot", "restore_snapshot"]


@contextlib.contextmanager
def grad_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside the block; every flag is restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block (no dropout); each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def preserved(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> Iterator[None]:
    """Eval mode, and grad only on ``params`` (none if ``None``), for one computation."""
    with eval_mode(model), grad_only(model, params or ()):
        yield


def check_materialized(model: nn.Module) -> None:
    """Raise if any parameter or buffer of ``model`` is on the ``meta`` device.

    A model built under ``accelerate.init_empty_weights()`` has shapes but no numbers:
    :func:`~gradlocate.handles.down_projections` works on it (a shape-only dry run),
    but nothing can be computed. Weights offloaded to disk by a ``device_map`` are
    meta too; gradlocate needs every weight in memory (on any devices).

    Example:
        >>> from accelerate import init_empty_weights
        >>> with init_empty_weights():
        ...     layer = nn.Linear(2, 2)
        >>> check_materialized(layer)
        Traceback (most recent call last):
        ...
        ValueError: the model's weights are on the meta device (weight, ...): ...
    """
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(
            f"the model's weights are on the meta device ({', '.join(meta[:3])}, ...): it has shapes but no "
            f"values (built under accelerate.init_empty_weights(), or offloaded to disk by a device_map). "
            f"gradlocate computes with real weights: load them (e.g. from_pretrained(..., device_map=...) with "
            f"devices only, no 'disk'); down_projections() alone works on a meta model"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings (works for models
    dispatched across devices with accelerate's ``device_map``).

    Raises:
        ValueError: the model has weights on the ``meta`` device (see
            :func:`check_materialized`); every computing function asks here first.
    """
    check_materialized(model)
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        emb = get()
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def snapshot(params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bit-exact copies of ``params`` (to undo an in-place edit)."""
    return [(p, p.detach().clone()) for p in params]


def restore_snapshot(snap: list[tuple[torch.Tensor, Any]]) -> None:
    """Write a :func:`snapshot` back, bit for bit."""
    with torch.no_grad():
        for p, saved in snap:
            p.copy_(saved)

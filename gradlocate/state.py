"""Model state that is not an intervention: where inputs go, whether the weights are
real, and an exact undo of an in-place edit.

Example:
    >>> from gradlocate.models import tiny
    >>> model, _ = tiny("gpt2", n_layers=1, d_model=16)
    >>> input_device(model).type
    'cpu'
"""

from __future__ import annotations


import torch
from torch import nn

__all__ = ["input_device", "check_materialized", "Undo"]


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


class Undo:
    """A bit-exact copy of a tensor, to put it back (an in-place edit's undo).

    Example:
        >>> import torch
        >>> w = torch.ones(2)
        >>> u = Undo(w)
        >>> _ = w.mul_(3); u.changed
        True
        >>> u.restore(); w.tolist(), u.changed
        ([1.0, 1.0], False)
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.saved: torch.Tensor | None = tensor.detach().clone()

    @property
    def committed(self) -> bool:
        return self.saved is None

    @property
    def changed(self) -> bool:
        """Whether the tensor differs (bitwise) from the copy (always after a commit)."""
        return self.saved is None or not torch.equal(self.tensor.detach(), self.saved)

    @property
    def delta(self) -> torch.Tensor:
        if self.saved is None:
            raise RuntimeError("the edit was committed: the original weight is no longer kept")
        return self.tensor.detach() - self.saved

    def restore(self) -> None:
        """Write the copy back, bit for bit."""
        if self.saved is None:
            raise RuntimeError("the edit was committed with .commit(); there is nothing to restore")
        with torch.no_grad():
            self.tensor.copy_(self.saved)

    def commit(self) -> None:
        """Keep the change and release the copy."""
        self.saved = None

"""A memory guard: micro-batch sizes chosen from a byte budget.

Functions that take ``max_memory=`` (bytes) estimate what one sequence costs in
activations and run micro-batches of at most ``max_memory // cost`` sequences (never
more than their ``batch_size``), so a large edit set or a long retain text splits
into more, smaller passes instead of running out of memory. The results do not
depend on the micro-batch size (up to float rounding).

The estimate is deliberately rough and on the high side: per layer a forward+backward
keeps about ``16 d_model + 4 d_mlp`` values per token (attention and MLP inputs,
norms, residuals), plus ``n_heads * T`` attention scores per token (an eager
attention's probabilities), plus the output head's float32 logits, log-softmax and
gradient (``vocab`` values each) at the scored positions. It covers activations only,
not the weights themselves.

Example:
    >>> from gradlocate.models import tiny
    >>> from gradlocate.handles import down_projections
    >>> model, _ = tiny("llama", n_layers=2, d_model=16)
    >>> hs = down_projections(model)
    >>> cost = sequence_bytes(hs, 10)
    >>> micro_batch_size(8, None, cost), micro_batch_size(8, 3 * cost, cost)
    (8, 3)
"""

from __future__ import annotations

import warnings
from typing import Any

from gradlocate.handles import Handles

__all__ = ["sequence_bytes", "micro_batch_size", "check_max_memory"]

# Values kept per token and layer for the backward pass, in units of d_model / d_mlp.
_PER_D_MODEL = 16
_PER_D_MLP = 4
# float32 logits, log-softmax and their gradient per scored position and vocabulary entry.
_HEAD_BYTES = 12


def check_max_memory(max_memory: Any) -> None:
    """``max_memory`` must be ``None`` or a positive number of bytes."""
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0:
        raise ValueError(f"max_memory must be a number of bytes > 0 (or None), got {max_memory!r}")


def _n_heads(root: Any) -> int:
    cfg = getattr(root, "config", None)
    for name in ("num_attention_heads", "n_head", "n_heads", "num_heads"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


def _vocab(root: Any) -> int:
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    if w is not None and getattr(w, "dim", lambda: 0)() == 2:
        return int(w.shape[0])
    return int(getattr(getattr(root, "config", None), "vocab_size", 0) or 0)


def sequence_bytes(handles: Handles, seq_len: int, *, scored: int | None = None, backward: bool = True,
                   stored_per_token: int = 0) -> int:
    """Estimated activation bytes of one sequence of ``seq_len`` tokens.

    Args:
        handles: the model's :class:`~gradlocate.handles.Handles`.
        seq_len: tokens in the sequence (the widest of the micro-batch).
        scored: positions at which the output head's logits are kept (default all).
        backward: a forward and backward pass (``False``: a forward without grad,
            which keeps one layer's activations at a time).
        stored_per_token: extra bytes per token the caller keeps (e.g. captured
            activations and gradients).
    """
    root = handles.root
    h0 = handles[0]
    e = h0.parameter.element_size()
    d_model, d_mlp, n_layers = h0.d_model, h0.d_mlp, len(handles)
    per_layer = seq_len * ((_PER_D_MODEL * d_model + _PER_D_MLP * d_mlp) + _n_heads(root) * seq_len) * e
    layers = n_layers * per_layer if backward else per_layer
    head = (seq_len if scored is None else scored) * _vocab(root) * (_HEAD_BYTES if backward else 4 + e)
    return int(layers + head + seq_len * stored_per_token)


def micro_batch_size(batch_size: int, max_memory: float | None, per_sequence: int, what: str = "sequences") -> int:
    """The micro-batch size: ``batch_size``, lowered so that ``per_sequence`` bytes
    per sequence fit in ``max_memory`` (no limit if ``None``). At least 1; a single
    sequence over the budget runs alone, with a warning."""
    check_max_memory(max_memory)
    if max_memory is None:
        return batch_size
    fit = int(max_memory // max(1, per_sequence))
    if fit < 1:
        warnings.warn(
            f"max_memory={int(max_memory)} bytes is less than one of the {what} needs (about {per_sequence} "
            f"bytes of activations): running them one at a time", stacklevel=3)
        return 1
    return max(1, min(batch_size, fit))

"""The names of tensor dimensions, one per meaning, used in every jaxtyping annotation.

A shape such as ``Float[Tensor, "rows pos d_model"]`` is checked when the tests run
(jaxtyping's pytest plugin with beartype, see ``pyproject.toml``): within one call,
every use of a name must have the same size. So a name means one thing everywhere:

============  =====================================================================
name          meaning
============  =====================================================================
``rows``      rows of a token batch: one sequence (a prompt, an edit, a text) each
``pos``       token positions of a (padded) batch or of one prompt; ``pos-1`` the
              positions of next-token predictions (jaxtyping evaluates it)
``pos1``,     the positions of two batches that are paired but padded separately
``pos2``      (:func:`~gradlocate.gradients.ghost_inner_products`)
``k``         scattered entries: ``(row, position)`` pairs picked out of a batch,
              e.g. the scored (target) positions of an edit batch
``vocab``     the vocabulary: logits and probabilities
``d_model``   the residual stream's width (a site's output for the MLP down-projection)
``d_mlp``     the MLP's hidden width; for a :class:`~gradlocate.handles.Handle` the
              input width of the site, whatever it is (as ``Handles.d_mlp``)
``d_in``,     input and output widths of any linear map (a site's weight is
``d_out``     ``[d_out, d_in]``) when the code does not depend on it being the MLP's
``layers``    decoder layers (one score or value per layer)
``edits``     edit requests: one loss, score or per-sample product per edit
``texts``     retain texts (a corpus of plain text)
``samples``   causal tracing's noise samples (one corrupted run each)
``subject``   the subject's tokens inside a prompt (the corrupted span)
``*lead``     any number of leading dimensions (broadcast)
============  =====================================================================

``1`` is a literal dimension of size one (a single prompt). A scalar is ``""``.
A name's size is bound per call: ``rows`` in an argument and in the return value
of the same call are the same size; across calls nothing is shared.

Example:
    >>> import torch
    >>> from gradlocate.dims import Logits
    >>> from jaxtyping import jaxtyped
    >>> from beartype import beartype
    >>> @jaxtyped(typechecker=beartype)
    ... def last(logits: Logits) -> Float[Tensor, "rows vocab"]:
    ...     return logits[:, -1]
    >>> last(torch.zeros(2, 3, 5)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from typing import TypeAlias

from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["TokenIds", "Logits", "Weight", "Residual"]

#: A batch of token ids (input ids, labels, attention masks): ``[rows, pos]``.
TokenIds: TypeAlias = Int[Tensor, "rows pos"]
#: Logits of a batch: ``[rows, pos, vocab]``.
Logits: TypeAlias = Float[Tensor, "rows pos vocab"]
#: A site's weight as ``[d_out, d_in]`` (``[d_model, d_mlp]`` for a down-projection).
Weight: TypeAlias = Float[Tensor, "d_model d_mlp"]
#: Residual-stream activations of a batch: ``[rows, pos, d_model]``.
Residual: TypeAlias = Float[Tensor, "rows pos d_model"]

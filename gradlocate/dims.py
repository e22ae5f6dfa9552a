"""The names of tensor dimensions, one per meaning, used in every jaxtyping annotation.

A shape such as ``Float[Tensor, "rows pos d_model"]`` is checked when the tests run
(jaxtyping's pytest plugin with beartype, see ``pyproject.toml``): within one call,
every use of a name must have the same size. So a name means one thing everywhere:

| name | meaning |
|------|---------|
| `rows` | rows of a token batch: one sequence (a prompt, an edit, a text) each |
| `pos` | token positions of a (padded) batch or of one prompt; `pos-1`: the positions of next-token predictions (jaxtyping evaluates it) |
| `pos1`, `pos2` | the positions of two batches that are paired but padded separately (`gradients.ghost_inner_products`) |
| `k` | scattered entries: `(row, position)` pairs picked out of a batch, e.g. its scored (target) positions |
| `vocab` | the vocabulary: logits and probabilities |
| `d_model` | the residual stream's width (the output width of the MLP down-projection) |
| `d_mlp` | the MLP's hidden width; for a `Handle`, the input width of its site, whatever the site is (as `Handles.d_mlp`) |
| `d_in`, `d_out` | input and output widths of any linear map (a weight is `[d_out, d_in]`), where the code does not depend on it being the MLP's |
| `features` | the width of activations captured at any module, when it may be any of the widths above (`interventions.states`) |
| `layers` | decoder layers: one score or value per layer |
| `edits` | edit requests: one loss, score, weight change or per-sample product per edit |
| `texts` | retain texts (a corpus of plain text) |
| `samples` | causal tracing's noise samples (one corrupted run each) |
| `subject` | the subject's tokens inside a prompt (the span causal tracing corrupts) |
| `*lead` | any number of leading dimensions (broadcast) |
| `_` | a dimension left unchecked: OPT's flattened ``rows * pos`` (a product cannot be bound), positions after generation |

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
    >>> last(torch.zeros(3, 5))
    Traceback (most recent call last):
    ...
    jaxtyping.TypeCheckError: Type-check error whilst checking the parameters of ...
"""

from __future__ import annotations

from typing import TypeAlias

from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["TokenIds", "Logits", "Weight"]

#: A batch of token ids (input ids, labels, attention masks): ``[rows, pos]``.
TokenIds: TypeAlias = Int[Tensor, "rows pos"]
#: Logits of a batch: ``[rows, pos, vocab]``.
Logits: TypeAlias = Float[Tensor, "rows pos vocab"]
#: A site's weight as ``[d_out, d_in]`` (``[d_model, d_mlp]`` for a down-projection).
Weight: TypeAlias = Float[Tensor, "d_model d_mlp"]

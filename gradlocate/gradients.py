"""Per-layer gradient signals on the MLP down-projections.

Two kinds of signal, both computed for every selected layer from **one forward and
one backward per micro-batch** (never one pass per layer):

* :func:`edit_gradients` / :func:`retain_gradients`: the gradient of the edit loss
  (GradRatio eq. 1) or of the retain loss (eq. 2) with respect to each layer's
  down-projection weight ``W_l`` (``[d_model, d_mlp]``). By default only the squared
  Frobenius norms are returned; ``keep=True`` also returns the gradients.
* :func:`per_sample_inner_products`: for every edit ``i`` and layer ``l`` the inner
  product ``<grad_{W_l} L_a^i, grad_{W_l} L_b^i>`` of two per-sample gradients (LGA
  uses ``a`` = new target, ``b`` = old answer) computed with the *ghost* identity of
  :func:`ghost_inner_products`, never materialising a per-sample weight gradient.

Losses are computed in float32 and gradients are accumulated across micro-batches in
float32 buffers, so float16 / bfloat16 models accumulate in float32 too. Micro-batching
(``batch_size=``) gives the same result as one big batch (up to float rounding): the
edit loss is normalised by the total number of edits and the retain loss by the total
number of scored tokens, not per micro-batch.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> g = edit_gradients(model, [{"prompt": "Paris is in", "target_new": "Rome"}])
    >>> g.layers, len(g.sq_norms), g.grads is None
    ([0, 1], 2, True)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradlocate.data import EditRequest, as_edits, load_edits, load_texts, warn_duplicates
from gradlocate.handles import DownProjection, DownProjections, down_projections, find_tokenizer, instrumented
from gradlocate.losses import (
    IGNORE,
    NonFiniteLossError,
    TokenBatch,
    context_length,
    per_sample_nll,
    token_nll,
    tokenize_edits,
    tokenize_texts,
)
from gradlocate.memory import check_max_memory, micro_batch_size, sequence_bytes
from gradlocate.state import input_device, preserved

__all__ = [
    "LayerGradients",
    "SampleProducts",
    "edit_gradients",
    "retain_gradients",
    "ghost_inner_products",
    "per_sample_inner_products",
    "greedy_answers",
    "resolve_edits",
]


# --------------------------------------------------------------------------- results


@dataclass
class LayerGradients:
    """Per-layer gradients of one loss w.r.t. the down-projection weights.

    Attributes:
        kind: ``"edit"`` (GradRatio eq. 1) or ``"retain"`` (eq. 2).
        layers: the layer index of each entry.
        sq_norms: ``||grad_{W_l} L||_F^2`` per layer (float64 sums of float32 gradients).
        loss: the value of the loss (mean over edits, or mean over retain tokens).
        n_sequences: number of edits or retain texts.
        n_tokens: number of scored (target or next-token) positions.
        grads: with ``keep=True``, the gradients as ``[d_model, d_mlp]`` float32 tensors
            (canonical layout, on each layer's device); ``None`` otherwise.
        params: the options used.
        timings: wall times in seconds.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
        >>> g = retain_gradients(model, ["a short text", "another one"], keep=True)
        >>> tuple(g.grads[0].shape), g.n_sequences
        ((16, 64), 2)
    """

    kind: str
    layers: list[int]
    sq_norms: list[float]
    loss: float
    n_sequences: int
    n_tokens: int
    grads: list[Float[Tensor, "d_model d_mlp"]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sq_norms) != len(self.layers):
            raise ValueError("sq_norms must have one entry per layer")
        if self.grads is not None and len(self.grads) != len(self.layers):
            raise ValueError("grads must have one entry per layer")

    @property
    def norms(self) -> list[float]:
        """``||grad_{W_l} L||_F`` per layer."""
        return [math.sqrt(s) for s in self.sq_norms]

    def dot(self, other: LayerGradients) -> list[float]:
        """``<grad_l, other.grad_l>_F`` per layer (both need ``keep=True``)."""
        if self.grads is None or other.grads is None:
            raise ValueError("dot products need the gradients themselves: compute both with keep=True")
        if list(self.layers) != list(other.layers):
            raise ValueError(f"layer mismatch: {self.layers} vs {other.layers}")
        return [float((a.double() * b.to(a.device).double()).sum()) for a, b in zip(self.grads, other.grads)]

    def cosine(self, other: LayerGradients) -> list[float]:
        """Cosine similarity of the two gradients per layer (nan where a norm is 0)."""
        return [d / math.sqrt(a * b) if a > 0 and b > 0 else math.nan
                for d, a, b in zip(self.dot(other), self.sq_norms, other.sq_norms)]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the gradient tensors, as plain Python values."""
        return {"kind": self.kind, "layers": list(self.layers), "sq_norms": [float(s) for s in self.sq_norms],
                "loss": float(self.loss), "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
                "params": dict(self.params), "timings": dict(self.timings)}

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Bar chart of the squared gradient norm per layer. Returns the Axes."""
        from gradlocate.plotting import plot_layer_values

        return plot_layer_values(self.layers, self.sq_norms, ax=ax, log=log,
                                 ylabel=f"||grad L_{self.kind}||_F^2",
                                 title=f"{self.kind} loss {self.loss:.4g}: squared gradient norm per layer")

    def __repr__(self) -> str:
        top = max(range(len(self.layers)), key=lambda i: self.sq_norms[i])
        return (f"LayerGradients(kind={self.kind!r}, layers={len(self.layers)}, loss={self.loss:.4g}, "
                f"n_sequences={self.n_sequences}, n_tokens={self.n_tokens}, "
                f"max ||g||^2 = {self.sq_norms[top]:.4g} at layer {self.layers[top]}"
                f"{', grads kept' if self.grads is not None else ''})")


@dataclass
class SampleProducts:
    """Per-sample, per-layer gradient inner products (see :func:`per_sample_inner_products`).

    Attributes:
        layers: the layer index of each column.
        dot: ``[n_samples, n_layers]``: ``<grad_{W_l} L_a^i, grad_{W_l} L_b^i>_F``.
        sq_norm_a: ``[n_samples, n_layers]``: ``||grad_{W_l} L_a^i||_F^2``.
        sq_norm_b: ``[n_samples, n_layers]``: ``||grad_{W_l} L_b^i||_F^2``.
        loss_a / loss_b: ``[n_samples]``: the per-sample losses.
        timings: wall times in seconds.
    """

    layers: list[int]
    dot: Float[Tensor, "sample layer"]
    sq_norm_a: Float[Tensor, "sample layer"]
    sq_norm_b: Float[Tensor, "sample layer"]
    loss_a: Float[Tensor, " sample"]
    loss_b: Float[Tensor, " sample"]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cosine(self) -> Float[Tensor, "sample layer"]:
        """Per-sample cosine similarity of the two gradients (nan where a norm is 0)."""
        den = (self.sq_norm_a * self.sq_norm_b).sqrt()
        return torch.where(den > 0, self.dot / den, torch.full_like(den, math.nan))

    def __repr__(self) -> str:
        return f"SampleProducts(samples={self.dot.shape[0]}, layers={self.layers})"


# --------------------------------------------------------------------------- inputs


def resolve_edits(edits: Any) -> list[EditRequest]:
    """Edits as :class:`EditRequest` objects: from records in any public spelling, a
    ``datasets`` dataset, or a path / ``"zsre"`` / ``"counterfact"`` (read with
    :func:`~gradlocate.data.load_edits`). Raises ``ValueError`` on an empty set or an
    empty target."""
    if isinstance(edits, (str, os.PathLike)):
        out = load_edits(edits)
    else:
        out = as_edits(edits)
    for i, e in enumerate(out):
        if not e.target_new or not e.target_new.strip():
            raise ValueError(f"edit {i}: the target is empty (prompt {e.prompt!r})")
        if not e.prompt or not e.prompt.strip():
            raise ValueError(f"edit {i}: the prompt is empty")
    warn_duplicates(out)
    return out


def _handles(model: Any) -> DownProjections:
    # Selectors pass the DownProjections they already found: discovery walks the model.
    return model if isinstance(model, DownProjections) else down_projections(model)


def _setup(model: Any, tokenizer: Any, layers: Any) -> tuple[DownProjections, nn.Module, Any, list[int]]:
    hs = _handles(model)
    tok = find_tokenizer(hs.model, tokenizer)
    return hs, hs.root, tok, hs.layer_indices(layers)


def _edit_batch(tok: Any, root: nn.Module, prompts: Sequence[str], targets: Sequence[str],
                append_eos: bool) -> TokenBatch:
    # An edit longer than the context is an error (truncating would drop the target).
    return tokenize_edits(tok, list(prompts), list(targets), append_eos=append_eos,
                          max_length=context_length(root))


def _retain_batch(tok: Any, root: nn.Module, texts: Sequence[str], max_length: int | None) -> TokenBatch:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    batch = tokenize_texts(tok, list(texts), max_length=max_length, truncate=True)
    ctx = context_length(root)
    if ctx is not None and batch.input_ids.shape[1] > ctx:
        # Texts are cut to max_length by design; a shorter context cuts them further: say so.
        if max_length is not None:
            warnings.warn(f"retain texts cut to the model's context of {ctx} tokens (shorter than "
                          f"max_length={max_length})", stacklevel=3)
        batch = TokenBatch(batch.input_ids[:, :ctx], batch.attention_mask[:, :ctx], batch.labels[:, :ctx])
    return batch


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _bar(n: int, progress: bool | None, desc: str) -> Any:
    # progress=None: tqdm decides (shown on a terminal, hidden in logs and tests).
    return tqdm(total=n, desc=desc, disable=(None if progress is None else not progress), leave=False)


def _scored_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(row, position) of every logit that is scored: position ``t`` predicts ``labels[:, t + 1]``."""
    rows, pos = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows, pos


def _output_head(root: nn.Module) -> nn.Module | None:
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def _head_only_at(root: nn.Module, rows: Tensor, pos: Tensor) -> Iterator[None]:
    """Inside the block the output head (``lm_head``) runs only on the hidden states at
    ``(rows, pos)``, so the model returns logits ``[1, K, vocab]`` for those K positions.

    An edit scores a few target tokens of a longer sequence: skipping the vocabulary
    projection (and its backward) elsewhere saves a fifth of a small model's compute and
    changes no scored value. Any post-processing the model applies after the head
    (e.g. Gemma's logit soft-capping) still applies. The hook is removed afterwards.
    """
    head = _output_head(root)
    if head is None:
        yield
        return

    def gather(module: nn.Module, args: tuple) -> tuple:
        h = args[0]
        return (h[rows.to(h.device), pos.to(h.device)][None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _row_nll(logits: Tensor, labels: Tensor, rows: Tensor, pos: Tensor) -> Float[Tensor, " batch"]:
    """Per-row mean target NLL (as :func:`~gradlocate.losses.per_sample_nll`), from full
    logits ``[batch, pos, vocab]`` or from logits at the scored positions ``[1, K, vocab]``."""
    k = int(rows.numel())
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, k):
        return per_sample_nll(logits, labels)  # the model did not use its output head module
    rows, pos = rows.to(logits.device), pos.to(logits.device)
    target = labels.to(logits.device)[rows, pos + 1]
    nll = -logits[0].float().log_softmax(-1).gather(-1, target[:, None])[:, 0]
    n_rows = labels.shape[0]
    sums = torch.zeros(n_rows, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    counts = torch.bincount(rows, minlength=n_rows)
    if bool((counts == 0).any()):
        raise ValueError("a row has no scored tokens (empty target)")
    return sums / counts


# --------------------------------------------------------------------------- accumulated gradients


def _nonfinite_rows(logits: Tensor, at_rows: Tensor) -> list[int]:
    """Rows (of the micro-batch) whose logits hold a NaN or infinity."""
    bad = ~torch.isfinite(logits.detach()).all(-1)  # [rows, pos], or [1, K] at the scored positions
    if logits.dim() == 3 and tuple(logits.shape[:2]) == (1, at_rows.numel()):
        return sorted(set(at_rows[bad[0].to(at_rows.device)].tolist()))
    return bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()


def _accumulate(root: nn.Module, handles: Sequence[DownProjection], batch: TokenBatch,
                loss_of: Any, batch_size: int, progress: bool | None, desc: str,
                scored_only: bool = False, describe: Any = None) -> tuple[list[Tensor], float]:
    """Sum over micro-batches of ``grad loss_of(logits, labels, rows, pos)`` w.r.t. each
    handle's parameter (stored layout, float32), and the summed loss value. With
    ``scored_only`` the output head runs on the scored positions only (see
    :func:`_head_only_at`)."""
    params = [h.parameter for h in handles]
    dev = input_device(root)
    bufs: list[Tensor] | None = None
    total = 0.0
    # Longest sequences first and similar lengths together: less padding, and the peak
    # memory (set by the widest micro-batch) is reached at once.
    order = batch.attention_mask.sum(1).argsort(descending=True, stable=True)
    with preserved(root, params), torch.enable_grad(), _bar(len(batch), progress, desc) as bar:
        for rows in _chunks(len(batch), batch_size):
            mb = batch[order[rows]].to(dev)
            at_rows, at_pos = _scored_positions(mb.labels)
            with _head_only_at(root, at_rows, at_pos) if scored_only else contextlib.nullcontext():
                logits = _logits(root(input_ids=mb.input_ids, attention_mask=mb.attention_mask))
            loss = loss_of(logits, mb.labels.to(logits.device), at_rows, at_pos)
            if not bool(torch.isfinite(loss)):
                rows_idx = order[rows].tolist()
                local = _nonfinite_rows(logits, at_rows) or list(range(len(rows_idx)))
                bad = sorted(rows_idx[i] for i in local)
                names = "; ".join(describe(i) if describe else str(i) for i in bad[:5])
                raise NonFiniteLossError(
                    f"{desc}: the loss is {float(loss)} (non-finite outputs for {names}"
                    f"{' ...' if len(bad) > 5 else ''}); check the model for NaN/inf weights or overflow "
                    f"(e.g. float16: try bfloat16 or float32). No weight was changed"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            del logits
            # A layer the loss does not reach (e.g. cut off by a custom head) gets zeros.
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if bufs is None:
                # autograd returns fresh tensors: float32 ones become the buffers as is.
                bufs = [g.to(torch.float32) for g in grads]
            else:
                for b, g in zip(bufs, grads):
                    b.add_(g)
            del grads
            total += float(loss.detach())
            bar.update(rows.stop - rows.start)
    assert bufs is not None
    return bufs, total


def _finish(kind: str, handles: Sequence[DownProjection], bufs: list[Tensor], loss: float, n_seq: int,
            n_tok: int, keep: bool, params: dict[str, Any], t0: float) -> LayerGradients:
    sq = [float((b.double() ** 2).sum()) for b in bufs]
    bad = [h.layer for h, v in zip(handles, sq) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(f"{kind} gradients: the gradient norm is not finite at layer(s) {bad} "
                                 f"(overflow, or NaN/inf weights); no weight was changed")
    grads = [h.canonical(b) for h, b in zip(handles, bufs)] if keep else None
    return LayerGradients(kind, [h.layer for h in handles], sq, loss, n_seq, n_tok, grads, params,
                          {"gradients": time.perf_counter() - t0})


def edit_gradients(model: Any, edits: Any, *, tokenizer: Any = None, layers: Sequence[int] | int | None = None,
                   batch_size: int = 8, append_eos: bool = False, keep: bool = False,
                   progress: bool | None = None, max_memory: int | None = None) -> LayerGradients:
    """Gradient of the edit loss w.r.t. every selected layer's down-projection weight.

    The edit loss (GradRatio eq. 1) is, for each edit, the mean negative log-likelihood
    of the target tokens given the prompt (a space between them; prompt and padding
    masked), averaged over edits:
    ``L_edit = (1/N) sum_i (1/|y_i|) sum_t -log p(y_i,t | x_i, y_i,<t)``.

    One forward and one backward per micro-batch of ``batch_size`` edits gives every
    layer's gradient; only the selected down-projection weights require grad (flags,
    eval/train mode and ``.grad`` are left as they were).

    Args:
        model: a Hugging Face causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: :class:`~gradlocate.data.EditRequest` objects, dicts in the CounterFact /
            ZsRE / KnowEdit spellings, a dataset, or a path (see :func:`resolve_edits`).
        tokenizer: the model's tokenizer (found on the model if omitted).
        layers: layer indices (default: all).
        batch_size: edits per forward/backward (memory bound; same result for any value).
        append_eos: append EOS to each target (as LocFT-BF does).
        keep: also return the gradients (``[d_model, d_mlp]`` float32 per layer).
        progress: show a progress bar (default: only on a terminal).
        max_memory: a byte budget for activations: micro-batches shrink below
            ``batch_size`` to fit it (see :mod:`gradlocate.memory`); same result.

    Raises:
        ValueError: no edits, an empty target or one that tokenizes to nothing, an edit
            longer than the model's context, layers out of range.
        NonFiniteLossError: the loss is NaN or infinite (the message names the edits).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=3, d_model=16)
        >>> g = edit_gradients(model, [{"src": "Who wrote Hamlet?", "alt": "Marlowe"}], layers=[1, 2])
        >>> g.kind, g.layers, g.n_sequences
        ('edit', [1, 2], 1)
    """
    t0 = time.perf_counter()
    _check_batch_size(batch_size)
    check_max_memory(max_memory)
    edits = resolve_edits(edits)
    hs, root, tok, idx = _setup(model, tokenizer, layers)
    batch = _edit_batch(tok, root, [e.prompt for e in edits], [e.target_new for e in edits], append_eos)
    n = len(edits)
    bs = micro_batch_size(batch_size, max_memory, sequence_bytes(
        hs, batch.input_ids.shape[1], scored=int(batch.n_scored.max())), "edits")

    def loss_of(logits: Tensor, labels: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
        return _row_nll(logits, labels, rows, pos).sum() / n

    handles = [hs[i] for i in idx]
    bufs, loss = _accumulate(root, handles, batch, loss_of, bs, progress, "edit gradients", scored_only=True,
                             describe=lambda i: f"edit {i} ({edits[i].prompt!r} -> {edits[i].target_new!r})")
    params = {"batch_size": batch_size, "append_eos": append_eos, "micro_batch": bs}
    return _finish("edit", handles, bufs, loss, n, int(batch.n_scored.sum()), keep, params, t0)


def retain_gradients(model: Any, texts: Any, *, tokenizer: Any = None, layers: Sequence[int] | int | None = None,
                     batch_size: int = 8, max_length: int | None = 128, keep: bool = False,
                     progress: bool | None = None, max_memory: int | None = None) -> LayerGradients:
    """Gradient of the retain (language-model) loss w.r.t. every selected layer's
    down-projection weight.

    The retain loss (GradRatio eq. 2) is the mean next-token NLL over every non-padding
    token of every text: ``L_retain = (1/M) sum_j sum_t -log p(z_j,t | z_j,<t)``, ``M``
    the total number of scored tokens. Texts are cut to their first ``max_length`` tokens
    (GradRatio uses 128) and to the model's context (with a warning when that is shorter
    than ``max_length``).

    Arguments not listed below are as in :func:`edit_gradients`.

    Args:
        texts: a list of strings, or anything :func:`~gradlocate.data.load_texts` reads.
        max_length: truncate each text to this many tokens (``None``: the model's context).

    Raises:
        ValueError: no texts, a text of fewer than 2 tokens, layers out of range.
        NonFiniteLossError: the loss is NaN or infinite (the message names the texts).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=2, d_model=16)
        >>> g = retain_gradients(model, ["The sky is blue.", "Water is wet."])
        >>> g.kind, g.n_tokens == sum(len(t) - 1 for t in ["The sky is blue.", "Water is wet."])
        ('retain', True)
    """
    t0 = time.perf_counter()
    _check_batch_size(batch_size)
    check_max_memory(max_memory)
    texts = load_texts(texts)
    hs, root, tok, idx = _setup(model, tokenizer, layers)
    batch = _retain_batch(tok, root, texts, max_length)
    bs = micro_batch_size(batch_size, max_memory, sequence_bytes(hs, batch.input_ids.shape[1]), "retain texts")
    n_tok = int((batch.labels[:, 1:] != IGNORE).sum())

    def loss_of(logits: Tensor, labels: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
        # Normalised by the global token count so micro-batches add up to one batch.
        return token_nll(logits, labels).sum() / n_tok

    handles = [hs[i] for i in idx]
    bufs, loss = _accumulate(root, handles, batch, loss_of, bs, progress, "retain gradients",
                             describe=lambda i: f"text {i} ({texts[i][:40]!r})")
    params = {"batch_size": batch_size, "max_length": max_length, "micro_batch": bs}
    return _finish("retain", handles, bufs, loss, len(texts), n_tok, keep, params, t0)


# --------------------------------------------------------------------------- ghost inner products


def ghost_inner_products(a1: Float[Tensor, "batch pos1 d_in"], d1: Float[Tensor, "batch pos1 d_out"],
                         a2: Float[Tensor, "batch pos2 d_in"], d2: Float[Tensor, "batch pos2 d_out"]
                         ) -> Float[Tensor, " batch"]:
    """Per-row Frobenius inner products of two linear-layer weight gradients, from
    activations and output gradients only.

    For a linear map ``y_t = W a_t`` the gradient of a loss is ``grad W = sum_t d_t a_t^T``
    (``d_t = dL/dy_t``), so for two losses

    ``<grad W, grad W'>_F = sum_{t,s} (d_t . d'_s) (a_t . a'_s)``,

    computed here from two ``[pos1, pos2]`` Gram matrices per row: memory
    ``O(T (d_in + d_out) + T^2)`` per row instead of ``O(d_in d_out)``. Computed in
    float32 (half-precision inputs are upcast).

    Example:
        >>> import torch
        >>> a, d = torch.randn(2, 5, 6), torch.randn(2, 5, 3)
        >>> b, e = torch.randn(2, 4, 6), torch.randn(2, 4, 3)
        >>> full = (torch.einsum("btj,bti->bji", d, a) * torch.einsum("btj,bti->bji", e, b)).sum((1, 2))
        >>> torch.allclose(ghost_inner_products(a, d, b, e), full, rtol=1e-4, atol=1e-5)
        True
    """
    if a1.dim() != 3 or a2.dim() != 3 or d1.dim() != 3 or d2.dim() != 3:
        raise ValueError("ghost_inner_products takes [batch, pos, features] tensors")
    if a1.shape[:2] != d1.shape[:2] or a2.shape[:2] != d2.shape[:2]:
        raise ValueError(f"activations and gradients must share [batch, pos]: {tuple(a1.shape)} vs "
                         f"{tuple(d1.shape)}, {tuple(a2.shape)} vs {tuple(d2.shape)}")
    if a1.shape[0] != a2.shape[0] or a1.shape[2] != a2.shape[2] or d1.shape[2] != d2.shape[2]:
        raise ValueError("the two gradients must have the same batch size and layer shape")
    f = torch.float32 if a1.dtype in (torch.float16, torch.bfloat16, torch.float32) else a1.dtype
    gram_d = torch.bmm(d1.to(f), d2.to(f).transpose(1, 2))
    gram_a = torch.bmm(a1.to(f), a2.to(f).transpose(1, 2))
    return (gram_d * gram_a).sum((1, 2))


def _stack(x: TokenBatch, y: TokenBatch, pad_id: int) -> TokenBatch:
    """Rows of ``x`` then rows of ``y``, right-padded to a common width."""
    width = max(x.input_ids.shape[1], y.input_ids.shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return TokenBatch(torch.cat([pad(x.input_ids, pad_id), pad(y.input_ids, pad_id)]),
                      torch.cat([pad(x.attention_mask, 0), pad(y.attention_mask, 0)]),
                      torch.cat([pad(x.labels, IGNORE), pad(y.labels, IGNORE)]))


def _capture(root: nn.Module, traced: Any, handles: Sequence[DownProjection], batch: TokenBatch) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward and one backward of ``sum_i L^i`` (per-row mean target NLL) through
    nnsight: each handle's input activations and output gradients, and the per-row losses.

    Rows do not interact (a row's loss depends only on that row), so the gradient w.r.t.
    row ``i``'s activations is exactly the per-sample gradient of ``L^i``.
    """
    acts: list[Tensor] = []
    grads: list[Tensor] = []
    losses: list[Tensor] = []
    rows, pos = _scored_positions(batch.labels)
    # nnsight must meet the modules in the order the forward runs them (layers=[3, 0] too).
    order = sorted(range(len(handles)), key=lambda j: handles[j].layer)
    in_order = [handles[j] for j in order]
    with _head_only_at(root, rows, pos):
        # nnsight compiles this `with` body, so it is written out here, not wrapped.
        with traced.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
            outs = []
            for h in in_order:
                env = h.envoy(traced)
                acts.append(env.input.save())
                outs.append(env.output)
            per_row = _row_nll(_logits(traced.output), batch.labels, rows, pos)
            losses.append(per_row.detach().save())
            loss = per_row.sum()
            # inputs=outs: autograd stops at the activations and never touches a weight's .grad.
            with loss.backward(inputs=outs):
                for o in reversed(outs):
                    grads.append(o.grad.save())
    grads.reverse()
    back = sorted(range(len(order)), key=order.__getitem__)  # position of each handle in run order
    return [acts[k].detach() for k in back], [grads[k].detach() for k in back], losses[0]


def per_sample_inner_products(model: Any, prompts: Sequence[str], targets_a: Sequence[str],
                              targets_b: Sequence[str], *, tokenizer: Any = None,
                              layers: Sequence[int] | int | None = None, batch_size: int = 8,
                              append_eos: bool = False, progress: bool | None = None,
                              max_memory: int | None = None) -> SampleProducts:
    """``<grad_{W_l} L_a^i, grad_{W_l} L_b^i>_F`` for every sample ``i`` and layer ``l``,
    where ``L_a^i`` is the mean target NLL of ``targets_a[i]`` after ``prompts[i]`` (same
    for ``b``), ``W_l`` layer ``l``'s down-projection weight.

    Each chunk of ``batch_size`` samples gives ``2 * batch_size`` sequences (the ``a`` and
    ``b`` targets); sorted by length, they run in forward+backward passes of up to
    ``batch_size`` sequences (rows never interact, so a row's gradient is its own
    sample's), which capture every layer's down-projection inputs ``a`` and output
    gradients ``d`` through nnsight. The inner products and squared norms then follow from
    :func:`ghost_inner_products`. No per-sample weight gradient is materialised: memory
    per sample and layer is ``O(T (d_mlp + d_model))``, and only one chunk is held.
    ``max_memory`` (bytes) lowers ``batch_size`` until a chunk's estimated activations
    fit (see :mod:`gradlocate.memory`).

    Raises:
        NonFiniteLossError: a sample's loss or inner product is NaN or infinite (the
            message names the sample and the target).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=2, d_model=16)
        >>> p = per_sample_inner_products(model, ["Paris is in"], ["Italy"], ["France"])
        >>> tuple(p.dot.shape), bool((p.sq_norm_a > 0).all())
        ((1, 2), True)
    """
    t0 = time.perf_counter()
    _check_batch_size(batch_size)
    check_max_memory(max_memory)
    if not (len(prompts) == len(targets_a) == len(targets_b)):
        raise ValueError(f"{len(prompts)} prompts, {len(targets_a)} and {len(targets_b)} targets: lengths differ")
    hs, root, tok, idx = _setup(model, tokenizer, layers)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Row i: sample i with target a; row n + i: with target b.
    both = _stack(_edit_batch(tok, root, prompts, targets_a, append_eos),
                  _edit_batch(tok, root, prompts, targets_b, append_eos), pad_id)
    lengths = both.attention_mask.sum(1).tolist()
    handles = [hs[i] for i in idx]
    n, n_l = len(prompts), len(handles)
    # Per sample: its two rows' passes, and their captured activations and gradients (float32).
    kept = 2 * 4 * sum(h.d_model + h.d_mlp for h in handles)
    batch_size = micro_batch_size(batch_size, max_memory, 2 * sequence_bytes(
        hs, both.input_ids.shape[1], scored=int(both.n_scored.max()), stored_per_token=kept), "samples")
    out = {k: torch.zeros(n, n_l, dtype=torch.float64) for k in ("dot", "aa", "bb")}
    losses = torch.zeros(2 * n, dtype=torch.float64)
    dev = input_device(root)
    # Samples of similar length share a chunk, and rows of similar length a pass: less padding.
    order = sorted(range(n), key=lambda i: lengths[i] + lengths[n + i])
    t_capture = 0.0
    with preserved(root, [h.parameter for h in handles]), torch.enable_grad(), instrumented(root) as traced, \
            _bar(n, progress, "per-sample gradients") as bar:
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            t1 = time.perf_counter()
            store = _capture_rows(root, traced, handles, both, chunk + [n + i for i in chunk], lengths,
                                  batch_size, dev, losses)
            t_capture += time.perf_counter() - t1
            bad = [(i, t[i]) for base, t in ((0, targets_a), (n, targets_b)) for i in chunk
                   if not math.isfinite(float(losses[base + i]))]
            if bad:
                _raise_nonfinite("loss", [(i, prompts[i], t) for i, t in bad])
            for j in range(n_l):
                aa, da = _repad([store[i][0][j] for i in chunk]), _repad([store[i][1][j] for i in chunk])
                ab, db = _repad([store[n + i][0][j] for i in chunk]), _repad([store[n + i][1][j] for i in chunk])
                out["dot"][chunk, j] = ghost_inner_products(aa, da, ab, db).double().cpu()
                out["aa"][chunk, j] = ghost_inner_products(aa, da, aa, da).double().cpu()
                out["bb"][chunk, j] = ghost_inner_products(ab, db, ab, db).double().cpu()
            del store
            bad = [i for i in chunk if not all(bool(torch.isfinite(out[k][i]).all()) for k in out)]
            if bad:
                _raise_nonfinite("gradient inner product", [(i, prompts[i], targets_a[i]) for i in bad])
            bar.update(len(chunk))
    total = time.perf_counter() - t0
    return SampleProducts([h.layer for h in handles], out["dot"], out["aa"], out["bb"], losses[:n], losses[n:],
                          {"capture": t_capture, "ghost": total - t_capture, "total": total})


def _raise_nonfinite(what: str, samples: list[tuple[int, str, str]]) -> None:
    samples = sorted(samples, key=lambda s: s[0])
    names = "; ".join(f"sample {i} ({p!r} -> {t!r})" for i, p, t in samples[:5])
    raise NonFiniteLossError(
        f"per-sample gradients: the {what} is not finite for {names}{' ...' if len(samples) > 5 else ''}; "
        f"check the model for NaN/inf weights or overflow (e.g. float16: try bfloat16 or float32). "
        f"No weight was changed"
    )


def _capture_rows(root: nn.Module, traced: Any, handles: Sequence[DownProjection], both: TokenBatch,
                  rows: list[int], lengths: list[int], batch_size: int, dev: Any,
                  losses: Tensor) -> dict[int, tuple[list[Tensor], list[Tensor]]]:
    """Activations and output gradients of ``rows`` of ``both``, each trimmed to its
    real length, from passes of up to ``batch_size`` rows sorted by length; the
    per-row losses are written into ``losses``."""
    store: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    rows = sorted(rows, key=lambda r: lengths[r])
    for k in range(0, len(rows), batch_size):
        part = rows[k:k + batch_size]
        mb = both[torch.tensor(part)].to(dev)
        acts, grads, row_loss = _capture(root, traced, handles, mb)
        losses[part] = row_loss.double().cpu()
        for m, r in enumerate(part):
            store[r] = ([a[m, :lengths[r]] for a in acts], [g[m, :lengths[r]] for g in grads])
    return store


def _repad(seqs: list[Tensor]) -> Tensor:
    """``[pos, d]`` tensors as one zero-padded ``[len, max_pos, d]`` batch (zero rows add
    nothing to a ghost inner product)."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)


# --------------------------------------------------------------------------- old answers


_STOP = ("\n", ".")


@torch.no_grad()
def greedy_answers(model: Any, prompts: Sequence[str], *, tokenizer: Any = None,
                   max_new_tokens: int = 8) -> list[str]:
    """The model's own greedy continuation of each prompt, as a short answer: up to
    ``max_new_tokens`` tokens, stopping at EOS, a newline or a period once some text has
    been produced (leading whitespace is skipped), stripped.

    Used by :func:`~gradlocate.selectors.lga` when an edit has no old answer.

    Raises:
        ValueError: the model produces no text for a prompt within ``max_new_tokens``.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=1, d_model=16)
        >>> isinstance(greedy_answers(model, ["Paris is in"], max_new_tokens=3)[0], str)
        True
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    hs = _handles(model)
    root = hs.root
    tok = find_tokenizer(hs.model, tokenizer)
    dev = input_device(root)
    eos = getattr(tok, "eos_token_id", None)
    ctx = context_length(root)
    answers = []
    with preserved(root):
        for i, p in enumerate(prompts):
            ids = list(tok(p)["input_ids"])
            if ctx is not None and len(ids) >= ctx:
                raise ValueError(f"edit {i}: the prompt is {len(ids)} tokens, no shorter than the model's context of "
                                 f"{ctx}: no room to generate its old answer; shorten the prompt")
            new: list[int] = []
            text = ""
            for _ in range(max_new_tokens):
                if ctx is not None and len(ids) + len(new) >= ctx:
                    break
                x = torch.tensor([ids + new], device=dev)
                nxt = int(_logits(root(input_ids=x)).float()[0, -1].argmax())
                if nxt == eos:
                    break
                cand = tok.decode(new + [nxt])
                if text.strip() and any(s in cand[len(text):] for s in _STOP):
                    break
                new.append(nxt)
                text = cand
            answer = text.strip()
            for s in _STOP:
                answer = answer.split(s)[0].strip()
            if not answer:
                raise ValueError(
                    f"edit {i}: no old answer given (ground_truth / pred) and the model's greedy "
                    f"continuation of {p!r} is empty within {max_new_tokens} tokens; give ground_truth"
                )
            answers.append(answer)
    return answers

"""Per-layer gradient signals on the editing sites (the MLP down-projections).

Two kinds of signal, both for every selected layer from **one forward and one backward
per micro-batch** (never one pass per layer):

* :func:`edit_gradients` / :func:`retain_gradients`: the gradient of the edit loss
  (GradRatio eq. 1, :func:`~gradlocate.losses.edit_nll`) or of the retain loss (eq. 2)
  with respect to each layer's site weight ``W_l`` (``[d_model, d_mlp]``). By default
  only the squared Frobenius norms are returned; ``keep=True`` also returns the gradients.
* :func:`per_sample_inner_products`: for every edit ``i`` and layer ``l`` the inner
  product ``<grad_{W_l} L_a^i, grad_{W_l} L_b^i>`` of two per-sample gradients (LGA
  uses ``a`` = new target, ``b`` = old answer) computed with the *ghost* identity of
  :func:`ghost_inner_products`, never materialising a per-sample weight gradient.

Losses are computed in float32 and gradients accumulated across micro-batches in
float32, so half-precision models accumulate in float32 too. ``batch_size`` (sequences
per forward) changes memory, never the result: the edit loss is normalised by the total
number of edits, the retain loss by the total number of scored tokens.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> g = edit_gradients(model, [{"prompt": "Paris is in", "target_new": "Rome"}])
    >>> g.loss_kind, g.layers, len(g.sq_norms), g.grads is None
    ('edit', [0, 1], 2, True)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from gradlocate.data import as_edits, load_texts
from gradlocate.dims import Weight
from gradlocate.handles import Handle, Handles, LayerSelection, resolve
from gradlocate.interventions import capture, head_at, require_gradients, run, states, using
from gradlocate.losses import (
    IGNORE,
    SELECTOR_APPEND_EOS,
    NonFiniteLossError,
    TokenBatch,
    context_length,
    edit_nll,
    logits_of,
    per_sample_nll,
    scored_positions,
    token_nll,
    tokenize_edits,
    tokenize_texts,
)
from gradlocate.memory import check_max_memory, micro_batch_size, sequence_bytes
from gradlocate.state import input_device

__all__ = [
    "LayerGradients",
    "SampleProducts",
    "edit_loss",
    "edit_gradients",
    "retain_gradients",
    "ghost_inner_products",
    "per_sample_inner_products",
]


# --------------------------------------------------------------------------- results


@dataclass
class LayerGradients:
    """Per-layer gradients of one loss w.r.t. the site weights.

    Attributes:
        loss_kind: ``"edit"`` (GradRatio eq. 1) or ``"retain"`` (eq. 2).
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

    loss_kind: str
    layers: list[int]
    sq_norms: list[float]
    loss: float
    n_sequences: int
    n_tokens: int
    grads: list[Weight] | None = None
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
        return {"loss_kind": self.loss_kind, "layers": list(self.layers), "sq_norms": [float(s) for s in self.sq_norms],
                "loss": float(self.loss), "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
                "params": dict(self.params), "timings": dict(self.timings)}

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Bar chart of the squared gradient norm per layer. Returns the Axes."""
        from gradlocate.plotting import plot_layer_values

        return plot_layer_values(self.layers, self.sq_norms, ax=ax, log=log,
                                 ylabel=f"||grad L_{self.loss_kind}||_F^2",
                                 title=f"{self.loss_kind} loss {self.loss:.4g}: squared gradient norm per layer")

    def __repr__(self) -> str:
        top = max(range(len(self.layers)), key=lambda i: self.sq_norms[i])
        return (f"LayerGradients(loss_kind={self.loss_kind!r}, layers={len(self.layers)}, loss={self.loss:.4g}, "
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
    dot: Float[Tensor, "edits layers"]
    sq_norm_a: Float[Tensor, "edits layers"]
    sq_norm_b: Float[Tensor, "edits layers"]
    loss_a: Float[Tensor, " edits"]
    loss_b: Float[Tensor, " edits"]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cosine(self) -> Float[Tensor, "edits layers"]:
        """Per-sample cosine similarity of the two gradients (nan where a norm is 0)."""
        den = (self.sq_norm_a * self.sq_norm_b).sqrt()
        return torch.where(den > 0, self.dot / den, torch.full_like(den, math.nan))

    def __repr__(self) -> str:
        return f"SampleProducts(samples={self.dot.shape[0]}, layers={self.layers})"


# --------------------------------------------------------------------------- inputs


def check_batch_size(batch_size: Any) -> None:
    """``batch_size`` (sequences per forward) must be a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (sequences per forward), got {batch_size!r}")


def edit_batch(h: Handles, prompts: Sequence[str], targets: Sequence[str], append_eos: bool) -> TokenBatch:
    """The edits tokenized as the edit loss scores them. An edit longer than the
    context is an error (truncating would drop the target)."""
    return tokenize_edits(h.require_tokenizer(), list(prompts), list(targets), append_eos=append_eos,
                          max_length=context_length(h.root), chat=h.chat)


def _retain_batch(h: Handles, texts: Sequence[str], max_length: int | None) -> TokenBatch:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    batch = tokenize_texts(h.require_tokenizer(), list(texts), max_length=max_length, truncate=True)
    ctx = context_length(h.root)
    if ctx is not None and batch.input_ids.shape[1] > ctx:
        # Texts are cut to max_length by design; a shorter context cuts them further: say so.
        if max_length is not None:
            warnings.warn(f"retain texts cut to the model's context of {ctx} tokens (shorter than "
                          f"max_length={max_length})", stacklevel=3)
        batch = TokenBatch(batch.input_ids[:, :ctx], batch.attention_mask[:, :ctx], batch.labels[:, :ctx])
    return batch


def _bar(n: int, progress: bool | None, desc: str) -> Any:
    # progress=None: tqdm decides (shown on a terminal, hidden in logs and tests).
    return tqdm(total=n, desc=desc, disable=(None if progress is None else not progress), leave=False)


# --------------------------------------------------------------------------- accumulated gradients


def _accumulate(h: Handles, handles: Sequence[Handle], batch: TokenBatch, loss_of: Callable[[Tensor, Tensor], Tensor],
                batch_size: int, progress: bool | None, desc: str, scored_only: bool,
                describe: Callable[[int], str]) -> tuple[list[Tensor], float]:
    """Sum over micro-batches of ``grad loss_of(logits, labels)`` w.r.t. each handle's
    weight (stored layout, float32) and the summed loss. With ``scored_only`` the head
    runs at the scored positions only."""
    params = [x.parameter for x in handles]
    dev = input_device(h.root)
    bufs: list[Tensor] | None = None
    total = 0.0
    # Longest sequences first, similar lengths together: less padding, peak memory at once.
    order = batch.attention_mask.sum(1).argsort(descending=True, stable=True)
    with using(h, params), torch.enable_grad(), _bar(len(batch), progress, desc) as bar:
        for start in range(0, len(batch), batch_size):
            idx = order[start:start + batch_size]
            mb = batch[idx].to(dev)
            rows, pos = scored_positions(mb.labels)
            with head_at(h, rows, pos) if scored_only else contextlib.nullcontext():
                logits = logits_of(run(h, input_ids=mb.input_ids, attention_mask=mb.attention_mask))
            loss = loss_of(logits, mb.labels)
            if not bool(torch.isfinite(loss)):
                bad = sorted(idx.tolist())
                names = "; ".join(describe(i) for i in bad[:5])
                raise NonFiniteLossError(
                    f"{desc}: the loss is {float(loss)} (in the micro-batch of {names}{' ...' if len(bad) > 5 else ''}); "
                    f"check the model for NaN/inf weights or overflow (e.g. float16: try bfloat16 or float32). "
                    f"No weight was changed")
            found = torch.autograd.grad(loss, params, allow_unused=True)
            # A layer the loss does not reach (e.g. cut off by a custom head) gets zeros.
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]
            if bufs is None:
                bufs = [g.to(torch.float32) for g in grads]
            else:
                for b, g in zip(bufs, grads):
                    b.add_(g)
            total += float(loss.detach())
            bar.update(len(idx))
    assert bufs is not None
    return bufs, total


def _finish(loss_kind: str, handles: Sequence[Handle], bufs: list[Tensor], loss: float, n_seq: int, n_tok: int,
            keep: bool, params: dict[str, Any], t0: float) -> LayerGradients:
    sq = [float((b.double() ** 2).sum()) for b in bufs]
    bad = [x.layer for x, v in zip(handles, sq) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(f"{loss_kind} gradients: the gradient norm is not finite at layer(s) {bad} "
                                 f"(overflow, or NaN/inf weights); no weight was changed")
    grads = [x.canonical(b) for x, b in zip(handles, bufs)] if keep else None
    return LayerGradients(loss_kind, [x.layer for x in handles], sq, loss, n_seq, n_tok, grads, params,
                          {"gradients": time.perf_counter() - t0})


def edit_loss(model: Any, batch: TokenBatch) -> Float[Tensor, ""]:
    """GradRatio eq. 1: mean over edits of the mean target-token NLL. ``model`` is a
    model or its :class:`~gradlocate.handles.Handles`; the forward goes through
    :func:`~gradlocate.interventions.run` (eval mode, like every gradlocate forward) and
    the loss stays differentiable in every weight that requires a gradient."""
    h = resolve(model)
    params = [p for p in h.root.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    with using(h, params):
        out = run(h, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return per_sample_nll(logits_of(out), batch.labels).mean()


def edit_gradients(model: Any, edits: Any, *, tokenizer: Any = None, layers: LayerSelection = None,
                   batch_size: int = 8, append_eos: bool = SELECTOR_APPEND_EOS, keep: bool = False,
                   progress: bool | None = None, max_memory: int | None = None) -> LayerGradients:
    """Gradient of the edit loss w.r.t. every selected layer's site weight.

    The edit loss (GradRatio eq. 1, :func:`~gradlocate.losses.edit_nll`) is, for each
    edit, the mean negative log-likelihood of the target tokens (and EOS with
    ``append_eos=True``) given the prompt, averaged over edits:
    ``L_edit = (1/N) sum_i (1/|y_i|) sum_t -log p(y_i,t | x_i, y_i,<t)``.

    One forward and one backward per micro-batch of ``batch_size`` edits gives every
    layer's gradient; only the selected weights require grad (flags, eval/train mode
    and ``.grad`` are left as they were). The head runs at the target positions only.

    Args:
        model: a Hugging Face causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :func:`~gradlocate.handles.down_projections`' :class:`~gradlocate.handles.Handles`.
        edits: :class:`~gradlocate.data.EditRequest` objects, dicts in any public
            spelling, a dataset, or a path (see :func:`~gradlocate.data.as_edits`).
        tokenizer: the model's tokenizer (found on the model if omitted).
        layers: layer indices (default: all).
        batch_size: sequences per forward/backward (memory only; same result).
        append_eos: score EOS after each target (default
            :data:`~gradlocate.losses.SELECTOR_APPEND_EOS`: the answer tokens only, as the
            selectors' papers define the loss; ``True`` scores LocFT-BF's training loss).
        keep: also return the gradients (``[d_model, d_mlp]`` float32 per layer).
        progress: show a progress bar (``None``: only on a terminal).
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
        >>> g.loss_kind, g.layers, g.n_sequences
        ('edit', [1, 2], 1)
    """
    t0 = time.perf_counter()
    require_gradients("edit_gradients")
    check_batch_size(batch_size)
    check_max_memory(max_memory)
    h = resolve(model, tokenizer)
    edits = as_edits(edits)
    idx = h.layer_indices(layers)
    batch = edit_batch(h, [e.prompt for e in edits], [e.target_new for e in edits], append_eos)
    n = len(edits)
    bs = micro_batch_size(batch_size, max_memory, sequence_bytes(
        h, batch.input_ids.shape[1], scored=int(batch.n_scored.max())), "edits")
    handles = [h[i] for i in idx]
    at = h.head is not None  # the head at the target positions only (a model without one: full logits)
    bufs, loss = _accumulate(
        h, handles, batch, lambda logits, labels: edit_nll(logits, labels, scored_only=at).sum() / n, bs, progress,
        "edit gradients", at, lambda i: f"edit {i} ({edits[i].prompt!r} -> {edits[i].target_new!r})")
    params = {"batch_size": batch_size, "append_eos": append_eos, "micro_batch": bs}
    return _finish("edit", handles, bufs, loss, n, int(batch.n_scored.sum()), keep, params, t0)


def retain_gradients(model: Any, texts: Any, *, tokenizer: Any = None, layers: LayerSelection = None,
                     batch_size: int = 8, max_length: int | None = 128, keep: bool = False,
                     progress: bool | None = None, max_memory: int | None = None) -> LayerGradients:
    """Gradient of the retain (language-model) loss w.r.t. every selected layer's site weight.

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
        >>> g.loss_kind, g.n_tokens == sum(len(t) - 1 for t in ["The sky is blue.", "Water is wet."])
        ('retain', True)
    """
    t0 = time.perf_counter()
    require_gradients("retain_gradients")
    check_batch_size(batch_size)
    check_max_memory(max_memory)
    texts = load_texts(texts)
    h = resolve(model, tokenizer)
    idx = h.layer_indices(layers)
    batch = _retain_batch(h, texts, max_length)
    bs = micro_batch_size(batch_size, max_memory, sequence_bytes(h, batch.input_ids.shape[1]), "retain texts")
    n_tok = int((batch.labels[:, 1:] != IGNORE).sum())
    handles = [h[i] for i in idx]
    # Normalised by the global token count so micro-batches add up to one batch.
    bufs, loss = _accumulate(h, handles, batch, lambda logits, labels: token_nll(logits, labels).sum() / n_tok,
                             bs, progress, "retain gradients", False, lambda i: f"text {i} ({texts[i][:40]!r})")
    params = {"batch_size": batch_size, "max_length": max_length, "micro_batch": bs}
    return _finish("retain", handles, bufs, loss, len(texts), n_tok, keep, params, t0)


# --------------------------------------------------------------------------- ghost inner products


def ghost_inner_products(a1: Float[Tensor, "rows pos1 d_in"], d1: Float[Tensor, "rows pos1 d_out"],
                         a2: Float[Tensor, "rows pos2 d_in"], d2: Float[Tensor, "rows pos2 d_out"]
                         ) -> Float[Tensor, " rows"]:
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
        raise ValueError("ghost_inner_products takes [rows, pos, features] tensors")
    if a1.shape[:2] != d1.shape[:2] or a2.shape[:2] != d2.shape[:2]:
        raise ValueError(f"activations and gradients must share [rows, pos]: {tuple(a1.shape)} vs "
                         f"{tuple(d1.shape)}, {tuple(a2.shape)} vs {tuple(d2.shape)}")
    if a1.shape[0] != a2.shape[0] or a1.shape[2] != a2.shape[2] or d1.shape[2] != d2.shape[2]:
        raise ValueError("the two gradients must have the same batch size and layer shape")
    f = torch.float32 if a1.dtype in (torch.float16, torch.bfloat16, torch.float32) else a1.dtype
    gram_d = torch.einsum("rto,rso->rts", d1.to(f), d2.to(f))  # rows, pos1 (t), pos2 (s), d_out (o)
    gram_a = torch.einsum("rti,rsi->rts", a1.to(f), a2.to(f))  # d_in (i)
    return torch.einsum("rts,rts->r", gram_d, gram_a)


def _capture_rows(h: Handles, handles: Sequence[Handle], mb: TokenBatch) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward and one backward of ``sum_i L^i`` (per-row edit loss): each site's
    input activations and output gradients, and the per-row losses.

    Rows do not interact (a row's loss depends only on that row), so the gradient w.r.t.
    row ``i``'s activations is exactly the per-sample gradient of ``L^i``."""
    paths = [x.path for x in handles]
    rows, pos = scored_positions(mb.labels)
    at = h.head is not None
    with capture(h, paths, inputs=True) as cap, head_at(h, rows, pos) if at else contextlib.nullcontext():
        logits = logits_of(run(h, input_ids=mb.input_ids, attention_mask=mb.attention_mask))
    per_row = edit_nll(logits, mb.labels, scored_only=at)
    # Gradients into the activations only: no weight's .grad is touched.
    grads = cap.grads(per_row.sum(), paths)
    rows_n = len(mb)
    return ([states(cap.inputs[p].detach(), rows_n) for p in paths], [states(g.detach(), rows_n) for g in grads],
            per_row.detach())


def per_sample_inner_products(model: Any, prompts: Sequence[str], targets_a: Sequence[str],
                              targets_b: Sequence[str], *, tokenizer: Any = None,
                              layers: LayerSelection = None, batch_size: int = 8,
                              append_eos: bool = SELECTOR_APPEND_EOS, progress: bool | None = None,
                              max_memory: int | None = None) -> SampleProducts:
    """``<grad_{W_l} L_a^i, grad_{W_l} L_b^i>_F`` for every sample ``i`` and layer ``l``,
    where ``L_a^i`` is the edit loss of ``targets_a[i]`` after ``prompts[i]`` (same for
    ``b``), ``W_l`` layer ``l``'s site weight.

    Each chunk of ``batch_size`` samples gives ``2 * batch_size`` sequences (the ``a`` and
    ``b`` targets); sorted by length, they run in forward+backward passes of up to
    ``batch_size`` sequences (rows never interact, so a row's gradient is its own
    sample's), capturing every site's inputs ``a`` and output gradients ``d``. The inner
    products and squared norms follow from :func:`ghost_inner_products`. No per-sample
    weight gradient is materialised: memory per sample and layer is
    ``O(T (d_mlp + d_model))``, and only one chunk is held. ``max_memory`` (bytes) lowers
    ``batch_size`` until a chunk's estimated activations fit. ``append_eos`` is as in
    :func:`edit_gradients` (default: the answer tokens only).

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
    require_gradients("per_sample_inner_products")
    check_batch_size(batch_size)
    check_max_memory(max_memory)
    if not (len(prompts) == len(targets_a) == len(targets_b)):
        raise ValueError(f"{len(prompts)} prompts, {len(targets_a)} and {len(targets_b)} targets: lengths differ")
    h = resolve(model, tokenizer)
    idx = h.layer_indices(layers)
    n = len(prompts)
    a_rows, b_rows = edit_batch(h, prompts, targets_a, append_eos), edit_batch(h, prompts, targets_b, append_eos)
    both = _stack(a_rows, b_rows, h.require_tokenizer().pad_token_id or 0)  # row i: target a; row n + i: target b
    lengths = both.attention_mask.sum(1).tolist()
    handles = [h[i] for i in idx]
    kept = 2 * 4 * sum(x.d_model + x.d_mlp for x in handles)  # captured activations and gradients, float32
    batch_size = micro_batch_size(batch_size, max_memory, 2 * sequence_bytes(
        h, both.input_ids.shape[1], scored=int(both.n_scored.max()), stored_per_token=kept), "samples")
    out = {k: torch.zeros(n, len(handles), dtype=torch.float64) for k in ("dot", "aa", "bb")}
    losses = torch.zeros(2 * n, dtype=torch.float64)
    dev = input_device(h.root)
    # Samples of similar length share a chunk, and rows of similar length a pass: less padding.
    order = sorted(range(n), key=lambda i: lengths[i] + lengths[n + i])
    t_capture = 0.0
    with using(h, [x.parameter for x in handles]), torch.enable_grad(), _bar(n, progress, "per-sample gradients") as bar:
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            t1 = time.perf_counter()
            store: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
            rows = sorted(chunk + [n + i for i in chunk], key=lambda r: lengths[r])
            for k in range(0, len(rows), batch_size):
                part = rows[k:k + batch_size]
                acts, grads, row_loss = _capture_rows(h, handles, both[torch.tensor(part)].to(dev))
                losses[part] = row_loss.double().cpu()
                for m, r in enumerate(part):
                    store[r] = ([a[m, :lengths[r]] for a in acts], [g[m, :lengths[r]] for g in grads])
            t_capture += time.perf_counter() - t1
            bad = [(i, t[i]) for base, t in ((0, targets_a), (n, targets_b)) for i in chunk
                   if not math.isfinite(float(losses[base + i]))]
            if bad:
                _raise_nonfinite("loss", [(i, prompts[i], t) for i, t in bad])
            for j in range(len(handles)):
                aa, da = _repad([store[i][0][j] for i in chunk]), _repad([store[i][1][j] for i in chunk])
                ab, db = _repad([store[n + i][0][j] for i in chunk]), _repad([store[n + i][1][j] for i in chunk])
                out["dot"][chunk, j] = ghost_inner_products(aa, da, ab, db).double().cpu()
                out["aa"][chunk, j] = ghost_inner_products(aa, da, aa, da).double().cpu()
                out["bb"][chunk, j] = ghost_inner_products(ab, db, ab, db).double().cpu()
            bad_rows = [i for i in chunk if not all(bool(torch.isfinite(out[k][i]).all()) for k in out)]
            if bad_rows:
                _raise_nonfinite("gradient inner product", [(i, prompts[i], targets_a[i]) for i in bad_rows])
            bar.update(len(chunk))
    total = time.perf_counter() - t0
    return SampleProducts([x.layer for x in handles], out["dot"], out["aa"], out["bb"], losses[:n], losses[n:],
                          {"capture": t_capture, "ghost": total - t_capture, "total": total})


def _stack(x: TokenBatch, y: TokenBatch, pad_id: int) -> TokenBatch:
    """Rows of ``x`` then rows of ``y``, right-padded to a common width."""
    width = max(x.input_ids.shape[1], y.input_ids.shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return TokenBatch(torch.cat([pad(x.input_ids, pad_id), pad(y.input_ids, pad_id)]),
                      torch.cat([pad(x.attention_mask, 0), pad(y.attention_mask, 0)]),
                      torch.cat([pad(x.labels, IGNORE), pad(y.labels, IGNORE)]))


def _raise_nonfinite(what: str, samples: list[tuple[int, str, str]]) -> None:
    samples = sorted(samples, key=lambda s: s[0])
    names = "; ".join(f"sample {i} ({p!r} -> {t!r})" for i, p, t in samples[:5])
    raise NonFiniteLossError(
        f"per-sample gradients: the {what} is not finite for {names}{' ...' if len(samples) > 5 else ''}; "
        f"check the model for NaN/inf weights or overflow (e.g. float16: try bfloat16 or float32). "
        f"No weight was changed")


def _repad(seqs: list[Tensor]) -> Tensor:
    """``[pos, d]`` tensors as one zero-padded ``[len, max_pos, d]`` batch (zero rows add
    nothing to a ghost inner product)."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)

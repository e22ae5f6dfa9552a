"""How the LocFT-BF trainer computes a mini-batch's losses: one executor, three options.

The trainer's loop (:class:`~gradlocate.editors.locft.LocFTBF`) asks an :class:`Executor` for
the edit loss of each edit in a mini-batch. The plain executor runs the whole model
and reads the loss off its full logits - the reference. Two optional speed-ups plug in,
each proven equal to the plain executor by ``tests/test_editing.py``:

* **the activation cache** (``cache="down_input"`` or ``"residual"``): the blocks below
  the edited layer never change, so their output is computed once per ``fit`` and the
  forwards start there (:func:`~gradlocate.interventions.from_layer`). When the edited
  block is *residual-additive* (its output is ``c + site(x)``, checked numerically: true
  of LLaMA, GPT-2, OPT, NeoX ...) the cache holds ``c`` and the site's input ``x`` and a
  step runs only the site and the blocks above; otherwise (e.g. Gemma's
  post-feed-forward norm) it holds the stream entering the edited block.
* **the selective head** (``head="select"``: the LM head only at the scored positions,
  :func:`~gradlocate.interventions.head_at`; ``"fused"``: the head does not run and the
  loss comes from :func:`~gradlocate.losses.head_nll`, one pass over the head's weight).

Example:
    >>> import torch
    >>> from gradlocate import down_projections
    >>> from gradlocate.gradients import edit_batch
    >>> from gradlocate.interventions import using
    >>> from gradlocate.models import tiny
    >>> h = down_projections(tiny("llama", n_layers=3, d_model=16)[0])
    >>> batch = edit_batch(h, ["Paris is in"], ["Rome"], True)
    >>> with using(h), torch.no_grad(), Executor(h, 2, batch) as plain, Executor(h, 2, batch, "down_input", "fused") as fast:
    ...     bool(torch.allclose(plain.losses(torch.tensor([0])), fast.losses(torch.tensor([0])), atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gradlocate.handles import Handles
from gradlocate.interventions import (capture, edited, from_layer, head_at, no_cache, replaced, rewrap, rewrappable,
                                      run, stop_after)
from gradlocate.losses import TokenBatch, edit_nll, head_nll, logits_of, row_means, scored_positions

__all__ = ["Executor", "CACHE_MODES", "HEAD_MODES", "cache_mode", "probe_additive", "row_delta"]

CACHE_MODES = ("none", "down_input", "residual")
HEAD_MODES = ("full", "select", "fused")
#: Rows per forward when building the cache.
_CHUNK = 64


class Executor:
    """The losses of a tokenized edit set's rows at the current weight of ``layer``'s site.

    A context manager: entering builds the activation cache (``cache`` not ``"none"``).
    Use inside :func:`~gradlocate.interventions.using`.
    """

    def __init__(self, h: Handles, layer: int, batch: TokenBatch, cache: str = "none", head: str = "full",
                 delta: Float[Tensor, "rows d_out d_in"] | None = None):
        if cache not in CACHE_MODES or head not in HEAD_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES} and head one of {HEAD_MODES}, got {cache!r}, {head!r}")
        if cache == "residual" and layer == 0:
            raise ValueError("cache='residual' needs a layer above 0: nothing runs below layer 0")
        self.h, self.layer, self.batch, self.cache, self.head = h, layer, batch, cache, head
        self.site = h[layer]
        self.cached: dict[str, Tensor] = {}
        self.like: Any = None  # a block output, for the structure a skipped block must return
        # With ``delta`` [rows, d_out, d_in], row r of the batch sees the site's weight plus delta[r]
        # (the sample-wise sweep: every edit with its own weight, no copy of the model).
        self.delta = delta

    def __enter__(self) -> Executor:
        if self.cache != "none":
            self.cached = self._build()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cached = {}

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cached.values())

    def losses(self, rows: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        """Each row's edit loss (float32, differentiable in the site's weight)."""
        mb = self.batch[rows]
        r, p = scored_positions(mb.labels)
        width = mb.input_ids.shape[1]
        kept: list[Tensor] = []
        d = self.delta
        if d is not None and not (len(rows) == len(d) and bool((rows.cpu() == torch.arange(len(d))).all())):
            d = d[rows]  # a copy (and a scatter in the backward): only when some rows have stopped
        with contextlib.ExitStack() as stack:
            if self.cache == "down_input":  # blocks 0..layer skipped: the edited block's output is c + site(x)
                def entering() -> Any:
                    x = self.cached["x"][rows, :width]
                    out = self.cached["c"][rows, :width] + self.site.module(x)
                    return rewrap(self.like, out if d is None else out + row_delta(x, d))

                stack.enter_context(from_layer(self.h, self.layer + 1, entering))
            elif d is not None:
                stack.enter_context(edited(self.h, self.site.path, lambda x, out: out + row_delta(x, d)))
            if self.cache == "residual":
                stack.enter_context(from_layer(self.h, self.layer,
                                               lambda: rewrap(self.like, self.cached["h"][rows, :width])))
            if self.head == "select":
                stack.enter_context(head_at(self.h, r, p))
            elif self.head == "fused":
                def keep(x: Tensor) -> Tensor:  # the head's input; a [1, k, 1] stand-in for its logits
                    kept.append(x)
                    return x[None, :, :1]

                stack.enter_context(head_at(self.h, r, p, skip=keep))
            out = run(self.h, input_ids=mb.input_ids, attention_mask=mb.attention_mask, **no_cache(self.h.root))
        if self.head == "fused":
            target = mb.labels[r, p + 1].to(kept[0].device)
            return row_means(head_nll(kept[0], self.h.head, target), r.to(kept[0].device), len(rows))
        return edit_nll(logits_of(out), mb.labels, scored_only=self.head == "select")

    @torch.no_grad()
    def _build(self) -> dict[str, Tensor]:
        """Run every edit (padded to the full width, in chunks) up to the edited block and
        keep what the steps start from."""
        block = self.h.block_paths[self.layer if self.cache == "down_input" else self.layer - 1]
        paths = [block] + ([self.site.path] if self.cache == "down_input" else [])
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, len(self.batch), _CHUNK):
            ids = self.batch.input_ids[start:start + _CHUNK]
            am = self.batch.attention_mask[start:start + _CHUNK]
            with capture(self.h, paths, inputs=True, detach=True) as cap, stop_after(self.h, block):
                run(self.h, input_ids=ids, attention_mask=am, **no_cache(self.h.root))
            self.like = cap.raw[block]
            if self.cache == "down_input":
                out, d = cap.outputs[block], cap.outputs[self.site.path].view(cap.outputs[block].shape)
                parts.setdefault("x", []).append(cap.inputs[self.site.path].view(*out.shape[:2], -1))
                parts.setdefault("c", []).append(out - d)
            else:
                parts.setdefault("h", []).append(cap.outputs[block])
        return {k: torch.cat(v) for k, v in parts.items()}


def row_delta(x: Float[Tensor, "rows pos d_in"] | Float[Tensor, "_ d_in"],
              delta: Float[Tensor, "rows d_out d_in"]) -> Float[Tensor, "rows pos d_out"] | Float[Tensor, "_ d_out"]:
    """``x @ delta[r].T`` for each row ``r``: what a per-row weight change adds to a
    linear map's output (``x`` is ``[rows, pos, d_in]``, or OPT's flat ``[rows * pos, d_in]``)."""
    flat = x.dim() == 2
    xs = x.view(delta.shape[0], -1, x.shape[-1]) if flat else x
    out = torch.einsum("bti,boi->bto", xs.to(delta.dtype), delta).to(x.dtype)
    return out.reshape(-1, out.shape[-1]) if flat else out


def cache_mode(h: Handles, layer: int, batch: TokenBatch) -> str:
    """The fastest of :data:`CACHE_MODES` that is exact at ``layer``: ``"down_input"`` where
    the block is residual-additive, else ``"residual"`` where a skipped block can stand in
    (not at layer 0: nothing runs below it), else ``"none"``."""
    additive, skippable = probe_additive(h, layer, batch)
    return "down_input" if additive else ("residual" if layer > 0 and skippable else "none")


@torch.no_grad()
def probe_additive(h: Handles, layer: int, batch: TokenBatch) -> tuple[bool, bool]:
    """``(additive, skippable)``: is block ``layer``'s output ``c + site(x)`` (a random
    perturbation of the site's output moves the block's output by exactly that much), and
    is its output a structure a skipped block can stand in for (a tensor, or a tuple
    led by one whose other items are ``None``)? Runs a few rows up to the block twice."""
    probe = batch[torch.arange(min(4, len(batch)))]
    block, site = h.block_paths[layer], h[layer].path
    kw = dict(input_ids=probe.input_ids, attention_mask=probe.attention_mask, **no_cache(h.root))
    with capture(h, [block], detach=True) as before, stop_after(h, block):
        run(h, **kw)
    raw = before.raw[block]
    if not rewrappable(raw):
        return False, False
    seen: dict[str, Tensor] = {}

    def perturb(out: Tensor) -> Tensor:
        g = torch.Generator(device=out.device).manual_seed(0)
        seen["delta"] = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype) * (out.float().std() + 1)
        return out + seen["delta"]

    with replaced(h, site, perturb), capture(h, [block], detach=True) as after, stop_after(h, block):
        run(h, **kw)
    moved = (after.outputs[block] - before.outputs[block]).float()
    delta = seen["delta"].float().view(moved.shape)
    mask = probe.attention_mask.to(moved.device).bool()
    scale = (before.outputs[block].float() + delta)[mask].abs().max().item() + 1e-12
    tol = 1e-5 if h[layer].dtype == torch.float32 else 1e-2
    return bool(((moved - delta)[mask].abs().max() / scale) <= tol), True

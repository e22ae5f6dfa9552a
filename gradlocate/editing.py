"""LocFT-BF: fine-tune one layer's MLP down-projection, breadth first, in place.

LocFT-BF ("Fine-tuning Done Right in Model Editing", Yang et al., 2025; public code
ICT-STAR/LocFT) edits a model by plain fine-tuning of a single weight matrix, the
down-projection of one decoder layer, with Adam:

* each epoch shuffles all edits and sweeps them in mini-batches, one optimizer step
  per mini-batch (breadth first, rather than one edit at a time);
* the loss of a mini-batch is the mean over its edits of the mean negative
  log-likelihood of the target tokens (prompt and padding masked), the target written
  with a leading space and followed by the tokenizer's EOS token;
* a mini-batch whose loss is already below ``1e-2`` takes no step; training stops
  after the first epoch whose mean loss is below ``1e-2``.

:class:`LocFTBF` edits the model object you hold and can undo the edit bit for bit.

Speed. The blocks below the edited layer never change, so their output is computed
once per :meth:`LocFTBF.fit` and reused by every step. When the edited block is
*residual-additive* (its output is ``c + down_proj(x)``, checked numerically, true of
LLaMA, GPT-2, OPT, NeoX ...) the cache holds ``c`` and the down-projection's input
``x`` and a step runs only the down-projection of the edited block and the blocks
above it; otherwise (e.g. Gemma's post-feed-forward norm) it holds the residual stream
entering the edited block. The language-model head is applied only at the positions
that are scored. A cache that would exceed ``cache_budget`` bytes is not built and
every step runs the whole model (the memory-bounded fallback).

Example:
    >>> from gradlocate import LocFTBF
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=32)
    >>> edit = {"prompt": "The capital of France is", "target_new": "Rome"}
    >>> with LocFTBF(model, 1, lr=1e-2, epochs=3, progress=False) as ft:
    ...     _ = ft.fit([edit])
    ...     len(ft.history), ft.cache_mode
    (3, 'down_input')
    >>> ft.edited  # restored on leaving the block
    False
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradlocate.data import EditRequest, as_edits, warn_duplicates
from gradlocate.handles import DownProjection, down_projections, find_tokenizer
from gradlocate.losses import IGNORE, TokenBatch, context_length, per_sample_nll, tokenize_edits
from gradlocate.state import input_device, preserved, restore_snapshot, snapshot

__all__ = ["LocFTBF", "EditTrainingError", "auto_batch_size"]

#: LocFT-BF's published hyper-parameters (hparams/*.yaml of ICT-STAR/LocFT).
PAPER_LR = 5e-4
PAPER_BATCH_SIZE = 100
PAPER_EPOCHS = 25
#: The loss below which a mini-batch takes no step and training stops.
LOSS_THRESHOLD = 1e-2
#: Default byte budget of the activation cache.
CACHE_BUDGET = 2 * 1024**3
#: Rows per forward when building the cache.
_CACHE_CHUNK = 64


class EditTrainingError(RuntimeError):
    """Training produced a non-finite loss; the weight was restored."""


def auto_batch_size(n_edits: int, *, max_batch: int = PAPER_BATCH_SIZE, min_steps_per_epoch: int = 8) -> int:
    """The default mini-batch size for ``n_edits`` edits.

    The paper's batch of 100 gives 30 steps per epoch with 3000 edits (750 steps in 25
    epochs), but a single step per epoch with 100 edits or fewer: 25 steps in all,
    too few for Adam at lr 5e-4 to move a weight enough. So the batch shrinks until an
    epoch has at least ``min_steps_per_epoch`` steps, down to 1 (small sets are then
    trained one edit per step), and never exceeds ``max_batch``.

    Example:
        >>> [auto_batch_size(n) for n in (1, 8, 64, 800, 3000)]
        [1, 1, 8, 100, 100]
    """
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    return max(1, min(max_batch, n_edits // min_steps_per_epoch))


# --------------------------------------------------------------------------- engine


@dataclass
class _Current:
    """What the patched forwards need to know about the mini-batch being run."""

    rows: Tensor | None = None
    width: int = 0
    positions: tuple[Tensor, Tensor] | None = None
    head_input: Tensor | None = None


class _Stop(Exception):
    """Raised by a hook to end a forward early (the rest is not needed)."""


@dataclass
class _Structure:
    """What a decoder block returns: a tensor, or a tuple whose first item is the
    hidden states and whose other items are None."""

    kind: str  # "tensor" | "tuple"
    length: int = 1

    @staticmethod
    def of(output: Any) -> _Structure | None:
        if isinstance(output, Tensor):
            return _Structure("tensor")
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) \
                and all(o is None for o in output[1:]):
            return _Structure("tuple", len(output))
        return None

    def wrap(self, hidden: Tensor) -> Any:
        return hidden if self.kind == "tensor" else (hidden,) + (None,) * (self.length - 1)


def _hidden_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _replaced_forward(module: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """``module.forward = fn`` for the block; whatever was there before (an nnsight
    forward, or nothing) is put back."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            module.__dict__["forward"] = old
        else:
            module.__dict__.pop("forward", None)


@contextlib.contextmanager
def _hooks(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _scored_positions(labels: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """(row, position) of every position whose next token is scored."""
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return b, t


def _selected_nll(logits: Float[Tensor, "n vocab"], labels: Int[Tensor, "batch pos"],
                  positions: tuple[Tensor, Tensor]) -> Float[Tensor, " batch"]:
    """Per-row mean NLL from logits computed only at the scored positions."""
    b, t = positions
    target = labels[b, t + 1]
    lp = logits.float().log_softmax(-1)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return _row_means(nll, b, labels.shape[0])


class _FusedHeadNLL(torch.autograd.Function):
    """NLL of ``target`` under ``softmax(h @ weight.T + bias)``, and its gradient in
    ``h``, in one pass over the vocabulary.

    The LM head's weight (``[vocab, d_model]``) is the largest matrix of a small model
    and, at the few scored positions of an edit batch, reading it dominates the cost.
    Autograd reads it twice (logits, then their gradient); here each vocabulary chunk
    is read once and used for both, with an online (running-max) softmax. Float32
    throughout; the head's weight gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                chunk: int) -> Tensor:  # type: ignore[override]
        h32 = h.float()
        n = h32.shape[0]
        run_max = torch.full((n, 1), -math.inf, device=h.device)
        run_sum = torch.zeros((n, 1), device=h.device)
        acc = torch.zeros_like(h32)  # sum_v exp(logit_v - max) * weight_v
        for lo in range(0, weight.shape[0], chunk):
            w = weight[lo: lo + chunk].float()
            logits = h32 @ w.T
            if bias is not None:
                logits = logits + bias[lo: lo + chunk].float()
            new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
            rescale = torch.exp(run_max - new_max)
            p = torch.exp(logits - new_max)
            run_sum = run_sum * rescale + p.sum(1, keepdim=True)
            acc = acc * rescale + p @ w
            run_max = new_max
        w_t = weight[target].float()
        logit_t = (h32 * w_t).sum(1)
        if bias is not None:
            logit_t = logit_t + bias[target].float()
        nll = run_max.squeeze(1) + run_sum.squeeze(1).log() - logit_t
        ctx.save_for_backward(acc / run_sum - w_t)  # d nll_i / d h_i = E_p[w] - w_target
        ctx.h_dtype = h.dtype
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_nll.unsqueeze(1)).to(ctx.h_dtype), None, None, None, None


#: Vocabulary rows per chunk of the fused head (fits in a CPU's L2/L3 cache at d_model <= 1024).
_HEAD_CHUNK = 1024


def _row_means(values: Float[Tensor, " n"], rows_of: Tensor, n_rows: int) -> Float[Tensor, " batch"]:
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows_of, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows_of, torch.ones_like(values))
    if bool((count == 0).any()):
        raise ValueError("a row has no scored tokens (empty target)")
    return total / count


class _Engine:
    """Runs mini-batches of one tokenized edit set through the model, reusing cached
    activations. Built by :meth:`LocFTBF._engine`, valid inside that context only.

    ``head`` is ``"full"`` (the model's logits everywhere), ``"select"`` (the LM head
    applied only at scored positions) or ``"fused"`` (the head's forward replaced by a
    capture of its input at scored positions; the NLL and its gradient come from
    :class:`_FusedHeadNLL`)."""

    def __init__(self, root: nn.Module, batch: TokenBatch, current: _Current, head: str):
        self.root = root
        self.batch = batch
        self.current = current
        self.head = head

    def losses(self, rows: Tensor) -> Float[Tensor, " batch"]:
        """Mean target NLL of each of ``rows`` (float32, differentiable in the weight)."""
        mb = self.batch[rows]
        self.current.rows = rows
        self.current.width = mb.input_ids.shape[1]
        b, t = _scored_positions(mb.labels)
        self.current.positions = (b, t) if self.head != "full" else None
        self.current.head_input = None
        out = self.root(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        if self.head == "fused":
            h = self.current.head_input
            self.current.head_input = None
            lm = self.root.get_output_embeddings()
            target = mb.labels[b, t + 1].to(h.device)
            nll = _FusedHeadNLL.apply(h, lm.weight, getattr(lm, "bias", None), target, _HEAD_CHUNK)
            return _row_means(nll, b.to(nll.device), len(rows))
        logits = out.logits if hasattr(out, "logits") else out
        labels = mb.labels.to(logits.device)
        if self.head == "select":
            return _selected_nll(logits[0], labels, (b.to(logits.device), t.to(logits.device)))
        return per_sample_nll(logits, labels)


# --------------------------------------------------------------------------- trainer


class LocFTBF:
    """LocFT-BF: fine-tune the MLP down-projection of one layer, breadth first.

    The model you pass is edited in place. Undo with :meth:`restore` (bit for bit),
    or use the trainer as a context manager, which restores on exit unless
    :meth:`commit` was called. An exception or ``KeyboardInterrupt`` inside
    :meth:`fit` restores the weight as it was when ``fit`` began. No other tensor of
    the model is touched; requires_grad flags, train/eval mode and forwards are
    restored after every call.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
        layer: the decoder layer whose down-projection is trained (negative counts from
            the end).
        tokenizer: defaults to the one the model carries.
        lr: Adam learning rate (weight decay 0). Default 5e-4, the paper's.
        batch_size: edits per optimizer step. ``None`` (default): :func:`auto_batch_size`
            (the paper's 100 for large sets, smaller for small ones so that every epoch
            has several steps).
        epochs: maximum number of sweeps over the edits (the paper's 25).
        append_eos: append the tokenizer's EOS token to each target, as LocFT does.
        seed: seeds the per-epoch shuffles
            (``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``, one
            call per epoch); the order used is kept in :attr:`orders`.
        loss_threshold: a mini-batch takes no step if its loss is below this, and
            training stops after an epoch whose mean loss is below it (1e-2, the paper's).
        cache: ``"auto"`` (cache the activations below the edited layer if they fit in
            ``cache_budget`` bytes), ``True`` (always) or ``False`` (never: every step
            runs the whole model).
        cache_budget: bytes the cache may take under ``cache="auto"``.
        head: how the loss is read off the LM head. ``"auto"`` (default): the fused
            head (NLL and its gradient in one pass over the head's weight, at the scored
            positions only) if it reproduces the model's own losses on two edits, else
            ``"select"`` (the model's head applied at the scored positions only) if
            that does, else ``"full"`` (the model's logits everywhere, as a plain loop).
        progress: show a tqdm progress bar of epochs with the loss.
        callback: called as ``callback(epoch, batch_index, loss)`` after every mini-batch.

    Attributes:
        handle: the :class:`~gradlocate.handles.DownProjection` being trained.
        history: each epoch's mean loss (mean over edits of the per-edit loss, computed
            before that mini-batch's step), of the last :meth:`fit`.
        steps: optimizer steps taken per epoch.
        orders: each epoch's order of the edits (indices into the list given to fit).
        cache_mode: ``"down_input"``, ``"residual"`` or ``"none"`` (see the module doc).
        head_mode: ``"fused"``, ``"select"`` or ``"full"`` (see ``head``).
        timings: seconds spent on setup (tokenizing is not counted; building the cache and
            choosing the head mode) and on training.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
        >>> ft = LocFTBF(model, -1, lr=1e-2, epochs=2, progress=False)
        >>> _ = ft.fit([{"prompt": "2 + 2 =", "target_new": "5"}])
        >>> ft.edited, len(ft.steps)
        (True, 2)
        >>> ft.restore(); ft.edited
        False
    """

    def __init__(self, model: Any, layer: int, *, tokenizer: Any = None, lr: float = PAPER_LR,
                 batch_size: int | None = None, epochs: int = PAPER_EPOCHS, append_eos: bool = True,
                 seed: int = 0, loss_threshold: float = LOSS_THRESHOLD, cache: bool | str = "auto",
                 cache_budget: int = CACHE_BUDGET, head: str = "auto", progress: bool = True,
                 callback: Callable[[int, int, float], Any] | None = None):
        if isinstance(layer, (list, tuple)) or not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"LocFTBF edits one layer: give an int, got {layer!r}")
        _check_positive("lr", lr)
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not (isinstance(loss_threshold, (int, float)) and math.isfinite(loss_threshold) and loss_threshold >= 0):
            raise ValueError(f"loss_threshold must be a finite number >= 0, got {loss_threshold!r}")
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        if head not in ("auto", "fused", "select", "full"):
            raise ValueError(f"head must be 'auto', 'fused', 'select' or 'full', got {head!r}")
        if not isinstance(cache_budget, int) or cache_budget < 0:
            raise ValueError(f"cache_budget must be a number of bytes >= 0, got {cache_budget!r}")
        self.model = model
        self.handles = down_projections(model)
        self.layer = self.handles.layer_indices(layer)[0]
        self.handle: DownProjection = self.handles[self.layer]
        self.root: nn.Module = self.handles.root
        self.blocks: nn.ModuleList = self.root.get_submodule(self.handles.blocks_path)
        self.tokenizer = find_tokenizer(model, tokenizer)
        self.lr = float(lr)
        self.batch_size = batch_size
        self.epochs = epochs
        self.append_eos = append_eos
        self.seed = seed
        self.loss_threshold = float(loss_threshold)
        self.cache = cache
        self.cache_budget = cache_budget
        self.head = head
        self.head_mode: str | None = None
        self.progress = progress
        self.callback = callback
        self.history: list[float] = []
        self.steps: list[int] = []
        self.orders: list[list[int]] = []
        self.cache_mode: str | None = None
        self.timings: dict[str, float] = {}
        self.n_edits = 0
        self.batch_size_used: int | None = None
        self.cache_bytes = 0
        self._original: list[tuple[Tensor, Tensor]] | None = snapshot([self.handle.parameter])
        self._committed = False

    # ------------------------------------------------------------------ undo

    @property
    def edited(self) -> bool:
        """Whether the weight differs (bitwise) from when the trainer was made."""
        if self._original is None:
            return True
        return not torch.equal(self.handle.parameter.detach(), self._original[0][1])

    @property
    def delta(self) -> Float[Tensor, "d_model d_mlp"]:
        """The edit: current weight minus the original, as ``[d_model, d_mlp]``."""
        if self._original is None:
            raise RuntimeError("the edit was committed: the original weight is no longer kept")
        return self.handle.canonical(self.handle.parameter.detach() - self._original[0][1])

    def restore(self) -> None:
        """Put the original weight back, bit for bit."""
        if self._original is None:
            raise RuntimeError("the edit was committed with .commit(); there is nothing to restore")
        restore_snapshot(self._original)

    def commit(self) -> None:
        """Keep the edit: the context manager will not restore it, and the copy of the
        original weight is released."""
        self._committed = True
        self._original = None

    def __enter__(self) -> LocFTBF:
        return self

    def __exit__(self, *exc: Any) -> bool:
        if not self._committed:
            self.restore()
        return False

    # ------------------------------------------------------------------ training

    def fit(self, edits: Any) -> LocFTBF:
        """Train on ``edits`` (EditRequest objects or dicts in CounterFact / ZsRE /
        KnowEdit spelling). Returns ``self``; see :attr:`history`.

        A fresh Adam optimizer is made for each call; a second call continues from the
        edited weight.

        Raises:
            ValueError: no edits, an empty target, or a sequence longer than the context.
            EditTrainingError: a mini-batch's loss was NaN or infinite (the weight is
                restored; the message names the edits of that mini-batch), or the last
                step left the weight non-finite.
        """
        edits = as_edits(edits)
        warn_duplicates(edits)
        batch = self._tokenize(edits)
        n = len(edits)
        bs = self.batch_size if self.batch_size is not None else auto_batch_size(n)
        param = self.handle.parameter
        start = snapshot([param])
        old_grad = param.grad
        self.history, self.steps, self.orders, self.timings = [], [], [], {}
        self.n_edits = n
        gen = torch.Generator().manual_seed(self.seed)
        try:
            with preserved(self.root, [param]):
                param.grad = None
                t0 = time.perf_counter()
                with self._engine(batch) as engine:
                    self.timings["setup"] = time.perf_counter() - t0
                    # Half-precision weights: Adam updates a float32 master copy (its second-moment
                    # state underflows to 0 in float16 and the step divides by it), copied back.
                    master = param if param.dtype in (torch.float32, torch.float64) else \
                        param.detach().float().requires_grad_()
                    opt = torch.optim.Adam([master], lr=self.lr, weight_decay=0.0)
                    t1 = time.perf_counter()
                    self._train(engine, edits, gen, bs, opt, master)
                    # The last step's update is never seen by a loss: check the weight itself.
                    if not bool(torch.isfinite(param).all()):
                        raise EditTrainingError(
                            f"the trained weight of layer {self.layer} became non-finite (NaN/inf) in the last "
                            f"step; the weight was restored. Try a smaller lr (now {self.lr:g})"
                        )
                    self.timings["train"] = time.perf_counter() - t1
        except BaseException:
            restore_snapshot(start)
            raise
        finally:
            param.grad = old_grad
        self.batch_size_used = bs
        return self

    def _train(self, engine: _Engine, edits: list[EditRequest], gen: torch.Generator, bs: int,
               opt: torch.optim.Optimizer, master: Tensor) -> None:
        n = len(edits)
        bar = tqdm(range(self.epochs), desc=f"LocFT-BF layer {self.layer}", disable=not self.progress, leave=False)
        try:
            for epoch in bar:
                order = torch.randperm(n, generator=gen)
                self.orders.append(order.tolist())
                total, steps = 0.0, 0
                for i, rows in enumerate(order.split(bs)):
                    loss = engine.losses(rows.to(engine.batch.input_ids.device)).mean()
                    value = loss.item()
                    if not math.isfinite(value):
                        bad = ", ".join(f"{r} ({edits[r].prompt!r} -> {edits[r].target_new!r})" for r in rows.tolist())
                        raise EditTrainingError(
                            f"the loss became {value} at epoch {epoch}, mini-batch {i}; the weight was restored. "
                            f"Edits of that mini-batch: {bad}. Try a smaller lr (now {self.lr:g}) or check the model "
                            f"for non-finite weights"
                        )
                    total += value * len(rows)
                    if value >= self.loss_threshold:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        self._step(opt, master)
                        steps += 1
                    if self.callback is not None:
                        self.callback(epoch, i, value)
                mean = total / n
                self.history.append(mean)
                self.steps.append(steps)
                bar.set_postfix(loss=f"{mean:.4f}", steps=steps)
                if mean < self.loss_threshold:
                    break
        finally:
            bar.close()
        opt.zero_grad(set_to_none=True)

    def _step(self, opt: torch.optim.Optimizer, master: Tensor) -> None:
        param = self.handle.parameter
        if master is param:
            opt.step()
            return
        master.grad = param.grad.float()
        param.grad = None
        opt.step()
        with torch.no_grad():
            param.copy_(master)

    def losses(self, edits: Any) -> Float[Tensor, " n_edits"]:
        """Each edit's training loss at the current weight: the mean NLL of its target
        tokens (with EOS if ``append_eos``), as :meth:`fit` computes it.

        Example:
            >>> from gradlocate.models import tiny
            >>> model, tok = tiny("llama", n_layers=2, d_model=16)
            >>> ft = LocFTBF(model, 0, progress=False)
            >>> ft.losses([{"prompt": "a", "target_new": "b"}]).shape
            torch.Size([1])
        """
        edits = as_edits(edits)
        batch = self._tokenize(edits)
        with torch.no_grad(), preserved(self.root, []), self._engine(batch) as engine:
            rows = torch.arange(len(edits), device=batch.input_ids.device)
            out = torch.cat([engine.losses(r) for r in rows.split(_CACHE_CHUNK)])
        return out.detach().cpu()

    def _tokenize(self, edits: Sequence[EditRequest]) -> TokenBatch:
        batch = tokenize_edits(self.tokenizer, [e.prompt for e in edits], [e.target_new for e in edits],
                               append_eos=self.append_eos, max_length=context_length(self.root))
        return batch.to(input_device(self.root))

    # ------------------------------------------------------------------ caching

    @contextlib.contextmanager
    def _engine(self, batch: TokenBatch) -> Iterator[_Engine]:
        """Install the cache and head selection for ``batch``; yield an engine."""
        current = _Current()
        mode, structure = self._choose_mode(batch)
        cached = self._build_cache(batch, mode) if mode != "none" else {}
        self.cache_mode = mode
        self.cache_bytes = sum(t.numel() * t.element_size() for t in cached.values())
        with contextlib.ExitStack() as stack:
            if mode != "none":
                self._install_cache(stack, cached, mode, structure, current)
            mode_head = self._choose_head(batch, current)
            self.head_mode = mode_head
            if mode_head != "full":
                stack.enter_context(_head_installed(self.root.get_output_embeddings(), mode_head, current))
            yield _Engine(self.root, batch, current, mode_head)

    def _choose_mode(self, batch: TokenBatch) -> tuple[str, _Structure | None]:
        if self.cache is False:
            return "none", None
        probe = batch[torch.arange(min(4, len(batch)), device=batch.input_ids.device)]
        additive, structure, returned = self._probe_block(probe)
        if structure is None:
            warnings.warn(
                f"decoder block {self.layer} returns {returned}, not a tensor or (tensor, None, ...): "
                "training without the activation cache", stacklevel=4)
            return "none", None
        n, w = batch.input_ids.shape
        elem = self.handle.parameter.element_size()
        sizes = {"down_input": n * w * (self.handle.d_model + self.handle.d_mlp) * elem,
                 "residual": n * w * self.handle.d_model * elem}
        fits = lambda m: self.cache is True or sizes[m] <= self.cache_budget  # noqa: E731
        if additive and fits("down_input"):
            return "down_input", structure
        if self.layer > 0 and fits("residual"):
            return "residual", structure
        return "none", None

    @torch.no_grad()
    def _probe_block(self, probe: TokenBatch) -> tuple[bool, _Structure | None, str]:
        """Is block ``layer``'s output ``c + down_proj(x)``? Runs the model up to that
        block twice on a few rows: once with the down-projection's output zeroed (gives
        ``c``), once with a random perturbation ``delta`` added, and checks
        ``out == c + down + delta``. Also records what the block returns."""
        block, down = self.blocks[self.layer], self.handle.module
        seen: dict[str, Any] = {}

        def down_hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if seen.get("zero"):
                return torch.zeros_like(out)
            g = torch.Generator(device=out.device).manual_seed(0)
            delta = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype) * (out.float().std() + 1)
            seen["down"], seen["delta"] = out, delta
            return out + delta

        def block_hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            seen["out"] = out
            raise _Stop

        with _hooks(down.register_forward_hook(down_hook), block.register_forward_hook(block_hook)):
            self._run_until_stop(probe)
            structure = _Structure.of(seen["out"])
            returned = type(seen["out"]).__name__
            if structure is None:
                return False, None, returned
            perturbed = _hidden_of(seen["out"]).float()
            seen["zero"] = True
            self._run_until_stop(probe)
            c = _hidden_of(seen["out"]).float()
        expected = c + seen["down"].float() + seen["delta"].float()
        mask = probe.attention_mask.to(expected.device).bool()
        scale = expected[mask].abs().max().item() + 1e-12
        tol = 1e-5 if self.handle.dtype == torch.float32 else 1e-2
        additive = bool(((perturbed - expected)[mask].abs().max() / scale) <= tol)
        return additive, structure, returned

    def _run_until_stop(self, batch: TokenBatch) -> None:
        try:
            self.root(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _Stop:
            return
        raise RuntimeError(f"decoder block {self.layer} did not run in the model's forward")

    @torch.no_grad()
    def _build_cache(self, batch: TokenBatch, mode: str) -> dict[str, Tensor]:
        """Run the model up to the edited block over every edit (padded to the full
        width, in chunks) and keep what the steps will need."""
        parts: dict[str, list[Tensor]] = {}

        def keep(name: str, t: Tensor) -> None:
            parts.setdefault(name, []).append(t.detach().clone())

        handles = []
        if mode == "down_input":
            block, down = self.blocks[self.layer], self.handle.module

            def down_hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
                keep("x", args[0])
                return torch.zeros_like(out)  # the block then outputs c

            def block_hook(mod: nn.Module, args: tuple, out: Any) -> Any:
                keep("c", _hidden_of(out))
                raise _Stop

            handles = [down.register_forward_hook(down_hook), block.register_forward_hook(block_hook)]
        else:  # residual: the output of the block below the edited one
            def below_hook(mod: nn.Module, args: tuple, out: Any) -> Any:
                keep("h", _hidden_of(out))
                raise _Stop

            handles = [self.blocks[self.layer - 1].register_forward_hook(below_hook)]
        rows = torch.arange(len(batch), device=batch.input_ids.device)
        with _hooks(*handles):
            for chunk in rows.split(_CACHE_CHUNK):
                ids, am = batch.input_ids[chunk], batch.attention_mask[chunk]
                self._run_until_stop(TokenBatch(ids, am, batch.labels[chunk]))
        return {k: torch.cat(v) for k, v in parts.items()}

    def _install_cache(self, stack: contextlib.ExitStack, cached: dict[str, Tensor], mode: str,
                       structure: _Structure, current: _Current) -> None:
        """Replace the forwards of the blocks below the edited one (and, in
        ``down_input`` mode, of the edited block itself) by cache look-ups."""

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return structure.wrap(_block_input(args, kwargs))

        def rows_of(t: Tensor) -> Tensor:
            return t[current.rows.to(t.device), : current.width]

        if mode == "down_input":
            down = self.handle.module

            def edited_block(*args: Any, **kwargs: Any) -> Any:
                return structure.wrap(rows_of(cached["c"]) + down(rows_of(cached["x"])))

            below, last = range(self.layer), (self.layer, edited_block)
        else:
            def cached_block(*args: Any, **kwargs: Any) -> Any:
                return structure.wrap(rows_of(cached["h"]))

            below, last = range(self.layer - 1), (self.layer - 1, cached_block)
        for j in below:
            stack.enter_context(_replaced_forward(self.blocks[j], passthrough))
        stack.enter_context(_replaced_forward(self.blocks[last[0]], last[1]))

    def _choose_head(self, batch: TokenBatch, current: _Current) -> str:
        """The head mode: the first of fused / select (as allowed by ``head``) whose
        losses on two edits match the model's full logits (rtol 1e-4); else full.
        Catches heads with post-processing (soft-capping, scaling) or missing heads."""
        lm = self.root.get_output_embeddings() if hasattr(self.root, "get_output_embeddings") else None
        w = getattr(lm, "weight", None)
        if not isinstance(lm, nn.Module) or not isinstance(w, Tensor) or w.dim() != 2:
            return "full"
        candidates = {"auto": ("fused", "select"), "fused": ("fused",), "select": ("select",), "full": ()}[self.head]
        if not candidates:
            return "full"
        rows = torch.arange(min(2, len(batch)), device=batch.input_ids.device)
        with torch.no_grad():
            reference = _Engine(self.root, batch, current, "full").losses(rows)
            for mode in candidates:
                try:
                    with _head_installed(lm, mode, current):
                        got = _Engine(self.root, batch, current, mode).losses(rows)
                except Exception:  # noqa: BLE001 - any failure means: try the next mode
                    continue
                if torch.allclose(reference, got.to(reference.device), rtol=1e-4, atol=1e-5):
                    return mode
        if self.head != "auto":
            warnings.warn(f"head={self.head!r} does not reproduce the model's losses here: using full logits",
                          stacklevel=4)
        return "full"

    # ------------------------------------------------------------------ display

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """The training loss per epoch (and the stopping threshold). Returns the Axes."""
        from gradlocate.plotting import plot_training_loss

        return plot_training_loss(self.history, ax=ax, threshold=self.loss_threshold, log=log,
                                  title=f"LocFT-BF, layer {self.layer}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "locft-bf", "layer": self.layer, "path": self.handle.path, "lr": self.lr,
            "batch_size": self.batch_size_used or self.batch_size, "epochs": self.epochs,
            "append_eos": self.append_eos, "seed": self.seed, "loss_threshold": self.loss_threshold,
            "n_edits": self.n_edits, "history": list(self.history), "steps": list(self.steps),
            "cache_mode": self.cache_mode, "timings": dict(self.timings),
        }

    def __repr__(self) -> str:
        state = "committed" if self._committed else ("edited" if self.edited else "unedited")
        last = f", final loss={self.history[-1]:.4g} after {len(self.history)} epoch(s)" if self.history else ""
        return (f"LocFTBF(layer={self.layer}, path={self.handle.path!r}, lr={self.lr:g}, "
                f"batch_size={self.batch_size_used or self.batch_size}, epochs={self.epochs}, "
                f"{state}{last})")


def _selected(h: Tensor, current: _Current) -> Tensor:
    b, t = current.positions  # type: ignore[misc]
    return h[b.to(h.device), t.to(h.device)]


def _head_installed(lm: nn.Module, mode: str, current: _Current) -> contextlib.AbstractContextManager:
    """``select``: a pre-hook that keeps only the scored positions (as one row).
    ``fused``: a forward that stores its input at the scored positions (for
    :class:`_FusedHeadNLL`) and returns a dummy ``[1, n, 1]`` tensor instead of logits."""
    if mode == "select":
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            if current.positions is None:
                return None
            if args:
                return (_selected(args[0], current).unsqueeze(0),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "input": _selected(kwargs["input"], current).unsqueeze(0)}

        return _hooks(lm.register_forward_pre_hook(hook, with_kwargs=True))

    def capture(*args: Any, **kwargs: Any) -> Tensor:
        h = args[0] if args else kwargs["input"]
        current.head_input = _selected(h, current)
        return h.new_zeros(1, current.head_input.shape[0], 1)

    return _replaced_forward(lm, capture)


def _check_positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

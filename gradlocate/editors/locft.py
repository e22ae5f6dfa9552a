"""LocFT-BF: fine-tune one layer's site (the MLP down-projection), breadth first, in place.

LocFT-BF ("Fine-tuning Done Right in Model Editing", Yang et al., 2025; code
ICT-STAR/LocFT) edits a model by plain fine-tuning of one weight matrix with Adam:

* each epoch shuffles all edits and sweeps them in mini-batches of ``edits_per_step``,
  one optimizer step per mini-batch (breadth first, not one edit at a time);
* a mini-batch's loss is the mean over its edits of the edit loss
  (:func:`~gradlocate.losses.edit_nll`: target tokens and EOS, prompt masked);
* a mini-batch whose loss is below ``loss_threshold`` (1e-2) takes no step; training
  stops after the first epoch whose mean loss is below it (it has *converged*).

:class:`LocFTBF` is that loop (:meth:`LocFTBF.fit`), editing the weight you hold
through its handle, with an undo that puts it back bit for bit. How a mini-batch's
losses are computed is the :class:`~gradlocate.editors.executors.Executor`'s business: the
activation cache and the selective head make it faster, never different.

Example:
    >>> from gradlocate import LocFTBF
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=32)
    >>> edit = {"prompt": "The capital of France is", "target_new": "Rome"}
    >>> with LocFTBF(model, 1, lr=1e-2, epochs=3, progress=False) as ft:
    ...     r = ft.fit([edit])
    ...     len(r.history), r.cache_mode, ft.edited
    (3, 'down_input', True)
    >>> ft.edited  # restored on leaving the block
    False
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.data import Edits, as_edits
from gradlocate.editors.executors import Executor, probe_additive
from gradlocate.editors.protocol import TrainStep, summary
from gradlocate.editors.settings import LocFTSettings
from gradlocate.gradients import edit_batch
from gradlocate.editors.base import InPlaceEdit
from gradlocate.handles import Handle, Handles, resolve
from gradlocate.interventions import require_gradients, using
from gradlocate.losses import TokenBatch
from gradlocate.state import Undo, input_device

__all__ = ["LocFTBF", "FitResult", "EditTrainingError", "auto_edits_per_step",
           "PAPER_LR", "PAPER_EDITS_PER_STEP", "PAPER_EPOCHS", "LOSS_THRESHOLD"]

#: LocFT-BF's published hyper-parameters (hparams/*.yaml of ICT-STAR/LocFT).
PAPER_LR: float = LocFTSettings.lr
PAPER_EDITS_PER_STEP = 100
PAPER_EPOCHS: int = LocFTSettings.epochs
#: The loss below which a mini-batch takes no step and training stops.
LOSS_THRESHOLD: float = LocFTSettings.loss_threshold
#: Default byte budget of the activation cache.
CACHE_BUDGET: int = LocFTSettings.cache_budget


class EditTrainingError(RuntimeError):
    """Training produced a non-finite loss or weight; the weight was restored."""


def auto_edits_per_step(n_edits: int, *, most: int = PAPER_EDITS_PER_STEP, min_steps_per_epoch: int = 8) -> int:
    """The default mini-batch size for ``n_edits`` edits.

    The paper's 100 gives 30 steps per epoch with 3000 edits, but one step per epoch
    with 100 edits or fewer: 25 steps in all, too few for Adam at lr 5e-4 to move a
    weight enough. So the mini-batch shrinks until an epoch has at least
    ``min_steps_per_epoch`` steps, down to 1, and never exceeds ``most``.

    Example:
        >>> [auto_edits_per_step(n) for n in (1, 8, 64, 800, 3000)]
        [1, 1, 8, 100, 100]
    """
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    return max(1, min(most, n_edits // min_steps_per_epoch))


@dataclass
class FitResult:
    """What one :meth:`LocFTBF.fit` did.

    Attributes:
        history: each epoch's mean loss (over edits, before that mini-batch's step).
        steps: optimizer steps taken per epoch.
        orders: each epoch's order of the edits (indices into the list given to ``fit``).
        converged: training stopped because an epoch's mean loss fell below the threshold.
        final_loss: the last epoch's mean loss.
        layer, edits_per_step, n_edits: the setting.
        cache_mode, head_mode, cache_bytes: the executor used.
        timings: seconds spent on setup (the cache, the head choice) and on training.
    """

    history: list[float]
    steps: list[int]
    orders: list[list[int]]
    converged: bool
    layer: int
    edits_per_step: int
    n_edits: int
    cache_mode: str
    head_mode: str
    cache_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.history[-1] if self.history else None

    @property
    def epochs(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "epochs": self.epochs, "final_loss": self.final_loss,
                "converged": self.converged, "steps": int(sum(self.steps)), "edits_per_step": self.edits_per_step,
                "n_edits": self.n_edits, "history": list(self.history), "cache_mode": self.cache_mode,
                "head_mode": self.head_mode, "timings": dict(self.timings)}

    def summary(self) -> dict[str, Any]:
        """The protocol's summary fields (:data:`~gradlocate.editors.protocol.SUMMARY_FIELDS`):
        the trajectory is the mean loss per epoch, the steps the optimizer steps taken."""
        return summary(self.history, self.converged, int(sum(self.steps)), epochs=self.epochs)

    def plot(self, ax: Any = None, *, log: bool = True, threshold: float = LOSS_THRESHOLD) -> Any:
        """The training loss per epoch and the stopping threshold. Returns the Axes."""
        from gradlocate.plotting import plot_training_loss

        return plot_training_loss(self.history, ax=ax, threshold=threshold, log=log,
                                  title=f"LocFT-BF, layer {self.layer}")

    def __repr__(self) -> str:
        end = (f"reached its loss target in {self.epochs} epoch(s)" if self.converged else
               f"stopped at its epoch budget ({self.epochs}) above its loss target (the edit may still have taken: "
               f"evaluate it)")
        loss = f"{self.final_loss:.4g}" if self.history else "n/a"
        return (f"FitResult(layer={self.layer}, {self.epochs} epoch(s), {sum(self.steps)} steps, final loss {loss}, "
                f"{end}; cache={self.cache_mode}, head={self.head_mode})")


class _Run:
    """One ``fit``'s training state: the executor, the optimizer (over a float32 master copy
    for half-precision weights), the shuffles' generator, and what each epoch recorded."""

    def __init__(self, ft: LocFTBF, ex: Executor, edits: Edits, edits_per_step: int):
        param = ft.handle.parameter
        # Half precision: Adam's second moment underflows in float16 and the step divides by
        # it, so Adam updates a float32 master copy, copied back after each step.
        self.master = param if param.dtype in (torch.float32, torch.float64) else \
            param.detach().float().requires_grad_()
        self.opt = torch.optim.Adam([self.master], lr=ft.lr, weight_decay=0.0)
        self.ex, self.edits, self.edits_per_step = ex, edits, edits_per_step
        self.gen = torch.Generator().manual_seed(ft.seed)
        self.history: list[float] = []
        self.steps: list[int] = []
        self.orders: list[list[int]] = []
        self.converged = False
        self.counted = 0  # mini-batches seen in this fit (the callback's step index)


class LocFTBF(InPlaceEdit):
    """LocFT-BF: fine-tune the site of one layer, breadth first, editing the model in place.

    Undo with :meth:`restore` (bit for bit), or use the trainer as a context manager,
    which restores on exit unless :meth:`commit` was called. An exception or
    ``KeyboardInterrupt`` inside :meth:`fit` restores the weight as it was when ``fit``
    began. No other tensor is touched; flags, modes and forwards are restored.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles` (its site, e.g. an ``o_proj`` override, is trained).
        layer: the decoder layer whose site is trained (negative counts from the end).
        settings: :class:`~gradlocate.editors.settings.LocFTSettings` (default: the paper's);
            ``overrides`` change single settings by name:
            lr: Adam learning rate (weight decay 0); the paper's 5e-4.
            edits_per_step: edits per optimizer step. ``None``: :func:`auto_edits_per_step`.
            epochs: maximum number of sweeps over the edits (the paper's 25).
            append_eos: score EOS after each target (LocFT's loss, the default everywhere).
            seed: seeds the per-epoch shuffles (``torch.randperm`` with
                ``torch.Generator().manual_seed(seed)``, one call per epoch).
            loss_threshold: no step below it; stop after an epoch whose mean loss is below it.
            cache: ``"auto"`` (the activation cache if it fits in ``cache_budget`` bytes),
                ``True`` (always) or ``False`` (never: every step runs the whole model).
            cache_budget: bytes the cache may take under ``cache="auto"``.
            head: ``"auto"`` (the fused head if it reproduces the model's own losses on two
                edits, else ``"select"`` if that does, else ``"full"``), or one of those.
        tokenizer: defaults to the one the model carries.
        progress: a progress bar of epochs with the loss (``None``: on a terminal only).
        callback: called with a :class:`~gradlocate.editors.protocol.TrainStep` (step, loss,
            epoch) after every mini-batch.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
        >>> ft = LocFTBF(model, -1, lr=1e-2, epochs=2, progress=False)
        >>> r = ft.fit([{"prompt": "2 + 2 =", "target_new": "5"}])
        >>> ft.edited, r.epochs, r.converged
        (True, 2, False)
        >>> ft.restore(); ft.edited
        False
    """

    h: Handles
    layer: int
    handle: Handle
    lr: float
    edits_per_step: int | None
    epochs: int
    append_eos: bool
    seed: int
    loss_threshold: float
    cache: bool | str
    cache_budget: int
    head: str
    progress: bool | None
    callback: Callable[[TrainStep], Any] | None
    undo: Undo

    def __init__(self, model: Any, layer: SupportsIndex, settings: LocFTSettings | None = None, *,
                 tokenizer: Any = None, progress: bool | None = None,
                 callback: Callable[[TrainStep], Any] | None = None, **overrides: Any):
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"LocFTBF edits one layer: give an int, got {layer!r}")
        if settings is not None and not isinstance(settings, LocFTSettings):
            raise TypeError(f"LocFTBF takes LocFTSettings, got {type(settings).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step: TrainStep), got {callback!r}")
        self.settings = (settings or LocFTSettings()).replace(**overrides)  # checked: SettingsError names a bad one
        s = self.settings
        self.h = resolve(model, tokenizer)
        self.layer = self.h.layer_indices(int(layer))[0]
        self.handle = self.h[self.layer]
        self.lr, self.edits_per_step, self.epochs = float(s.lr), s.edits_per_step, int(s.epochs)
        self.append_eos, self.seed, self.loss_threshold = s.append_eos, s.seed, float(s.loss_threshold)
        self.cache, self.cache_budget, self.head = s.cache, int(s.cache_budget), s.head
        self.progress, self.callback = progress, callback
        self.undo = Undo(self.handle.parameter)

    # -- training
    def fit(self, edits: Any) -> FitResult:
        """Train on ``edits`` (any public form, see :func:`~gradlocate.data.as_edits`).
        A fresh Adam optimizer each call; a second call continues from the edited weight.

        Raises:
            ValueError: no edits, an empty target, a sequence longer than the context.
            EditTrainingError: a loss or the weight became non-finite (the weight is
                restored; the message names the mini-batch's edits).
        """
        require_gradients("LocFTBF.fit")
        edits = as_edits(edits)
        batch = edit_batch(self.h, [e.prompt for e in edits], [e.target_new for e in edits],
                           self.append_eos).to(input_device(self.h.root))
        start = Undo(self.handle.parameter)
        try:
            with using(self.h, [self.handle.parameter]), torch.enable_grad():
                return self._train(edits, batch)
        except BaseException:
            start.restore()
            raise

    def _train(self, edits: Edits, batch: TokenBatch) -> FitResult:
        """Choose the executor, then run epochs until one's mean loss is below the threshold."""
        t0 = time.perf_counter()
        cache, head = self._modes(batch)
        with Executor(self.h, self.layer, batch, cache, head) as ex:
            timings = {"setup": time.perf_counter() - t0}
            run = _Run(self, ex, edits, self.edits_per_step or auto_edits_per_step(len(edits)))
            bar = _epochs(self.epochs, self.layer, self.progress)
            for epoch in bar:
                self._epoch(run, epoch)
                bar.set_postfix(loss=f"{run.history[-1]:.4f}", steps=run.steps[-1])
                if run.history[-1] < self.loss_threshold:
                    run.converged = True
                    break
            bar.close()
            if not bool(torch.isfinite(self.handle.parameter).all()):  # the last step was never seen by a loss
                raise EditTrainingError(f"the trained weight of layer {self.layer} became non-finite (NaN/inf) "
                                        f"in the last step; the weight was restored. Try a smaller lr "
                                        f"(now {self.lr:g})")
            timings["train"] = time.perf_counter() - t0 - timings["setup"]
            return FitResult(run.history, run.steps, run.orders, run.converged, self.layer, run.edits_per_step,
                             len(edits), cache, head, ex.cache_bytes, timings)

    def _epoch(self, run: _Run, epoch: int) -> None:
        """One sweep over the shuffled edits in mini-batches; a step where the loss is not
        already below the threshold."""
        n = len(run.edits)
        order = torch.randperm(n, generator=run.gen)
        run.orders.append(order.tolist())
        total, taken = 0.0, 0
        for i, rows in enumerate(order.split(run.edits_per_step)):
            loss = run.ex.losses(rows.to(run.ex.batch.input_ids.device)).mean()
            value = loss.item()
            if not math.isfinite(value):
                raise EditTrainingError(
                    f"the loss became {value} at epoch {epoch}, mini-batch {i}; the weight was restored. "
                    f"Edits of that mini-batch: " + ", ".join(
                        f"{r} ({run.edits[r].prompt!r} -> {run.edits[r].target_new!r})" for r in rows.tolist())
                    + f". Try a smaller lr (now {self.lr:g}) or check the model for non-finite weights")
            total += value * len(rows)
            if value >= self.loss_threshold:
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                _step(run.opt, run.master, self.handle.parameter)
                taken += 1
            if self.callback is not None:
                self.callback(TrainStep(run.counted, value, epoch=epoch, batch=i))
            run.counted += 1
        run.history.append(total / n)
        run.steps.append(taken)

    def losses(self, edits: Any) -> Float[Tensor, " edits"]:
        """Each edit's training loss at the current weight, as :meth:`fit` computes it.

        Example:
            >>> from gradlocate.models import tiny
            >>> model, tok = tiny("llama", n_layers=2, d_model=16)
            >>> LocFTBF(model, 0, progress=False).losses([{"prompt": "a", "target_new": "b"}]).shape
            torch.Size([1])
        """
        edits = as_edits(edits)
        batch = edit_batch(self.h, [e.prompt for e in edits], [e.target_new for e in edits],
                           self.append_eos).to(input_device(self.h.root))
        with using(self.h), torch.no_grad(), Executor(self.h, self.layer, batch) as ex:
            return torch.cat([ex.losses(r) for r in torch.arange(len(edits)).split(64)]).cpu()

    def _modes(self, batch: TokenBatch) -> tuple[str, str]:
        """The executor: the activation cache if allowed and it fits; the fused or
        selective head if it reproduces the plain losses on two edits (rtol 1e-4)."""
        cache = "none"
        if self.cache is not False:
            additive, skippable = probe_additive(self.h, self.layer, batch)
            n, w = batch.input_ids.shape
            e, site = self.handle.parameter.element_size(), self.handle
            size = {"down_input": n * w * (site.d_model + site.d_mlp) * e, "residual": n * w * site.d_model * e}
            fits = lambda m: self.cache is True or size[m] <= self.cache_budget  # noqa: E731
            if not skippable:
                warnings.warn(f"decoder block {self.layer} returns a structure a skipped block cannot stand in for: "
                              f"training without the activation cache", stacklevel=4)
            elif additive and fits("down_input"):
                cache = "down_input"
            elif self.layer > 0 and fits("residual"):
                cache = "residual"
        candidates = {"auto": ("fused", "select"), "fused": ("fused",), "select": ("select",), "full": ()}[self.head]
        if self.h.head is None or getattr(self.h.head, "weight", None) is None:
            candidates = ()
        rows = torch.arange(min(2, len(batch)), device=batch.input_ids.device)
        with torch.no_grad():
            with Executor(self.h, self.layer, batch) as plain:
                reference = plain.losses(rows)
            for mode in candidates:
                try:
                    with Executor(self.h, self.layer, batch, head=mode) as ex:
                        got = ex.losses(rows)
                except Exception:  # noqa: BLE001 - any failure means: try the next mode
                    continue
                if torch.allclose(reference, got.to(reference.device), rtol=1e-4, atol=1e-5):
                    return cache, mode
        if self.head not in ("auto", "full"):
            warnings.warn(f"head={self.head!r} does not reproduce the model's losses here: using full logits",
                          stacklevel=4)
        return cache, "full"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "locft-bf", "layer": self.layer, "path": self.handle.path, "lr": self.lr,
                "edits_per_step": self.edits_per_step, "epochs": self.epochs, "append_eos": self.append_eos,
                "seed": self.seed, "loss_threshold": self.loss_threshold}

    def __repr__(self) -> str:
        state = "committed" if self.undo.committed else ("edited" if self.edited else "unedited")
        return (f"LocFTBF(layer={self.layer}, path={self.handle.path!r}, lr={self.lr:g}, "
                f"edits_per_step={self.edits_per_step or 'auto'}, epochs={self.epochs}, {state})")


def _epochs(n: int, layer: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"LocFT-BF layer {layer}", disable=None if progress is None else not progress,
                leave=False)


def _step(opt: torch.optim.Optimizer, master: Tensor, param: Tensor) -> None:
    if master is param:
        opt.step()
        return
    if param.grad is None:  # the loss did not reach the weight: nothing to step
        return
    master.grad = param.grad.float()
    param.grad = None
    opt.step()
    with torch.no_grad():
        param.copy_(master)

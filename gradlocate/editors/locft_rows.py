"""LocFT-BF on every edit alone, all at once: per-row weight changes in one batch.

For the single-edit matrix each edit is trained alone at a layer. Done naively that is
one :class:`~gradlocate.editors.locft.LocFTBF` run per edit. Here all edits of a layer
train together, in one batched forward and backward per epoch, each batch row carrying
its own weight change ``delta[i]`` on the layer's site
(:class:`~gradlocate.editors.executors.Executor` with ``delta``: no copy of the model).
Adam is elementwise, so one Adam over the stacked deltas is N independent Adams; a row
stops stepping below the loss threshold and stops training once it has converged,
exactly as a single-edit run does (``tests/test_samplewise.py`` checks each row against
:class:`~gradlocate.editors.locft.LocFTBF` on that edit alone, to 1e-5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.data import Edits
from gradlocate.editors.executors import Executor, cache_mode
from gradlocate.editors.locft import LOSS_THRESHOLD, PAPER_EPOCHS, PAPER_LR, EditTrainingError, LocFTBF
from gradlocate.editors.protocol import EditorSpec, summary
from gradlocate.editors.settings import LocFTSettings
from gradlocate.gradients import edit_batch
from gradlocate.handles import Handles
from gradlocate.interventions import using
from gradlocate.state import input_device

__all__ = ["train_per_sample", "SPECS"]

_BETAS, _EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which LocFTBF uses


def train_per_sample(h: Handles, layer: int, edits: Edits, *, lr: float = PAPER_LR, epochs: int = PAPER_EPOCHS,
                     seed: int = 0, loss_threshold: float = LOSS_THRESHOLD, append_eos: bool = True,
                     cache: bool | str = "auto", head: str = "auto",
                     **unused: Any) -> tuple[Float[Tensor, "edits d_model d_mlp"], list[dict[str, Any]]]:
    """Train LocFT-BF on each edit alone at ``layer``, all edits at once: returns the
    per-edit weight changes ``[edits, d_model, d_mlp]`` (canonical layout, float32) and each
    edit's training summary (epochs, final loss, converged, steps).

    Each row is the single-edit run of :class:`~gradlocate.editors.locft.LocFTBF` with the same
    settings: one step per epoch (a mini-batch of one edit), no step below
    ``loss_threshold``, stop after the first epoch below it; Adam with torch's defaults.
    """
    if unused.keys() - {"progress", "callback", "edits_per_step", "cache_budget"}:
        raise TypeError(f"train_per_sample got unknown trainer settings {sorted(unused)}")
    site = h[layer]
    dev = input_device(h.root)
    batch = edit_batch(h, [e.prompt for e in edits], [e.target_new for e in edits], append_eos).to(dev)
    n = len(edits)
    delta = torch.zeros(n, site.d_model, site.d_mlp, device=site.device, dtype=torch.float32, requires_grad=True)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    steps = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    history: list[list[float]] = [[] for _ in range(n)]
    taken: list[int] = [0] * n
    with using(h), torch.enable_grad():
        mode = "none"
        if cache is not False:
            mode = cache_mode(h, layer, batch)
        heads = {"auto": "fused", "fused": "fused", "select": "select", "full": "full"}
        head_mode = heads[head] if h.head is not None and getattr(h.head, "weight", None) is not None else "full"
        with Executor(h, layer, batch, mode, head_mode, delta=delta) as ex:
            for _ in range(epochs):
                rows = active.nonzero().flatten()
                if rows.numel() == 0:
                    break
                losses = ex.losses(rows.to(dev))
                values = losses.detach().cpu().tolist()
                bad = [int(r) for r, x in zip(rows, values) if not math.isfinite(x)]
                if bad:
                    raise EditTrainingError(f"sample-wise training at layer {layer}: the loss became non-finite for "
                                            f"edits {bad[:5]}; try a smaller lr (now {lr:g})")
                step = torch.tensor([x >= loss_threshold for x in values])
                if bool(step.any()):
                    (grad,) = torch.autograd.grad(losses[step.to(losses.device)].sum(), delta)
                    _adam(delta, grad, m, v, steps, rows[step], lr)
                for r, x, s in zip(rows.tolist(), values, step.tolist()):
                    history[r].append(x)
                    taken[r] += int(s)
                    if x < loss_threshold:
                        active[r] = False
    summaries = [summary(hs, bool(hs) and hs[-1] < loss_threshold, taken[i], epochs=len(hs))
                 for i, hs in enumerate(history)]
    return delta.detach(), summaries


def _per_edit(h: Handles, layer: int, edits: Edits, settings: LocFTSettings, memo: dict[Any, Any] | None = None,
              **runtime: Any) -> tuple[Float[Tensor, "edits d_model d_mlp"], list[dict[str, Any]]]:
    """The registry's ``per_edit`` for LocFT-BF (``memo``: nothing of it is layer-independent)."""
    if runtime:
        raise TypeError(f"LocFT-BF's per-edit training takes no argument {sorted(runtime)}")
    s = settings
    return train_per_sample(h, layer, edits, lr=s.lr, epochs=s.epochs, seed=s.seed, loss_threshold=s.loss_threshold,
                            append_eos=s.append_eos, cache=s.cache, head=s.head)


# LocFT-BF's registration lives here, beside its per-edit trainer (which imports the
# editor class; the other way round would be an import cycle).
SPECS = [EditorSpec("locft", "LocFT-BF", LocFTBF, LocFTSettings, _per_edit, None, ("locft-bf", "ft"),
                    "fine-tune one layer's down-projection, breadth first (Yang et al. 2025)")]


@torch.no_grad()
def _adam(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, steps: Tensor, rows: Tensor, lr: float) -> None:
    """``torch.optim.Adam``'s step (betas 0.9/0.999, eps 1e-8, no weight decay; the same
    operations as its single-tensor path) on the rows that step; each row keeps its own
    step count, as its own optimizer would. In place: at ``[edits, d_model, d_mlp]`` the
    update is memory-bound, and gathering rows copied every state tensor."""
    b1, b2 = _BETAS
    steps[rows] += 1
    for t in sorted(set(steps[rows].tolist())):  # rows with one step count share the bias corrections
        same = rows[steps[rows] == t]
        if same.numel() == param.shape[0]:  # every row, one count: no gather, no scatter
            p, g, mm, vv = param, grad, m, v
        else:
            r = same.to(param.device)
            p, g, mm, vv = param[r], grad[r], m[r], v[r]
        mm.lerp_(g, 1 - b1)
        vv.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (vv.sqrt() / math.sqrt(1 - b2 ** t)).add_(_EPS)
        p.addcdiv_(mm, denom, value=-lr / (1 - b1 ** t))
        if p is not param:
            param[r], m[r], v[r] = p, mm, vv

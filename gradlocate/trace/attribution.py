"""Causal tracing at gradient cost: attribution patching (AtP).

ROME's causal trace restores one (token, layer) state per forward. Attribution patching
(Nanda 2023; AtP*, Kramar et al. 2024, arXiv 2403.00745) estimates every cell at once to
first order, from one clean forward, one corrupted forward of all ``samples`` rows and
one backward. The metric linearised is the answer's **log**-probability in each
corrupted sample ``s``, ``log p_s``: for a state ``h`` (a block's output, or an MLP's or
attention's output) restored to its clean value,

``log p_s(h_s <- h_clean) ≈ log p_s + Δ_s,   Δ_s = (h_clean - h_s) · ∂ log p_s / ∂h_s``

and the cell's score, like the exact trace's, is the mean probability:
``score(t, l) ≈ mean_s min(1, p_s · exp(Σ_{j ∈ window(l)} Δ_s(t, j)))`` (the window sum
for mlp/attn restores several layers at once, whose first-order effects add). Why log:
the corrupted probability is small, and there ``log p`` is nearly linear in the answer's
logit while ``p`` is not: on 50 CounterFact prompts with SmolLM2, the median Spearman
against the exact trace is 0.48 for mlp and 0.61 for hidden, against 0.39 and 0.58
linearising ``p`` (``space="prob"``); attn is about even (0.50 vs 0.52).
Tokens before the subject are unaffected by the noise: their estimate is exactly
``low_score``, as their exact score is.

The estimate is still first order; it is poor where restoring a state changes a lot at
once - a whole residual stream (``kind="hidden"``), a window of ten MLPs, saturated
probabilities. ``verify=k`` re-runs the ``k`` highest estimated cells exactly, so the
reported peak is exact (among the cells checked). ``docs/causal_tracing.md`` measures
where it agrees with the exact trace and where not.

Example:
    >>> import torch
    >>> from gradlocate import causal_trace
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=4, d_model=32, initializer_range=0.4, seed=1)
    >>> est = causal_trace(model, "So Paris is in", "Paris", kind="mlp", window=1, samples=3, method="atp")
    >>> exact = causal_trace(model, "So Paris is in", "Paris", kind="mlp", window=1, samples=3)
    >>> est.params["method"], tuple(est.scores.shape) == tuple(exact.scores.shape)
    ('atp', True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.handles import Handles
from gradlocate.interventions import capture, no_cache, path_of, replaced, run, states
from gradlocate.trace.core import KINDS, TracePrompt, cells_of, last_only, last_probs, site_paths, window_layers
from gradlocate.trace.fast import FastTrace

__all__ = ["atp_estimates", "verify_cells", "window_sum"]


def window_sum(effects: Float[Tensor, "*lead layers"], window: int) -> Float[Tensor, "*lead layers"]:
    """Column ``l`` (last dimension) of the result is the sum of ``effects`` over
    ``window_layers(l, window)``: the first-order effect of restoring that whole window.

    Example:
        >>> import torch
        >>> window_sum(torch.tensor([[1.0, 2.0, 4.0]]), 2).tolist()   # windows {0}, {0, 1}, {1, 2}
        [[1.0, 3.0, 6.0]]
    """
    n = effects.shape[-1]
    return torch.stack([effects[..., list(window_layers(l, window, n))].sum(-1) for l in range(n)], dim=-1)


def atp_estimates(h: Handles, tp: TracePrompt, kinds: Sequence[str],
                  noise: Float[Tensor, "samples subject d_model"], answer: int | None, window: int, space: str = "log",
                  ) -> tuple[dict[str, Float[Tensor, "pos layers"]], int, float, float, dict[str, float]]:
    """AtP estimates of every (token, layer) cell of each kind in ``kinds``, from one
    clean forward, one corrupted forward of all samples and one backward.

    ``space="log"`` linearises each sample's ``log p`` (the module docstring);
    ``space="prob"`` linearises ``p`` itself (plain AtP on the probability:
    ``score ≈ low_score + mean_s Σ_window (h_clean - h_s) · ∂p_s/∂h_s``), kept to measure
    the difference.

    Returns ``(scores by kind [pos, layers], answer, high_score, low_score, timings)``,
    the scores at every prompt position and layer: estimates of the answer's mean
    probability with the cell restored.
    """
    _check(kinds, space)
    paths = {k: site_paths(h, k) for k in kinds}
    every = sorted({p for ps in paths.values() for p in ps})
    ids = torch.tensor([list(tp.ids)], device=noise.device)
    T, S = ids.shape[1], noise.shape[0]
    t0 = time.perf_counter()
    with torch.no_grad(), capture(h, every, detach=True) as clean_cap, last_only(h, 1, T):
        out = run(h, input_ids=ids, **no_cache(h.root))
    probs = last_probs(h, out)[0]
    answer = int(probs.argmax()) if answer is None else answer
    high = float(probs[answer])
    t1 = time.perf_counter()
    s0 = tp.subject_range[0]

    def noised_leaf(emb: Tensor) -> Tensor:
        # The corrupted embeddings, made a leaf that needs grad: the frozen model then
        # builds the graph back to them, through every captured state.
        emb = emb.detach().clone()
        emb[:, s0:s0 + noise.shape[1]] += noise.to(emb.dtype)
        return emb.requires_grad_(True)

    with torch.enable_grad(), replaced(h, path_of(h, h.require_embed("attribution patching noises its outputs")), noised_leaf), capture(h, every) as cor, \
            last_only(h, S, T):
        out = run(h, input_ids=ids.expand(S, -1), **no_cache(h.root))
        p = last_probs(h, out, answer)  # [S]
        # A probability that underflowed to 0 would make log p -inf and its gradient NaN.
        metric = p.double().clamp_min(1e-300).log() if space == "log" else p
        grads = torch.autograd.grad(metric.sum(), [cor.outputs[q] for q in every])  # rows are independent
    p = p.detach().double().cpu()
    low = float(p.mean())
    t2 = time.perf_counter()
    effect = {}
    for q, g in zip(every, grads):
        clean = states(clean_cap.outputs[q], 1)  # [1, T, d]
        corrupted = states(cor.outputs[q].detach(), S)  # [S, T, d]
        effect[q] = ((clean - corrupted) * states(g, S)).double().sum(-1).cpu()  # [S, T]
    scores = {}
    for k in kinds:
        cells = torch.stack([effect[q] for q in paths[k]], dim=-1)  # [S, T, L]
        scores[k] = _estimate(cells if k == "hidden" else window_sum(cells, window), p, low, space)
    return scores, answer, high, low, {"clean": t1 - t0, "corrupted_and_backward": t2 - t1,
                                        "estimate": time.perf_counter() - t2}


def _check(kinds: Sequence[str], space: str) -> None:
    """An error naming what is allowed for an unknown kind or space."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {k!r}")
    if space not in ("log", "prob"):
        raise ValueError(f"space must be 'log' or 'prob', got {space!r}")


def _estimate(delta: Float[Tensor, "samples pos layers"], p: Float[Tensor, " samples"], low: float,
              space: str) -> Float[Tensor, "pos layers"]:
    """The cells' scores from each sample's first-order effect ``delta`` (in ``space``)
    and its corrupted probability ``p``."""
    if space == "log":
        # exp(80) > 1/p for any p the forward can produce: the clamp only avoids inf * 0.
        est = (p[:, None, None] * delta.clamp(max=80.0).exp()).clamp(max=1.0).mean(0)
    else:
        est = low + delta.mean(0)
    return est.float()


def verify_cells(h: Handles, tp: TracePrompt, kind: str, noise: Float[Tensor, "samples subject d_model"], answer: int,
                 window: int, cells: Sequence[tuple[int, int]], batch_size: int, merge: bool | None,
                 ) -> tuple[list[float], dict[str, int]]:
    """The exact scores of the ``(token, layer)`` cells (with the fast executor), and
    its forward counts."""
    engine = FastTrace(h, kind, batch_size, merge, True)
    s, _ = engine.setup(tp, noise, answer)
    todo = [replace(c, row=i) for i, (t, l) in enumerate(cells)
            for c in cells_of(h, kind, window, [t], [l], tp.subject_range[0])]
    out = [s.low] * len(cells)
    for c, v in zip(todo, engine.scores(s, todo, progress=False)):
        out[c.row] = v
    return out, dict(engine.stats)

"""Causal tracing at gradient cost: attribution patching (AtP).

ROME's causal trace restores one (token, layer) state per forward. Attribution patching
(Nanda 2023; AtP*, Kramár et al. 2024, arXiv 2403.00745) estimates every cell at once to
first order. With ``p_s`` the answer's probability in corrupted sample ``s`` and ``h`` a
state (a block's output, or an MLP's or attention's output):

``p_s(h_s <- h_clean) ≈ p_s + (h_clean - h_s) · ∂p_s/∂h_s``

so from one clean forward, one corrupted forward of all ``samples`` rows and one
backward, every cell of every kind is estimated:
``score(t, l) ≈ low_score + mean_s Σ_{j ∈ window(l)} (h_clean - h_s)(t, j) · ∂p_s/∂h(t, j)``
(the window sum for mlp/attn restores several layers at once, whose first-order effects
add). Tokens before the subject are unaffected by the noise: their estimate is exactly
``low_score``, as their exact score is.

The estimate is linear; it is poor where restoring a state changes a lot at once - a
whole residual stream (``kind="hidden"``), early layers, saturated probabilities - and
good for the small writes of single MLPs. ``verify=k`` re-runs the ``k`` highest
estimated cells exactly, so the reported peak is exact (among the cells checked).
``docs/causal_tracing.md`` measures where it agrees with the exact trace and where not.

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
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.handles import Handles
from gradlocate.interventions import capture, no_cache, path_of, replaced, run, states
from gradlocate.tracing import KINDS, TracePrompt, last_only, last_probs, site_paths, window_layers

__all__ = ["atp_estimates", "window_sum"]


def window_sum(effects: Float[Tensor, "tokens layers"], window: int) -> Float[Tensor, "tokens layers"]:
    """Column ``l`` of the result is the sum of ``effects`` over ``window_layers(l, window)``:
    the first-order effect of restoring that whole window.

    Example:
        >>> import torch
        >>> window_sum(torch.tensor([[1.0, 2.0, 4.0]]), 2).tolist()   # windows {0}, {0, 1}, {1, 2}
        [[1.0, 3.0, 6.0]]
    """
    n = effects.shape[1]
    return torch.stack([effects[:, list(window_layers(l, window, n))].sum(1) for l in range(n)], dim=1)


def atp_estimates(h: Handles, tp: TracePrompt, kinds: Sequence[str], noise: Float[Tensor, "samples subject d"],
                  answer: int | None, window: int) -> tuple[dict[str, Tensor], int, float, float, dict[str, float]]:
    """AtP estimates of every (token, layer) cell of each kind in ``kinds``, from one
    clean forward, one corrupted forward of all samples and one backward.

    Returns ``(scores by kind [tokens, layers], answer, high_score, low_score, timings)``;
    ``scores`` are estimates of the answer's mean probability with the cell restored.
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {k!r}")
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

    with torch.enable_grad(), replaced(h, path_of(h, h.embed), noised_leaf), capture(h, every) as cor, \
            last_only(h, S, T):
        out = run(h, input_ids=ids.expand(S, -1), **no_cache(h.root))
        p = last_probs(h, out, answer)  # [S]
        grads = torch.autograd.grad(p.sum(), [cor.outputs[q] for q in every])  # rows are independent
    low = float(p.detach().mean())
    t2 = time.perf_counter()
    effect = {}
    for q, g in zip(every, grads):
        clean = states(clean_cap.outputs[q], 1)  # [1, T, d]
        corrupted = states(cor.outputs[q].detach(), S)  # [S, T, d]
        effect[q] = ((clean - corrupted) * states(g, S)).float().sum(-1).mean(0)  # [T]
    scores = {}
    for k in kinds:
        cells = torch.stack([effect[q] for q in paths[k]], dim=1).cpu()  # [T, L]
        scores[k] = low + (cells if k == "hidden" else window_sum(cells, window))
    return scores, answer, high, low, {"clean": t1 - t0, "corrupted_and_backward": t2 - t1,
                                        "estimate": time.perf_counter() - t2}


def verify_cells(h: Handles, tp: TracePrompt, kind: str, noise: Tensor, answer: int, window: int,
                 cells: Sequence[tuple[int, int]], batch_size: int, merge: Any) -> tuple[list[float], dict[str, int]]:
    """The exact scores of the ``(token, layer)`` cells (with the fast executor), and
    its forward counts."""
    from dataclasses import replace

    from gradlocate.trace_plan import FastTrace
    from gradlocate.tracing import cells_of

    engine = FastTrace(h, kind, batch_size, merge, True)
    s, _ = engine.setup(tp, noise, answer)
    todo = [replace(c, row=i) for i, (t, l) in enumerate(cells)
            for c in cells_of(h, kind, window, [t], [l], tp.subject_range[0])]
    out = [s.low] * len(cells)
    for c, v in zip(todo, engine.scores(s, todo, progress=False)):
        out[c.row] = v
    return out, dict(engine.stats)

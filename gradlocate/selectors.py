"""The two published gradient-based layer selectors, on the MLP down-projections.

* :func:`gradratio` (GradRatio-Select): ``S(l) = ||g_edit(l)||_F^2 / ||g_retain(l)||_F^2``,
  the argmax over layers ``l >= l_min`` with ``l_min = max(3, ceil(0.15 L))``
  (:func:`adaptive_min_layer`).
* :func:`lga` (Layer Gradient Analysis, "Golden Layers", arXiv 2602.20207):
  ``S(l) = sum_i <grad_{W_l} L_old^i, grad_{W_l} L_new^i>``; layers outside Tukey's
  fences (:func:`tukey_fences`) are excluded, the golden layer is the argmax of the
  signed score among the rest.

Both return a :class:`~gradlocate.results.LayerScores`. The exact definitions and the
choices made are in ``docs/methods.md``.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=6, d_model=16)
    >>> edits = [{"prompt": "Paris is in", "target_new": "Rome", "ground_truth": "France"}]
    >>> r = gradratio(model, edits, ["Some general text.", "More text here."])
    >>> r.method, r.selected >= adaptive_min_layer(6), len(r.scores)
    ('gradratio', True, 6)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from gradlocate.gradients import (
    LayerGradients,
    edit_gradients,
    greedy_answers,
    per_sample_inner_products,
    resolve_edits,
    retain_gradients,
)
from gradlocate.data import load_texts
from gradlocate.handles import down_projections
from gradlocate.memory import check_max_memory
from gradlocate.results import LayerScores

__all__ = ["adaptive_min_layer", "TukeyFences", "tukey_fences", "gradratio", "lga"]


# --------------------------------------------------------------------------- helpers


def adaptive_min_layer(n_layers: int) -> int:
    """GradRatio-Select's lowest eligible layer: ``l_min = max(3, ceil(0.15 L))``.

    Computed in exact integer arithmetic, ``ceil(15 L / 100)``, so no floating-point
    rounding can move the ceiling. ``L`` is the model's number of decoder layers.

    Example:
        >>> [adaptive_min_layer(L) for L in (12, 20, 28, 30, 32, 80)]
        [3, 3, 5, 5, 5, 12]
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    return max(3, -(-15 * int(n_layers) // 100))


class TukeyFences(NamedTuple):
    """Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]`` of a score vector.

    Attributes:
        lower, upper: the fences.
        q1, q3: the quartiles (linear interpolation between order statistics, i.e.
            numpy's default / Hyndman-Fan type 7).
        k: the multiplier.
        inside: per score, whether ``lower <= score <= upper``.
    """

    lower: float
    upper: float
    q1: float
    q3: float
    k: float
    inside: list[bool]


def tukey_fences(scores: Sequence[float], k: float = 1.0) -> TukeyFences:
    """Tukey's fences of ``scores`` with multiplier ``k`` and which scores lie inside.

    Quartiles use linear interpolation between order statistics (type 7). Scores on a
    fence count as inside. Tukey's classic ``k`` is 1.5; LGA uses 1.0 by default.

    Raises:
        ValueError: empty or non-finite scores, or ``k`` negative or not finite.

    Example:
        >>> f = tukey_fences([1.0, 2.0, 3.0, 4.0, 100.0], k=1.0)
        >>> f.q1, f.q3, f.lower, f.upper, f.inside
        (2.0, 4.0, 0.0, 6.0, [True, True, True, True, False])
    """
    x = np.asarray([float(s) for s in scores], dtype=np.float64)
    if x.size == 0:
        raise ValueError("tukey_fences needs at least one score")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"tukey_fences needs finite scores, got {x.tolist()}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"the fence multiplier k must be a finite number >= 0, got {k!r}")
    q1, q3 = (float(v) for v in np.quantile(x, [0.25, 0.75]))
    iqr = q3 - q1
    lo, hi = q1 - k * iqr, q3 + k * iqr
    return TukeyFences(lo, hi, q1, q3, float(k), [bool(lo <= v <= hi) for v in x])


def _argmax(values: Sequence[float], mask: Sequence[bool]) -> int:
    """Position of the largest value where ``mask`` holds (nan counts as -inf; ties: the first)."""
    cands = [i for i, m in enumerate(mask) if m]
    if not cands:
        raise ValueError("no eligible layer to select from")
    return max(cands, key=lambda i: -math.inf if math.isnan(values[i]) else values[i])


def _resolve_min_layer(min_layer: Any, n_layers: int) -> int:
    if min_layer == "adaptive":
        l_min = adaptive_min_layer(n_layers)
        if l_min >= n_layers:
            warnings.warn(
                f"the model has only {n_layers} layer(s): GradRatio's l_min = max(3, ceil(0.15 L)) = {l_min} "
                f"leaves no eligible layer, so l_min is clamped to the last layer ({n_layers - 1})",
                stacklevel=3,
            )
            l_min = n_layers - 1
        return l_min
    if isinstance(min_layer, bool) or not isinstance(min_layer, (int, np.integer)):
        raise ValueError(f"min_layer must be 'adaptive' or an int, got {min_layer!r}")
    if not 0 <= int(min_layer) < n_layers:
        raise ValueError(f"min_layer={min_layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return int(min_layer)


def _check_precomputed(g: LayerGradients, what: str, layers: list[int] | None) -> None:
    if g.kind != what:
        raise ValueError(f"the {what} argument is a LayerGradients of the {g.kind!r} loss, not of the {what!r} loss")
    if layers is not None and list(g.layers) != list(layers):
        raise ValueError(f"the precomputed {what} gradients cover layers {g.layers}, not the requested {layers}")


# --------------------------------------------------------------------------- GradRatio


def gradratio(model: Any, edits: Any, retain: Any, *, tokenizer: Any = None,
              min_layer: int | Literal["adaptive"] = "adaptive", layers: Sequence[int] | int | None = None,
              batch_size: int = 8, max_length: int | None = 128, append_eos: bool = False,
              progress: bool | None = None, max_memory: int | None = None) -> LayerScores:
    """GradRatio-Select: the layer whose down-projection gradient is largest for the
    edits relative to general text.

    ``S(l) = ||grad_{W_l} L_edit||_F^2 / ||grad_{W_l} L_retain||_F^2`` with ``L_edit``
    the mean over edits of the mean target NLL (eq. 1) and ``L_retain`` the mean
    next-token NLL of the retain texts (eq. 2). Selected: ``argmax_{l >= l_min} S(l)``
    with ``l_min = max(3, ceil(0.15 L))`` (``min_layer="adaptive"``; on a model with
    ``L <= 3`` layers it is clamped to ``L - 1`` with a warning) or ``min_layer=`` an int.

    Also reported per layer (``extras``): ``g_edit_sq``, ``g_retain_sq``,
    ``cos`` = cos(g_edit, g_retain), and ``first_formulation`` =
    ``||g_edit||^2 (1 - |cos|)`` (the paper's first formulation; its ablation found
    ``cos`` near 0 everywhere, which you can check here).

    Paper defaults: 32 edits, 256 retain sequences of 128 tokens. gradlocate uses what
    it is given, cutting retain texts to ``max_length`` tokens (128).

    Args:
        model: a Hugging Face causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: edits in any public spelling (see :func:`~gradlocate.gradients.resolve_edits`),
            or a precomputed :class:`~gradlocate.gradients.LayerGradients` of the edit loss.
        retain: retain texts (a list of strings or anything
            :func:`~gradlocate.data.load_texts` reads), or a precomputed
            :class:`~gradlocate.gradients.LayerGradients` of the retain loss; computing it
            once with ``retain_gradients(..., keep=True)`` and reusing it across edit sets
            saves half the work.
        min_layer: ``"adaptive"`` or the lowest eligible layer index.
        layers: score only these layers (``l_min`` still refers to the model's depth).
        batch_size: sequences per forward/backward.
        max_length: retain texts are cut to this many tokens.
        append_eos: append EOS to each edit target.
        progress: progress bars (default: on a terminal only).
        max_memory: a byte budget for activations; micro-batches shrink to fit it
            (same result, see :mod:`gradlocate.memory`).

    Raises:
        ValueError: empty edits or retain set, bad targets, layers out of range, or no
            requested layer at or above ``l_min``.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=8, d_model=16)
        >>> r = gradratio(model, [{"src": "Who wrote Hamlet?", "alt": "Marlowe"}], ["It rained all day."])
        >>> r.params["l_min"], r.eligible[:4], sorted(r.extras)
        (3, [False, False, False, True], ['cos', 'first_formulation', 'g_edit_sq', 'g_retain_sq'])
    """
    t0 = time.perf_counter()
    check_max_memory(max_memory)
    hs = down_projections(model)
    n_layers = len(hs)
    pre = [g for g in (edits, retain) if isinstance(g, LayerGradients)]
    idx = hs.layer_indices(layers) if (layers is not None or not pre) else list(pre[0].layers)
    l_min = _resolve_min_layer(min_layer, n_layers)
    eligible = [l >= l_min for l in idx]
    if not any(eligible):
        raise ValueError(f"none of the layers {idx} is at or above l_min = {l_min}: score higher layers "
                         f"or pass min_layer=")
    # Check both inputs before the (long) gradient computations.
    if not isinstance(edits, LayerGradients):
        edits = resolve_edits(edits)
    if not isinstance(retain, LayerGradients):
        retain = load_texts(retain)
    kw = dict(tokenizer=tokenizer, layers=idx, batch_size=batch_size, keep=True, progress=progress,
              max_memory=max_memory)
    if isinstance(edits, LayerGradients):
        _check_precomputed(edits, "edit", idx)
        g_e = edits
    else:
        g_e = edit_gradients(hs, edits, append_eos=append_eos, **kw)
    if isinstance(retain, LayerGradients):
        _check_precomputed(retain, "retain", idx)
        g_r = retain
    else:
        g_r = retain_gradients(hs, retain, max_length=max_length, **kw)

    e, r = g_e.sq_norms, g_r.sq_norms
    if g_e.grads is not None and g_r.grads is not None:
        cos = g_e.cosine(g_r)
    else:
        warnings.warn("precomputed gradients without keep=True: cos and first_formulation are nan", stacklevel=2)
        cos = [math.nan] * len(idx)
    scores = [_ratio(a, b) for a, b in zip(e, r)]
    first = [a * (1 - abs(c)) for a, c in zip(e, cos)]
    sel = idx[_argmax(scores, eligible)]
    params = {
        "n_layers": n_layers, "l_min": l_min, "min_layer": min_layer, "n_edits": g_e.n_sequences,
        "edit_tokens": g_e.n_tokens, "n_retain": g_r.n_sequences, "retain_tokens": g_r.n_tokens,
        "edit_loss": g_e.loss, "retain_loss": g_r.loss, "batch_size": batch_size,
        "max_length": max_length, "append_eos": append_eos, "max_memory": max_memory,
    }
    # Parts that add up to the wall time (LayerScores' repr shows their sum).
    timings = {"edit_gradients": g_e.timings.get("gradients", 0.0) if g_e is not edits else 0.0,
               "retain_gradients": g_r.timings.get("gradients", 0.0) if g_r is not retain else 0.0}
    timings["other"] = max(0.0, time.perf_counter() - t0 - sum(timings.values()))
    return LayerScores("gradratio", scores, eligible, sel, params,
                       {"g_edit_sq": e, "g_retain_sq": r, "cos": cos, "first_formulation": first},
                       timings, idx)


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


# --------------------------------------------------------------------------- LGA


def lga(model: Any, edits: Any, *, tokenizer: Any = None, fence: float = 1.0,
        aggregate: Literal["sum", "mean"] = "sum", sign: Literal["signed", "negative", "abs"] = "signed",
        layers: Sequence[int] | int | None = None, batch_size: int = 8, append_eos: bool = False,
        max_new_tokens: int = 8, progress: bool | None = None, max_memory: int | None = None) -> LayerScores:
    """Layer Gradient Analysis: the "golden layer" from per-sample gradient inner products.

    ``S(l) = sum_i <grad_{W_l} L_old^i, grad_{W_l} L_new^i>_F`` where ``L_new^i`` is edit
    ``i``'s mean NLL of ``target_new`` and ``L_old^i`` that of its old answer
    (``ground_truth``, else ``pred``, else the model's own greedy answer, see
    :func:`~gradlocate.gradients.greedy_answers`). Layers whose score lies outside Tukey's
    fences ``[Q1 - k IQR, Q3 + k IQR]`` over all scored layers (``k = fence``) are
    excluded; the golden layer is the argmax of the score among the rest.

    The inner products come from the ghost identity (two forward+backward passes per
    micro-batch, no per-sample weight gradient materialised).

    Arguments not listed below are as in :func:`gradratio`.

    Args:
        fence: Tukey's ``k`` (default 1.0).
        aggregate: ``"sum"`` (the definition) or ``"mean"`` over edits; the selection and
            the fences are the same for both (the fences are scale-equivariant).
        sign: what is maximised among the layers inside the fences: ``"signed"`` (the
            definition: ``S``), ``"negative"`` (``-S``: the layer where lowering the new
            target's loss most raises the old answer's) or ``"abs"`` (``|S|``). The fences
            are always computed on ``S``.
        max_new_tokens: length cap of a generated old answer.
        max_memory: a byte budget for activations; chunks of edits shrink to fit it.

    Returns:
        :class:`~gradlocate.results.LayerScores` with ``scores`` = ``S`` (aggregated as asked),
        ``eligible`` = inside the fences, extras ``mean`` / ``std`` (over edits) and
        ``cos_mean`` (mean per-edit cosine of the two gradients), and the fences in ``params``.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=4, d_model=16)
        >>> r = lga(model, [{"prompt": "Paris is in", "target_new": "Rome", "ground_truth": "France"},
        ...                 {"src": "Who wrote Hamlet?", "alt": "Marlowe", "answers": ["Shakespeare"]}])
        >>> r.method, len(r.scores), r.eligible[r.selected], sorted(r.extras)
        ('lga', 4, True, ['cos_mean', 'mean', 'std'])
    """
    t0 = time.perf_counter()
    if aggregate not in ("sum", "mean"):
        raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
    if sign not in ("signed", "negative", "abs"):
        raise ValueError(f"sign must be 'signed', 'negative' or 'abs', got {sign!r}")
    if isinstance(fence, bool) or not isinstance(fence, (int, float)) or not math.isfinite(fence) or fence < 0:
        raise ValueError(f"fence (Tukey's k) must be a finite number >= 0, got {fence!r}")
    check_max_memory(max_memory)
    edits = resolve_edits(edits)
    hs = down_projections(model)
    idx = hs.layer_indices(layers)

    old = [e.old_answer if e.old_answer is not None and e.old_answer.strip() else None for e in edits]
    missing = [i for i, o in enumerate(old) if o is None]
    t1 = time.perf_counter()
    if missing:
        gen = greedy_answers(hs, [edits[i].prompt for i in missing], tokenizer=tokenizer,
                             max_new_tokens=max_new_tokens)
        for i, g in zip(missing, gen):
            old[i] = g
    t_old = time.perf_counter() - t1

    prods = per_sample_inner_products(hs, [e.prompt for e in edits], [e.target_new for e in edits],
                                      old, tokenizer=tokenizer, layers=idx, batch_size=batch_size,
                                      append_eos=append_eos, progress=progress, max_memory=max_memory)
    per = prods.dot  # [edits, layers], float64
    agg = per.sum(0) if aggregate == "sum" else per.mean(0)
    scores = [float(v) for v in agg]
    f = tukey_fences(scores, fence)
    if not any(f.inside):
        raise ValueError(f"every layer is outside Tukey's fences [{f.lower:.4g}, {f.upper:.4g}] with k={fence}: "
                         f"use a larger fence")
    key = {"signed": scores, "negative": [-s for s in scores], "abs": [abs(s) for s in scores]}[sign]
    sel = idx[_argmax(key, f.inside)]
    n = per.shape[0]
    std = per.std(0, unbiased=True) if n > 1 else torch.zeros(per.shape[1], dtype=per.dtype)
    cos_mean = torch.nanmean(prods.cosine, 0)
    params = {
        "fence": fence, "aggregate": aggregate, "sign": sign, "lower": f.lower, "upper": f.upper,
        "q1": f.q1, "q3": f.q3, "n_edits": n, "generated_old_answers": len(missing),
        "batch_size": batch_size, "append_eos": append_eos, "max_memory": max_memory,
        "new_loss": float(prods.loss_a.mean()), "old_loss": float(prods.loss_b.mean()),
    }
    timings = {"old_answers": t_old, "capture": prods.timings["capture"], "ghost": prods.timings["ghost"]}
    timings["other"] = max(0.0, time.perf_counter() - t0 - sum(timings.values()))
    return LayerScores("lga", scores, list(f.inside), sel, params,
                       {"mean": [float(v) for v in per.mean(0)], "std": [float(v) for v in std],
                        "cos_mean": [float(v) for v in cos_mean]},
                       timings, idx)

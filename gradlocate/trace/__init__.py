"""Causal tracing (causal mediation analysis) as in ROME, on any decoder-only model.

Causal tracing (Meng et al. 2022, ``experiments/causal_trace.py``) asks which hidden
states carry a fact:

1. run the prompt cleanly: the answer is the clean run's most likely next token
   (``high_score`` = its probability);
2. add Gaussian noise to the subject tokens' input embeddings in ``samples``
   corrupted copies (``low_score`` = the answer's mean probability over them);
3. for each (token ``t``, layer ``l``) cell copy the clean state into every corrupted
   copy - the decoder block's output (``kind="hidden"``), or the MLP / attention output
   at the ``window`` layers centred on ``l`` (``kind="mlp"`` / ``"attn"``) - and record
   the answer's mean probability over the corrupted copies.

:func:`causal_trace` (and :func:`trace_prompt`, for a prompt already tokenized) picks
the executor; the modules below it depend one way, each only on those listed before it:

* :mod:`gradlocate.trace.core`: the shared building blocks (sites and windows, the
  tokenized prompt, the noise, the clean and corrupted runs, the grid's cells);
* :mod:`gradlocate.trace.result`: :class:`~gradlocate.trace.result.TraceResult`;
* :mod:`gradlocate.trace.reference`: the reference path, ROME's ``trace_with_patch``
  (one forward per batch of cells, built from :mod:`gradlocate.interventions`);
* :mod:`gradlocate.trace.fast`: the default executor, the same scores with fewer and
  smaller forwards, proven equal to 1e-6 by the tests;
* :mod:`gradlocate.trace.attribution`: attribution patching (``method="atp"``), an
  estimate of every cell at gradient cost.

:func:`~gradlocate.selectors.cma_layer` builds the CMA layer choice on it.

Example:
    >>> import torch
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=4, d_model=32)
    >>> r = causal_trace(model, "The Eiffel Tower is in", "Eiffel Tower", samples=4, progress=False)
    >>> tuple(r.scores.shape), r.subject_range, r.kind
    ((22, 4), (4, 16), 'hidden')
    >>> abs(r.scores[-1, -1].item() - r.high_score) < 1e-5  # the last state decides the output
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.handles import HandleError, Handles, resolve, validate_indices
from gradlocate.interventions import using
from gradlocate.losses import NonFiniteLossError
from gradlocate.state import input_device
from gradlocate.trace.attribution import atp_estimates, verify_cells
from gradlocate.trace.core import Cell, Setup, TracePrompt, answer_id, cells_of, make_noise, site_paths, window_layers
from gradlocate.trace.fast import FastTrace
from gradlocate.trace.reference import ReferenceTrace
from gradlocate.trace.result import TraceResult

__all__ = ["causal_trace", "trace_prompt"]


def _check_options(h: Handles, kind: str, window: int, batch_size: int, method: str, verify: int) -> None:
    """Errors for the settings before any work: the method, and what the model must have."""
    if method not in ("exact", "atp"):
        raise ValueError(f"method must be 'exact' or 'atp', got {method!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify must be an int >= 0 (cells to re-run exactly), got {verify!r}")
    site_paths(h, kind)  # a clear error if the model has no module of this kind
    _embed_dtype(h)
    window_layers(0, window, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per forward), got {batch_size!r}")


def _embed_dtype(h: Handles) -> torch.dtype:
    """The input embedding's weight dtype (the noise's), or a clear error if there is none."""
    w = getattr(h.embed, "weight", None)
    if not isinstance(w, Tensor):
        raise HandleError(f"{type(h.root).__name__} has no get_input_embeddings() with a weight: causal tracing adds "
                          f"noise to the input embeddings and needs that module")
    return w.dtype


def _grid(s: Setup, cells: Sequence[Cell], values: Sequence[float], shape: tuple[int, int],
          prompt: str) -> Float[Tensor, "pos layers"]:
    """The score grid: each computed cell's value, ``low_score`` where no forward was
    needed; an error if a probability is not finite."""
    scores = torch.full(shape, s.low, dtype=torch.float32)
    for c, v in zip(cells, values):
        scores[c.row, c.col] = v
    if not (math.isfinite(s.high) and math.isfinite(s.low) and bool(torch.isfinite(scores).all())):
        raise NonFiniteLossError(f"causal trace of {prompt!r}: the answer's probability is not finite (clean "
                                 f"{s.high}, corrupted {s.low}): the model outputs NaN/inf; check its weights, or its "
                                 f"dtype for overflow")
    return scores


def trace_prompt(h: Handles, tp: TracePrompt, *, kind: str = "hidden", samples: int | None = None,
                 noise: float | Float[Tensor, "samples subject d_model"] = 3.0, std: float | None = None,
                 seed: int = 0, window: int = 10, answer: int | str | None = None,
                 tokens: Sequence[int] | int | None = None, layers: Sequence[int] | int | None = None,
                 batch_size: int = 256, method: str = "exact", verify: int = 0, fast: bool = True,
                 merge: bool | None = None, reuse_prefix: bool = True, progress: bool | None = None) -> TraceResult:
    """:func:`causal_trace` of a prompt already tokenized
    (:class:`~gradlocate.trace.core.TracePrompt`)."""
    _check_options(h, kind, window, batch_size, method, verify)
    t_start = time.perf_counter()
    T = len(tp.ids)
    token_idx = list(range(T)) if tokens is None else validate_indices(tokens, T, "token position",
                                                                        f"the prompt has {T} tokens")
    layer_idx = h.layer_indices(layers)
    noise_t, info = make_noise(noise, samples, tp.subject_range[1] - tp.subject_range[0], h.d_model, std, seed, h)
    noise_t = noise_t.to(device=input_device(h.root), dtype=_embed_dtype(h))
    answer_tok = answer_id(h, tp.prompt, answer)
    cells = cells_of(h, kind, window, token_idx, layer_idx, tp.subject_range[0])
    stats = {"cells": len(token_idx) * len(layer_idx), "cells_before_subject": len(token_idx) * len(layer_idx) - len(cells)}
    if method == "atp":
        return _atp_trace(h, tp, kind, noise_t, answer_tok, window, token_idx, layer_idx, verify, batch_size, merge,
                          info, stats, t_start)
    with using(h), torch.no_grad():
        engine = FastTrace(h, kind, batch_size, merge, reuse_prefix) if fast else ReferenceTrace(h, kind, batch_size)
        s, timings = engine.setup(tp, noise_t, answer_tok)
        t0 = time.perf_counter()
        values = engine.scores(s, cells, progress)
        stats.update(engine.stats)
        timings["cells"] = time.perf_counter() - t0
    scores = _grid(s, cells, values, (len(token_idx), len(layer_idx)), tp.prompt)
    # ROME: one forward of 1 clean + S corrupted rows per cell, plus its clean prediction and low_score run.
    stats["rome_forwards"] = stats["cells"] + 2
    stats["rome_token_block_evals"] = (stats["cells"] + 2) * (s.samples + 1) * T * h.n_layers
    timings["total"] = time.perf_counter() - t_start
    return TraceResult(scores=scores, low_score=s.low, high_score=s.high, subject_range=tp.subject_range,
                       tokens=list(tp.tokens), token_indices=token_idx, layers=layer_idx, kind=kind, answer=s.answer,
                       answer_text=h.tokenizer.decode([s.answer]), prompt=tp.prompt, subject=tp.subject,
                       window=window, samples=s.samples,
                       params={**info, "batch_size": batch_size, "fast": fast, "reuse_prefix": reuse_prefix},
                       stats=stats, timings=timings)


def _atp_trace(h: Handles, tp: TracePrompt, kind: str, noise: Float[Tensor, "samples subject d_model"],
               answer: int | None, window: int, token_idx: list[int], layer_idx: list[int], verify: int,
               batch_size: int, merge: bool | None, info: dict[str, Any], stats: dict[str, Any],
               t_start: float) -> TraceResult:
    """The AtP estimate of the grid (:mod:`gradlocate.trace.attribution`), with the
    ``verify`` highest cells re-run exactly."""
    with using(h):
        est, answer, high, low, timings = atp_estimates(h, tp, [kind], noise, answer, window)
        grid = est[kind][token_idx][:, layer_idx].float().clone()
        exact = torch.zeros_like(grid, dtype=torch.bool)
        stats.update(forwards=2, backwards=1, verified=0)
        if verify:
            t0 = time.perf_counter()
            flat = [(grid[r, c].item(), r, c) for r in range(len(token_idx)) for c in range(len(layer_idx))
                    if token_idx[r] >= tp.subject_range[0]]
            top = sorted(flat, reverse=True)[:verify]
            with torch.no_grad():
                values, st = verify_cells(h, tp, kind, noise, answer, window,
                                          [(token_idx[r], layer_idx[c]) for _, r, c in top], batch_size, merge)
            for (_, r, c), v in zip(top, values):
                grid[r, c], exact[r, c] = v, True
            stats.update(forwards=2 + st["forwards"], verified=len(top))
            timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return TraceResult(scores=grid, low_score=low, high_score=high, subject_range=tp.subject_range,
                       tokens=list(tp.tokens), token_indices=token_idx, layers=layer_idx, kind=kind, answer=answer,
                       answer_text=h.tokenizer.decode([answer]), prompt=tp.prompt, subject=tp.subject, window=window,
                       samples=int(noise.shape[0]), params={**info, "method": "atp", "verify": verify},
                       stats=stats, timings=timings, method="atp", exact=exact)


def causal_trace(model: Any, prompt: str, subject: str, *, tokenizer: Any = None, kind: str = "hidden",
                 samples: int | None = None, noise: float | Float[Tensor, "samples subject d_model"] = 3.0,
                 std: float | None = None, seed: int = 0, window: int = 10, answer: int | str | None = None,
                 tokens: Sequence[int] | int | None = None, layers: Sequence[int] | int | None = None,
                 batch_size: int = 256, method: str = "exact", verify: int = 0, fast: bool = True,
                 merge: bool | None = None, reuse_prefix: bool = True, progress: bool | None = None) -> TraceResult:
    """ROME's causal trace of ``prompt`` with ``subject`` corrupted.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles`.
        prompt: the prompt, e.g. ``"The Eiffel Tower is in"``.
        subject: the subject inside the prompt (its first occurrence is noised).
        tokenizer: defaults to the one the model carries.
        kind: ``"hidden"`` (restore a block's output), ``"mlp"`` or ``"attn"`` (restore
            that output at ``window`` layers centred on each layer).
        samples: corrupted rows per cell (default 10, or the explicit noise's first dim).
        noise: a multiple of ``std`` (ROME: 3), or an explicit tensor
            ``[samples, n_subject_tokens, d_model]`` added to the subject's embeddings.
        std: the embedding std the multiple applies to; default
            :func:`~gradlocate.trace.core.embedding_std` of the whole vocabulary (pass
            ``embedding_std(model, subjects)`` for ROME's std over a set of subjects).
        seed: seeds the noise (``torch.Generator``); the same noise serves every cell.
        window: layers restored per cell for mlp/attn (default 10).
        answer: ``None`` (the clean run's argmax next token), a token id, or a target
            string (its first token).
        tokens: the token positions to trace (rows; default all).
        layers: the layers to trace (columns; default all).
        batch_size: at most this many rows (cells x samples) per forward.
        method: ``"exact"`` (ROME's algorithm) or ``"atp"``: attribution patching, a
            first-order estimate of every cell from two forwards and one backward
            (:mod:`gradlocate.trace.attribution`; :attr:`~gradlocate.trace.result.TraceResult.estimated`
            is then true).
        verify: with ``method="atp"``, re-run this many of the highest estimated cells
            exactly, so the reported peak (:meth:`~gradlocate.trace.result.TraceResult.best`)
            is exact.
        fast: use the optimised executor (:mod:`gradlocate.trace.fast`: fewer, smaller
            forwards, the same scores to 1e-6); ``False``: the reference path
            (:mod:`gradlocate.trace.reference`), ROME's ``trace_with_patch`` for batches of cells.
        merge: fast executor: how cells are grouped into forwards. ``None``: by a cost
            model; ``True``: as many cells per forward as ``batch_size`` allows; ``False``:
            only cells that need exactly the same blocks and positions.
        reuse_prefix: fast executor: take positions before the restored token from the
            corrupted run's key/value cache (where the model has one; else a warning).
        progress: a progress bar (``None``: on a terminal only).

    Returns:
        :class:`~gradlocate.trace.result.TraceResult`.

    Raises:
        ValueError: an empty subject, a subject not in the prompt, ``window < 1``, a bad
            kind, noise of the wrong shape, layers or tokens out of range.

    Example:
        >>> import torch
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=4, d_model=32)
        >>> r = causal_trace(model, "Paris is in", "Paris", kind="mlp", window=2,
        ...                  noise=torch.zeros(3, 5, 32), progress=False)
        >>> bool(torch.allclose(r.scores, torch.tensor(r.high_score), atol=1e-6))  # no noise: nothing to restore
        True
    """
    h = resolve(model, tokenizer)
    return trace_prompt(h, TracePrompt.of(h, prompt, subject), kind=kind, samples=samples, noise=noise, std=std,
                        seed=seed, window=window, answer=answer, tokens=tokens, layers=layers, batch_size=batch_size,
                        method=method, verify=verify, fast=fast, merge=merge, reuse_prefix=reuse_prefix,
                        progress=progress)

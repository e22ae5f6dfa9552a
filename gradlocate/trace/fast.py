"""The optimised executor of causal tracing: ROME's scores with fewer, smaller forwards.

:func:`~gradlocate.trace.reference.reference_scores` runs every cell's corrupted rows through
the whole model. Most of that work repeats itself, and :class:`FastTrace` skips it:

* **Skipped blocks.** Below a cell's first restored layer the corrupted rows are
  exactly the corrupted run: those blocks return its recorded outputs
  (:func:`~gradlocate.interventions.from_layer`) instead of running.
* **Prefix reuse.** Positions before the restored token are the corrupted run's too:
  their keys and values come from its cache (built with public ``Cache`` methods,
  :func:`gradlocate._compat.prefix_cache`) and only the positions from the token on run.
  Where the model has no usable cache this is off, with one warning naming why.
* **A batching plan.** Cells are grouped into forwards by a cost model (:meth:`FastTrace.plan`).

``tests/test_tracing.py`` proves the scores equal to the reference path to 1e-6.

Example:
    >>> from gradlocate import down_projections
    >>> from gradlocate.models import tiny
    >>> from gradlocate.trace import trace_prompt
    >>> from gradlocate.trace.core import TracePrompt
    >>> h = down_projections(tiny("llama", n_layers=4, d_model=32)[0])
    >>> tp = TracePrompt.of(h, "The Eiffel Tower is in", "Eiffel Tower")
    >>> fast = trace_prompt(h, tp, samples=3)
    >>> slow = trace_prompt(h, tp, samples=3, fast=False)
    >>> bool((fast.scores - slow.scores).abs().max() < 1e-6), fast.stats["prefix_cache"], fast.stats["skipped_blocks"] > 0
    (True, 1, True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate import _compat
from gradlocate.handles import Handles
from gradlocate.interventions import from_layer, noised, restored, rewrap, rewrappable, run, states
from gradlocate.state import input_device
from gradlocate.trace.core import Cell, Setup, TracePrompt, last_only, last_probs, setup

__all__ = ["FastTrace", "FIXED_COST_CPU", "FIXED_COST_ACCELERATOR"]

#: A forward's fixed cost per block, in units of one row-position's compute (see :meth:`FastTrace.plan`).
FIXED_COST_CPU = 48.0
FIXED_COST_ACCELERATOR = 2048.0


class FastTrace:
    """Causal tracing's optimised executor for one model and kind (see the module doc)."""

    def __init__(self, h: Handles, kind: str, batch_size: int, merge: bool | None, reuse_prefix: bool):
        self.h, self.kind, self.batch_size, self.merge, self.reuse_prefix = h, kind, batch_size, merge, reuse_prefix
        self.device = input_device(h.root)
        self.cache_arg = _compat.cache_argument(h.root)
        block = sum(p.numel() for p in h.blocks[0].parameters())
        w = getattr(h.head, "weight", None)
        self.head_share = float(w.numel()) / block if isinstance(w, Tensor) and block else 0.0
        self.stats = {"forwards": 0, "token_block_evals": 0, "prefix_cache": 0, "skipped_blocks": 0}

    def setup(self, tp: TracePrompt, noise: Float[Tensor, "samples subject d_model"],
              answer: int | None) -> tuple[Setup, dict[str, float]]:
        """The clean and corrupted runs, recording every block's corrupted output and,
        if asked, the corrupted key/value cache."""
        t0 = time.perf_counter()
        arg = self.cache_arg
        cache = _compat.new_cache(self.h.root) if self.reuse_prefix and arg else None
        kw = {arg: cache, "use_cache": True} if cache is not None and arg else None
        s = setup(self.h, tp, self.kind, noise, answer, record_blocks=True, cache_kw=kw)
        self._count(2, len(tp.ids), 0, rows=1 + s.samples)
        why = None
        if self.reuse_prefix:
            if kw is None:
                why = f"{type(self.h.root).__name__}'s forward takes no key/value cache"
            else:
                s.cache, why = self._usable(s.cache, len(tp.ids))
            if why is not None:
                warnings.warn(f"causal_trace: prefix reuse is off ({why}): every forward recomputes the positions "
                              f"before the restored token, which is slower; the scores are the same", stacklevel=4)
        self.stats["prefix_cache"] = int(s.cache is not None)
        self.skippable = all(rewrappable(o) for o in s.corrupted or [])
        return s, {"setup": time.perf_counter() - t0}

    def _usable(self, cache: Any, T: int) -> tuple[Any, str | None]:
        """The cache if it holds all ``T`` positions of every layer, else why not."""
        if cache is None or not hasattr(cache, "get_seq_length"):
            return None, f"{type(self.h.root).__name__}'s forward returned no key/value cache"
        for layer in range(self.h.n_layers):
            try:
                n = int(cache.get_seq_length(layer))
            except (TypeError, IndexError, AttributeError):
                return None, "its key/value cache does not report a length per layer"
            if n != T:
                return None, (f"its key/value cache holds {n} of the prompt's {T} positions at layer {layer} "
                              f"(a sliding window shorter than the prompt?)")
        return cache, None

    def _count(self, forwards: int, width: int, first: int, rows: int) -> None:
        self.stats["forwards"] += forwards
        self.stats["token_block_evals"] += rows * width * (self.h.n_layers - first)
        self.stats["skipped_blocks"] += first

    # ----------------------------------------------------------------- cells

    def scores(self, s: Setup, cells: Sequence[Cell], progress: bool | None) -> list[float]:
        """Each cell's score, in ``cells`` order."""
        from tqdm.auto import tqdm

        if not self.skippable:
            cells = [Cell(c.row, c.col, c.token, c.sites, 0) for c in cells]
        out: dict[tuple[int, int], float] = {}
        T = s.ids.shape[1]
        for chunk in tqdm(self.plan(cells, s.samples, T, s.cache is not None), desc=f"causal trace ({self.kind})",
                          disable=None if progress is None else not progress, leave=False):
            for c, v in zip(chunk, self.run_chunk(s, chunk)):
                out[(c.row, c.col)] = v
        return [out[(c.row, c.col)] for c in cells]

    def run_chunk(self, s: Setup, chunk: Sequence[Cell]) -> list[float]:
        """One forward for ``chunk``: from its first restored block, from its earliest
        token (the rest from the prefix cache), its cells' corrupted rows side by side."""
        S, C, T = s.samples, len(chunk), s.ids.shape[1]
        s0, s1 = s.subject_range
        o = min(c.token for c in chunk) if s.cache is not None else 0
        first = min(c.first_block for c in chunk)
        rows = C * S
        a = max(s0, o)  # the subject positions inside this forward's window
        noise = s.noise[:, a - s0:max(a, s1) - s0].repeat(C, 1, 1)

        def entering() -> Any:  # the corrupted stream entering block `first`, for these rows and positions
            raw = s.corrupted[first - 1]  # type: ignore[index]  # not None: setup(record_blocks=True) records every block
            return rewrap(raw, states(raw)[:, o:].repeat(C, 1, 1))

        kw: dict[str, Any] = {"use_cache": False} if self.cache_arg else {}
        if o > 0:
            if self.cache_arg is None:  # s.cache is only kept when the forward takes one (setup)
                raise RuntimeError("causal_trace: a prefix cache without a key/value cache argument")
            kw = {self.cache_arg: _compat.prefix_cache(s.cache, o, torch.arange(S, device=self.device).repeat(C)),
                  "use_cache": True}
        with noised(self.h, noise, a - o), restored(self.h, s.patches(chunk, offset=o), rows=rows), \
                from_layer(self.h, first, entering), last_only(self.h, rows, T - o):
            out = run(self.h, input_ids=s.ids[:, o:].expand(rows, -1), **kw)
        self._count(1, T - o, first, rows)
        return last_probs(self.h, out, s.answer).view(C, S).mean(1).tolist()

    def plan(self, cells: Sequence[Cell], S: int, T: int, prefix: bool) -> list[list[Cell]]:
        """Split the cells into forwards of at most ``batch_size`` rows, minimising a cost
        model: a forward that runs blocks ``f..L-1`` on ``R`` rows of ``P`` positions costs
        ``(L - f) * (K + R * P)`` plus the output head's share, where ``K`` (the fixed
        per-block cost - reading the weights, launching kernels - in row-position units) is
        48 on CPU and 2048 on accelerators. Merging cells saves the fixed cost; it costs
        blocks below a cell's first restored layer and positions before its token, both
        recomputed. Exact over contiguous runs of the cells sorted by (token, first block)
        or (first block, token), whichever is cheaper."""
        if not cells:
            return []
        if self.merge is None:
            fixed = FIXED_COST_CPU if self.device.type == "cpu" else FIXED_COST_ACCELERATOR
        else:
            fixed = 1e9 if self.merge else 0.0
        L, per, head = self.h.n_layers, max(1, self.batch_size // S), self.head_share

        def cost(first: int, token: int, n: int) -> float:
            rows, pos = n * S, T - (token if prefix else 0)
            return (L - first) * (fixed + rows * pos) + head * (fixed + rows) + 1e-6  # ties: fewer forwards

        best: tuple[float, list[list[Cell]]] | None = None
        for key in (lambda c: (c.token, c.first_block, c.col), lambda c: (c.first_block, c.token, c.col)):
            order = sorted(cells, key=key)
            n = len(order)
            total, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
            for i in range(1, n + 1):
                f, t = L, T
                for j in range(i - 1, max(-1, i - 1 - per), -1):
                    f, t = min(f, order[j].first_block), min(t, order[j].token)
                    c = total[j] + cost(f, t, i - j)
                    if c < total[i]:
                        total[i], cut[i] = c, j
            chunks, i = [], n
            while i > 0:
                chunks.append(order[cut[i]:i])
                i = cut[i]
            if best is None or total[n] < best[0]:
                best = (total[n], chunks[::-1])
        return best[1]  # type: ignore[index]  # not None: cells is non-empty, so the loop set it

"""The reference path of causal tracing: ROME's ``trace_with_patch``, cell by cell.

Every cell's ``samples`` corrupted rows run through the whole model, with the noise on
the subject's embeddings and the cell's clean states restored (both built from
:mod:`gradlocate.interventions`); the cell's score is the answer's mean probability over
those rows. Cells are batched side by side, at most ``batch_size`` rows per forward, and
nothing else is skipped: this is the algorithm the optimised executor
(:mod:`gradlocate.trace.fast`) must match, and ``causal_trace(..., fast=False)`` runs it.

Example:
    >>> import torch
    >>> from gradlocate import down_projections
    >>> from gradlocate.interventions import using
    >>> from gradlocate.models import tiny
    >>> from gradlocate.trace.core import TracePrompt, cells_of, make_noise
    >>> h = down_projections(tiny("llama", n_layers=4, d_model=32)[0])
    >>> tp = TracePrompt.of(h, "The Eiffel Tower is in", "Eiffel Tower")   # the subject: tokens 4..15
    >>> noise, _ = make_noise(3.0, 2, 12, 32, None, 0, h)
    >>> cells = cells_of(h, "hidden", 10, [21], [0, 3], tp.subject_range[0])  # the last token, layers 0 and 3
    >>> engine = ReferenceTrace(h, "hidden", batch_size=8)
    >>> with using(h), torch.no_grad():
    ...     s, timings = engine.setup(tp, noise, None)
    ...     values = engine.scores(s, cells)
    >>> len(values), engine.stats, abs(values[-1] - s.high) < 1e-6  # the last state decides the output
    (2, {'forwards': 3, 'prefix_cache': 0}, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from gradlocate.handles import Handles
from gradlocate.interventions import no_cache, noised, restored, run
from gradlocate.trace.core import Cell, Setup, TracePrompt, last_only, last_probs, setup

__all__ = ["ReferenceTrace", "reference_scores"]


def reference_scores(h: Handles, s: Setup, cells: Sequence[Cell], batch_size: int) -> list[float]:
    """ROME's ``trace_with_patch`` for batches of cells: one forward per batch, the S
    corrupted rows of each cell with its clean states restored; the answer's mean
    probability per cell."""
    S, T = s.samples, s.ids.shape[1]
    per = max(1, batch_size // S)
    out: list[float] = []
    for k in range(0, len(cells), per):
        chunk = cells[k:k + per]
        rows = len(chunk) * S
        with noised(h, s.noise.repeat(len(chunk), 1, 1), s.subject_range[0]), \
                restored(h, s.patches(chunk), rows=rows), last_only(h, rows, T):
            o = run(h, input_ids=s.ids.expand(rows, -1), **no_cache(h.root))
        out += last_probs(h, o, s.answer).view(len(chunk), S).mean(1).tolist()
    return out


class ReferenceTrace:
    """The reference path behind the executor interface of
    :class:`~gradlocate.trace.fast.FastTrace` (``setup``, ``scores``, ``stats``), so the
    dispatcher runs either the same way."""

    def __init__(self, h: Handles, kind: str, batch_size: int):
        self.h, self.kind, self.batch_size = h, kind, batch_size
        self.stats: dict[str, int] = {}

    def setup(self, tp: TracePrompt, noise: Float[Tensor, "samples subject d_model"],
              answer: int | None) -> tuple[Setup, dict[str, float]]:
        """The clean and corrupted runs (:func:`~gradlocate.trace.core.setup`), and their time."""
        t0 = time.perf_counter()
        s = setup(self.h, tp, self.kind, noise, answer)
        return s, {"setup": time.perf_counter() - t0}

    def scores(self, s: Setup, cells: Sequence[Cell], progress: bool | None = None) -> list[float]:
        """Each cell's score, in ``cells`` order (:func:`reference_scores`; ``progress``
        is accepted for the common interface, and there is no bar)."""
        values = reference_scores(self.h, s, cells, self.batch_size)
        # Both runs of the setup, then one forward per batch of cells.
        self.stats = {"forwards": 2 + math.ceil(len(cells) / max(1, self.batch_size // s.samples)), "prefix_cache": 0}
        return values

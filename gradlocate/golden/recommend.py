"""One recommendation from several selectors' picks: which layer, how sure, what a check costs.

The gradient selectors (GradRatio, LGA) and causal tracing (CMA) read the model, not the
editor: their picks are the same whether LocFT-BF or R-ROME will edit, and the golden layer
is not (docs/results.md). So a recommendation from them says how far they agree, never that
the layer is right for the editor; the check is the budgeted search
(:func:`gradlocate.golden.search.search`), which edits with the editor, and its cost is
stated from a cell timed on this machine.

Example:
    >>> from gradlocate.results import LayerScores
    >>> pick = lambda l: LayerScores("x", [0.0, 1.0, 0.0], [True] * 3, l, layers=[0, 1, 2])
    >>> r = recommend({"gradratio": pick(1), "lga": pick(1), "cma": pick(2)}, "LocFT-BF", 3, seconds_per_cell=2.0)
    >>> r.layer, r.agree, r.check_cells
    (1, ['gradratio', 'lga'], 12)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gradlocate.results import LayerScores

__all__ = ["Recommendation", "recommend", "WHAT_THE_SCORES_MEAN"]

#: What each method's score is, in which unit, and what "excluded" means for it.
WHAT_THE_SCORES_MEAN = {
    "gradratio": "edit / retain gradient-norm ratio of the layer (unitless, higher is picked); excluded: below "
                 "l_min, the first 15% of layers",
    "lga": "edit-gradient norm of the layer (unitless; the paper picks the highest inside Tukey's fences); "
           "excluded: outside the fences (an outlier layer)",
    "cma": "indirect effect of restoring the layer's MLP output on the answer's probability (probability, "
           "higher is picked); nothing excluded",
}


@dataclass(repr=False)
class Recommendation:
    """The layer to edit from several selectors' picks (see the module doc).

    Attributes:
        layer: the layer most methods picked (ties: the lowest such layer, said in ``why``).
        agree / disagree: the methods that picked it, and the others with their layers.
        editor: the editor the check would edit with.
        check_cells, check_seconds: the budgeted search's default budget in cells and its
            estimated cost (``None`` when no cell was timed).
        seconds_per_cell: one cell timed on this machine (``None``: not timed).
    """

    layer: int
    agree: list[str]
    disagree: dict[str, int]
    editor: str
    check_cells: int
    seconds_per_cell: float | None = None
    why: list[str] = field(default_factory=list)
    checked: dict[str, Any] | None = None  # the search's result, when it ran: layer, contenders, confidence, cells

    @property
    def check_seconds(self) -> float | None:
        return None if self.seconds_per_cell is None else self.check_cells * self.seconds_per_cell

    @property
    def sure(self) -> str:
        """How sure, in words: how many methods agree (none of them sees the editor)."""
        n = len(self.agree) + len(self.disagree)
        return f"{len(self.agree)} of {n} methods agree" + ("" if self.disagree else " (all)")

    def lines(self, command: str = "") -> list[str]:
        """The recommendation as it prints (each line under 100 columns, but the command)."""
        other = ", ".join(f"{k} {v}" for k, v in self.disagree.items())
        if self.checked is not None:
            c = self.checked
            agree = ", ".join(self.agree) or "none of the selectors"
            return [f"Recommendation: edit layer {self.layer}: the budgeted search edited with {self.editor} and "
                    f"picked it,", f"  {c['cells']} cells, probability {c['confidence']:.2f} that no layer beats it "
                    f"by more than {c['margin']}; contenders {', '.join(map(str, c['contenders']))}.",
                    f"  Agree: {agree}" + (f"; other picks: {other}." if other else "."), *self.why]
        cost = ("" if self.check_seconds is None else
                f", about {_duration(self.check_seconds)} here ({self.seconds_per_cell:.1f} s per cell)")
        return [f"Recommendation: edit layer {self.layer} ({self.sure}: {', '.join(self.agree)}"
                + (f"; {other})" if other else ")"),
                *self.why,
                "None of these methods sees the editor; the layer is not checked for "
                f"{self.editor} yet.",
                f"Check it: the budgeted search edits with {self.editor}, {self.check_cells} cells{cost}:",
                f"  {command}" if command else "  gradlocate select --method search --editor ..."]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "check_seconds": self.check_seconds, "sure": self.sure}

    def __repr__(self) -> str:
        return f"Recommendation(layer {self.layer}: {self.sure}; check {self.check_cells} cells with {self.editor})"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def recommend(picks: Mapping[str, LayerScores], editor: str, n_layers: int, *,
              seconds_per_cell: float | None = None, searched: Any = None) -> Recommendation:
    """The layer most of ``picks`` chose, who agrees, and the cost of checking it with the
    budgeted search at its default budget (:func:`~gradlocate.golden.search.default_budget`);
    with ``searched`` (a :class:`~gradlocate.golden.search.Search` that ran), its layer, which
    edited with the editor, and which selectors agree with it.

    Raises:
        ValueError: neither picks nor a search.
    """
    from gradlocate.golden.search import default_budget

    if searched is not None:
        checked = {"cells": searched.cost.cells, "confidence": searched.confidence, "margin": searched.margin,
                   "contenders": list(searched.contenders)}
        return Recommendation(searched.layer, [k for k, s in picks.items() if s.selected == searched.layer],
                              {k: s.selected for k, s in picks.items() if s.selected != searched.layer}, editor,
                              searched.cost.cells, seconds_per_cell, [], checked)
    if not picks:
        raise ValueError("no selector result to recommend from")
    votes = Counter(s.selected for s in picks.values())
    top = max(votes.values())
    tied = sorted(l for l, v in votes.items() if v == top)
    layer = tied[0]
    why = [] if len(tied) == 1 else [f"A tie between layers {', '.join(map(str, tied))}: the lowest is shown; "
                                     f"only the check can tell them apart."]
    if seconds_per_cell is not None and not (math.isfinite(seconds_per_cell) and seconds_per_cell > 0):
        raise ValueError(f"seconds_per_cell must be a positive number, got {seconds_per_cell!r}")
    return Recommendation(layer, [k for k, s in picks.items() if s.selected == layer],
                          {k: s.selected for k, s in picks.items() if s.selected != layer}, editor,
                          default_budget(n_layers), seconds_per_cell, why)

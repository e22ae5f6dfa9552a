"""Plots. Every function takes an optional matplotlib ``Axes`` and returns the one it
drew on, so figures compose in notebooks."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_layer_scores"]

SELECTED = "#d62728"
ELIGIBLE = "#1f77b4"
EXCLUDED = "#c7c7c7"


def _axes(ax: Any, figsize: tuple[float, float] = (8, 3)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_layer_scores(result: Any, ax: Any = None, *, log: bool | None = None, title: str | None = None) -> Any:
    """Bar chart of a :class:`~gradlocate.results.LayerScores`."""
    ax = _axes(ax)
    colors = [SELECTED if l == result.selected else (ELIGIBLE if e else EXCLUDED)
              for l, e in zip(result.layers, result.eligible)]
    ax.bar(result.layers, result.scores, color=colors)
    positive = all(s > 0 for s in result.scores)
    if log is None:
        pos = [s for s in result.scores if s > 0]
        log = positive and len(pos) > 1 and max(pos) / min(pos) > 1e3
    if log and positive:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{result.method} score")
    ax.set_title(title or f"{result.method}: selected layer {result.selected}")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=ELIGIBLE, label="eligible"), Patch(color=EXCLUDED, label="excluded"),
                       Patch(color=SELECTED, label="selected")], loc="best", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    return ax

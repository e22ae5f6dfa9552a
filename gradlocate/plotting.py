"""Plots. Every function takes an optional matplotlib ``Axes`` and returns the one it
drew on, so figures compose in notebooks."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_layer_scores", "plot_training_loss", "plot_edit_evaluation"]

SELECTED = "#d62728"
ELIGIBLE = "#1f77b4"
EXCLUDED = "#c7c7c7"


def _axes(ax: Any, figsize: tuple[float, float] = (8.0, 3.0)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_layer_scores(result: Any, ax: Any = None, *, log: bool | None = None, title: str | None = None) -> Any:
    """Bar chart of a :class:`~gradlocate.results.LayerScores`. An excluded layer far
    outside the eligible layers' range (LGA's outliers) does not set the scale: its bar is
    cut at the axis, hatched, and labelled with its value; the legend names only what is
    drawn."""
    ax = _axes(ax)
    kinds = ["selected" if l == result.selected else ("eligible" if e else "excluded")
             for l, e in zip(result.layers, result.eligible)]
    colour = {"eligible": ELIGIBLE, "excluded": EXCLUDED, "selected": SELECTED}
    bars = ax.bar(result.layers, result.scores, color=[colour[k] for k in kinds])
    positive = all(s > 0 for s in result.scores)
    if log is None:
        pos = [s for s in result.scores if s > 0]
        log = positive and len(pos) > 1 and max(pos) / min(pos) > 1e3
    clipped = _clip_outliers(ax, bars, result, kinds) if not log else False
    if log and positive:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{result.method} score")
    ax.set_title(title or f"{result.method}: selected layer {result.selected}")
    from matplotlib.patches import Patch

    shown = [k for k in ("eligible", "excluded", "selected") if k in kinds]
    handles = [Patch(color=colour[k], label=k) for k in shown]
    if clipped:  # outside the axes: the cut bars' labels sit at the top edge
        handles.append(Patch(facecolor=EXCLUDED, hatch="//", label="excluded, cut at the axis"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    return ax


def _clip_outliers(ax: Any, bars: Any, result: Any, kinds: list[str]) -> bool:
    """Scale the axis to the layers that can be picked when an excluded one lies more than
    twice their span beyond them (else that one bar flattens all the others)."""
    kept = [s for s, k in zip(result.scores, kinds) if k != "excluded"]
    if not kept:
        return False
    lo, hi = min(0.0, *kept), max(0.0, *kept)
    span = (hi - lo) or 1.0
    far = [i for i, (s, k) in enumerate(zip(result.scores, kinds))
           if k == "excluded" and (s > hi + 2 * span or s < lo - 2 * span)]
    if not far:
        return False
    top, bottom = hi + 0.25 * span if hi > 0 else 0.05 * span, lo - 0.25 * span if lo < 0 else 0.0
    ax.set_ylim(bottom, top)
    for i in [i for i, s in enumerate(result.scores) if s > top or s < bottom]:  # every bar the axis cuts
        bars[i].set_hatch("//")
        y = top if result.scores[i] > 0 else bottom
        ax.annotate(f"{result.scores[i]:.3g}", (result.layers[i], y), ha="center",
                    va="top" if y == top else "bottom", fontsize=7, xytext=(0, -2 if y == top else 2),
                    textcoords="offset points", rotation=90)
    return True


def plot_training_loss(history: Any, ax: Any = None, *, threshold: float | None = None, log: bool = True,
                       title: str | None = None) -> Any:
    """Mean training loss per epoch (e.g. :attr:`gradlocate.LocFTBF.history`), with the
    stopping threshold as a dashed line."""
    ax = _axes(ax, (5.0, 3.0))
    epochs = list(range(1, len(history) + 1))
    ax.plot(epochs, list(history), marker="o", color=ELIGIBLE, label="epoch mean loss")
    if threshold is not None and threshold > 0:
        ax.axhline(threshold, color=SELECTED, ls="--", lw=1, label=f"stop below {threshold:g}")
    if log and history and all(h > 0 for h in history):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mean target NLL)")
    ax.set_title(title or "training loss")
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_edit_evaluation(result: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Grouped bars of an :class:`~gradlocate.evaluation.EditEvaluation`: each metric
    under both scorings (teacher-forced token accuracy, generation exact match)."""
    ax = _axes(ax, (6.0, 3.0))
    metrics = list(result.teacher_forced)
    series = [("teacher-forced", result.teacher_forced, ELIGIBLE)]
    if result.generation is not None:
        series.append(("generation EM", result.generation, SELECTED))
    width = 0.8 / len(series)
    for k, (label, values, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(metrics))]
        ys = [values.get(m) for m in metrics]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
               width=width, color=color, label=label)
        for x, y in zip(xs, ys):
            if y is None:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="gray", rotation=90)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title or f"edit evaluation ({result.n_edits} edits)")
    ax.legend(loc="lower right", fontsize=8)
    return ax


def plot_layer_values(layers: Any, values: Any, ax: Any = None, *, log: bool = False, ylabel: str = "value",
                      title: str | None = None, color: str = ELIGIBLE) -> Any:
    """Bar chart of one value per layer (e.g. a :class:`~gradlocate.gradients.LayerGradients`'
    squared gradient norms); a log axis when ``log`` and every value is positive."""
    ax = _axes(ax)
    layers, values = list(layers), [float(v) for v in values]
    ax.bar(layers, values, color=color)
    if log and values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


__all__.append("plot_layer_values")


# --------------------------------------------------------------------------- sweep / compare

_METRIC_STYLE = {"reliability": ("#1f77b4", "-"), "generalization": ("#ff7f0e", "-"),
                 "locality": ("#2ca02c", "-"), "portability": ("#9467bd", "-"), "overall": ("black", "--")}


def plot_sweep(result: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Edit metrics of a :class:`~gradlocate.golden.sweep.SweepResult` across layers, with the
    overall score dashed and the golden layer marked."""
    ax = _axes(ax)
    for name, (color, ls) in _METRIC_STYLE.items():
        vals = result.metric(name)
        if all(v is None for v in vals):
            continue
        xs = [l for l, v in zip(result.layers, vals) if v is not None]
        ys = [v for v in vals if v is not None]
        ax.plot(xs, ys, ls, color=color, marker="o", ms=3, label=name, lw=2 if name == "overall" else 1.3)
    ax.axvline(result.golden, color=SELECTED, lw=1, ls=":")
    ax.annotate(f"golden {result.golden}", (result.golden, 1.0), xytext=(3, -12), textcoords="offset points",
                color=SELECTED, fontsize=8)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("edited layer")
    ax.set_ylabel(f"score ({result.scoring.replace('_', '-')})")
    ax.set_title(title or "LocFT-BF sweep: edit metrics per layer")
    ax.legend(fontsize=8, loc="best")
    return ax


def plot_comparison(cmp: Any, *, title: str | None = None) -> Any:
    """Two panels on one layer axis: each selector's per-layer scores (min-max
    normalised, selected layer starred) above, the sweep's metrics below."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    colors = {"gradratio": "#d62728", "lga": "#9467bd", "cma": "#8c564b"}
    for name, sel in cmp.selections.items():
        s = [float(v) for v in sel.maximised]
        lo, hi = min(s), max(s)
        norm = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in s]
        c = colors.get(name, None)
        top.plot(sel.layers, norm, marker="o", ms=3, label=f"{name} (layer {sel.selected})", color=c)
        top.plot([sel.selected], [norm[sel.layers.index(sel.selected)]], marker="*", ms=14, color=c)
    top.set_ylabel("selector score\n(min-max normalised)")
    top.legend(fontsize=8, loc="best")
    top.axvline(cmp.golden, color="black", lw=1, ls=":")
    top.set_title(title or f"Selectors vs sweep (golden layer {cmp.golden})")
    plot_sweep(cmp.sweep, ax=bottom, title="")
    fig.tight_layout()
    return fig


_TRACE_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def plot_trace_heatmap(result: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """ROME's causal-trace heatmap of a :class:`~gradlocate.trace.result.TraceResult`:
    tokens down (subject tokens marked ``*``), layers across, colour = the answer's
    probability with that state restored, from ``low_score`` up."""
    ax = _axes(ax, figsize=(0.35 * len(result.layers) + 2.5, 0.25 * len(result.token_indices) + 1.2))
    scores = result.scores.detach().cpu().numpy() if hasattr(result.scores, "detach") else result.scores
    mesh = ax.pcolor(scores, cmap=_TRACE_CMAPS.get(result.kind, "Purples"), vmin=result.low_score)
    ax.invert_yaxis()
    s0, s1 = result.subject_range
    labels = [result.tokens[t] + ("*" if s0 <= t < s1 else "") for t in result.token_indices]
    ax.set_yticks([0.5 + i for i in range(len(labels))])
    ax.set_yticklabels(labels)
    step = max(1, len(result.layers) // 8)
    ax.set_xticks([0.5 + i for i in range(0, len(result.layers), step)])
    ax.set_xticklabels([str(result.layers[i]) for i in range(0, len(result.layers), step)])
    if result.kind == "hidden":
        ax.set_title(title or "Impact of restoring state after corrupted input")
        ax.set_xlabel("single restored layer")
    else:
        name = "MLP" if result.kind == "mlp" else "Attn"
        ax.set_title(title or f"Impact of restoring {name} after corrupted input")
        ax.set_xlabel(f"center of interval of {result.window} restored {name} layers")
    cb = ax.figure.colorbar(mesh, ax=ax)
    cb.ax.set_title(f"p({result.answer_text.strip()})", y=-0.12, fontsize=9)
    return ax


__all__ += ["plot_trace_heatmap"]


def plot_optimum_histogram(layers: Any, optima: Any, *, golden: int | None = None, ax: Any = None,
                           title: str | None = None) -> Any:
    """How many edits have each layer as their own optimal layer (the sample-wise sweep),
    with the dataset-level golden layer marked."""
    from collections import Counter

    ax = _axes(ax)
    counts = Counter(optima)
    ax.bar(list(layers), [counts.get(l, 0) for l in layers], color="#4c72b0")
    if golden is not None:
        ax.axvline(golden, color=SELECTED, lw=1.5, ls="--")
        ax.annotate(f"golden {golden}", (golden, max(counts.values() or [1])), xytext=(3, -12),
                    textcoords="offset points", color=SELECTED, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("edits whose optimal layer it is")
    ax.set_title(title or f"Sample-wise optimal layers ({len(optima)} edits)")
    return ax


__all__ += ["plot_optimum_histogram"]


def plot_matrix(m: Any, metric: str = "edit-only", *, golden: int | None = None, title: str | None = None) -> Any:
    """A :class:`~gradlocate.golden.matrix.Matrix`: ``metric`` per edit x layer as a
    heatmap, and below it the mean over edits per layer with the golden layer marked."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = m.capability if metric == "capability" else (m.scores[metric] if metric in m.scores else m.overall(metric))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 2 + 0.12 * len(m.edit_ids) + 2.5), sharex=True,
                                      gridspec_kw={"height_ratios": [max(2.0, 0.12 * len(m.edit_ids)), 2.0]})
    im = top.imshow(np.ma.masked_invalid(table), aspect="auto", cmap="viridis", interpolation="nearest",
                    extent=(m.layers[0] - 0.5, m.layers[-1] + 0.5, len(m.edit_ids) - 0.5, -0.5))
    fig.colorbar(im, ax=top, label=metric)
    top.set_ylabel("edit")
    top.set_title(title or f"{metric}: every edit alone at every layer ({m.editor})")
    golden = m.golden(metric) if golden is None else golden
    bottom.plot(m.layers, m.curve(metric), marker="o", color=ELIGIBLE, label=f"mean {metric} over edits")
    bottom.axvline(golden, color=SELECTED, ls="--", lw=1, label=f"golden layer {golden}")
    bottom.set_xlabel("layer")
    bottom.set_ylabel(f"mean {metric}")
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


__all__ += ["plot_matrix"]

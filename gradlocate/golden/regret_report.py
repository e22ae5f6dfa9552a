"""Markdown tables and figures of :class:`~gradlocate.golden.regret.Regrets`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["regrets_markdown", "plot_regrets", "fmt"]


def fmt(v: float | None, digits: int = 3) -> str:
    """A number for a table (``n/a`` for None or NaN).

    >>> fmt(0.01234), fmt(float("nan")), fmt(3.0, 0)
    ('0.012', 'n/a', '3')
    """
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _interval(mean: float, lo: float, hi: float) -> str:
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def regrets_markdown(r: Any, definitions: Sequence[str] | None = None) -> str:
    """One table per definition: each method's mean test regret with its interval, its
    paired difference to the reference, and its cost."""
    out = [f"**{r.study}** ({r.n_edits} edits x {len(r.layers)} layers): {r.scheme}.", ""]
    for dfn in definitions or list(r.rows):
        ref = f" minus {r.reference}" if r.reference else ""
        out += [f"Under `{dfn}` (best layer over all rows: {r.golden[dfn]}):", "",
                f"| method | mean test regret [{r.level:.0%} interval] | regret{ref} [interval] | cells (max) | "
                "editor steps | stored seconds | stated confidence / share within margin |",
                "|---|---|---|---|---|---|---|"]
        for x in r.rows[dfn]:
            vs = "" if x.vs_reference is None else _interval(*x.vs_reference)
            conf = "" if not math.isfinite(x.stated) else f"{x.stated:.2f} / {x.hit:.2f}"
            bad = f" ({x.damaging} damaging picks)" if x.damaging else ""
            out.append(f"| {x.name}{bad} | {_interval(x.mean, x.lo, x.hi)} | {vs} | {fmt(x.cells, 0)} "
                       f"({fmt(x.cells_max, 0)}) | {fmt(x.steps, 0)} | {fmt(x.seconds, 0)} | {conf} |")
        out.append("")
    return "\n".join(out)


def plot_regrets(r: Any, definition: str, title: str | None = None) -> Any:
    """Mean test regret with its interval against the cost in cells (log scale); the
    cost-free baselines (random layer, best constant layer) as horizontal lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for x in r.rows[definition]:
        if x.cells == 0:
            ax.axhline(x.mean, ls="--" if "random" in x.name else ":", color="0.5", lw=1)
            ax.annotate(x.name, (1, x.mean), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7)
            continue
        search = x.name.startswith("search")
        ax.errorbar([x.cells], [x.mean], yerr=[[x.mean - x.lo], [x.hi - x.mean]], capsize=2,
                    color="tab:red" if search else "tab:blue", marker="*" if search else "o", ms=11 if search else 5)
        ax.annotate(x.name.replace("brute force ", "BF "), (x.cells, x.mean), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("cost: cells (one proxy edit alone at one layer)")
    ax.set_ylabel(f"mean test regret ({definition})")
    ax.set_ylim(bottom=min(0.0, float(np.nanmin([x.lo for x in r.rows[definition]]))))
    ax.set_title(title or f"{r.study}: {r.n_draws} proxy draws")
    return fig

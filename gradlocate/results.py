"""Result types shared by every selector: small dataclasses with ``.plot()``,
``.to_dict()`` and a readable repr."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerScores"]


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    ax = abs(x)
    return f"{x:.4g}" if 1e-3 <= ax < 1e5 or ax == 0 else f"{x:.3e}"


@dataclass
class LayerScores:
    """Per-layer scores of a layer selector and the layer it selects.

    Attributes:
        method: ``"gradratio"``, ``"lga"``, ``"cma"`` ...
        scores: one float per layer (index = layer).
        eligible: per layer, whether it may be selected (GradRatio's ``l >= l_min``,
            LGA's Tukey fences).
        selected: the selected layer.
        params: the parameters used (for reproducibility).
        extras: other per-layer series (e.g. ``"cos"``, ``"g_edit_sq"``).
        timings: wall times in seconds.
        layers: the layer index of each score (all layers unless a subset was asked;
            not given or empty: ``0..len(scores)-1``).
    """

    method: str
    scores: list[float]
    eligible: list[bool]
    selected: int
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layers:  # also None, as earlier versions wrote for "all layers"
            self.layers = list(range(len(self.scores)))
        if len(self.eligible) != len(self.scores) or len(self.layers) != len(self.scores):
            raise ValueError("scores, eligible and layers must have one entry per layer")

    @property
    def n_layers(self) -> int:
        return len(self.scores)

    @property
    def maximised(self) -> list[float]:
        """Per layer, the value the selection maximises: ``scores``, except for LGA with
        ``sign="negative"`` (``-S``) or ``"abs"`` (``|S|``), whose ``scores`` stay the
        signed ``S``. Rankings and rank correlations with a sweep use this.

        Example:
            >>> r = LayerScores("lga", [1.0, -3.0, 2.0], [True] * 3, 1, params={"sign": "negative"})
            >>> r.maximised, r.ranking()
            ([-1.0, 3.0, -2.0], [1, 0, 2])
        """
        sign = self.params.get("sign", "signed") if self.method == "lga" else "signed"
        if sign == "negative":
            return [-s for s in self.scores]
        if sign == "abs":
            return [abs(s) for s in self.scores]
        return list(self.scores)

    def ranking(self) -> list[int]:
        """Eligible layers from best to worst (by :attr:`maximised`)."""
        pairs = [(s, l) for s, l, e in zip(self.maximised, self.layers, self.eligible) if e]
        return [l for s, l in sorted(pairs, key=lambda p: -p[0])]

    def among(self, layers: Sequence[int]) -> LayerScores:
        """The same scores with the choice limited to ``layers`` (e.g. the layers a matrix
        judged): those layers' entries only, and ``selected`` the best eligible one of them
        by :attr:`maximised`. The eligibility stays as the selector computed it over all its
        layers (LGA's fences, GradRatio's ``l_min``).

        Raises:
            ValueError: no layer of ``layers`` was scored, or none of them is eligible.

        Example:
            >>> r = LayerScores("gradratio", [0.1, 0.9, 0.5, 0.7], [True] * 4, 1)
            >>> r.among([0, 2, 3]).selected
            3
        """
        keep = [i for i, l in enumerate(self.layers) if l in set(layers)]
        if not keep:
            raise ValueError(f"{self.method}: none of layers {sorted(set(layers))} was scored (scored: {self.layers})")
        sub = LayerScores(self.method, [self.scores[i] for i in keep], [self.eligible[i] for i in keep], -1,
                          {**self.params, "among": sorted(set(layers))},
                          {k: [v[i] for i in keep] for k, v in self.extras.items()}, dict(self.timings),
                          [self.layers[i] for i in keep])
        order = sub.ranking()
        if not order:
            raise ValueError(f"{self.method}: none of layers {sub.layers} is eligible")
        sub.selected = order[0]
        return sub

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "selected": self.selected,
            "layers": list(self.layers),
            "scores": [float(s) for s in self.scores],
            "eligible": [bool(e) for e in self.eligible],
            "params": dict(self.params),
            "extras": {k: [float(v) for v in vs] for k, vs in self.extras.items()},
            "timings": dict(self.timings),
        }

    def to_table(self) -> str:
        """Plain-text per-layer table (what the CLI prints)."""
        keys = list(self.extras)
        head = f"{'layer':>5} {'score':>12} " + " ".join(f"{k:>12}" for k in keys) + "  note"
        lines = [head]
        for i, (l, s, e) in enumerate(zip(self.layers, self.scores, self.eligible)):
            note = "<- selected" if l == self.selected else ("" if e else "excluded")
            ex = " ".join(f"{_fmt(self.extras[k][i]):>12}" for k in keys)
            lines.append(f"{l:>5} {_fmt(s):>12} {ex}  {note}".rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        key = self.maximised
        best = sorted(range(self.n_layers), key=lambda i: -key[i] if self.eligible[i] else math.inf)[:3]
        top = ", ".join(f"{self.layers[i]}: {_fmt(self.scores[i])}" for i in best)
        t = sum(self.timings.values())
        return (
            f"LayerScores(method={self.method!r}, selected={self.selected}, n_layers={self.n_layers}, "
            f"eligible={sum(self.eligible)}, top=[{top}]" + (f", time={t:.2f}s" if self.timings else "") + ")"
        )

    def _repr_html_(self) -> str:
        rows = []
        for i, (l, s, e) in enumerate(zip(self.layers, self.scores, self.eligible)):
            style = "font-weight:bold;background:#ffe9a8" if l == self.selected else ("color:#999" if not e else "")
            ex = "".join(f"<td>{_fmt(self.extras[k][i])}</td>" for k in self.extras)
            rows.append(f"<tr style='{style}'><td>{l}</td><td>{_fmt(s)}</td>{ex}<td>{'' if e else 'excluded'}</td></tr>")
        head = "".join(f"<th>{html.escape(k)}</th>" for k in self.extras)
        return (
            f"<div><b>{html.escape(self.method)}</b>: selected layer <b>{self.selected}</b>"
            f"<table><tr><th>layer</th><th>score</th>{head}<th></th></tr>{''.join(rows)}</table></div>"
        )

    def plot(self, ax: Any = None, *, log: bool | None = None, title: str | None = None) -> Any:
        """Bar chart per layer: eligible, excluded and selected layers drawn distinctly
        (as in the GradRatio paper's Figure 2). Returns the matplotlib ``Axes``."""
        from gradlocate.plotting import plot_layer_scores

        return plot_layer_scores(self, ax=ax, log=log, title=title)

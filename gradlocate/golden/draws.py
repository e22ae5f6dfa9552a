"""Selectors judged over several proxy draws: how often each one lands where.

One proxy draw gives each selector one layer, and another draw of the same size can give
another (SmolLM2, CounterFact, R-ROME: LGA picked 28 on one 16-edit proxy and 8 on a
24-edit one). :func:`over_draws` judges the selectors on each of several random proxy/test
splits of one matrix: each draw's selectors ran on its proxy rows; their regret is measured
on its test rows (bootstrap over those rows, as :func:`~gradlocate.golden.judge.judge`
does), and one pair of selectors (LGA and CMA by default) is compared by the paired
bootstrap of the regret difference per draw. :class:`Draws` then says, across draws, each
selector's picks and its mean regret.

The draws share edits (each is a quarter of the same rows), so they are not independent
replicates, and no count of "draws won" is given (it says how often, not by how much, and
treats overlapping draws as independent): the mean test regret over these draws with an
interval over draws and edits is :func:`gradlocate.golden.regret.regret_on_committed_draws`,
which reads the picks this writes (``draws.json``).

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.matrix import Matrix
    >>> from gradlocate.results import LayerScores
    >>> rel = np.tile([0.1, 0.9, 0.5], (12, 1)) + np.arange(12)[:, None] * 0.01
    >>> m = Matrix([0, 1, 2], [f"e{i}" for i in range(12)], {"reliability": rel})
    >>> pick = lambda l: LayerScores("x", [0.0, 0.0, 0.0], [True] * 3, l, layers=[0, 1, 2])
    >>> d = over_draws(m, [(0, [0, 1, 2], {"lga": pick(1), "cma": pick(2)}),
    ...                    (1, [3, 4, 5], {"lga": pick(1), "cma": pick(0)})], definitions=["reliability"], n_boot=50)
    >>> d.picks("lga"), d.picks("cma"), d.regrets("cma", "reliability").round(2).tolist()
    ([1, 1], [2, 0], [0.4, 0.8])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlocate.golden import inference, scores
from gradlocate.golden.judge import DAMAGE_THRESHOLD, PRIMARY, _gated_bootstrap, _picks
from gradlocate.golden.table import Matrix

__all__ = ["over_draws", "Draws", "Draw"]


@dataclass(repr=False)
class Draw:
    """One proxy draw: its seed and proxy rows, each selector's layer, its regret per
    definition (value, lo, hi; ``None`` where the layer is not in the matrix), and the pair's
    paired regret difference per definition (``None`` where either is missing)."""

    seed: int
    proxy: list[int]
    picks: dict[str, int]
    regret: dict[str, dict[str, tuple[float, float, float] | None]]
    difference: dict[str, inference.RegretDifference | None]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "proxy": self.proxy, "picks": self.picks,
                "regret": {k: {d: None if v is None else list(v) for d, v in r.items()} for k, r in self.regret.items()},
                "difference": {d: None if v is None else v.to_dict() for d, v in self.difference.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Draw:
        return cls(int(d["seed"]), list(d["proxy"]), dict(d["picks"]),
                   {k: {a: None if v is None else tuple(v) for a, v in r.items()} for k, r in d["regret"].items()},
                   {a: None if v is None else inference.RegretDifference(**v) for a, v in d["difference"].items()})


@dataclass(repr=False)
class Draws:
    """The selectors over several proxy draws of one matrix (see the module doc)."""

    n_edits: int
    n_proxy: int
    definitions: list[str]
    pair: tuple[str, str]
    draws: list[Draw] = field(default_factory=list)

    @property
    def selectors(self) -> list[str]:
        return list(dict.fromkeys(k for d in self.draws for k in d.regret))

    def picks(self, name: str) -> list[int | None]:
        """The selector's layer in each draw (``None`` where it did not run)."""
        return [d.picks.get(name) for d in self.draws]

    def regrets(self, name: str, definition: str) -> np.ndarray:
        """The selector's regret in each draw (NaN where its layer is not in the matrix)."""
        return np.array([np.nan if (r := d.regret.get(name, {}).get(definition)) is None else r[0]
                         for d in self.draws], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return {"n_edits": self.n_edits, "n_proxy": self.n_proxy, "definitions": self.definitions,
                "pair": list(self.pair), "draws": [d.to_dict() for d in self.draws]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Draws:
        return cls(int(d["n_edits"]), int(d["n_proxy"]), list(d["definitions"]), (d["pair"][0], d["pair"][1]),
                   [Draw.from_dict(x) for x in d["draws"]])

    def __repr__(self) -> str:
        def mean(s: str) -> str:  # a pick outside the matrix's layers has no regret
            r = np.asarray(self.regrets(s, self.definitions[0]), dtype=float)
            return f"{np.nanmean(r):.3f}" if np.isfinite(r).any() else "none (no pick among the matrix's layers)"

        told = "; ".join(f"{s} mean regret ({self.definitions[0]}) {mean(s)}"
                         for s in self.selectors) if self.draws and self.definitions else "no draw"
        return f"Draws({len(self.draws)} proxy draws of {self.n_proxy}/{self.n_edits} edits; {told})"

    def to_markdown(self) -> str:
        """One row per selector: its layer per draw and, per definition, its mean regret over
        these draws with the range (descriptive; the interval is
        :func:`~gradlocate.golden.regret.regret_on_committed_draws`'s)."""
        def f(v: float) -> str:
            return "n/a" if not np.isfinite(v) else f"{v:.3f}"

        head = "| selector | layer per draw | " + " | ".join(f"regret ({d}): mean [min, max]" for d in self.definitions)
        lines = [head + " |", "|---|---|" + "---|" * len(self.definitions)]
        for s in self.selectors:
            cells = []
            for d in self.definitions:
                r = self.regrets(s, d)
                ok = r[np.isfinite(r)]
                cells.append("n/a" if ok.size == 0 else f"{f(ok.mean())} [{f(ok.min())}, {f(ok.max())}]")
            picks = ", ".join("-" if p is None else str(p) for p in self.picks(s))
            lines.append(f"| {s} | {picks} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, definition: str | None = None) -> Any:
        """Each selector's regret per draw under ``definition`` (default the first)."""
        import matplotlib.pyplot as plt

        d = definition or self.definitions[0]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = np.arange(len(self.draws))
        for s in self.selectors:
            ax.plot(x, self.regrets(s, d), marker="o", label=s)
        ax.set_xticks(x, [str(dr.seed) for dr in self.draws])
        ax.set_xlabel("proxy draw (seed)"), ax.set_ylabel(f"regret ({d}), test rows")
        ax.set_title(f"selectors over {len(self.draws)} proxy draws of {self.n_proxy} edits")
        ax.legend(fontsize=7)
        return fig


def _draw(m: Matrix, seed: int, proxy: Sequence[int], selections: Mapping[str, Any], definitions: Sequence[str],
          pair: tuple[str, str], gate: scores.DamageGate, n_boot: int) -> Draw:
    """One draw judged on its test rows: regret per selector and definition, the pair's difference."""
    proxy = sorted(int(i) for i in proxy)
    if not proxy or any(not 0 <= i < m.n_edits for i in proxy):
        raise ValueError(f"draw {seed}: proxy rows must be a non-empty subset of 0..{m.n_edits - 1}, got {proxy}")
    test = np.setdiff1d(np.arange(m.n_edits), proxy)
    if test.size < 2:
        raise ValueError(f"draw {seed}: at least 2 test rows are needed, got {test.size}")
    metrics, picks = m.metrics(test), _picks(m, selections)
    regret: dict[str, dict[str, Any]] = {k: {} for k in selections}
    diff: dict[str, inference.RegretDifference | None] = {}
    for d in definitions:
        _, _, boot = _gated_bootstrap(metrics, d, gate, picks, n_boot, seed)
        for k in selections:
            regret[k][d] = boot.regret.get(k)
        diff[d] = boot.difference(*pair) if set(pair) <= set(picks) else None
    return Draw(seed, proxy, {k: int(s.selected) for k, s in selections.items()}, regret, diff)


def over_draws(m: Matrix, draws: Sequence[tuple[int, Sequence[int], Mapping[str, Any]]], *,
               definitions: Sequence[str] = (PRIMARY, "weighted", "golden-layers"), pair: tuple[str, str] = ("lga", "cma"),
               threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000) -> Draws:
    """Judge the selectors on each proxy draw of ``m`` (see the module doc).

    Args:
        m: the matrix (complete columns).
        draws: (seed, proxy rows, selector name -> :class:`~gradlocate.results.LayerScores`
            run on those rows) per draw; every draw the same number of proxy rows.
        definitions: the overalls judged; pair: the two selectors compared per draw.
        threshold: the damage gate (nats), as in :func:`~gradlocate.golden.judge.judge`.
        n_boot: bootstrap resamples per draw and definition (seeded by the draw's seed).

    Raises:
        ValueError: no draw, draws of different proxy sizes, or a draw's rows out of range.
    """
    if not draws:
        raise ValueError("over_draws needs at least one (seed, proxy rows, selections) draw")
    sizes = {len(set(p)) for _, p, _ in draws}
    if len(sizes) != 1:
        raise ValueError(f"every draw must have the same number of proxy rows, got sizes {sorted(sizes)}")
    gate = scores.damage_gate(m.capability, threshold, higher_is_better=False)
    done = [_draw(m, int(s), p, sel, definitions, pair, gate, n_boot) for s, p, sel in draws]
    return Draws(m.n_edits, sizes.pop(), list(definitions), pair, done)

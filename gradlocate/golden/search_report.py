"""The search replayed on stored studies, judged against every baseline and the published selectors.

:func:`search_replay` runs, on each matrix folder, :func:`~gradlocate.golden.regret.regret_over_draws`
(the search at 3, 4 and 8 cells per layer, brute force on 1 .. 24 edits, a random layer, the
best constant layer, >= 200 random draws, two-level bootstrap intervals) and
:func:`~gradlocate.golden.regret.regret_on_committed_draws` (the folder's 16 committed
draws: GradRatio with and without l_min, LGA, CMA beside the search and brute force on the
same proxy rows), and says per study and definition whether issue 43's bar is met
(:class:`Verdict`): the search's mean test regret at most the best published selector's
and at most brute force on 16 edits', at no more than a quarter of brute force on 16
edits' cells; and the aim beyond: brute force on 24 edits' regret at an eighth of its cost.

Example:
    >>> v = Verdict("s", "edit-only", 0.010, (0.0, -0.004, 0.003), 120, 0.012, 480, "lga", 0.05, 0.011,
    ...             0.011, 90, 0.009, 720)
    >>> v.holds, v.aim
    (True, False)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.golden import arrays, scores
from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.judge import DAMAGE_THRESHOLD
from gradlocate.golden.regret import (BRUTE_FORCE_K, CONSTANT, RANDOM, Regrets, brute_force, regret_on_committed_draws,
                                      regret_over_draws, searched)
from gradlocate.golden.regret_report import fmt

__all__ = ["search_replay", "SearchReplay", "StudyReplay", "Verdict", "SEARCH", "SEARCH_AIM"]

#: The row names of the search at its default budget (4 cells per layer) and at an eighth of brute force on 24.
SEARCH, SEARCH_AIM = "search", "search (3 cells/layer)"
SEARCH_MORE = "search (8 cells/layer)"
SELECTORS = ("lga", "cma", "gradratio", "gradratio (no l_min)")


@dataclass
class Verdict:
    """Issue 43's bar on one study under one definition.

    Attributes:
        search, search_vs_bf16, search_cells: the search's mean test regret over the random
            draws, its paired difference to brute force on 16 edits (mean, lo, hi), mean cells.
        bf16, bf16_cells: brute force on 16 edits (NaN where the pool is smaller).
        selector, selector_regret, search_committed: the best published selector on the
            committed draws, its mean regret there, and the search's on the same draws.
        aim_search, aim_cells, bf24, bf24_cells: the search at 3 cells per layer and brute force on 24.
    """

    study: str
    definition: str
    search: float
    search_vs_bf16: tuple[float, float, float] | None
    search_cells: float
    bf16: float
    bf16_cells: float
    selector: str
    selector_regret: float
    search_committed: float
    aim_search: float
    aim_cells: float
    bf24: float
    bf24_cells: float

    @property
    def beats_bf16(self) -> bool:
        return bool(self.search <= self.bf16 + 1e-12)

    @property
    def beats_selector(self) -> bool:
        return bool(self.search_committed <= self.selector_regret + 1e-12)

    @property
    def cheap(self) -> bool:
        return bool(self.search_cells <= self.bf16_cells / 4 + 1e-9)

    @property
    def holds(self) -> bool:
        """The done-when: at most the best selector's and BF16's regret, at a quarter of BF16's cells."""
        return self.beats_bf16 and self.beats_selector and self.cheap

    @property
    def aim(self) -> bool:
        """The aim beyond: BF24's regret (or less) at an eighth of its cells."""
        return bool(self.aim_search <= self.bf24 + 1e-12 and self.aim_cells <= self.bf24_cells / 8 + 1e-9)

    @property
    def within_noise(self) -> bool:
        """The search - BF16 paired interval holds 0 (a shortfall no larger than the noise)."""
        v = self.search_vs_bf16
        return v is not None and v[1] <= 0 <= v[2]

    def to_dict(self) -> dict[str, Any]:
        return {**arrays.plain(asdict(self)), "holds": self.holds, "aim": self.aim, "within_noise": self.within_noise}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        num = lambda k: math.nan if d.get(k) is None else float(d[k])  # noqa: E731
        vs = d.get("search_vs_bf16")
        return cls(d["study"], d["definition"], num("search"),
                   None if vs is None else (float(vs[0]), float(vs[1]), float(vs[2])), num("search_cells"),
                   num("bf16"), num("bf16_cells"), d["selector"], num("selector_regret"), num("search_committed"),
                   num("aim_search"), num("aim_cells"), num("bf24"), num("bf24_cells"))


def _mean(r: Regrets, dfn: str, name: str) -> tuple[float, float]:
    try:
        row = r.row(dfn, name)
    except KeyError:
        return math.nan, math.nan
    return row.mean, row.cells


def verdict(study: str, dfn: str, draws: Regrets, committed: Regrets) -> Verdict:
    """The bar (see :class:`Verdict`) read off one study's two tables."""
    s = draws.row(dfn, SEARCH)
    bf16, bf16_cells = _mean(draws, dfn, "brute force k=16")
    sels = [x for x in committed.rows[dfn] if x.name in SELECTORS and math.isfinite(x.mean)]
    best = min(sels, key=lambda x: x.mean) if sels else None
    aim, aim_cells = _mean(draws, dfn, SEARCH_AIM)
    bf24, bf24_cells = _mean(draws, dfn, "brute force k=24")
    return Verdict(study, dfn, s.mean, s.vs_reference, s.cells, bf16, bf16_cells,
                   best.name if best else "none", best.mean if best else math.nan,
                   committed.row(dfn, SEARCH).mean, aim, aim_cells, bf24, bf24_cells)


@dataclass(repr=False)
class StudyReplay:
    """One study: its random-draws table, its committed-draws table, a verdict per definition."""

    name: str
    draws: Regrets
    committed: Regrets
    verdicts: dict[str, Verdict]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "draws": self.draws.to_dict(), "committed": self.committed.to_dict(),
                "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyReplay:
        return cls(d["name"], Regrets.from_dict(d["draws"]), Regrets.from_dict(d["committed"]),
                   {k: Verdict.from_dict(v) for k, v in d["verdicts"].items()})


@dataclass(repr=False)
class SearchReplay:
    """The search replayed on several studies (see the module doc)."""

    studies: list[StudyReplay] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": arrays.plain(self.settings), "studies": [s.to_dict() for s in self.studies]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchReplay:
        return cls([StudyReplay.from_dict(s) for s in d["studies"]], dict(d.get("settings", {})))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SearchReplay:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        v = [x for s in self.studies for x in s.verdicts.values()]
        return (f"SearchReplay({len(self.studies)} studies: the bar holds in {sum(x.holds for x in v)} of {len(v)} "
                f"study x definition pairs, the aim in {sum(x.aim for x in v)})")

    def to_markdown(self, details: bool = True) -> str:
        """The summary table (one row per study and definition), then each study's two tables."""
        return summary_markdown(self) + ("" if not details else "\n" + "\n".join(
            s.draws.to_markdown() + "\n" + s.committed.to_markdown() for s in self.studies))

    def docs_markdown(self) -> str:
        """The summary, then per definition the wide tables (every method x every study) of
        the random draws and of the committed draws: what docs/search.md shows."""
        out = [summary_markdown(self)]
        for dfn in self.settings.get("definitions") or list(self.studies[0].verdicts):
            out += [f"\n**Random draws, `{dfn}`**: mean test regret [95% interval] (mean cells)\n",
                    wide_markdown(self, dfn),
                    f"\n**The 16 committed draws, `{dfn}`** (the published selectors' picks; the proxy methods "
                    f"on the same proxy rows)\n", wide_markdown(self, dfn, committed=True)]
        return "\n".join(out)

    def plot(self, definition: str = "edit-only") -> Any:
        """Each study's mean test regret against cost under ``definition``, one panel each."""
        import matplotlib.pyplot as plt

        n = len(self.studies)
        cols = min(4, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, s in zip(axes.flat, self.studies):
            rows = s.draws.rows[definition]
            for x in rows:
                if x.cells == 0:
                    ax.axhline(x.mean, ls=":", color="0.6", lw=1)
                    continue
                c = "tab:red" if x.name.startswith("search") else "tab:blue"
                ax.errorbar([x.cells], [x.mean], yerr=[[x.mean - x.lo], [x.hi - x.mean]], fmt="o", color=c, ms=4,
                            capsize=2)
            ax.set_xscale("log"), ax.set_title(s.name, fontsize=8)
            ax.set_xlabel("cells", fontsize=7), ax.set_ylabel(f"test regret ({definition})", fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("search (red) and brute force on k edits (blue); dotted: random layer, best constant layer",
                     fontsize=9)
        fig.tight_layout()
        return fig


def summary_markdown(r: SearchReplay) -> str:
    """One row per study and definition: the search against BF16 and the best selector, and the aim."""
    lines = ["| study | score | search: regret [interval] (cells) | BF16: regret (cells) | search - BF16 [interval] | "
             "best selector, 16 committed draws | search, same draws | done-when | aim: search 3/layer vs BF24 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in r.studies:
        for dfn, v in s.verdicts.items():
            row = s.draws.row(dfn, SEARCH)
            vs = "n/a" if v.search_vs_bf16 is None else \
                f"{v.search_vs_bf16[0]:+.3f} [{v.search_vs_bf16[1]:+.3f}, {v.search_vs_bf16[2]:+.3f}]"
            why = "holds" if v.holds else "no: " + ", ".join(
                w for w, ok in (("above BF16" + (" (within noise)" if v.within_noise else ""), v.beats_bf16),
                                ("above the selector", v.beats_selector), ("too costly", v.cheap)) if not ok)
            aim = f"{fmt(v.aim_search)} ({fmt(v.aim_cells, 0)}) vs {fmt(v.bf24)} ({fmt(v.bf24_cells, 0)})" + \
                (": met" if v.aim else "")
            lines.append(f"| {s.name} | {dfn} | {fmt(row.mean)} [{fmt(row.lo)}, {fmt(row.hi)}] ({fmt(row.cells, 0)}) | "
                         f"{fmt(v.bf16)} ({fmt(v.bf16_cells, 0)}) | {vs} | {v.selector} {fmt(v.selector_regret)} | "
                         f"{fmt(v.search_committed)} | {why} | {aim} |")
    return "\n".join(lines) + "\n"


def _order(name: str) -> tuple[int, float]:
    """Baselines, selectors, brute force by k, then the search by budget."""
    if name.startswith("brute force k="):
        return 2, float(name.split("=")[1])
    if name.startswith("search"):
        return 3, {SEARCH_AIM: 3.0, SEARCH: 4.0, SEARCH_MORE: 8.0}.get(name, 9.0)
    return (0, 0.0) if name in (RANDOM, CONSTANT) else (1, 0.0)


def wide_markdown(r: SearchReplay, definition: str, committed: bool = False) -> str:
    """One row per method, one column per study: mean test regret [interval] and, below
    the name, the mean cells (random draws, or the committed draws with ``committed``)."""
    tables = [s.committed if committed else s.draws for s in r.studies]
    names = sorted(dict.fromkeys(x.name for t in tables for x in t.rows[definition]), key=_order)
    head = "| method | " + " | ".join(f"{s.name} ({len(t.layers)} layers)" for s, t in zip(r.studies, tables)) + " |"
    lines = [head, "|---|" + "---|" * len(tables)]
    for name in names:
        cells = []
        for t in tables:
            try:
                x = t.row(definition, name)
            except KeyError:
                cells.append("")
                continue
            cost = "" if x.cells == 0 else f" ({fmt(x.cells, 0)} cells)"
            cells.append(f"{fmt(x.mean)} [{fmt(x.lo)}, {fmt(x.hi)}]{cost}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _methods(pool: int) -> list[Any]:
    return [*(brute_force(k) for k in BRUTE_FORCE_K if k <= pool), searched(per_layer=3, name=SEARCH_AIM),
            searched(name=SEARCH), searched(per_layer=8, name=SEARCH_MORE)]


def search_replay(folders: Sequence[str | os.PathLike[str]], *, definitions: Sequence[str] = ("edit-only", "weighted"),
                  n_draws: int = 200, pool: int = 24, n_boot: int = 200, boot_draws: int | None = None,
                  n_boot_committed: int = 1000, seed: int = 0, threshold: float = DAMAGE_THRESHOLD,
                  level: float = 0.95, progress: bool = True) -> SearchReplay:
    """Replay the search on each matrix folder (see the module doc).

    Args:
        folders: study folders, each complete and with ``draws.json`` (the selectors' proxy draws).
        pool: proxy rows per random draw (capped at half the rows).
        n_boot, boot_draws: the two-level bootstrap's replicates and draws per replicate
            (default ``n_draws``; fewer: wider, conservative intervals).
        n_boot_committed: the committed draws' replicates.
        progress: print one line per study as it starts (the whole run takes minutes).
    """
    out = SearchReplay(settings={"definitions": list(definitions), "n_draws": n_draws, "pool": pool, "n_boot": n_boot,
                                 "boot_draws": boot_draws, "seed": seed, "threshold": threshold, "level": level})
    for folder in folders:
        name = Path(folder).name
        n_edits = len(StudyFolder.open(folder).manifest.edits)
        p = min(pool, n_edits // 2)
        if progress:
            print(f"search replay: {name} ({n_draws} draws of {p} proxy edits, {n_boot} x {boot_draws or n_draws} "
                  f"bootstrap draws; the 16 committed draws)", flush=True)
        draws = regret_over_draws(folder, definitions=definitions, methods=_methods(p), n_draws=n_draws, pool=p,
                                  n_boot=n_boot, boot_draws=boot_draws, seed=seed, threshold=threshold, level=level)
        committed = regret_on_committed_draws(folder, definitions=definitions, n_boot=n_boot_committed, seed=seed,
                                              threshold=threshold, level=level, reference=SEARCH)
        out.studies.append(StudyReplay(name, draws, committed, {d: verdict(name, d, draws, committed)
                                                                for d in definitions}))
    return out


__all__ += ["summary_markdown", "wide_markdown", "verdict", "RANDOM", "CONSTANT"]

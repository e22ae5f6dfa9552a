"""What the page answers first, per study folder: which layer to edit, which selector (if
any) to trust and at what regret, and what brute force on ``k`` edits would cost instead.

:func:`answer` puts around one folder's :class:`~gradlocate.golden.judge.Judgment`:

* **regret over random proxy draws** (:func:`~gradlocate.golden.regret.regret_over_draws`,
  primary score, damage-gated): ``n_draws`` (>= 200) draws of the folder's proxy size,
  brute force on ``k`` = 1, 2, 4, 8, 16 and on all the proxy edits ("transfer": the
  proxy's best layer used on the test edits), a random layer and the best constant layer,
  with two-level bootstrap intervals (edits and draws); the budgeted search
  (:func:`~gradlocate.golden.regret.searched`) on the same number of draws, with its own,
  smaller bootstrap (its replay costs ~2 ms a draw);
* **the published selectors on their committed draws**
  (:func:`~gradlocate.golden.regret.regret_on_committed_draws`: ``draws.json``, 16 draws;
  only these have the selectors' picks), beside brute force on the same proxy rows, each
  paired against the random layer; LGA against CMA paired on the same draws;
* the **cost** of brute force on ``k`` edits: ``k x layers`` cells times the mean stored
  seconds per cell of the folder's matrix (the cells' own ``timings``);
* whether the regime is **under-trained** (:func:`~gradlocate.golden.judge_report.under_trained`).

:func:`holm_family` then Holm-adjusts, across every study that is not under-trained, every
p-value the page presents as a test (:meth:`Answer.tests`): each edit's own optimum vs
the golden layer where a replicate makes it estimable (oracle gain > 0; TOST), each
published selector's regret below a random layer's, and transfer below a random layer's.
A selector is **trusted** when its test is rejected after the adjustment (one-sided, at
:data:`~gradlocate.golden.versus.ALPHA`); among those, the lowest mean regret.

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.judge import judge
    >>> from gradlocate.golden.table import Matrix
    >>> m = Matrix([0, 1, 2], list("abcdefgh"), {"reliability": np.tile([0.2, 0.9, 0.5], (8, 1))})
    >>> a = Answer("s", judge(m, proxy=[0, 1], n_boot=10), {}, 2, 2.0, layers=m.layers)
    >>> a.cost(2), a.trusted(), a.tests()   # 2 edits x 3 layers x 2.0 s; no regret table made here
    (12.0, None, {})
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlocate.golden import arrays
from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.judge import DAMAGE_THRESHOLD, Judgment
from gradlocate.golden.judge_report import under_trained
from gradlocate.golden.oracle import holm
from gradlocate.golden.regret import RANDOM, MethodRegret, Regrets, brute_force, regret_on_committed_draws, \
    regret_over_draws, searched
from gradlocate.golden.versus import ALPHA

__all__ = ["answer", "Answer", "holm_family", "PROXY_K", "SELECTORS", "seconds_per_cell", "RegretSettings"]

#: Brute force on this many random proxy edits is judged (those up to the proxy size), and on all of them.
PROXY_K = (1, 2, 4, 8, 16)
#: The published selectors, in the order the page lists them.
SELECTORS = ("lga", "cma", "gradratio", "gradratio (no l_min)")
SEARCH = "search"


@dataclass
class RegretSettings:
    """How the regret tables are made (stated on the page).

    Attributes:
        n_draws: random proxy draws (>= 200 to report).
        n_boot, boot_draws: the two-level bootstrap of brute force and the baselines: edit
            resamples, each with ``boot_draws`` fresh draws (fewer draws than ``n_draws``
            widen the interval: conservative). 1000 replicates resolve a one-sided p down
            to 1/1001, which the Holm adjustment over ~30 tests needs.
        search_boot, search_draws: the same for the search (its replay is ~10x dearer per draw).
        committed_boot: resamples of the committed draws (draws x edits).
        search: judge the search at all.
    """

    n_draws: int = 200
    n_boot: int = 1000
    boot_draws: int = 50
    search_boot: int = 200
    search_draws: int = 50
    committed_boot: int = 2000
    search: bool = True


@dataclass(repr=False)
class Answer:
    """One study folder's answer (see the module doc).

    Attributes:
        name: the folder's name; judgment: its :class:`~gradlocate.golden.judge.Judgment`;
        regime: model, data, editor, settings; n_proxy: the folder's proxy size;
        secs: mean stored seconds per cell (NaN: no timings); layers: the judged layers.
        draws, search, committed: the regret tables (``None`` where not made: see ``notes``).
        lga_cma: LGA's minus CMA's regret on the committed draws (mean, lo, hi), paired.
        picks: each selector's layer per committed draw.
        under_trained: why the regime is under-trained ("" when it is not).
        adjusted: Holm-adjusted p by test name (:func:`holm_family`; empty when out of the family).
    """

    name: str
    judgment: Judgment
    regime: dict[str, Any]
    n_proxy: int
    secs: float
    layers: list[int] = field(default_factory=list)
    draws: Regrets | None = None
    search: Regrets | None = None
    committed: Regrets | None = None
    lga_cma: tuple[float, float, float] | None = None
    picks: dict[str, list[int | None]] = field(default_factory=dict)
    under_trained: str = ""
    notes: list[str] = field(default_factory=list)
    adjusted: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.judgment.primary

    def _row(self, table: Regrets | None, name: str) -> MethodRegret | None:
        if table is None:
            return None
        try:
            return table.row(self.primary, name)
        except KeyError:
            return None

    def brute_force(self, k: int) -> MethodRegret | None:
        """Brute force on ``k`` random proxy edits over the random draws (``None``: not judged)."""
        return self._row(self.draws, f"brute force k={k}")

    @property
    def transfer(self) -> MethodRegret | None:
        """Brute force on all the proxy edits: the proxy's best layer used on the test edits."""
        return self.brute_force(self.n_proxy)

    @property
    def random_layer(self) -> MethodRegret | None:
        return self._row(self.draws, RANDOM)

    def selectors(self) -> list[MethodRegret]:
        """The published selectors' rows on the committed draws (in :data:`SELECTORS` order)."""
        rows = [self._row(self.committed, s) for s in SELECTORS]
        return [r for r in rows if r is not None and math.isfinite(r.mean)]

    def tests(self) -> dict[str, float]:
        """Every one-sided p-value the page presents as a test, by name (unadjusted)."""
        out = dict(self.judgment.own_optimum.tests())
        for r in self.selectors():
            out[f"{r.name}: regret below a random layer's"] = r.p_below
        t = self.transfer
        if t is not None:
            out["transfer: regret below a random layer's"] = t.p_below
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def rejected(self, test: str) -> bool:
        """The test is rejected after the Holm adjustment (``False`` outside the family)."""
        return self.adjusted.get(test, 1.0) < ALPHA

    def trusted(self) -> MethodRegret | None:
        """The published selector with the lowest mean regret among those whose regret is
        below a random layer's after the Holm adjustment (``None``: none is)."""
        ok = [r for r in self.selectors() if self.rejected(f"{r.name}: regret below a random layer's")]
        return min(ok, key=lambda r: r.mean) if ok else None

    def cost(self, k: int) -> float:
        """Seconds brute force on ``k`` edits costs: ``k x layers`` cells at the mean stored seconds per cell."""
        return float(k * len(self.layers) * self.secs)

    def instead(self) -> tuple[int, MethodRegret] | None:
        """The smallest ``k`` whose brute-force mean regret (random draws) is at most the
        lowest published selector's (committed draws); where none is, the ``k`` with the
        lowest mean regret. ``None``: no brute force judged."""
        ks = [(k, r) for k in sorted({*PROXY_K, self.n_proxy}) if (r := self.brute_force(k)) is not None]
        if not ks:
            return None
        best = min((r.mean for r in self.selectors()), default=math.nan)
        good = [(k, r) for k, r in ks if math.isfinite(best) and r.mean <= best + 1e-12]
        return good[0] if good else min(ks, key=lambda kr: kr[1].mean)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "regime": arrays.plain(self.regime), "n_proxy": self.n_proxy,
                "seconds_per_cell": self.secs, "layers": self.layers, "under_trained": self.under_trained,
                "draws": None if self.draws is None else self.draws.to_dict(),
                "search": None if self.search is None else self.search.to_dict(),
                "committed": None if self.committed is None else self.committed.to_dict(),
                "lga_cma": self.lga_cma, "picks": self.picks, "tests": self.tests(), "adjusted": self.adjusted,
                "notes": self.notes}

    def __repr__(self) -> str:
        t = self.trusted()
        return (f"Answer({self.name}: layer {self.judgment.golden}, trusted "
                f"{t.name if t else 'none'}{', under-trained' if self.under_trained else ''})")


def seconds_per_cell(folder: StudyFolder, edit_ids: list[str], layers: list[int]) -> float:
    """The mean stored seconds of the folder's cells of these edits and layers (first
    replicate; each cell's ``timings`` summed: train, score, capability). NaN: none stored."""
    rows, cols = set(edit_ids), set(layers)
    seed = folder.manifest.regime["seeds"][0]
    t = [sum(float(v) for v in r["timings"].values()) for r in folder.records().values()
         if r.get("edit") in rows and int(r["layer"]) in cols and r.get("seed", seed) == seed and r.get("timings")]
    return float(np.mean(t)) if t else math.nan


def _regime(folder: StudyFolder) -> dict[str, Any]:
    man = folder.manifest
    return {"model": man.model.get("spec") or man.model.get("class"), "data": man.data.get("source"),
            "editor": man.regime["editor"], "hparams": man.regime["fingerprint"].get("hparams", {}),
            "n_layers": man.n_layers}


def _random_draws(a: Answer, m: Any, threshold: float, rs: RegretSettings) -> None:
    """Brute force and the baselines (and the search) over random proxy draws of the judged matrix."""
    ks = sorted(k for k in {*PROXY_K, a.n_proxy} if k <= a.n_proxy)
    kw = dict(definitions=[a.primary], n_draws=rs.n_draws, pool=a.n_proxy, threshold=threshold, reference=RANDOM)
    try:
        a.draws = regret_over_draws(m, methods=[brute_force(k) for k in ks], n_boot=rs.n_boot,
                                    boot_draws=rs.boot_draws, **kw)  # type: ignore[arg-type]
    except ValueError as e:
        a.notes.append(f"regret over random draws not made: {e}")
        return
    if rs.search:
        try:
            a.search = regret_over_draws(m, methods=[searched(name=SEARCH)], n_boot=rs.search_boot,
                                         boot_draws=rs.search_draws, **kw)  # type: ignore[arg-type]
        except ValueError as e:
            a.notes.append(f"the search not replayed: {e}")


def _committed(a: Answer, folder: StudyFolder, n_edits: int, threshold: float, rs: RegretSettings) -> None:
    """The published selectors on the folder's committed draws, with brute force on the same proxy rows."""
    if not folder.draws_path.exists():
        a.notes.append("no committed proxy draws (draws.json): the selectors are judged on the one draw only")
        return
    d = json.loads(folder.draws_path.read_text())
    if int(d.get("n_edits", -1)) != n_edits:
        a.notes.append(f"the committed draws were made at {d.get('n_edits')} edits, not the {n_edits} judged (stale)")
        return
    n_proxy = int(d["n_proxy"])
    methods = [brute_force(k) for k in sorted({*PROXY_K, n_proxy}) if k <= n_proxy]
    kw = dict(definitions=[a.primary], n_boot=rs.committed_boot, threshold=threshold)
    a.committed = regret_on_committed_draws(folder.path, methods=methods, reference=RANDOM, **kw)  # type: ignore[arg-type]
    pair = regret_on_committed_draws(folder.path, methods=[], reference="cma", **kw)  # type: ignore[arg-type]
    try:
        a.lga_cma = pair.row(a.primary, "lga").vs_reference
    except KeyError:
        a.lga_cma = None
    a.picks = {s: [x["picks"].get(s) for x in d["draws"]] for s in d.get("selectors", [])}


def answer(folder: StudyFolder | str | os.PathLike[str], judgment: Judgment, matrix: Any, *,
           threshold: float = DAMAGE_THRESHOLD, settings: RegretSettings | None = None) -> Answer:
    """One folder's answer around its ``judgment`` of ``matrix`` (the judged complete
    layers; see the module doc). Regret tables that cannot be made say why in ``notes``."""
    folder = folder if isinstance(folder, StudyFolder) else StudyFolder.open(folder)
    rs = settings or RegretSettings()
    n_proxy = len(judgment.proxy) or max(1, matrix.n_edits // 4)
    a = Answer(folder.path.name, judgment, _regime(folder), n_proxy,
               seconds_per_cell(folder, matrix.edit_ids, matrix.layers), list(matrix.layers),
               under_trained=under_trained(judgment))
    _random_draws(a, matrix, threshold, rs)
    _committed(a, folder, matrix.n_edits, threshold, rs)
    return a


def holm_family(answers: list[Answer]) -> dict[str, float]:
    """Holm-adjust every test of every answer that is not under-trained, as one family;
    each answer's ``adjusted`` is filled (under-trained ones: left empty). Returns the
    family, ``"study: test" -> adjusted p`` (empty when there is no test)."""
    family = {f"{a.name}: {t}": p for a in answers if not a.under_trained for t, p in a.tests().items()}
    adjusted = holm(family) if family else {}
    for a in answers:
        a.adjusted = {} if a.under_trained else {t: adjusted[f"{a.name}: {t}"] for t in a.tests()}
    return adjusted

"""Judge every selector against the golden-layer sweep.

:func:`compare` splits the edits into a **proxy** subset (default 10 %, as in the
Golden Layers paper) and a **test** subset. Each selector sees only the proxy edits
and picks a layer; the sweep edits and evaluates on the test edits at every candidate
layer (and at every selected layer). For each selector it reports a
:class:`SelectorRow`:

* the selected layer and the sweep's metrics there;
* **regret**: the overall score lost against the golden layer (0 = found it);
* **Spearman ρ** between the selector's per-layer scores and the sweep's per-layer
  overall score (does the selector *rank* layers like the ground truth?);
* its wall time, absolute and relative to the sweep's.

A selector that cannot run on the data (no subjects for causal tracing, no old
answer ...) gets a row saying why; the others and the sweep still run.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": f"{i} + {i} =", "target_new": str(3 * i), "subject": str(i),
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"} for i in range(1, 5)]
    >>> cmp = compare(model, edits, ["some general text here", "and some more of it"],
    ...               selectors=("gradratio",), proxy=0.5, trainer={"lr": 1e-2, "epochs": 2},
    ...               progress=False, generation=False, selector_kwargs={"gradratio": {"min_layer": 0}})
    >>> [r.selector for r in cmp.rows]
    ['gradratio']
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradlocate.data import as_edits
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import ModelBusyError, require_gradients, using
from gradlocate.results import LayerScores
from gradlocate.golden.folder import proxy_split
from gradlocate.golden.inference import rank_agreement
from gradlocate.golden.sweep import OVERALL_METRICS, SweepResult, sweep as run_sweep

__all__ = ["compare", "Comparison", "SelectorRow", "split_edits", "SELECTORS", "spearman", "run_selector"]

SELECTORS = ("gradratio", "lga", "cma")


def split_edits(edits: Sequence[Any], proxy: float = 0.1, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(proxy, test) edits under the proxy rule (:func:`gradlocate.golden.folder.proxy_split`)
    with a fraction: ``max(1, round(proxy * n))`` proxy edits (at most ``n - 1``).

    Example:
        >>> p, t = split_edits(list(range(10)), proxy=0.2)
        >>> len(p), len(t), sorted(p + t) == list(range(10))
        (2, 8, True)
    """
    if isinstance(proxy, bool) or not isinstance(proxy, (int, float)) or not 0 < proxy < 1:
        raise ValueError(f"proxy must be a fraction in (0, 1), got {proxy!r}")
    if len(edits) < 2:
        raise ValueError(f"a proxy/test split needs at least 2 edits, got {len(edits)}")
    k = min(len(edits) - 1, max(1, round(proxy * len(edits))))
    rows, test = proxy_split(len(edits), k, seed, min_test=1)
    return [edits[i] for i in rows], [edits[i] for i in test]


def spearman(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's rank correlation (:func:`gradlocate.golden.inference.rank_agreement`);
    ``None`` for fewer than 3 points or a constant series."""
    x = np.array([math.nan if v is None else v for v in a], dtype=float)
    y = np.array([math.nan if v is None else v for v in b], dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or len(set(x[keep])) < 2 or len(set(y[keep])) < 2:
        return None
    rho = rank_agreement(x[keep], y[keep]).spearman
    return None if math.isnan(rho) else float(rho)


def run_selector(name: str, h: Handles, edits: Any, retain: Any = None, **kwargs: Any) -> LayerScores:
    """Run one selector by name (``"gradratio"``, ``"lga"`` or ``"cma"``)."""
    if name == "gradratio":
        from gradlocate.data import default_retain_texts
        from gradlocate.selectors import gradratio

        return gradratio(h, edits, default_retain_texts(16) if retain is None else retain, **kwargs)
    if name == "lga":
        from gradlocate.selectors import lga

        return lga(h, edits, **kwargs)
    if name == "cma":
        from gradlocate.selectors import cma_layer

        return cma_layer(h, edits, **kwargs)
    raise ValueError(f"unknown selector {name!r}: choose from {SELECTORS}")


@dataclass
class SelectorRow:
    """One selector judged against the sweep.

    Attributes:
        selector: its name.
        layer: the layer it selected (``None`` if it could not run: see ``error``).
        metrics: the sweep's metrics at that layer (teacher-forced or generation, as scored).
        overall, regret: the sweep's overall score there, and the golden layer's minus it.
        spearman: rank correlation of its per-layer scores with the sweep's overall.
        time_s, time_vs_sweep: its wall time, and that over the sweep's.
        error: why it could not run on this data.
    """

    selector: str
    layer: int | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    overall: float | None = None
    regret: float | None = None
    spearman: float | None = None
    time_s: float | None = None
    time_vs_sweep: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """Selectors against the sweep.

    Attributes:
        rows: one :class:`SelectorRow` per selector.
        golden: the sweep's golden layer.
        sweep: the :class:`~gradlocate.golden.sweep.SweepResult` (on the test edits).
        selections: each selector's :class:`~gradlocate.results.LayerScores` (on the proxy
            edits; absent for a selector that could not run).
        n_proxy, n_test: the split sizes.
    """

    rows: list[SelectorRow]
    golden: int
    sweep: SweepResult
    selections: dict[str, LayerScores]
    n_proxy: int
    n_test: int
    sweep_time_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def row(self, selector: str) -> SelectorRow:
        for r in self.rows:
            if r.selector == selector:
                return r
        raise KeyError(f"no selector {selector!r} in this comparison ({[r.selector for r in self.rows]})")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "golden": self.golden, "n_proxy": self.n_proxy,
                "n_test": self.n_test, "sweep_time_s": self.sweep_time_s, "sweep": self.sweep.to_dict(),
                "selections": {k: v.to_dict() for k, v in self.selections.items()}, "params": self.params}

    def to_markdown(self) -> str:
        """The comparison table (Golden Layers Table 2 style): selection method vs
        rewrite / rephrase / locality / overall, plus regret, Spearman ρ and time."""
        def f(v: Any, p: int = 3) -> str:
            return "n/a" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))

        g = self.sweep.at(self.golden).metrics(self.sweep.scoring)
        ov = self.sweep.metric("overall")[self.sweep.layers.index(self.golden)]
        lines = ["| method | layer | reliability | generalization | locality | overall | regret | Spearman ρ | "
                 "time (s) | time / sweep |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                 f"| golden (sweep) | {self.golden} | {f(g.get('reliability'))} | {f(g.get('generalization'))} | "
                 f"{f(g.get('locality'))} | {f(ov)} | 0.000 | 1.000 | {f(self.sweep_time_s, 1)} | 1.000 |"]
        for r in self.rows:
            if r.error is not None:
                lines.append(f"| {r.selector} | could not run: {r.error} | | | | | | | {f(r.time_s, 1)} | |")
                continue
            m = r.metrics
            lines.append(f"| {r.selector} | {r.layer} | {f(m.get('reliability'))} | {f(m.get('generalization'))} | "
                         f"{f(m.get('locality'))} | {f(r.overall)} | {f(r.regret)} | {f(r.spearman)} | "
                         f"{f(r.time_s, 1)} | {f(r.time_vs_sweep, 4)} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        sel = ", ".join(f"{r.selector}: could not run" if r.error else
                        f"{r.selector}={r.layer} (regret {r.regret:.3f})" if r.regret is not None else
                        f"{r.selector}={r.layer}" for r in self.rows)
        return f"Comparison(golden={self.golden}, {sel}; proxy={self.n_proxy}, test={self.n_test})"

    def _repr_html_(self) -> str:
        return f"<div><b>Selectors vs sweep</b><pre>{html.escape(self.to_markdown())}</pre></div>"

    def plot(self, *, title: str | None = None) -> Any:
        """Selector scores (normalised) and sweep metrics on one layer axis. Returns the Figure."""
        from gradlocate.plotting import plot_comparison

        return plot_comparison(self, title=title)


def compare(model: Any, edits: Any, retain: Any = None, *, tokenizer: Any = None,
            selectors: Sequence[str] = SELECTORS, sweep: SweepResult | None = None, proxy: float = 0.1,
            seed: int = 0, layers: Sequence[int] | None = None, trainer: Any = None,
            editor: str = "locft",
            out: str | None = None, generation: bool = True, scoring: str = "teacher_forced",
            selector_kwargs: dict[str, dict[str, Any]] | None = None, progress: bool | None = None) -> Comparison:
    """Run each selector on a proxy subset and judge its layer with a sweep on the rest.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles`.
        edits: all edits; split by :func:`split_edits` (``proxy`` fraction, ``seed``).
        retain: general texts for ``gradratio`` (default: the built-in retain texts).
        selectors: any of ``"gradratio"``, ``"lga"``, ``"cma"``.
        sweep: a finished sweep on the test edits to reuse (else one is run over
            ``layers`` plus every selected layer).
        layers: the sweep's candidate layer indices (default: all).
        trainer: the editor's settings for the sweep (a Settings object or a dict, as :func:`~gradlocate.golden.sweep.sweep`).
        editor: the sweep's editor (``"locft"``, ``"rome"``, ``"r-rome"``, ``"emmet"``).
        out: JSONL file for the sweep (resumable).
        selector_kwargs: per-selector keyword arguments, e.g. ``{"cma": {"samples": 5}}``.
        progress: progress bars (``None``: on a terminal only).

    Returns:
        :class:`Comparison`; a selector that fails on this data gets a row with its error.
    """
    require_gradients("compare (its sweep edits at every layer)")
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown or not selectors:
        raise ValueError(f"unknown selectors {unknown}: choose from {SELECTORS}" if unknown else "no selectors given")
    h = resolve(model, tokenizer)
    if layers is not None:  # refuse bad input before anything runs
        h.layer_indices(list(layers))
    if retain is not None and "gradratio" in selectors:
        from gradlocate.data import load_texts

        retain = load_texts(retain)
    proxy_edits, test_edits = split_edits(as_edits(edits), proxy, seed)
    with using(h):  # one caller owns the model for the whole comparison
        picked = _run_selectors(h, selectors, as_edits(proxy_edits), retain, selector_kwargs or {}, progress)
        judge = _judging_sweep(h, test_edits, layers, picked, sweep,
                               dict(trainer=trainer, editor=editor, out=out, generation=generation, scoring=scoring,
                                    progress=progress))
    return Comparison(_selector_rows(selectors, picked, judge), judge.sweep.golden, judge.sweep, picked.selections,
                      len(proxy_edits), len(test_edits), judge.time_s,
                      params={"proxy": proxy, "seed": seed, "selectors": list(selectors),
                              "scoring": judge.sweep.scoring})


@dataclass
class _Picked:
    """Each selector's scores on the proxy edits, its time, or why it could not run."""

    selections: dict[str, LayerScores]
    times: dict[str, float]
    errors: dict[str, str]


def _run_selectors(h: Handles, selectors: Sequence[str], proxy: Any, retain: Any,
                   selector_kwargs: dict[str, dict[str, Any]], progress: bool | None) -> _Picked:
    """Run each selector on the proxy edits; one that fails is recorded, the rest still run."""
    picked = _Picked({}, {}, {})
    for name in selectors:
        t0 = time.perf_counter()
        try:
            picked.selections[name] = run_selector(name, h, proxy, retain,
                                                   **{"progress": progress, **selector_kwargs.get(name, {})})
        except ModelBusyError:
            raise
        except Exception as e:  # noqa: BLE001 - this selector's row says why; the rest still runs
            picked.errors[name] = f"{type(e).__name__}: {e}"
        picked.times[name] = time.perf_counter() - t0
    return picked


@dataclass
class _Judge:
    """The sweep that judges the selections, and its time."""

    sweep: SweepResult
    time_s: float | None


def _judging_sweep(h: Handles, test_edits: Any, layers: Sequence[int] | None, picked: _Picked,
                   given: SweepResult | None, sweep_kw: dict[str, Any]) -> _Judge:
    """Sweep the test edits over ``layers`` and every selected layer, or check that the
    ``given`` sweep has every selected layer."""
    chosen = {s.selected for s in picked.selections.values()}
    if given is not None:
        missing = sorted(chosen - set(given.layers))
        if missing:
            raise ValueError(f"the given sweep lacks the selected layers {missing}: sweep them too")
        return _Judge(given, sum(r.timings.get("total", 0.0) for r in given.records) or None)
    cand = set(h.layer_indices(list(layers) if layers is not None else None)) | chosen
    t0 = time.perf_counter()
    done = run_sweep(h, test_edits, layers=sorted(cand), **sweep_kw)
    return _Judge(done, time.perf_counter() - t0)


def _selector_rows(selectors: Sequence[str], picked: _Picked, judge: _Judge) -> list[SelectorRow]:
    """One row per selector: the sweep's metrics at its layer, regret, Spearman, time."""
    sw = judge.sweep
    overall = dict(zip(sw.layers, sw.overall))
    best = overall[sw.golden]
    rows = []
    for name in selectors:
        if name in picked.errors:
            rows.append(SelectorRow(name, None, time_s=picked.times[name], error=picked.errors[name]))
            continue
        sel = picked.selections[name]
        scores = dict(zip(sel.layers, sel.maximised))  # what it ranks by (LGA's sign convention)
        common = [l for l in sw.layers if l in scores]
        got = overall[sel.selected]
        rows.append(SelectorRow(
            name, sel.selected, {m: sw.at(sel.selected).metrics(sw.scoring).get(m)
                                 for m in (*OVERALL_METRICS, "portability")}, got,
            best - got if best is not None and got is not None else None,
            spearman([scores[l] for l in common], [overall[l] for l in common]), picked.times[name],
            picked.times[name] / judge.time_s if judge.time_s else None))
    return rows

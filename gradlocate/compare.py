"""Judge every selector against the golden-layer sweep.

:func:`compare` splits the edits into a **proxy** subset (default 10 %, as in the
Golden Layers paper) and a **test** subset. Each selector sees only the proxy edits
and picks a layer; the sweep edits and evaluates on the test edits at every candidate
layer (and at every selected layer). For each selector it reports:

* the selected layer and the sweep's metrics there;
* **regret**: the overall score lost against the golden layer (0 = found it);
* **Spearman ρ** between the selector's per-layer scores and the sweep's per-layer
  overall score (does the selector *rank* layers like the ground truth?);
* its wall time, absolute and relative to the sweep's.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": f"{i} + {i} =", "target_new": str(3 * i), "subject": str(i),
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"} for i in range(1, 5)]
    >>> cmp = compare(model, edits, ["some general text here", "and some more of it"],
    ...               selectors=("gradratio",), proxy=0.5, trainer={"lr": 1e-2, "epochs": 2},
    ...               progress=False, generation=False, selector_kwargs={"gradratio": {"min_layer": 0}})
    >>> [r["selector"] for r in cmp.rows]
    ['gradratio']
"""

from __future__ import annotations

import html
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradlocate.data import as_edits, warn_duplicates
from gradlocate.handles import find_tokenizer
from gradlocate.results import LayerScores
from gradlocate.sweep import OVERALL_METRICS, SweepResult, sweep as run_sweep

__all__ = ["compare", "Comparison", "split_edits", "SELECTORS", "spearman"]

SELECTORS = ("gradratio", "lga", "cma")


def split_edits(edits: Sequence[Any], proxy: float = 0.1, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Shuffle with ``seed`` and split into (proxy, test): ``max(1, round(proxy * n))``
    proxy edits, the rest for testing (at least one)."""
    if not 0 < proxy < 1:
        raise ValueError(f"proxy must be a fraction in (0, 1), got {proxy}")
    if len(edits) < 2:
        raise ValueError(f"a proxy/test split needs at least 2 edits, got {len(edits)}")
    idx = list(range(len(edits)))
    random.Random(seed).shuffle(idx)
    k = min(len(edits) - 1, max(1, round(proxy * len(edits))))
    return [edits[i] for i in idx[:k]], [edits[i] for i in idx[k:]]


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (``scipy.stats.spearmanr``); ``None`` for fewer than 3
    points or a constant series."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and not (isinstance(x, float) and math.isnan(x)) and not (isinstance(y, float) and math.isnan(y))]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if math.isnan(rho) else float(rho)


def _run_selector(name: str, model: Any, edits: list[Any], retain: Any, tok: Any, kwargs: dict[str, Any]) -> LayerScores:
    if name == "gradratio":
        from gradlocate.selectors import gradratio

        if retain is None:
            from gradlocate.data import default_retain_texts

            retain = default_retain_texts(16)
        return gradratio(model, edits, retain, tokenizer=tok, **kwargs)
    if name == "lga":
        from gradlocate.selectors import lga

        return lga(model, edits, tokenizer=tok, **kwargs)
    if name == "cma":
        from gradlocate.tracing import cma_layer

        return cma_layer(model, edits, tokenizer=tok, **kwargs)
    raise ValueError(f"unknown selector {name!r}: choose from {SELECTORS}")


@dataclass
class Comparison:
    """Selectors against the sweep.

    Attributes:
        rows: one dict per selector: ``selector``, ``layer``, the sweep metrics at that
            layer, ``overall``, ``regret``, ``spearman``, ``time_s``, ``time_vs_sweep``.
        golden: the sweep's golden layer.
        sweep: the :class:`~gradlocate.sweep.SweepResult` (on the test edits).
        selections: each selector's :class:`~gradlocate.results.LayerScores` (on the proxy edits).
        n_proxy, n_test: the split sizes.
    """

    rows: list[dict[str, Any]]
    golden: int
    sweep: SweepResult
    selections: dict[str, LayerScores]
    n_proxy: int
    n_test: int
    sweep_time_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "golden": self.golden, "n_proxy": self.n_proxy, "n_test": self.n_test,
                "sweep_time_s": self.sweep_time_s, "sweep": self.sweep.to_dict(),
                "selections": {k: v.to_dict() for k, v in self.selections.items()}, "params": self.params}

    def to_markdown(self) -> str:
        """The comparison table (Golden Layers Table 2 style): selection method vs
        rewrite / rephrase / locality / overall, plus regret, Spearman ρ and time."""
        g = self.sweep.at(self.golden)[self.sweep.scoring]
        head = ("| method | layer | reliability | generalization | locality | overall | regret | Spearman ρ | time (s) | time / sweep |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def f(v: Any, p: int = 3) -> str:
            return "n/a" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))

        lines = [head]
        ov = self.sweep.metric("overall")[self.sweep.layers.index(self.golden)]
        lines.append(f"| golden (sweep) | {self.golden} | {f(g.get('reliability'))} | {f(g.get('generalization'))} | "
                     f"{f(g.get('locality'))} | {f(ov)} | 0.000 | 1.000 | {f(self.sweep_time_s, 1)} | 1.000 |")
        for r in self.rows:
            lines.append(
                f"| {r['selector']} | {r['layer']} | {f(r.get('reliability'))} | {f(r.get('generalization'))} | "
                f"{f(r.get('locality'))} | {f(r.get('overall'))} | {f(r.get('regret'))} | {f(r.get('spearman'))} | "
                f"{f(r.get('time_s'), 1)} | {f(r.get('time_vs_sweep'), 4)} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        sel = ", ".join(f"{r['selector']}={r['layer']} (regret {r['regret']:.3f})" if r.get("regret") is not None
                        else f"{r['selector']}={r['layer']}" for r in self.rows)
        return f"Comparison(golden={self.golden}, {sel}; proxy={self.n_proxy}, test={self.n_test})"

    def _repr_html_(self) -> str:
        return f"<div><b>Selectors vs sweep</b><pre>{html.escape(self.to_markdown())}</pre></div>"

    def plot(self, *, title: str | None = None) -> Any:
        """Selector scores (normalised) and sweep metrics on one layer axis. Returns the Figure."""
        from gradlocate.plotting import plot_comparison

        return plot_comparison(self, title=title)


def compare(model: Any, edits: Any, retain: Any = None, *, tokenizer: Any = None,
            selectors: Sequence[str] = SELECTORS, sweep: SweepResult | None = None, proxy: float = 0.1,
            seed: int = 0, layers: Sequence[int] | None = None, trainer: dict[str, Any] | None = None,
            out: str | None = None, generation: bool = True, scoring: str = "teacher_forced",
            selector_kwargs: dict[str, dict[str, Any]] | None = None, progress: bool = True) -> Comparison:
    """Run each selector on a proxy subset and judge its layer with a sweep on the rest.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: all edits; split by :func:`split_edits` (``proxy`` fraction, ``seed``).
        retain: general texts for ``gradratio`` (default: the built-in retain texts).
        selectors: any of ``"gradratio"``, ``"lga"``, ``"cma"``.
        sweep: a finished sweep on the test edits to reuse (else one is run over
            ``layers`` plus every selected layer).
        layers: the sweep's candidate layers (default: all).
        trainer: LocFT-BF keyword arguments for the sweep.
        out: JSONL file for the sweep (resumable).
        selector_kwargs: per-selector keyword arguments, e.g. ``{"cma": {"samples": 5}}``.

    Returns:
        :class:`Comparison`.
    """
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown or not selectors:
        raise ValueError(f"unknown selectors {unknown}: choose from {SELECTORS}" if unknown else "no selectors given")
    edits = as_edits(edits)
    warn_duplicates(edits)
    tok = find_tokenizer(model, tokenizer)
    if layers is not None:  # refuse bad layers before the selectors run
        from gradlocate.handles import down_projections

        down_projections(model).layer_indices(list(layers))
    proxy_edits, test_edits = split_edits(edits, proxy, seed)
    selector_kwargs = selector_kwargs or {}

    selections: dict[str, LayerScores] = {}
    times: dict[str, float] = {}
    for name in selectors:
        t0 = time.perf_counter()
        selections[name] = _run_selector(name, model, proxy_edits, retain, tok, dict(selector_kwargs.get(name, {})))
        times[name] = time.perf_counter() - t0

    sweep_time = None
    if sweep is None:
        from gradlocate.handles import down_projections

        cand = set(down_projections(model).layer_indices(list(layers) if layers is not None else None))
        cand |= {s.selected for s in selections.values()}
        t0 = time.perf_counter()
        sweep = run_sweep(model, test_edits, tokenizer=tok, layers=sorted(cand), trainer=trainer, out=out,
                          generation=generation, scoring=scoring, progress=progress)
        sweep_time = time.perf_counter() - t0
    else:
        missing = sorted({s.selected for s in selections.values()} - set(sweep.layers))
        if missing:
            raise ValueError(f"the given sweep lacks the selected layers {missing}: sweep them too")
        sweep_time = sum(r.get("timings", {}).get("total", 0.0) for r in sweep.records) or None

    golden = sweep.golden
    overall = dict(zip(sweep.layers, sweep.overall))
    rows = []
    for name, sel in selections.items():
        rec = sweep.at(sel.selected)[sweep.scoring] or {}
        sel_scores = dict(zip(sel.layers, sel.scores))
        common = [l for l in sweep.layers if l in sel_scores]
        row = {"selector": name, "layer": sel.selected,
               **{m: rec.get(m) for m in (*OVERALL_METRICS, "portability")},
               "overall": overall[sel.selected],
               "regret": (overall[golden] - overall[sel.selected])
               if overall[golden] is not None and overall[sel.selected] is not None else None,
               "spearman": spearman([sel_scores[l] for l in common], [overall[l] for l in common]),
               "time_s": times[name],
               "time_vs_sweep": times[name] / sweep_time if sweep_time else None}
        rows.append(row)
    return Comparison(rows, golden, sweep, selections, len(proxy_edits), len(test_edits), sweep_time,
                      params={"proxy": proxy, "seed": seed, "selectors": list(selectors), "scoring": sweep.scoring})

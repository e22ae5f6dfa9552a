"""The golden-layer study: does a selector pick the layer a brute-force sweep finds?

:func:`study` runs, on one model and one edit set, everything needed to answer that on
that data (the Golden Layers paper's protocol):

1. split the edits into a **proxy** set (the selectors see only these) and a **test** set;
2. run every selector on the proxy edits - GradRatio with and without its ``l_min``
   threshold, LGA with each sign convention (signed, negative, absolute; the paper's
   formula text is lost, so the data decides), causal tracing's CMA;
3. sweep LocFT-BF over the candidate layers on the test edits (the **golden layer**),
   and on the proxy edits (does a golden layer found on a proxy set **transfer**?);
4. train each of ``n_sample`` test edits alone at every ``sample_layers`` layer
   (the single-edit :func:`~gradlocate.golden.matrix.matrix`) and compare each edit's own optimal
   layer with the golden layer, metric by metric, with a paired t-test;
5. judge each selector against the test sweep: **regret** (overall lost against the
   golden layer), **Spearman** and **Kendall** rank correlation of its per-layer scores
   with the sweep's overall, each with a bootstrap 95% interval over the test edits.

Every part writes to ``out_dir`` as it finishes (record stores: ``selections.jsonl``,
keyed by selector and fingerprinted by the model, the proxy edits, the retain texts and
the selector's settings; ``sweep_test.jsonl``, ``sweep_proxy.jsonl``, ``samples.jsonl``),
so an interrupted study resumes where it stopped; a part that fails (a selector that cannot run on the data) is reported in its
place and the rest still runs.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=3, d_model=32, initializer_range=1.0)
    >>> edits = [{"prompt": f"{i} + {i} =", "target_new": str(3 * i), "subject": str(i), "ground_truth": str(2 * i),
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"} for i in range(1, 7)]
    >>> s = study(model, edits, ["general text here", "and more of it"], n_proxy=2, n_test=4, n_sample=2,
    ...           selectors=("gradratio", "lga"), trainer={"lr": 1e-2, "epochs": 2}, bootstrap=20, progress=False)
    >>> [r.selector for r in s.rows], s.golden in s.sweep.layers
    (['gradratio', 'lga'], True)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.data import Edits, as_edits, default_retain_texts, load_texts
from gradlocate.gradients import LayerGradients
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import ModelBusyError, require_gradients, using
from gradlocate.results import LayerScores
from gradlocate.golden.compare import run_selector, spearman
from gradlocate.golden.matrix import Matrix, matrix
from gradlocate.golden.store import RecordStore, model_identity
from gradlocate.golden.sweep import OVERALL_METRICS, SweepResult, overall_score, sweep

__all__ = ["study", "Study", "StudyRow", "STUDY_SELECTORS", "kendall"]

#: The selectors a study compares: name -> (selector, its keyword arguments).
STUDY_SELECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradratio": ("gradratio", {}),
    "gradratio (no l_min)": ("gradratio", {"min_layer": 0}),
    "lga": ("lga", {"sign": "signed"}),
    "lga (negative)": ("lga", {"sign": "negative"}),
    "lga (abs)": ("lga", {"sign": "abs"}),
    "cma": ("cma", {}),
}


def kendall(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Kendall's tau-b (``scipy.stats.kendalltau``); ``None`` for fewer than 3 points or a
    constant series."""
    from scipy.stats import kendalltau

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and not (isinstance(x, float) and math.isnan(x)) and not (isinstance(y, float) and math.isnan(y))]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    tau = kendalltau([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if math.isnan(tau) else float(tau)


@dataclass
class StudyRow:
    """One selector judged against the test sweep; intervals are bootstrap 95% over test edits.

    Attributes:
        selector: its name (e.g. ``"lga (negative)"``).
        layer: the layer it picked on the proxy edits (``None`` if it could not run).
        regret, regret_ci: the overall lost against the golden layer.
        spearman, spearman_ci, kendall, kendall_ci: rank agreement of its per-layer
            scores with the sweep's overall.
        time_s: its wall time.
        error: why it could not run.
    """

    selector: str
    layer: int | None
    regret: float | None = None
    regret_ci: tuple[float, float] | None = None
    spearman: float | None = None
    spearman_ci: tuple[float, float] | None = None
    kendall: float | None = None
    kendall_ci: tuple[float, float] | None = None
    time_s: float | None = None
    error: str | None = None


@dataclass
class Study:
    """What :func:`study` found. See the module doc for the protocol."""

    name: str
    sweep: SweepResult
    rows: list[StudyRow]
    selections: dict[str, LayerScores]
    proxy_sweep: SweepResult | None = None
    samples: Matrix | None = None
    golden_ci: tuple[int | None, ...] = ()  # None: a resample in which no layer has a score
    transfer: dict[str, Any] = field(default_factory=dict)
    versus: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def golden(self) -> int:
        return self.sweep.golden

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "golden": self.golden, "golden_bootstrap": list(self.golden_ci),
                "rows": [asdict(r) for r in self.rows], "transfer": self.transfer, "versus": self.versus,
                "sweep": self.sweep.to_dict(),
                "proxy_sweep": None if self.proxy_sweep is None else self.proxy_sweep.to_dict(),
                "samples": None if self.samples is None else self.samples.to_dict(),
                "selections": {k: v.to_dict() for k, v in self.selections.items()},
                "timings": dict(self.timings), "params": self.params}

    def to_markdown(self) -> str:
        """The study's tables: selectors vs the golden layer; golden vs sample-wise optimum;
        proxy-to-test transfer; the sweep; the CPU time of each part."""
        def f(v: Any, p: int = 3) -> str:
            return "n/a" if v is None else f"{v:.{p}f}"

        def ci(c: Any) -> str:
            return "" if c is None else f" [{c[0]:.2f}, {c[1]:.2f}]"

        p = self.params
        lines = [f"### {self.name}", "",
                 f"{p.get('n_test')} test edits, {p.get('n_proxy')} proxy edits (the selectors see only these); "
                 f"sweep over layers {_span(self.sweep.layers)}; overall = mean of {', '.join(self.sweep.averaged)} "
                 f"(teacher-forced). Golden layer **{self.golden}** (overall {f(self.sweep.overall[self.sweep.layers.index(self.golden)])})"
                 + (f"; in bootstrap resamples of the test edits the golden layer is one of {sorted({g for g in self.golden_ci if g is not None})}"
                    if self.golden_ci else "") + ".", "",
                 "| selector | layer | regret [95% CI] | Spearman ρ [95% CI] | Kendall τ [95% CI] | time (s) |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            if r.error:
                lines.append(f"| {r.selector} | could not run: {r.error[:80]} | | | | {f(r.time_s, 1)} |")
            else:
                lines.append(f"| {r.selector} | {r.layer} | {f(r.regret)}{ci(r.regret_ci)} | {f(r.spearman, 2)}"
                             f"{ci(r.spearman_ci)} | {f(r.kendall, 2)}{ci(r.kendall_ci)} | {f(r.time_s, 1)} |")
        if self.versus:
            opt = self.samples.optimum() if self.samples else []
            from collections import Counter

            common = ", ".join(f"{l} ({c})" for l, c in Counter(opt).most_common(4))
            lines += ["", f"Sample-wise: {self.samples.n_edits if self.samples else 0} test edits, each trained alone at "
                      f"layers {_span(self.samples.layers) if self.samples else ''}; most common optimal layers: "
                      f"{common}. Golden layer {self.golden} vs each edit's own optimum (paired t-test):", "",
                      "| metric | at golden layer | at own optimum | t | p | edits |", "|---|---:|---:|---:|---:|---:|"]
            for m, v in self.versus.items():
                pval = "n/a" if v["p"] is None else f"{v['p']:.2g}"
                lines.append(f"| {m} | {f(v['golden'])} | {f(v['optimum'])} | {f(v['t'], 2)} | {pval} | {v['n']} |")
        if self.transfer:
            t = self.transfer
            lines += ["", f"Proxy-to-test transfer: the golden layer on the proxy edits is {t['proxy_golden']}, on the "
                      f"test edits {t['test_golden']}; using the proxy's on the test edits loses "
                      f"{f(t['regret'])}{ci(t.get('regret_ci'))} overall."]
        unconv = self.sweep.unconverged
        lines += ["", f"Training did not converge at layers {unconv}." if unconv else
                  "LocFT-BF converged (mean loss below 1e-2) at every swept layer."]
        lines += ["", "Time (wall clock, summed over what each part recorded, so a resumed run counts each layer "
                  "once): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.timings.items()) + "."]
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """The study on one page: the sweep's metrics and overall per layer with each
        selector's pick; the selectors' normalised scores; the sample-wise optimal layers."""
        from gradlocate.plotting import plot_study

        fig = plot_study(self)
        if path:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig

    def __repr__(self) -> str:
        picks = ", ".join(f"{r.selector}={r.layer}" for r in self.rows)
        return f"Study({self.name!r}: golden={self.golden}; {picks})"


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 2 and all(b - a == layers[1] - layers[0] for a, b in zip(layers, layers[1:])):
        step = layers[1] - layers[0]
        return f"{layers[0]}..{layers[-1]}" + (f" (every {step})" if step > 1 else "")
    return ", ".join(map(str, layers))


def _overall_of(sw: SweepResult, idx: Sequence[int]) -> dict[int, float | None]:
    """Per-layer overall on a resample ``idx`` of the evaluated edits: each edit metric's
    mean over the resample, with capability and fluency (global per layer) as they are."""
    out = {}
    for r in sw.records:
        metrics = r.metrics(sw.scoring)
        for m, vals in r.per_edit.items():
            sample = [v for v in (vals[i] for i in idx) if v is not None]
            metrics[m] = sum(sample) / len(sample) if sample else None
        out[r.layer] = _score(sw, metrics)
    return out


def _score(sw: SweepResult, metrics: dict[str, float | None]) -> float | None:
    return overall_score(metrics, OVERALL_METRICS if sw.overall_kind == "edit-only" else sw.weights)


def _judge(sw: SweepResult, selections: dict[str, LayerScores], bootstrap: int, seed: int
           ) -> tuple[dict[str, dict[str, Any]], list[int | None]]:
    """Regret, Spearman and Kendall of each selection against the sweep, and their
    bootstrap 95% intervals over the evaluated edits; the golden layer of each resample."""
    n = len(next(iter(sw.records[0].per_edit.values()), [])) if sw.records[0].per_edit else 0

    def measures(overall: dict[int, float | None]) -> tuple[dict[str, dict[str, float | None]], int | None]:
        have = {l: v for l, v in overall.items() if v is not None}
        golden = max(have, key=lambda l: (have[l], -l)) if have else None
        res: dict[str, dict[str, float | None]] = {}
        for name, s in selections.items():
            scores = dict(zip(s.layers, s.maximised))
            common = [l for l in sw.layers if l in scores]
            got = overall.get(s.selected)
            res[name] = {"regret": None if golden is None or got is None else have[golden] - got,
                         "spearman": spearman([scores[l] for l in common], [overall[l] for l in common]),
                         "kendall": kendall([scores[l] for l in common], [overall[l] for l in common])}
        return res, golden

    point, _ = measures(_overall_of(sw, range(n)) if n else dict(zip(sw.layers, sw.overall)))
    rng = random.Random(seed)
    resampled = [measures(_overall_of(sw, [rng.randrange(n) for _ in range(n)])) for _ in range(bootstrap if n else 0)]
    draws, goldens = [d for d, _ in resampled], [g for _, g in resampled]

    def interval(name: str, key: str) -> tuple[float, float] | None:
        vals = sorted(v for v in (d[name][key] for d in draws) if v is not None)
        if len(vals) < 2:
            return None
        return vals[int(0.025 * (len(vals) - 1))], vals[int(math.ceil(0.975 * (len(vals) - 1)))]

    out = {name: {**point[name], **{f"{k}_ci": interval(name, k) for k in ("regret", "spearman", "kendall")}}
           for name in selections}
    return out, goldens


def study(model: Any, edits: Any, retain: Any = None, *, tokenizer: Any = None, name: str = "study",
          n_proxy: int = 16, n_test: int = 64, seed: int = 0, layers: Sequence[int] | None = None,
          sample_layers: Sequence[int] | None = None, n_sample: int = 32, selectors: Sequence[str] | None = None,
          trainer: dict[str, Any] | None = None, transfer: bool = True, bootstrap: int = 1000,
          generation: bool = False, out_dir: str | Path | None = None, progress: bool | None = None) -> Study:
    """The golden-layer study on one model and edit set (see the module doc).

    Args:
        model: a transformers causal LM, an nnsight wrapper, a bridge, or :class:`~gradlocate.handles.Handles`.
        edits: at least ``n_proxy + n_test`` edits (any public form); shuffled with
            ``seed`` and split.
        retain: general texts for GradRatio (default: the built-in retain texts, 16).
        n_proxy: the proxy split's size (the selectors see only these edits).
        n_test: the test split's size.
        layers: the sweep's candidate layer indices (default: all).
        sample_layers: the single-edit matrix's layer indices (default: every second
            layer; ``[]`` skips it); ``n_sample`` of the test edits are used.
        selectors: names from :data:`STUDY_SELECTORS` (default: all of them).
        trainer: LocFT-BF settings for every sweep.
        transfer: also sweep the proxy edits (proxy-to-test transfer).
        bootstrap: resamples of the test edits for the intervals.
        generation: also score the sweeps by generation exact match (slower; the golden
            layer is always by teacher-forced accuracy here).
        out_dir: where each part is written as it finishes (resume on a re-run).
        progress: progress bars (``None``: on a terminal only).

    Returns:
        :class:`Study`.
    """
    require_gradients("study")
    plan = _plan(model, edits, tokenizer, n_proxy, n_test, seed, layers, sample_layers, selectors, retain,
                 trainer, out_dir)
    with using(plan.h):
        picked = _select(plan, progress)
        sweeps = _sweep_both(plan, picked, transfer, generation, progress)
        samples = _sample_matrix(plan, n_sample, sweeps.test.golden, progress)
    judged, goldens = _judge(sweeps.test, picked.selections, bootstrap, seed)
    timings = {"selectors": sum(sum(s.timings.values()) for s in picked.selections.values()), **sweeps.timings}
    if samples is not None:
        timings["sample-wise sweep"] = sum(samples.timings.values())
    return Study(name, sweeps.test, _rows(plan.selectors, picked, judged), picked.selections, sweeps.proxy,
                 samples, tuple(goldens), _transfer(sweeps, bootstrap, seed),
                 samples.versus(sweeps.test.golden) if samples is not None else {}, timings,
                 {"n_proxy": n_proxy, "n_test": n_test, "n_sample": n_sample if samples else 0, "seed": seed,
                  "bootstrap": bootstrap, "trainer": {k: v for k, v in plan.trainer.items() if k != "callback"},
                  "selectors": plan.selectors, "proxy_prompts": [e.prompt for e in plan.proxy]})


@dataclass
class _StudyPlan:
    """What a study works on: the model, the proxy/test split, layers, selectors, settings."""

    h: Handles
    proxy: Edits
    test: Edits
    layers: list[int]
    sample_layers: list[int]
    selectors: list[str]
    retain: list[str] | LayerGradients
    trainer: dict[str, Any]
    out: Path | None


def _plan(model: Any, edits: Any, tokenizer: Any, n_proxy: int, n_test: int, seed: int,
          layers: Sequence[int] | None, sample_layers: Sequence[int] | None, selectors: Sequence[str] | None,
          retain: Any, trainer: dict[str, Any] | None, out_dir: Any) -> _StudyPlan:
    """Check the arguments, resolve the model, shuffle with ``seed`` and split the edits."""
    edits = as_edits(edits)
    if len(edits) < n_proxy + n_test:
        raise ValueError(f"the study needs {n_proxy} proxy + {n_test} test edits, the data has {len(edits)}")
    h = resolve(model, tokenizer)
    cand = h.layer_indices(list(layers) if layers is not None else None)
    s_layers = (list(range(0, h.n_layers, 2)) if sample_layers is None else
                h.layer_indices(list(sample_layers)) if len(sample_layers) else [])
    names = list(STUDY_SELECTORS) if selectors is None else list(selectors)
    unknown = [s for s in names if s not in STUDY_SELECTORS]
    if unknown:
        raise ValueError(f"unknown study selectors {unknown}: choose from {list(STUDY_SELECTORS)}")
    order = list(range(len(edits)))
    random.Random(seed).shuffle(order)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    return _StudyPlan(h, as_edits([edits[i] for i in order[:n_proxy]]),
                      as_edits([edits[i] for i in order[n_proxy:n_proxy + n_test]]), cand, s_layers, names,
                      _retain(retain), dict(trainer or {}), out)


def _retain(retain: Any) -> Any:
    """The retain texts, read once (they are part of the selections' fingerprint); a
    precomputed :class:`~gradlocate.gradients.LayerGradients` passes through."""
    if retain is None:
        return default_retain_texts(16)
    return retain if isinstance(retain, LayerGradients) else load_texts(retain)


@dataclass
class _Selections:
    """Each selector's scores on the proxy edits, or why it could not run (and its time)."""

    selections: dict[str, LayerScores]
    errors: dict[str, tuple[str, float]]


def _select(plan: _StudyPlan, progress: bool | None) -> _Selections:
    """Run each selector on the proxy edits, or read it back from ``selections.jsonl``
    (when made with the same model, proxy edits, retain texts and selector settings)."""
    store = None
    if plan.out is not None:
        base = {"model": model_identity(plan.h), "proxy": [e.to_dict() for e in plan.proxy], "retain": plan.retain}
        store = RecordStore(plan.out / "selections.jsonl",
                            lambda key: {**base, "selector": list(STUDY_SELECTORS[str(key)])})
    saved = store.read() if store is not None else {}
    got = _Selections({}, {})
    for sel in plan.selectors:
        if sel in saved:
            got.selections[sel] = LayerScores(**saved[sel]["scores"])
            continue
        kind, kw = STUDY_SELECTORS[sel]
        t1 = time.perf_counter()
        try:
            got.selections[sel] = run_selector(kind, plan.h, plan.proxy, plan.retain, progress=progress, **kw)
        except ModelBusyError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in this selector's row; the rest still runs
            got.errors[sel] = (f"{type(e).__name__}: {e}", time.perf_counter() - t1)
            continue
        if store is not None:
            store.append(sel, {"scores": _scores_dict(got.selections[sel])})
    return got


@dataclass
class _Sweeps:
    """The sweep on the test edits, the one on the proxy edits (if run), and their times."""

    test: SweepResult
    proxy: SweepResult | None
    timings: dict[str, float]


def _sweep_both(plan: _StudyPlan, picked: _Selections, transfer: bool, generation: bool,
                progress: bool | None) -> _Sweeps:
    """Sweep the test edits over the candidate and the selected layers; and the proxy
    edits, for the transfer. Each part's time is the sum of what its records say, so a
    resumed study reports the time the work took, not the time to read it back."""
    out = plan.out
    picks = {s.selected for s in picked.selections.values()}
    test = sweep(plan.h, plan.test, layers=sorted(set(plan.layers) | picks), trainer=plan.trainer,
                 generation=generation, progress=progress, out=out / "sweep_test.jsonl" if out else None)
    timings = {"test sweep": sum(r.timings.get("total", 0.0) for r in test.records)}
    proxy = None
    if transfer:
        proxy = sweep(plan.h, plan.proxy, layers=plan.layers, trainer=plan.trainer, generation=generation,
                      progress=progress, out=out / "sweep_proxy.jsonl" if out else None)
        timings["proxy sweep"] = sum(r.timings.get("total", 0.0) for r in proxy.records)
    return _Sweeps(test, proxy, timings)


def _sample_matrix(plan: _StudyPlan, n_sample: int, golden: int, progress: bool | None) -> Matrix | None:
    """The first ``n_sample`` test edits, each alone at the sample layers and the golden layer."""
    if not plan.sample_layers or not n_sample:
        return None
    return matrix(plan.h, plan.test[:n_sample], hparams=plan.trainer,
                  layers=sorted(set(plan.sample_layers) | {golden}), capability_edits=0,
                  out=plan.out / "samples.jsonl" if plan.out else None, progress=progress)


def _rows(names: list[str], picked: _Selections, judged: dict[str, dict[str, Any]]) -> list[StudyRow]:
    """One row per selector: its pick and how it fared, or why it could not run."""
    rows = []
    for sel in names:
        if sel in picked.errors:
            rows.append(StudyRow(sel, None, time_s=picked.errors[sel][1], error=picked.errors[sel][0]))
            continue
        j, s = judged[sel], picked.selections[sel]
        rows.append(StudyRow(sel, s.selected, j["regret"], j["regret_ci"], j["spearman"], j["spearman_ci"],
                             j["kendall"], j["kendall_ci"], sum(s.timings.values())))
    return rows


def _transfer(sweeps: _Sweeps, bootstrap: int, seed: int) -> dict[str, Any]:
    """The proxy sweep's golden layer used on the test edits: what it loses (with an interval)."""
    if sweeps.proxy is None:
        return {}
    pg, test = sweeps.proxy.golden, sweeps.test
    as_choice = LayerScores("proxy golden", [v if v is not None else -1.0 for v in sweeps.proxy.overall],
                            [True] * len(sweeps.proxy.layers), pg, layers=sweeps.proxy.layers)
    j, _ = _judge(test, {"proxy": as_choice}, bootstrap, seed)
    return {"proxy_golden": pg, "test_golden": test.golden, "regret": j["proxy"]["regret"],
            "regret_ci": j["proxy"]["regret_ci"], "spearman": j["proxy"]["spearman"]}


def _scores_dict(s: LayerScores) -> dict[str, Any]:
    d = s.to_dict()
    return {"method": d["method"], "scores": d["scores"], "eligible": d["eligible"], "selected": d["selected"],
            "params": d["params"], "extras": d["extras"], "timings": d["timings"], "layers": d["layers"]}

"""Markdown tables of a :class:`~gradlocate.golden.judge.Judgment` (what ``docs/results.md`` shows).

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.matrix import Matrix
    >>> from gradlocate.golden.judge import judge
    >>> rel = np.tile([0.2, 0.9, 0.4], (8, 1)) + np.arange(8)[:, None] * 0.01
    >>> md = judge(Matrix([0, 1, 2], list("abcdefgh"), {"reliability": rel}), n_boot=20,
    ...            primary="reliability").to_markdown()
    >>> "| reliability (primary) | 1 |" in md, "not estimable without a replicate" in md
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np

from gradlocate.golden.table import layer_span

__all__ = ["judgment_markdown", "reading", "label", "under_trained", "lower_regret", "LABELS"]

#: How each definition is named wherever it appears (the constructions are this project's).
LABELS = {"golden-layers": "golden-layers (gradlocate's min-max construction, not the paper's)",
          "weighted": "weighted (gradlocate's capability-aware mean)"}


def label(definition: str, primary: str | None = None) -> str:
    """A definition's name as every table prints it: the primary marked, gradlocate's own
    constructions labelled as such.

    >>> label("edit-only", "edit-only"), label("golden-layers")
    ('edit-only (primary)', "golden-layers (gradlocate's min-max construction, not the paper's)")
    """
    return f"{definition} (primary)" if definition == primary else LABELS.get(definition, definition)


def _f(v: Any, p: int = 3) -> str:
    # float() first: numpy scalars are not `float` instances; inf/nan print as n/a
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{p}f}"


def _d(v: float) -> str:
    """A difference whose sign decides a verdict: three decimals, or two significant digits
    when rounding to three would print a nonzero bound as 0.000."""
    return f"{v:.1e}" if 0 < abs(v) < 5e-4 else _f(v)


def _p(v: Any) -> str:
    """A p-value to two digits, three near 0.05 so it never reads 0.05 beside "holds".

    >>> _p(0.0495), _p(0.0099), _p(0.069), _p(float("nan"))
    ('0.0495', '0.0099', '0.069', 'n/a')
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3g}" if 0.045 <= v < 0.055 else f"{v:.2g}"


def _regime(j: Any) -> list[str]:
    r = j.regime
    keys = ", ".join(f"{k} {v}" for k, v in r.items() if v is not None)
    return [f"Regime: {keys}. Size: {j.n_edits} edits ({len(j.proxy)} proxy, {j.n_edits - len(j.proxy)} test) "
            f"x {len(j.layers)} layers ({layer_span(j.layers)}). Primary score: {j.primary}, damage-gated; the other "
            f"definitions are sensitivity analyses. Intervals: bootstrap "
            f"{int(100 * next(iter(j.definitions.values())).boot.level)}% percentile over the test edits unless said.",
            ""]


def _layers(xs: Collection[int]) -> str:
    return layer_span(sorted(xs)) if xs else "none"


def _golden_table(j: Any) -> list[str]:
    margin = next(iter(j.definitions.values())).margin
    lines = ["| definition | golden (gated) | golden (ungated) | P(golden) in bootstrap | layers golden in >5% of "
             f"resamples | best mean [CI] | within {margin:g} of the best |", "|---|---:|---:|---:|---|---:|---|"]
    for d, r in j.definitions.items():
        b = r.boot
        often = ", ".join(f"{j.layers[i]} ({f:.0%})" for i, f in enumerate(b.golden_freq) if f > 0.05)
        tie = f" (tied: {_layers(r.tied)})" if len(r.tied) > 1 else ""
        lines.append(f"| {label(d, j.primary)} | {r.golden}{tie} | {r.golden_ungated} | {b.p_golden:.2f} | {often} | "
                     f"{_f(b.golden_value)} [{_f(b.golden_value_interval[0])}, {_f(b.golden_value_interval[1])}] | "
                     f"{_layers(r.near)} |")
    return lines + [""]


def _versus_section(j: Any) -> list[str]:
    """Own optimum vs golden: the oracle gain and TOST with a replicate, else the plain statement."""
    v0 = j.own_optimum
    if not v0.estimable:
        lines = [f"Each edit's own optimum vs the golden layer, every row ({v0.n} edits): **{v0.note}.**", "",
                 "| definition | n | golden mean | own optimum mean (in-sample) | in-sample gain (biased upward) |",
                 "|---|---:|---:|---:|---:|"]
        for d, r in j.definitions.items():
            v = r.versus
            lines.append(f"| {label(d, j.primary)} | {v.n} | {_f(v.golden_mean)} | {_f(v.optimum_mean)} | "
                         f"{_f(v.in_sample_gain)} |")
        return lines + [""]
    e0 = v0.equivalence
    lines = [f"Each edit's own optimum vs the golden layer, every row, cross-fit over two replicates "
             f"(`oracle_gain`). Estimand: {v0.oracle.estimand}. Interval: {v0.oracle.level:.0%} bootstrap over edits, "
             f"the golden layer re-chosen in each resample; p: one-sided, gain <= 0. TOST: the gain within "
             f"+-{e0.margin:g} (declared before any study), each one-sided test at {e0.alpha:g} (the "
             f"{1 - 2 * e0.alpha:.0%} interval inside the margin). The paper's paired t-test (two-sided, on the "
             f"cross-fit per-edit differences) is shown beside it: a large p there is absence of evidence, not "
             f"equivalence.", "",
             "| definition | n | in-sample gain (biased upward) | oracle gain [CI] | p (gain > 0) | TOST "
             f"{1 - 2 * e0.alpha:.0%} interval, p | equivalent within {e0.margin:g}? | paper's paired t, p |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    for d, r in j.definitions.items():
        v, o, e = r.versus, r.versus.oracle, r.versus.equivalence
        lines.append(f"| {label(d, j.primary)} | {o.n} | {_f(v.in_sample_gain)} | {_d(o.gain)} [{_d(o.ci[0])}, "
                     f"{_d(o.ci[1])}] | {_p(o.p)} | [{_d(e.ci[0])}, {_d(e.ci[1])}], {_p(e.p_tost)} | "
                     f"{'yes' if e.equivalent else 'not shown'} | {_p(e.p_paired_t)} |")
    return lines + ["", "Only the primary row's tests count (Holm-adjusted across the studies in the summary); the "
                    "others are sensitivity analyses.", ""]


def _gate_table(j: Any) -> list[str]:
    g, c = j.gate, j.convergence
    dmg = [j.layers[i] for i in g.damaging]
    lines = [f"Damage gate: a layer whose edits raise the held-out LM loss by more than {g.threshold} nats (mean over "
             f"its capability cells) is damaging and cannot be golden. Damaging: {dmg or 'none'}.", "",
             *_effect_line(j),
             "| layer | cells | converged | mean final loss | held-out loss change (nats) | gate |",
             "|---:|---:|---:|---:|---:|---|"]
    for k, l in enumerate(j.layers):
        lines.append(f"| {l} | {c.cells[k]} | {_f(c.converged[k], 2)} | {_f(c.final_loss[k])} | {_f(g.values[k])} | "
                     f"{'damaging' if not g.allowed[k] else 'ok'} |")
    return lines + [""]


def _effect_line(j: Any) -> list[str]:
    e = j.capability_effect
    if e is None or not math.isfinite(e.p_value):
        return []
    return [f"Layer effect on the held-out loss change (Friedman, {e.n_edits} edits x {e.n_layers} layers): "
            f"chi-square {e.statistic:.1f}, p {_p(e.p_value)}; spread of the layer means {e.spread:.4f} nats.", ""]


def _noise_line(j: Any) -> list[str]:
    """golden-layers min-max normalises the held-out loss: say so when that stretches noise."""
    e = j.capability_effect
    if "golden-layers" not in j.definitions or e is None or not math.isfinite(e.p_value) or e.p_value < 0.05:
        return []
    return [f"- No layer effect on the held-out loss change is detected (Friedman p {_p(e.p_value)}, {e.n_edits} "
            f"edits; layer means within {e.spread:.4f} nats), yet golden-layers (gradlocate's min-max construction) "
            f"normalises it to [0, 1]: its held-out-loss term may rank the layers by noise. Read it beside edit-only."]


def _selector_table(j: Any) -> list[str]:
    if not j.selectors:
        return ["No selector scores were given for this matrix.", ""]
    defs = list(j.definitions)
    head = "| selector | layer | " + " | ".join(f"regret ({label(d, j.primary)}) [CI]" for d in defs) + \
        f" | ρ / τ all layers ({j.primary}) | ρ / τ eligible |"
    lines = [head, "|---|---:|" + "---:|" * len(defs) + "---|---|"]
    for s in j.selectors:
        reg = " | ".join("not in matrix" if s.regret.get(d) is None else
                         f"{_f(s.regret[d][0])} [{_f(s.regret[d][1])}, {_f(s.regret[d][2])}]" for d in defs)
        rk = s.rank
        ra = "n/a" if rk is None else f"{_f(rk.spearman, 2)} / {_f(rk.kendall, 2)} (n={rk.n})"
        re = "n/a" if rk is None else f"{_f(rk.spearman_allowed, 2)} / {_f(rk.kendall_allowed, 2)} (n={rk.n_allowed})"
        lines.append(f"| {s.name} | {s.layer} | {reg} | {ra} | {re} |")
    return lines + [""]


def _curves(j: Any) -> list[str]:
    defs = list(j.definitions)
    lines = ["| layer | " + " | ".join(label(d, j.primary) for d in defs) + " |", "|---:|" + "---:|" * len(defs)]
    for k, l in enumerate(j.layers):
        vals = " | ".join(_f(float(np.asarray(j.definitions[d].layer_mean)[k])) for d in defs)
        lines.append(f"| {l} | {vals} |")
    return lines + [""]


def _reliability_peak(j: Any) -> tuple[float, int] | None:
    """The best mean reliability over the judged layers and its layer (``None``: not measured)."""
    rel = j.definitions.get("reliability")
    means = np.asarray(rel.layer_mean, dtype=float) if rel is not None else np.array([np.nan])
    if not np.isfinite(means).any():
        return None
    k = int(np.nanargmax(means))
    return float(means[k]), j.layers[k]


def _converged(j: Any) -> float:
    conv = np.asarray(j.convergence.converged, dtype=float)
    return float(np.nanmean(conv)) if np.isfinite(conv).any() else math.nan


def under_trained(j: Any) -> str:
    """Why the regime is under-trained ("" when it is not): the best mean reliability on
    the test rows is below 0.5, or most cells did not converge (mean fraction below 0.5)
    and reliability stays below 0.9 (the edits did not take; a cell that missed the stop
    threshold with the edit made is not under-trained: R-ROME's v* loss carries a KL
    term). Such a regime is shown but excluded from the tests' family and the tallies.

    >>> from types import SimpleNamespace as N
    >>> j = N(definitions={"reliability": N(layer_mean=[0.1, 0.7])}, layers=[3, 4], convergence=N(converged=[0.0, 0.2]))
    >>> under_trained(j)
    'most cells did not converge (mean fraction 0.10) and reliability peaks at 0.70 (layer 4)'
    """
    peak = _reliability_peak(j)
    if peak is None:
        return ""
    if peak[0] < 0.5:
        return f"reliability peaks at {peak[0]:.2f} (layer {peak[1]})"
    conv = _converged(j)
    if conv < 0.5 and peak[0] < 0.9:
        return f"most cells did not converge (mean fraction {conv:.2f}) and reliability peaks at {peak[0]:.2f} (layer {peak[1]})"
    return ""


def _convergence_line(j: Any, frac: float) -> str:
    """Most cells missed the editor's stop threshold: under-training only if the edits did
    not take either (best mean reliability below 0.9; R-ROME's v* loss carries a KL term and
    can miss its threshold with every edit made)."""
    said = (f"- Most cells did not converge (mean fraction {frac:.2f}): they ran their full budget (epochs, or v* "
            f"steps) without reaching the editor's stop threshold")
    peak = _reliability_peak(j)
    if peak is None:
        return f"{said}; reliability was not measured, so whether the edits took is not known."
    if peak[0] >= 0.9:
        return f"{said}, yet mean reliability reaches {peak[0]:.2f} (layer {peak[1]}): they missed the threshold, not the edit."
    fl = np.asarray(j.convergence.final_loss, dtype=float)
    at = (f"; mean final loss {np.nanmin(fl):.2f} (layer {j.layers[int(np.nanargmin(fl))]}) to {np.nanmax(fl):.2f} "
          f"(layer {j.layers[int(np.nanargmax(fl))]})") if np.isfinite(fl).any() else ""
    return (f"{said}{at}: the edits do not fully take at any judged layer (mean reliability peaks at {peak[0]:.2f}, "
            f"layer {peak[1]}), and the results are about that.")


def _own_optimum_line(j: Any) -> str:
    v = j.own_optimum
    if not v.estimable:
        return (f"- Each edit's own optimum vs the golden layer ({j.primary}): {v.note}. In-sample gain "
                f"{_f(v.in_sample_gain)} over {v.n} edits (biased upward).")
    o, e = v.oracle, v.equivalence
    return (f"- Each edit's own optimum vs the golden layer ({j.primary}, cross-fit over two replicates, {o.n} edits): "
            f"oracle gain {_d(o.gain)} [{_d(o.ci[0])}, {_d(o.ci[1])}], one-sided p {_p(o.p)} (unadjusted); "
            f"TOST within +-{e.margin:g}: {'equivalent' if e.equivalent else 'not shown equivalent'} "
            f"({1 - 2 * e.alpha:.0%} interval [{_d(e.ci[0])}, {_d(e.ci[1])}], p {_p(e.p_tost)}); the paper's paired t "
            f"p {_p(e.p_paired_t)}.")


def reading(j: Any) -> list[str]:
    """Plain statements the numbers support (or not), each computed from the judgment."""
    defs = j.definitions
    goldens = {d: r.golden for d, r in defs.items()}
    p = defs[j.primary]
    out = [f"- Golden layer by definition: {', '.join(f'{d} {g}' for d, g in goldens.items())}"
           + (" — the definitions **disagree**: which layer is golden depends on what 'overall' means."
              if len(set(goldens.values())) > 1 else " — every definition agrees."),
           f"- Under the primary score ({j.primary}, gated) the test means of layers {_layers(p.near)} are within "
           f"{p.margin:g} of the best (layer {p.golden}): the data do not separate them at the declared margin."]
    shaky = [d for d, r in defs.items() if r.boot.p_golden < 0.8]
    if shaky:
        out.append(f"- Not determined at this size (golden in < 80% of bootstrap resamples): {', '.join(shaky)}.")
    out.append(_own_optimum_line(j))
    conv = _converged(j)
    if math.isfinite(conv) and conv < 0.5:
        out.append(_convergence_line(j, conv))
    out += _noise_line(j)
    out += _lga_versus_cma(j)
    outside = [s.name for s in j.selectors if s.layer not in j.layers]
    if outside:
        out.append(f"- Picked a layer outside the judged layers {layer_span(j.layers)} (not judged yet): "
                   f"{', '.join(outside)}.")
    return out + [""]


def _lga_versus_cma(j: Any) -> list[str]:
    """The Golden Layers paper's claim that LGA finds better layers than CMA on this one
    proxy draw, read off the paired bootstrap of their regret difference on the test edits
    (decided only when its interval excludes 0); over many draws: the report's regret tables."""
    sel = {s.name: s for s in j.selectors}
    if "lga" not in sel or "cma" not in sel:
        return []
    a, b = sel["lga"].regret.get(j.primary), sel["cma"].regret.get(j.primary)
    if a is None or b is None:
        return []
    diff = j.definitions[j.primary].boot.difference("lga", "cma")
    return [f"- 'LGA beats CMA' on this one proxy draw (regret on the test rows, {j.primary}, layer "
            f"{sel['lga'].layer} vs {sel['cma'].layer}): LGA {_f(a[0])} [{_f(a[1])}, {_f(a[2])}] vs CMA {_f(b[0])} "
            f"[{_f(b[1])}, {_f(b[2])}], paired difference {_d(diff.value)} [{_d(diff.lo)}, {_d(diff.hi)}]: "
            f"{lower_regret(diff.value, diff.lo, diff.hi, 'CMA')}. One draw; the mean over draws is below."]


def lower_regret(value: float, lo: float, hi: float, other: str) -> str:
    """The verdict on a paired regret difference (a's regret minus ``other``'s): decided
    only when its interval excludes 0.

    >>> lower_regret(-0.1, -0.2, -0.05, "CMA"), lower_regret(0.02, -0.01, 0.05, "CMA")
    ('holds', 'not resolved (the paired interval covers 0)')
    """
    if lo == hi == value == 0:
        return "a tie (the same layer)"
    return ("holds" if hi < 0 else f"reversed: {other}'s regret is lower" if lo > 0
            else "not resolved (the paired interval covers 0)")


def judgment_markdown(j: Any) -> str:
    """The judgment as markdown: regime, golden layer per definition, own optimum vs
    golden, selectors on the judged draw, gate and convergence, per-layer means."""
    parts = [*_regime(j), "**What these numbers say**", "", *reading(j),
             "**Golden layer by definition of overall** (test rows; gated)", "", *_golden_table(j),
             "**Own optimum vs golden layer**", "", *_versus_section(j),
             "**Selectors on the judged proxy draw** (seed 0: picked on its proxy edits; regret on its test rows, "
             "bootstrap over those rows). One draw; the mean test regret over many draws is in the regret tables.", "",
             *_selector_table(j), "**Damage gate and convergence per layer**", "", *_gate_table(j),
             "**Mean overall per layer, test rows**", "", *_curves(j)]
    return "\n".join(parts)

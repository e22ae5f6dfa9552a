"""Markdown tables of a :class:`~gradlocate.golden.judge.Judgment` (what ``docs/results.md`` shows).

Example:
    >>> import numpy as np
    >>> from gradlocate.golden.matrix import Matrix
    >>> from gradlocate.golden.judge import judge
    >>> rel = np.tile([0.2, 0.9, 0.4], (8, 1)) + np.arange(8)[:, None] * 0.01
    >>> md = judge(Matrix([0, 1, 2], list("abcdefgh"), {"reliability": rel}), n_boot=20, n_null=20, n_splits=10,
    ...            primary="reliability").to_markdown()
    >>> "| reliability | 1 |" in md
    True
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from gradlocate.golden.table import layer_span

__all__ = ["claims_table", "judgment_markdown"]


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
            f"x {len(j.layers)} layers ({layer_span(j.layers)}). Intervals: bootstrap "
            f"{int(100 * next(iter(j.definitions.values())).boot.level)}% percentile over test edits.", ""]


def _golden_table(j: Any) -> list[str]:
    lines = ["| definition | golden (gated) | golden (ungated) | P(golden) in bootstrap | layers golden in >5% of resamples "
             "| best mean [CI] |", "|---|---:|---:|---:|---|---:|"]
    for d, r in j.definitions.items():
        b = r.boot
        often = ", ".join(f"{j.layers[i]} ({f:.0%})" for i, f in enumerate(b.golden_freq) if f > 0.05)
        lines.append(f"| {d} | {r.golden} | {r.golden_ungated} | {b.p_golden:.2f} | {often} | "
                     f"{_f(b.golden_value)} [{_f(b.golden_value_interval[0])}, {_f(b.golden_value_interval[1])}] |")
    return lines + [""]


def _versus_table(j: Any) -> list[str]:
    lines = ["Own optimum vs golden layer, same matrix, test rows. *In-sample*: each edit's best layer "
             "chosen and scored on the same cells, so every difference is >= 0 and the paired p-values are "
             "biased (the paper's t-test). *Corrected*: the winner's curse estimated by a permutation null "
             "(`null_selection_bias`: each layer's residuals permuted across edits, so no edit keeps its own best "
             "layer) and subtracted; the corrected gain is a lower bound and p (null, one-sided) the test to read.",
             "", "| definition | n | golden mean | optimum mean (in-sample) | in-sample gain, p_t / p_wilcoxon / p_perm "
             "| null bias [CI] | corrected gain | p (null) |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for d, r in j.definitions.items():
        v = r.versus
        ins, nul = v["in_sample"], v["null"]
        lines.append(f"| {d} | {v['n']} | {_f(v['golden_mean'])} | {_f(v['optimum_mean'])} | {_f(ins['mean_diff'])}, "
                     f"{_p(ins['p_t'])} / {_p(ins['p_wilcoxon'])} / {_p(ins['p_permutation'])} | "
                     f"{_f(nul['null_mean'])} [{_f(nul['null_interval'][0])}, {_f(nul['null_interval'][1])}] | "
                     f"{_f(nul['corrected'])} | {_p(nul['p_value'])} |")
    return lines + [""]


def _transfer_table(j: Any) -> list[str]:
    lines = ["| definition | proxy/test | splits | agreement | chance (null) | p_null | test regret mean [CI] |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for d, r in j.definitions.items():
        t = r.transfer
        if t is None:
            continue
        lines.append(f"| {d} | {t.n_proxy}/{t.n_test} | {t.n_splits} | {t.agreement:.2f} | {_f(t.null_agreement, 2)} | "
                     f"{_p(t.p_null)} | {_f(t.regret_mean)} [{_f(t.regret_interval[0])}, {_f(t.regret_interval[1])}] |")
    return lines + [""]


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
            f"edits; layer means within {e.spread:.4f} nats), yet golden-layers min-max normalises it to [0, 1]: "
            f"its held-out-loss term may rank the layers by noise. Read golden-layers beside edit-only."]


def _selector_table(j: Any) -> list[str]:
    if not j.selectors:
        return ["No selector scores were given for this matrix.", ""]
    defs = list(j.definitions)
    head = "| selector | layer | " + " | ".join(f"regret ({d}) [CI]" for d in defs) + \
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
    lines = ["| layer | " + " | ".join(defs) + " |", "|---:|" + "---:|" * len(defs)]
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


def reading(j: Any) -> list[str]:
    """Plain statements the numbers support (or not), each computed from the judgment."""
    defs = j.definitions
    goldens = {d: r.golden for d, r in defs.items()}
    out = [f"- Golden layer by definition: {', '.join(f'{d} {g}' for d, g in goldens.items())}"
           + (" — the definitions **disagree**: which layer is golden depends on what 'overall' means."
              if len(set(goldens.values())) > 1 else " — every definition agrees.")]
    shaky = [d for d, r in defs.items() if r.boot.p_golden < 0.8]
    if shaky:
        out.append(f"- Not determined at this size (golden in < 80% of bootstrap resamples): {', '.join(shaky)}.")
    real = [d for d, r in defs.items() if _optimum_beats_golden(r)]
    out.append("- Own optimum beyond the winner's curse (p (null) < 0.05, corrected gain > 0): "
               + (", ".join(real) if real else "none — per-edit layer choice is not shown to beat the golden layer."))
    beat = [d for d, r in defs.items() if _transfers(r)]
    out.append("- Proxy -> test transfer above chance (p_null < 0.05): " + (", ".join(beat) if beat else "none") + ".")
    conv = np.asarray(j.convergence.converged, dtype=float)
    if np.isfinite(conv).any() and np.nanmean(conv) < 0.5:
        out.append(_convergence_line(j, float(np.nanmean(conv))))
    out += _noise_line(j)
    out += _lga_versus_cma(j)
    outside = [s.name for s in j.selectors if s.layer not in j.layers]
    if outside:
        out.append(f"- Picked a layer outside the judged layers {layer_span(j.layers)} (not judged yet): "
                   f"{', '.join(outside)}.")
    return out + [""]


def _optimum_beats_golden(r: Any) -> bool:
    """Each edit's own optimum beats the golden layer beyond the winner's curse."""
    return r.versus["null"]["p_value"] < 0.05 and r.versus["null"]["corrected"] > 0


def _transfers(r: Any) -> bool:
    """The proxy's golden layer is the test's more often than on row-permuted matrices."""
    return r.transfer is not None and r.transfer.p_null < 0.05


def _lga_versus_cma(j: Any) -> list[str]:
    """The Golden Layers paper's claim that LGA finds better layers than CMA, read off the
    paired bootstrap of their regret difference (both regrets on the same resamples of
    the test edits): decided only when its interval excludes 0."""
    sel = {s.name: s for s in j.selectors}
    if "lga" not in sel or "cma" not in sel:
        return []
    said = []
    for d in dict.fromkeys(("golden-layers", j.primary)):
        a, b = sel["lga"].regret.get(d), sel["cma"].regret.get(d)
        if a is None or b is None:
            continue
        diff = j.definitions[d].boot.difference("lga", "cma")
        said.append(f"{d}: LGA {_f(a[0])} [{_f(a[1])}, {_f(a[2])}] vs CMA {_f(b[0])} [{_f(b[1])}, {_f(b[2])}], "
                    f"paired difference {_d(diff.value)} [{_d(diff.lo)}, {_d(diff.hi)}] (LGA lower in "
                    f"{diff.p_a_lower:.0%} of resamples), {_lower_regret(diff, 'CMA')}")
    if not said:
        return []
    return [f"- 'LGA beats CMA' (the Golden Layers paper; regret on the test rows, layer {sel['lga'].layer} vs "
            f"{sel['cma'].layer}): " + "; ".join(said) + "."]


def _lower_regret(diff: Any, other: str) -> str:
    """The verdict on a :class:`~gradlocate.golden.inference.RegretDifference` (a's regret minus
    ``other``'s): decided only when its paired interval excludes 0."""
    if diff.lo == diff.hi == diff.value == 0:
        return "a tie (the same layer)"
    return ("holds" if diff.hi < 0 else f"reversed: {other}'s regret is lower" if diff.lo > 0
            else "not resolved (the paired interval covers 0)")


def _golden_caveats(j: Any, r: Any, definition: str, unjudged: Collection[int]) -> str:
    """What the summary must say beside a golden layer: next to a layer not judged yet (the
    optimum may lie there), edits that never take, a held-out term without a layer effect."""
    out = []
    if {r.golden - 1, r.golden + 1} & set(unjudged):
        out.append("next to layers not judged yet")
    peak = _reliability_peak(j)
    if peak is not None and peak[0] < 0.5:
        under = np.nanmean(np.asarray(j.convergence.converged, dtype=float)) < 0.5
        out.append(f"{'under-trained' if under else 'the edits do not take'}: reliability peaks at {peak[0]:.2f}")
    if definition == "golden-layers" and _noise_line(j):
        out.append(f"its held-out term shows no layer effect, Friedman p {_p(j.capability_effect.p_value)}")
    return f" ({'; '.join(out)})" if out else ""


def claims_table(studies: list[tuple[str, str, Any]], definition: str = "golden-layers",
                 draws: dict[str, Any] | None = None, partial: Mapping[str, Collection[int]] | None = None
                 ) -> list[str]:
    """The Golden Layers paper's three claims, one row per study, read as :func:`reading` reads
    them under one ``definition`` of overall (the paper's own by default).

    ``studies``: (name, completeness note, judgment). A per-edit optimum beats the fixed golden
    layer only beyond the winner's curse (corrected gain > 0 and p (null) < 0.05; else "not
    shown": the null's correction is conservative, so this is no proof the two are equal);
    transfer *holds* when the proxy's golden layer is the test's more often than on
    row-permuted matrices (p_null < 0.05); "LGA beats CMA" only when the paired bootstrap
    interval of their regret difference excludes 0. A study whose judgment lacks the
    definition is listed as such.
    ``draws``: study name -> :class:`~gradlocate.golden.draws.Draws` of its matrix (LGA vs CMA);
    where given, the verdict is followed by how it went over those proxy draws. ``partial``:
    study name -> the model's layers its judgment lacks (a partial matrix: its golden layer
    and regrets speak for the judged layers only, and the row says so).
    """
    lines = [f"| study | size | golden layer, P(golden) | each edit's own optimum beats the fixed layer? (corrected "
             f"gain, p null) | proxy -> test transfer (agreement vs chance, p_null) | 'LGA beats CMA' (regret) | "
             f"lowest regret [CI] |", "|---|---|---|---|---|---|---|"]
    for name, size, j in studies:
        unjudged = (partial or {}).get(name, ())
        r = j.definitions.get(definition)
        if r is None:
            lines.append(f"| {name} | {size} | no {definition} definition judged | | | | |")
            continue
        nul = r.versus["null"]
        fixed = "yes: a per-edit choice is better" if _optimum_beats_golden(r) else "not shown"
        t = r.transfer
        tr = "n/a" if t is None else (f"{'holds' if _transfers(r) else 'not shown'} ({t.agreement:.2f} vs "
                                      f"{_f(t.null_agreement, 2)}, {_p(t.p_null)})")
        sel = {s.name: s for s in j.selectors}
        if "lga" not in sel or "cma" not in sel:
            lc = "not measured"
        elif None in (a := sel["lga"].regret.get(definition), b := sel["cma"].regret.get(definition)):
            lc = f"not judged yet (layers {sel['lga'].layer} / {sel['cma'].layer} not in the matrix)"  # partial matrix
        else:
            diff = r.boot.difference("lga", "cma")
            lc = f"{_lower_regret(diff, 'CMA')} ({_f(a[0])} vs {_f(b[0])}; difference [{_d(diff.lo)}, {_d(diff.hi)}])"
        dr = (draws or {}).get(name)
        if dr is not None and lc != "not measured" and tuple(dr.pair) == ("lga", "cma") and definition in dr.definitions:
            lo, rs = dr.lower(definition), dr.resolved(definition)
            lc += (f"; over {len(dr.draws)} proxy draws LGA lower in {lo['lga']}, CMA in {lo['cma']} (resolved: "
                   f"{rs['lga']} / {rs['cma']})")
        judged = [(s.regret[definition], s.name) for s in j.selectors if s.regret.get(definition) is not None]
        best = min(judged, key=lambda x: x[0][0]) if judged else None
        bs = "none" if best is None else f"{best[1]} {_f(best[0][0])} [{_f(best[0][1])}, {_f(best[0][2])}]"
        if unjudged and best is not None:
            bs += f" ({len(judged)} of {len(j.selectors)} picks judged; regret vs the best judged layer)"
        lines.append(f"| {name} | {size} | {r.golden}, {r.boot.p_golden:.2f}{_golden_caveats(j, r, definition, unjudged)} | "
                     f"{fixed} ({_f(nul['corrected'])}, "
                     f"{_p(nul['p_value'])}) | {tr} | {lc} | {bs} |")
    return lines + [""]


def judgment_markdown(j: Any) -> str:
    """The judgment as markdown: regime, golden layer per definition, own optimum vs
    golden, transfer, selectors, gate and convergence, per-layer means."""
    parts = [*_regime(j), "**What these numbers say**", "", *reading(j),
             "**Golden layer by definition of overall** (test rows; gated)", "", *_golden_table(j),
             "**Own optimum vs golden layer**", "", *_versus_table(j),
             "**Proxy -> test transfer** (random splits of all rows; chance = the same splits on row-permuted matrices)",
             "", *_transfer_table(j), "**Selectors** (picked on the proxy edits; regret on the test rows)", "",
             *_selector_table(j), "**Damage gate and convergence per layer**", "", *_gate_table(j),
             "**Mean overall per layer, test rows**", "", *_curves(j)]
    return "\n".join(parts)

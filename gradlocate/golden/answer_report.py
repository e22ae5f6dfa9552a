"""The markdown of :class:`~gradlocate.golden.answer.Answer` s: the page's first screen, the
Golden Layers paper's claims study by study, and each study's regret tables.

Every claim states its estimand, regime, size and interval; no table counts wins over
draws (a count of overlapping draws says how often, not by how much): mean regret with
its interval instead.

Example:
    >>> first_screen([]) == []
    True
    >>> _secs(95.0), _secs(1060.0), _secs(9000.0), _secs(float("nan"))
    ('95 s', '18 min', '2.5 h', 'n/a')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradlocate.golden.answer import PROXY_K, SELECTORS, Answer
from gradlocate.golden.judge_report import _d, _f, _p, lower_regret
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN
from gradlocate.golden.regret import CONSTANT, RANDOM
from gradlocate.golden.versus import ALPHA

__all__ = ["first_screen", "claims_table", "regret_section", "tallies"]


def _secs(s: float) -> str:
    if not math.isfinite(s):
        return "n/a"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _ci(r: Any) -> str:
    return "n/a" if r is None else f"{_f(r.mean)} [{_f(r.lo)}, {_f(r.hi)}]"


def _regime(a: Answer) -> str:
    hp = ", ".join(f"{k} {v}" for k, v in a.regime.get("hparams", {}).items())
    return f"{a.regime.get('model')}, {a.regime.get('data')}, {a.regime.get('editor')}" + (f" ({hp})" if hp else "")


def _size(a: Answer) -> str:
    j = a.judgment
    n = a.regime.get("n_layers") or len(j.layers)
    return f"{j.n_edits} edits ({len(j.proxy)} proxy) x {len(j.layers)}" + \
        (" layers" if len(j.layers) >= n else f" of {n} layers (partial: the judged layers only)")


def _layer(a: Answer) -> str:
    r = a.judgment.definitions[a.primary]
    b = r.boot
    lo, hi = b.golden_value_interval
    near = ", ".join(map(str, r.near)) if len(r.near) <= 6 else f"{len(r.near)} layers ({r.near[0]}..{r.near[-1]})"
    return f"**{r.golden}** (P {b.p_golden:.2f}) | {_f(b.golden_value)} [{_f(lo)}, {_f(hi)}] | {near}"


def _trust(a: Answer) -> str:
    sels = a.selectors()
    if a.committed is None or not sels:
        return "not judged over draws (no committed draws)"
    best = min(sels, key=lambda r: r.mean)
    if a.under_trained:
        return f"not tested: under-trained; lowest: {best.name} {_ci(best)}"
    t = a.trusted()
    if t is None:
        return f"**none** (lowest: {best.name} {_ci(best)}, not below a random layer's after Holm)"
    adj = a.adjusted.get(f"{t.name}: regret below a random layer's", math.nan)
    return f"**{t.name}** {_ci(t)} (Holm p {_p(adj)})"


def _instead(a: Answer) -> str:
    got = a.instead()
    if got is None:
        return "not judged"
    k, r = got
    return f"k={k}: {_ci(r)}; {k * len(a.layers)} cells, {_secs(a.cost(k))}"


def first_screen(answers: Sequence[Answer]) -> list[str]:
    """The page's first screen: one row per study folder (model x data x editor)."""
    if not answers:
        return []
    a0 = answers[0]
    rs = a0.draws
    lines = ["## Which layer to edit, per model x editor", "",
             f"| study | regime | size | layer to edit ({a0.primary}, gated) | its test mean [95% CI] | within "
             f"{EQUIVALENCE_MARGIN:g} of it | selector to trust: mean regret [95% CI] | random layer: mean regret "
             f"[95% CI] | brute force on k random proxy edits instead: mean regret [95% CI], cost |",
             "|---|---|---|---|---:|---|---|---|---|"]
    for a in answers:
        flag = f" **under-trained**: {a.under_trained}" if a.under_trained else ""
        lines.append(f"| {a.name} | {_regime(a)}{flag} | {_size(a)} | {_layer(a)} | {_trust(a)} | "
                     f"{_ci(a.random_layer)} | {_instead(a)} |")
    scheme = "not made" if rs is None else (
        f"{rs.n_draws} random proxy draws of each folder's proxy size, the other edits the test edits; 95% two-level "
        f"bootstrap interval: {rs.n_boot} resamples of the edits x {rs.boot_draws} fresh draws each, fewer draws than "
        f"the estimate's, which widens it (conservative)")
    boot = a0.judgment.definitions[a0.primary].boot.n
    return lines + ["", *_estimands(a0, scheme, boot), "", *tallies(answers), ""]


def _estimands(a: Answer, scheme: str, boot: int) -> list[str]:
    return [
        f"- **Layer to edit**: the argmax over the layers the damage gate allows of the test edits' mean primary "
        f"score ({a.primary}: per cell the mean of reliability, generalization and locality, declared before any "
        f"study was run), with its P(golden) over {boot} bootstrap resamples of the test edits; the test mean there "
        f"with its 95% percentile interval; the layers whose test mean is within the declared margin "
        f"{EQUIVALENCE_MARGIN:g} of it (the data do not separate them).",
        f"- **Selector to trust**: estimand: a selector's expected test regret (the best test layer mean minus the "
        f"test mean at its pick) on the folder's committed proxy draws (`draws.json`, 16 draws of the proxy size: "
        f"only these have the selectors' picks), 95% bootstrap interval over the draws x the edits, picks held "
        f"fixed. Trusted: the lowest mean regret among {', '.join(SELECTORS)} whose regret is below a random "
        f"layer's (paired one-sided bootstrap test on the same draws, Holm-adjusted across every study x test "
        f"below, level {ALPHA:g}); **none**: use brute force on k edits instead.",
        f"- **Random layer** and **brute force on k random proxy edits** (every layer edited on k edits, the best "
        f"mean kept; k in {', '.join(map(str, PROXY_K))} and all the proxy edits): expected test regret over "
        f"{scheme}. k shown: the smallest whose mean regret is at most the lowest "
        f"published selector's, else the lowest. Cost: k x layers cells at the mean stored seconds per cell "
        f"(the matrix runs' own timings, on the CPU that made them)."]


def tallies(answers: Sequence[Answer]) -> list[str]:
    """Counts over the studies that are not under-trained (each with its statement)."""
    ok = [a for a in answers if not a.under_trained]
    out = []
    if len(ok) < len(answers):
        out.append(f"- Under-trained (shown, excluded from the tests and these counts): "
                   f"{', '.join(f'{a.name} ({a.under_trained})' for a in answers if a.under_trained)}.")
    trusted = [f"{a.name} ({t.name})" for a in ok if (t := a.trusted()) is not None]
    out.append(f"- A published selector is trusted (regret below a random layer's after Holm) in {len(trusted)} of "
               f"{len(ok)} studies" + (f": {', '.join(trusted)}." if trusted else "."))
    judged = [a for a in ok if a.selectors() and a.draws is not None]
    for who, names in (("LGA's and CMA's", ("lga", "cma")), ("every published selector's", SELECTORS)):
        cheap = [a.name for a in judged if _cheap(a, names)]
        out.append(f"- Brute force on 1-2 random proxy edits has a mean test regret at most {who} in {len(cheap)} of "
                   f"{len(judged)} studies (point estimates of the two estimands above; intervals in the table)"
                   + (f": {', '.join(cheap)}." if cheap else "."))
    est = [a.name for a in ok if a.judgment.own_optimum.estimable]
    out.append(f"- Each edit's own optimum vs the golden layer is estimable (a second replicate) in {len(est)} of "
               f"{len(ok)} studies; elsewhere it is not estimated (one replicate: the in-sample gain is biased upward).")
    return out


def _cheap(a: Answer, names: Sequence[str]) -> bool:
    """Brute force on 1 or 2 random proxy edits has a mean regret at most each named selector's."""
    rows = [r.mean for r in a.selectors() if r.name in names]
    bf = [r.mean for k in (1, 2) if (r := a.brute_force(k)) is not None]
    return bool(rows and bf and min(bf) <= min(rows) + 1e-12)


def _own_optimum(a: Answer) -> str:
    v = a.judgment.own_optimum
    o, e = v.oracle, v.equivalence
    if o is None or e is None:
        return f"not estimable (one replicate); in-sample gain {_f(v.in_sample_gain)}, biased upward"
    p1 = a.adjusted.get("oracle gain > 0", math.nan)
    p2 = a.adjusted.get(f"equivalent within {e.margin:g} (TOST)", math.nan)
    verdict = "equivalent" if a.rejected(f"equivalent within {e.margin:g} (TOST)") else "not shown equivalent"
    return (f"oracle gain {_d(o.gain)} [{_d(o.ci[0])}, {_d(o.ci[1])}] (Holm p {_p(p1)}); TOST within "
            f"+-{e.margin:g}: {verdict} (90% [{_d(e.ci[0])}, {_d(e.ci[1])}], Holm p {_p(p2)}); paper's paired t p "
            f"{_p(e.p_paired_t)}")


def _transfer(a: Answer) -> str:
    t, r = a.transfer, a.random_layer
    if t is None or r is None:
        return "not judged"
    p = a.adjusted.get("transfer: regret below a random layer's", math.nan)
    tested = "not tested: under-trained" if a.under_trained else f"Holm p {_p(p)}"
    return f"{_ci(t)} vs random layer {_ci(r)} ({tested})"


def _lga_cma(a: Answer) -> str:
    rows = {r.name: r for r in a.selectors()}
    if a.lga_cma is None or "lga" not in rows or "cma" not in rows:
        return "not measured"
    v, lo, hi = a.lga_cma
    return (f"{lower_regret(v, lo, hi, 'CMA')}: LGA {_ci(rows['lga'])} vs CMA {_ci(rows['cma'])}, "
            f"paired difference {_d(v)} [{_d(lo)}, {_d(hi)}]")


def claims_table(answers: Sequence[Answer]) -> list[str]:
    """The Golden Layers paper's claims, one row per study, under the primary score."""
    if not answers:
        return []
    n_draws = next((a.draws.n_draws for a in answers if a.draws is not None), "?")
    lines = [f"| study | size | golden layer, P(golden); within {EQUIVALENCE_MARGIN:g} | each edit's own optimum vs "
             f"the fixed layer | proxy -> test transfer: regret of the proxy's best layer ({n_draws} random draws) "
             f"| 'LGA beats CMA': mean regret on the 16 committed draws |", "|---|---|---|---|---|---|"]
    for a in answers:
        r = a.judgment.definitions[a.primary]
        flag = " (under-trained)" if a.under_trained else ""
        lines.append(f"| {a.name}{flag} | {_size(a)} | {r.golden}, {r.boot.p_golden:.2f}; "
                     f"{', '.join(map(str, r.near))} | {_own_optimum(a)} | {_transfer(a)} | {_lga_cma(a)} |")
    return lines + [""]


def _regret_rows(a: Answer, rows: list[Any], cost: bool) -> list[str]:
    out = []
    for x in rows:
        vs = "" if x.vs_reference is None else f"{_d(x.vs_reference[0])} [{_d(x.vs_reference[1])}, " \
                                                f"{_d(x.vs_reference[2])}]"
        test, name = next((t for t in a.tests() if t.startswith(f"{x.name}: ")), None), x.name
        if x.name == f"brute force k={a.n_proxy}" and cost:
            test, name = "transfer: regret below a random layer's", f"{x.name} (transfer: every proxy edit)"
        adj = "" if test is None else ("not tested: under-trained" if a.under_trained else _p(a.adjusted.get(test)))
        raw = "" if test is None else _p(x.p_below)  # a p-value only where the page tests it
        secs = _secs(x.cells * a.secs) if x.cells > 0 else ""
        out.append(f"| {name} | {_ci(x)} | {vs} | {raw} | {adj} | {_f(x.cells, 0)} | {secs} |")
    return out


def regret_section(a: Answer) -> str:
    """One study's regret tables: random draws (brute force, baselines, the search) and the
    committed draws (the published selectors beside brute force on the same proxy rows)."""
    head = ["| method | mean test regret [95% CI] | minus the random layer's [95% CI] | test: p (one-sided) | Holm p | "
            "mean cells | cost (cells x mean stored s per cell) |", "|---|---|---|---:|---:|---:|---:|"]
    out = [f"\n**Selectors, transfer and brute force by test regret** ({a.primary}, gated; regret = the best test "
           f"layer mean minus the test mean at the pick)."]
    if a.draws is not None:
        rows = a.draws.rows[a.primary] + ([] if a.search is None else
                                          [r for r in a.search.rows[a.primary] if r.name not in (RANDOM, CONSTANT)])
        out += ["", f"Random proxy draws: {a.draws.scheme}." + ("" if a.search is None else
                f" The search (default budget): {a.search.scheme}."), "", *head, *_regret_rows(a, rows, True)]
    if a.committed is not None:
        out += ["", f"The committed draws: {a.committed.scheme}.", "", *head,
                *_regret_rows(a, a.committed.rows[a.primary], False)]
    if a.picks:
        n = max(len(v) for v in a.picks.values())
        out += ["", f"Each selector's layer on the committed draws (seeds 0..{n - 1}; seed 0 is the draw judged above):",
                "",
                "| selector | layer per draw |", "|---|---|"]
        out += [f"| {s} | {', '.join('-' if p is None else str(p) for p in ps)} |" for s, ps in a.picks.items()]
    out += [f"\n- {n}." for n in a.notes]
    return "\n".join(out) + "\n"

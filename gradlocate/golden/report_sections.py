"""The markdown of a study report: the page's head and first screen, the Golden Layers
paper's claims, one section per study folder (its judgment, regret tables, batch regime,
growth check), the regimes side by side (what docs/results.md is).

:func:`gradlocate.golden.report.report` assembles these; each piece is a plain function of
a judgment, a matrix or a folder, so a notebook can show any one of them.
"""

from __future__ import annotations

import datetime
import platform
from typing import Any

import numpy as np

from gradlocate.golden import inference, scores
from gradlocate.golden.folder import Completeness, StudyFolder
from gradlocate.golden.answer import Answer
from gradlocate.golden.answer_report import claims_table, first_screen, regret_section
from gradlocate.golden.judge import Judgment
from gradlocate.golden.judge_report import _f, label
from gradlocate.golden.oracle import EQUIVALENCE_MARGIN, PRIMARY
from gradlocate.golden.table import Matrix, layer_span

__all__ = ["section", "batch_section", "growth_section", "regimes_section", "regret_section", "page", "claims",
           "first_screen_text", "HEAD", "HOW_TO_READ"]

#: LocFT-BF's stopping threshold and the rank-one editors' v* early stop, stated on the page.
from gradlocate.editors.locft import LOSS_THRESHOLD  # noqa: E402
from gradlocate.editors.rank_one import EARLY_STOP  # noqa: E402


def section(name: str, j: Judgment, done: Completeness, picked: Any, batch: str = "") -> str:
    state = "complete" if done.done else f"**partial**: {done}; judged: the complete layers {layer_span(done.complete_layers)}"
    errs = "".join(f"\n- selector {k} could not run: {v}" for k, v in (picked.errors if picked else {}).items())
    return f"### {name}\n\nMatrix: {state}.{errs}\n\n" + j.to_markdown() + batch


def batch_records(folder: StudyFolder) -> list[Any]:
    """The batch regime's layer records (``gradlocate matrix --batch``), by layer; [] if none."""
    from gradlocate.golden.store import RecordStore
    from gradlocate.golden.sweep import LayerRecord

    d = folder.batch_dir
    recs = [LayerRecord.from_dict(r) for r in RecordStore(d).read().values()] if d.is_dir() else []
    return sorted((r for r in recs if r.error is None), key=lambda r: r.layer)


def batch_section(folder: StudyFolder, j: Any, n_layers: int, threshold: float, n_boot: int) -> str:
    """The batch regime beside the matrix: the test edits edited together at each layer,
    its golden layer per definition (bootstrap over edits, damage-gated like the matrix),
    and what the single-edit golden layer costs the batch (its regret)."""

    recs = batch_records(folder)
    if not recs:
        return ""
    layers = [r.layer for r in recs]
    metrics: dict[str, Any] = {k: np.array([[np.nan if v is None else v for v in r.per_edit[k]] for r in recs]).T
                               for k in ("reliability", "generalization", "locality") if k in recs[0].per_edit}
    change = np.array([np.nan if r.general.get("lm_loss_change") is None else r.general["lm_loss_change"]
                       for r in recs])
    if np.isfinite(change).all():
        metrics["capability"], metrics["lm_loss"] = np.exp(-change), change
    gate = scores.damage_gate(change, threshold, higher_is_better=False)
    n_edits = next(iter(metrics.values())).shape[0]
    state = "complete" if len(layers) == n_layers else f"**partial**: {len(layers)} of {n_layers} layers"
    per_step = recs[0].train.get("edits_per_step")
    out = ["", f"**Batch regime** (the second question: the {n_edits} test edits edited *together* at each layer, "
           f"the same editor and hyper-parameters, {per_step} edits per optimizer step, `gradlocate matrix --batch`; {state}). Golden layer by definition "
           f"(bootstrap over the test edits, gated at {threshold} nats), against the single-edit matrix's, and the batch's "
           f"regret of editing it at the single-edit golden layer (against the best layer the gate allows, so "
           f"negative where the single-edit golden layer is damaging in the batch):", "",
           "| definition | batch golden | P(golden) | best mean [CI] | single-edit golden | batch regret there [CI] |",
           "|---|---:|---:|---:|---:|---:|"]
    for d in [k for k in ("reliability", "generalization", "locality") if k in metrics] + list(scores.DEFINITIONS):
        if d not in j.definitions:
            continue
        single = j.definitions[d].golden
        sel = {"single": layers.index(single)} if single in layers else {}
        b = inference.bootstrap(metrics, d, allowed=gate.allowed, n=n_boot, seed=0, selectors=sel)
        reg = b.regret.get("single")
        there = f"{reg[0]:.3f} [{reg[1]:.3f}, {reg[2]:.3f}]" if reg else "not swept"
        if single in layers and not gate.allowed[layers.index(single)]:
            # regret is measured against the best *allowed* layer, so it can be negative here
            there += f"; damaging in the batch (Δloss {change[layers.index(single)]:.2f})"
        lo, hi = b.golden_value_interval
        out.append(f"| {label(d, PRIMARY)} | {layers[b.golden]} | {b.p_golden:.2f} | {b.golden_value:.3f} "
                   f"[{lo:.3f}, {hi:.3f}] | {single} | {there} |")
    out += ["", "Per layer (means over the test edits; Δloss = held-out LM loss change, nats; converged = an epoch's "
            "mean loss fell below the threshold):", "",
            "| layer | reliability | generalization | locality | Δloss | damaging | converged | final loss | train s |",
            "|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    damaging = {layers[k] for k in gate.damaging}
    for i, r in enumerate(recs):
        tf = r.teacher_forced
        fl = r.train.get("final_loss")
        out.append(f"| {r.layer} | {_f(tf.get('reliability'))} | {_f(tf.get('generalization'))} | "
                   f"{_f(tf.get('locality'))} | {_f(change[i])} | {'yes' if r.layer in damaging else ''} | "
                   f"{r.converged} | {_f(fl)} | {_f(r.timings.get('train'), 1)} |")
    return "\n".join(out) + "\n"


def growth_section(m: Any, first: int, threshold: float) -> str:
    """A folder growing to more edits while the page still judges its first ``first`` rows
    (``m``: every row, the layers complete at every row): a replication check on those
    layers. The first rows and the new rows are different edits, so a golden layer that
    is a property of the layers (and not of the edits drawn) is found by both; the rank
    correlation of the two halves' layer means says how much of the layer ordering
    repeats. Damage-gated like the judgment; "golden-layers" is normalised on each half."""
    from scipy.stats import spearmanr

    from gradlocate.golden.judge import default_definitions

    if not first < m.n_edits or len(m.layers) < 2:
        return ""
    halves = {"first": np.arange(first), "new": np.arange(first, m.n_edits), "all": np.arange(m.n_edits)}
    gate = scores.damage_gate(m.capability, threshold, higher_is_better=False)
    out = ["", f"**Growth check** ({m.n_edits - first} edits added to the first {first}; the judgment above "
           f"still uses the first {first}). Over the {len(m.layers)} layers every one of the {m.n_edits} edits "
           f"has ({', '.join(map(str, m.layers))}), the best layer of each half by definition, its mean, and "
           f"Spearman's ρ between the halves' layer means (independent edits: how much of the ordering repeats; "
           f"capability, in the definitions that use it, is the per-layer curve of the first "
           f"{m.params.get('capability_edits', '?')} edits in both halves, so under those definitions the halves are not independent):", "",
           f"| definition | first {first}: best (mean) | new {m.n_edits - first}: best (mean) | "
           f"all {m.n_edits}: best (mean) | ρ first vs new |", "|---|---:|---:|---:|---:|"]
    for d in default_definitions(m):
        means = {}
        for name, rows in halves.items():
            score = scores.overall(m.metrics(rows), d)
            means[name] = np.nanmean(score, 0)
        cells = []
        for name in halves:
            k = scores.golden_layer(means[name][None], gate.allowed)
            cells.append(f"{m.layers[k]} ({means[name][k]:.3f})")
        rho = spearmanr(means["first"], means["new"]).statistic
        out.append(f"| {label(d, PRIMARY)} | " + " | ".join(cells) + f" | {_f(rho, 2)} |")
    return "\n".join(out) + "\n"


def complete_at_every_edit(folder: StudyFolder, judged: int) -> tuple[Any, int] | None:
    """Every row of a grown folder over the layers complete at every row (``None`` when the
    page already judges every row, or fewer than two layers are complete yet), and the rows
    judged (``judged``: the page's ``Completeness.edits_used``, passed in so the records are
    not read a second time to learn it)."""
    m, done = folder.load(complete_only=False)
    cols = [m.layers.index(l) for l in done.complete_layers]
    if judged >= m.n_edits or len(cols) < 2:
        return None
    pick = {k: v[:, cols] for k, v in m.scores.items()}
    return Matrix([m.layers[c] for c in cols], m.edit_ids, pick, {k: v[:, cols] for k, v in m.train.items()},
                  m.capability[:, cols], m.capability_base, m.editor, m.params), judged


def _restricted(group: list[tuple[str, dict[str, Any], Any]], layers: list[int]) -> str:
    """Say so when the shared layers are not all the model's: rows restricted to them can
    name another golden layer than their folder's own section."""
    n = group[0][1]["n_layers"]
    if len(layers) >= n:
        return ""
    short = [name for name, _, m in group if len(m.layers) < n]
    return (f" These are {len(layers)} of the model's {n} layers ({', '.join(short)} partial): every "
            f"row is restricted to them, so its golden layers can differ from its own section's.")


def regimes_section(runs: list[tuple[str, dict[str, Any], Any]], threshold: float, n_boot: int) -> str:
    """Regimes side by side: for each model and data set with more than one matrix folder
    (another learning rate, another editor), the golden layer per definition of each, on
    the edits and layers every one of them has (all shared rows: no selector is judged
    here), with convergence and the worst held-out loss change. A golden layer that moves
    with the regime is a statement about the regime."""
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any], Any]]] = {}
    for name, regime, m in runs:
        groups.setdefault((regime["model"], str(regime.get("data"))), []).append((name, regime, m))
    out = []
    for (model, data), group in groups.items():
        if len(group) < 2:
            continue
        ids = [e for e in group[0][2].edit_ids if all(e in m.edit_ids for _, _, m in group)]
        layers = [l for l in group[0][2].layers if all(l in m.layers for _, _, m in group)]
        if len(ids) < 2 or len(layers) < 2:
            continue
        defs = ["reliability", "generalization", "locality", *scores.DEFINITIONS]
        out += [f"### Regimes side by side: {model}, {data}", "",
                f"The same {len(ids)} edits (every edit the folders share, proxy and test alike) at the "
                f"{len(layers)} layers every folder has ({layer_span(layers)}); golden layer per definition, "
                f"gated at {threshold} nats, with P(golden) over {n_boot} bootstrap resamples of the edits."
                + _restricted(group, layers), "",
                "| folder | editor, settings | converged | worst Δloss (layer) | "
                + " | ".join(label(d, PRIMARY) for d in defs) + " |",
                "|---|---|---:|---:|" + "---:|" * len(defs)]
        for name, regime, m in group:
            rows = [m.edit_ids.index(e) for e in ids]
            cols = [m.layers.index(l) for l in layers]
            metrics = {k: (v[:, cols] if v.ndim == 2 else v[cols]) for k, v in m.metrics(rows).items()}
            change = metrics.get("lm_loss")
            gate = scores.damage_gate(change if change is not None else np.full(len(cols), np.nan), threshold,
                                     higher_is_better=False)
            conv = m.train["converged"][np.ix_(rows, cols)] if "converged" in m.train else np.full(1, np.nan)
            worst = "n/a" if change is None else f"{np.nanmax(change):+.3f} ({layers[int(np.nanargmax(change))]})"
            goldens = []
            for d in defs:
                try:
                    b = inference.bootstrap(metrics, d, allowed=gate.allowed, n=n_boot, seed=0)
                    goldens.append(f"{layers[b.golden]} ({b.p_golden:.2f})")
                except ValueError:
                    goldens.append("n/a")
            hp = ", ".join(f"{k} {v}" for k, v in regime["hparams"].items())
            out.append(f"| {name} | {regime['editor']}, {hp} | {_f(float(np.nanmean(conv)), 2)} | {worst} | "
                       + " | ".join(goldens) + " |")
        out.append("")
    return "\n".join(out)


HEAD = """# Results: which layer to edit, and which selector finds it?

Written by `gradlocate report` ({date}, {machine}, torch {torch}) from the study folders
{folders}. Every number comes from **one instrument**: each edit edited alone at each
layer (one cell per edit x layer), scored teacher-forced (EasyEdit's token accuracy:
reliability, generalization, locality), with the held-out LM loss change measured on the
first edits' cells. The edits are split (seed 0) into proxy edits, which the selectors
see, and test edits, on which everything is judged.
"""

HOW_TO_READ = """## How to read it

* **One primary score**, declared before any study was run (`gradlocate.golden.oracle.PRIMARY`):
  `edit-only`, per cell the mean of reliability, generalization and locality, judged over
  the layers the **damage gate** allows (a layer whose edits raise the held-out loss by more
  than {thr} nats, mean over its capability cells, cannot be golden). Every test counted
  is on it. The other definitions are sensitivity analyses, shown per study; `golden-layers`
  is **gradlocate's min-max construction, not the Golden Layers paper's definition**, and
  `weighted` gradlocate's capability-aware mean.
* **Ties and the margin**: beside each golden layer, the layers whose test mean is within
  the declared margin {margin} of the best; the data do not separate them.
* **Own optimum vs golden**: estimated only with a replicate (a second seed, or the other
  half of each edit's prompts): the cross-fitted oracle gain (estimand stated with it),
  the TOST equivalence within +-{margin} beside the paper's paired t-test. With one
  replicate it is **not estimable**: the in-sample gain (each edit's best layer chosen and
  scored on the same cells) is shown, labelled biased upward, with no p-value.
* **Transfer and selectors by test regret**, never by exact argmax agreement or win
  counts: mean test regret over random proxy draws with intervals that cover the edits
  and the draws, beside a random layer, the best constant layer and brute force on k
  random proxy edits; the published selectors on the 16 committed draws (the only draws
  with their picks), beside brute force on the same proxy rows.
* **Multiplicity**: every p-value presented as a test (oracle gain > 0, TOST, each
  selector's and transfer's regret below a random layer's; all one-sided) is Holm-adjusted
  across the studies x tests on this page. **Under-trained** regimes (best mean reliability
  below 0.5, or most cells not converged with reliability below 0.9) are shown but excluded
  from the family and the tallies.
* **Convergence**: LocFT-BF stops when an epoch's mean loss falls below {loss}; a cell that
  did not, ran its full epoch budget. R-ROME / ROME stop their v* optimisation when its loss
  falls below {v_stop} (EasyEdit's early stop); the final loss shown is v*'s.
* **Batch regime**, where a matrix has one: the same test edits edited *together* at each
  layer (how LocFT-BF is used), a second question with its own golden layer, shown after
  the matrix it belongs to; its regret column is what the single-edit golden layer costs it.

What this page does **not** support: claims about layers not yet in a partial matrix; claims
about other editors, learning rates or epoch budgets than the regime stated per result;
the batch regime where no batch section is shown; capability beyond the held-out texts of
the capability subsample (its uncertainty is not in the bootstrap, which resamples edits);
and "as good as each edit's own optimum" where no replicate was measured. A partial matrix
is judged only once half the model's layers are complete in it.
"""


def claims(answers: list[Answer]) -> str:
    """The Golden Layers paper's claims per study, under the primary score (each study's
    section shows the sensitivity analyses)."""
    if not answers:
        return ""
    return ("## The Golden Layers paper's claims, study by study\n\n"
            f"Under the primary score ({answers[0].primary}, gated). 'holds' / 'reversed' are read off the paired "
            "intervals; Holm p is across every study x test on this page (one-sided; under-trained studies excluded); "
            "'not shown' is no proof of the opposite. A partial matrix speaks only for its judged layers.\n\n"
            + "\n".join(claims_table(answers)) + "\n")


def page(sections: list[str], threshold: float, summary: str = "", folders: str = "", appendix: str = "",
         first: str = "") -> str:
    """The whole page: the head, the first screen (``first``), how to read it, the paper's
    claims (``summary``), the sections, and an appendix (e.g. a superseded study kept for
    the record), appended as it is."""
    import torch

    head = HEAD.format(date=datetime.date.today().isoformat(), machine=platform.machine(), torch=torch.__version__,
                       folders=folders)
    how = HOW_TO_READ.format(thr=threshold, loss=LOSS_THRESHOLD, v_stop=EARLY_STOP, margin=f"{EQUIVALENCE_MARGIN:g}")
    body = "\n\n".join(sections) if sections else "No study folder has a complete layer yet."
    return (head + "\n" + (first + "\n" if first else "") + how + "\n" + summary + "\n## Single-edit matrices\n\n"
            + body + "\n" + appendix)


def first_screen_text(answers: list[Answer]) -> str:
    """The first screen as one markdown block ("" with no answer)."""
    return "\n".join(first_screen(answers))

"""The markdown of a study report: one section per study folder, the batch regime, the growth
check, the regimes side by side, the page's head and summary (what docs/results.md is).

:func:`gradlocate.golden.report.report` assembles these; each piece is a plain function of
a judgment, a matrix or a folder, so a notebook can show any one of them.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import numpy as np

from gradlocate.golden import inference, scores
from gradlocate.golden.folder import Completeness, StudyFolder
from gradlocate.golden.judge import Judgment
from gradlocate.golden.judge_report import _f, claims_table
from gradlocate.golden.table import Matrix, layer_span

__all__ = ["section", "batch_section", "growth_section", "regimes_section", "draws_section", "page", "HEAD"]

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
        out.append(f"| {d} | {layers[b.golden]} | {b.p_golden:.2f} | {b.golden_value:.3f} [{lo:.3f}, {hi:.3f}] | "
                   f"{single} | {there} |")
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
        out.append(f"| {d} | " + " | ".join(cells) + f" | {_f(rho, 2)} |")
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
                "| folder | editor, settings | converged | worst Δloss (layer) | " + " | ".join(defs) + " |",
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


def read_draws(folder: StudyFolder) -> Any:
    """The folder's :class:`~gradlocate.golden.draws.Draws` (``draws.json``), or None."""
    import json

    from gradlocate.golden.draws import Draws

    f = folder.draws_path
    return Draws.from_dict(json.loads(f.read_text())) if f.exists() else None


def draws_section(folder: StudyFolder, j: Any) -> str:
    """The selectors over several proxy draws, when made at the judged size."""
    d = read_draws(folder)
    if d is None:
        return ""
    if d.n_edits != j.n_edits:
        return (f"\n**Selectors over proxy draws**: made at {d.n_edits} edits, not the {j.n_edits} judged here "
                f"(stale; re-run `gradlocate report {folder.path} --draws K`).\n")
    return (f"\n**Selectors over {len(d.draws)} proxy draws** ({d.n_proxy} proxy / {d.n_edits - d.n_proxy} test "
            f"edits each, seeds {d.draws[0].seed}-{d.draws[-1].seed}; seed 0 is the draw judged above; "
            f"`gradlocate report --draws`). Each draw's selectors ran on its proxy edits and are judged on its own "
            f"test rows; LGA and CMA are compared by the paired bootstrap of their regret difference. The draws "
            f"share edits, so they are not independent replicates: read the counts as how much one draw can "
            f"say, not as a test.\n\n" + d.to_markdown())


HEAD = """# Results: which layer to edit, and which selector finds it?

Written by `gradlocate report` ({date}, {machine}, torch {torch}) from the study folders
{folders}. Every number below comes from **one instrument**:
each edit edited alone at each layer (one cell per edit x layer), scored teacher-forced
(EasyEdit's token accuracy: reliability, generalization, locality), with the held-out LM
loss change measured on the first edits' cells. The edits are split (seed 0) into proxy
edits, which the selectors see, and test edits, on which everything is judged.

How to read it:

* **Definitions of overall** are shown side by side; a golden layer that changes with
  the definition is a statement about the definition, not about the model.
* **Damage gate**: a layer whose edits raise the held-out loss by more than {thr} nats
  (mean over its capability cells) cannot be golden; "ungated" shows what the gate changed.
* **Own optimum vs golden**: the in-sample gain is >= 0 by construction (each edit's best
  of L noisy cells), so its paired p-values (the Golden Layers paper's t-test, Wilcoxon,
  permutation) are not evidence; the gain after subtracting the permutation null's
  selection bias, with its p, is. The corrected gain is a lower bound.
* **Transfer** is judged against the chance agreement of the same splits on matrices
  whose rows are permuted across layers (`p_null`), not against 1/L.
* **LGA vs CMA** is decided by the paired bootstrap of their regret difference (both regrets
  on the same resamples of the test edits): "holds" or "reversed" only when its interval
  excludes 0. That verdict is about the one proxy draw judged; where a section has
  **Selectors over proxy draws**, it shows how the picks and the verdict move with the draw.
* **Convergence**: LocFT-BF stops when an epoch's mean loss falls below {loss}; a cell that
  did not, ran its full epoch budget. R-ROME / ROME stop their v* optimisation when its loss
  falls below {v_stop} (EasyEdit's early stop); the final loss shown is v*'s. The fraction
  is reported for every layer.

* **Batch regime**, where a matrix has one: the same test edits edited *together* at each
  layer (how LocFT-BF is used), a second question with its own golden layer, shown after
  the matrix it belongs to; its regret column is what the single-edit golden layer costs it.

What this page does **not** support: claims about layers not yet in a partial matrix; claims
about other editors, learning rates or epoch budgets than the regime stated per result;
the batch regime where no batch section is shown, and batch sizes other than the one stated;
and capability beyond the held-out texts of the capability subsample (its uncertainty is not
in the bootstrap, which resamples edits). A partial matrix is judged only once half the model's
layers are complete in it; before that its section says how far it is.
"""

def claims(studies: list[tuple[str, str, Judgment]], draws: dict[str, Any] | None = None,
           partial: dict[str, set[int]] | None = None) -> str:
    """The summary at the top: the Golden Layers paper's claims per study, under its own
    definition of overall (each study's section shows the others)."""
    if not studies:
        return ""
    return ("## Summary: the Golden Layers paper's claims, study by study\n\n"
            "Under the paper's definition of overall (`golden-layers`: min-max normalised reliability, "
            "generalization, locality and held-out loss, averaged); each study's section below shows every other "
            "definition, and the regime it was edited in. 'yes' / 'holds' are read off the intervals and null "
            "tests defined under *How to read it*; 'not shown' is no proof of the opposite. A partial matrix "
            "speaks only for its judged layers.\n\n"
            + "\n".join(claims_table(studies, draws=draws, partial=partial)) + "\n")


def page(sections: list[str], threshold: float, summary: str = "", folders: str = "", appendix: str = "") -> str:
    """The whole page: the head (how to read it), the summary, the sections, and an appendix
    (e.g. a superseded study kept for the record), appended as it is."""
    import torch

    head = HEAD.format(date=datetime.date.today().isoformat(), machine=platform.machine(), torch=torch.__version__,
                       thr=threshold, loss=LOSS_THRESHOLD, v_stop=EARLY_STOP, folders=folders)
    body = "\n\n".join(sections) if sections else "No study folder has a complete layer yet."
    return head + "\n" + summary + "\n## Single-edit matrices\n\n" + body + "\n" + appendix



"""ROME, R-ROME, EMMET and LocFT-BF on SmolLM2-135M at one layer: the three measurements
of the editors' issue, resumable.

Parts (``--part``; each appends one JSON line per finished unit to
``benchmarks/results/rome_study/<part>.jsonl`` and skips the units already there):

* ``single``: ``--n`` CounterFact and ``--n`` ZsRE edits (a seeded shuffle of the shared
  files; ZsRE edits whose subject is not in the question are skipped: ROME reads its key
  at the subject), each edited **alone** at ``--layer`` on the unedited model by ROME,
  R-ROME, EMMET (a batch of one) and LocFT-BF in two regimes (GradRatio-Select's lr 5e-4
  and a 10x rate, 25 epochs, loss threshold 1e-2), then EMMET on the ``--n`` edits of a
  data set at once (its intended use). Each scored by :func:`gradlocate.evaluate`:
  teacher-forced and generation rewrite / paraphrase / locality, fluency (n-gram entropy
  of 100-token generations), the held-out loss change (``capability=True``), ‖ΔW‖ and time.
  ROME and R-ROME differ only in the closed form (ROME: ``k_p``, ``o_p``; R-ROME: ``k̄``,
  ``ō``): both are computed from one key/v* computation per edit, which is the same
  computation either editor makes (``rome_update`` is deterministic and its v* does not
  depend on the variant); the run checks that ROME's ΔW equals ``rome_update``'s.
* ``ablation``: ROME and R-ROME (and single-edit EMMET) with C over 10k / 50k / 200k
  tokens of the model's own samples (the same seeded stream: 10k and 50k are its
  prefixes), from the ``single`` part's keys and values (cached under
  ``$GRADLOCATE_CACHE/rome_study``): teacher-forced metrics and the held-out loss change.
* ``sequential``: ``--seq`` CounterFact edits applied one after another (each update
  computed on the model the previous ones left), ROME and R-ROME. After each edit: the
  update's ‖ΔW‖, ‖W − W₀‖, the held-out loss, this edit's rewrite and (every 4 edits
  and at the end) the mean rewrite of all edits so far. A method's run resumes from the
  updates cached under ``$GRADLOCATE_CACHE/rome_study``; without them it restarts.
* ``report``: ``benchmarks/results/rome_study.md`` and ``rome_study.png`` from the records.

Run from the repository root (CPU, one thread each; about 35 / 5 / 30 min)::

    python benchmarks/rome_study.py --part single
    python benchmarks/rome_study.py --part ablation
    python benchmarks/rome_study.py --part sequential --seq 16
    python benchmarks/rome_study.py --part report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

import gradlocate as gl
from gradlocate.data import heldout_texts
from gradlocate.editors.covariance import second_moment
from gradlocate.editors.emmet import EMMET, EMMET_HPARAMS, emmet_ingredients
from gradlocate.editors.locft import LocFTBF
from gradlocate.editors.rank_one import context_templates, emmet_update, rank_one
from gradlocate.editors.rome import ROME, ROME_HPARAMS, RROME, rome_update
from gradlocate.evaluation import text_loss
from gradlocate.interventions import using
from gradlocate.state import Undo

OUT = ROOT / "benchmarks" / "results" / "rome_study"
FILES = {"counterfact": "counterfact_3k.json", "zsre": "zsre_3k.json"}
LOCFT = {"locft-lr5e-4": 5e-4, "locft-lr5e-3": 5e-3}
ABLATION_TOKENS = (10_000, 50_000, 200_000)
MOM2_TOKENS = 50_000


def cache_dir() -> Path:
    base = Path(os.environ.get("GRADLOCATE_CACHE", Path.home() / ".cache" / "gradlocate"))
    d = base / "rome_study"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- records


def read(part: str) -> dict[str, dict[str, Any]]:
    """The part's records by key (a later line replaces an earlier one; a cut-off last line is skipped)."""
    path = OUT / f"{part}.jsonl"
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[r["key"]] = r
    return out


def write(part: str, record: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{part}.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- edits


def pick(data: str, n: int, seed: int) -> list[tuple[int, Any]]:
    """``n`` edits of the shared file after a seeded shuffle (ROME needs the subject in the prompt)."""
    every = gl.load_edits(gl.data.shared_data_path(FILES[data]))
    order = list(range(len(every)))
    random.Random(seed).shuffle(order)
    got = [(i, every[i]) for i in order if every[i].subject and every[i].subject in every[i].prompt]
    return got[:n]


def evaluation(model: Any, edits: list[Any], pre: Any, *, full: bool = True) -> Any:
    return gl.evaluate(model, edits, pre=pre, generation=full, fluency=full, capability=True, progress=False)


def summary(ev: Any) -> dict[str, Any]:
    d = ev.to_dict(rows=False)
    return {k: d[k] for k in ("teacher_forced", "generation", "fluency", "general")}


# --------------------------------------------------------------------------- part: single


def ingredients(h: Any, layer: int, data: str, index: int, edit: Any, C: torch.Tensor) -> dict[str, Any]:
    """One edit's ROME key/value computation and EMMET's (cached on disk): everything the
    closed forms need, and the ROME ΔW ``rome_update`` itself returns (the check)."""
    path = cache_dir() / f"{data}-{index}-L{layer}.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.perf_counter()
    groups = context_templates(h, ROME_HPARAMS["context_template_length_params"])
    dW, info = rome_update(h, layer, edit, groups, C, ROME_HPARAMS, averaged=False)
    rome_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    egroups = context_templates(h, EMMET_HPARAMS["context_template_length_params"])
    em = emmet_ingredients(h, layer, edit, egroups, EMMET_HPARAMS)
    emmet_s = time.perf_counter() - t0
    got = {"rome_dW": dW.float(), "rome_seconds": rome_s, "emmet_seconds": emmet_s,
           **{k: info[k] for k in ("k_bar", "k_prompt", "o_bar", "o_prompt", "v_star", "final_nll")},
           "emmet_key": em["key"], "emmet_residual": em["residual"], "emmet_final_nll": em["final_nll"]}
    torch.save(got, path)
    return got


def closed_forms(ing: dict[str, Any], C: torch.Tensor) -> dict[str, torch.Tensor]:
    """ROME, R-ROME and single-edit EMMET ΔW (``[d_model, d_mlp]``, float64) from one edit's ingredients."""
    v = ing["v_star"]
    return {"rome": rank_one(C, ing["k_bar"], ing["k_prompt"], v - ing["o_prompt"]),
            "r-rome": rank_one(C, ing["k_bar"], ing["k_bar"], v - ing["o_bar"]),
            "emmet": emmet_update(C, ing["emmet_key"][None], ing["emmet_residual"][None],
                                  mom2_update_weight=EMMET_HPARAMS["mom2_update_weight"],
                                  emmet_lambda=EMMET_HPARAMS["emmet_lambda"],
                                  update_norm_lambda=EMMET_HPARAMS["update_norm_lambda"])}


def applied(h: Any, layer: int, dW: torch.Tensor) -> Undo:
    site = h[layer]
    undo = Undo(site.parameter)
    with torch.no_grad():
        site.parameter.add_(site.canonical(dW).to(site.parameter.dtype))
    return undo


def part_single(model: Any, h: Any, args: argparse.Namespace) -> None:
    done = read("single")
    C = second_moment(h, args.layer, tokens=MOM2_TOKENS, progress=True)
    for data in ("counterfact", "zsre"):
        chosen = pick(data, args.n, args.seed)
        for index, edit in chosen:
            names = ["rome", "r-rome", "emmet", *LOCFT]
            if all(f"{data}/{index}/{n}" in done for n in names):
                continue
            pre = evaluation(model, [edit], None)
            ing = ingredients(h, args.layer, data, index, edit, C)
            forms = closed_forms(ing, C)
            check = float((forms["rome"] - ing["rome_dW"].double()).norm() / ing["rome_dW"].double().norm())
            if check > 1e-4:
                raise SystemExit(f"ROME's closed form from the ingredients differs from rome_update's ΔW by {check:.2e}")
            seconds = {"rome": ing["rome_seconds"], "r-rome": ing["rome_seconds"], "emmet": ing["emmet_seconds"]}
            for name, dW in forms.items():
                undo = applied(h, args.layer, dW)
                try:
                    ev = evaluation(model, [edit], pre)
                finally:
                    undo.restore()
                write("single", {"key": f"{data}/{index}/{name}", "data": data, "index": index, "editor": name,
                                 "layer": args.layer, "update_norm": float(dW.norm()), "seconds": seconds[name],
                                 "pre": summary(pre), **summary(ev)})
            for name, lr in LOCFT.items():
                t0 = time.perf_counter()
                with LocFTBF(model, args.layer, lr=lr, epochs=25, progress=False) as ft:
                    fit = ft.fit([edit])
                    s = time.perf_counter() - t0
                    norm = float(ft.delta.double().norm())
                    ev = evaluation(model, [edit], pre)
                write("single", {"key": f"{data}/{index}/{name}", "data": data, "index": index, "editor": name,
                                 "layer": args.layer, "update_norm": norm, "seconds": s, "converged": fit.converged,
                                 "epochs": len(fit.history), "pre": summary(pre), **summary(ev)})
            print(f"{data} {index}: done", flush=True)
        key = f"{data}/batch/emmet-batch"
        if key not in done:
            edits = [e for _, e in chosen]
            ings = [ingredients(h, args.layer, data, i, e, C) for i, e in chosen]
            dW = emmet_update(C, torch.stack([g["emmet_key"] for g in ings]), torch.stack([g["emmet_residual"] for g in ings]),
                              mom2_update_weight=EMMET_HPARAMS["mom2_update_weight"],
                              emmet_lambda=EMMET_HPARAMS["emmet_lambda"], update_norm_lambda=EMMET_HPARAMS["update_norm_lambda"])
            pre = evaluation(model, edits, None)
            undo = applied(h, args.layer, dW)
            try:
                ev = evaluation(model, edits, pre)
            finally:
                undo.restore()
            write("single", {"key": key, "data": data, "index": None, "editor": "emmet-batch", "layer": args.layer,
                             "n_edits": len(edits), "update_norm": float(dW.norm()),
                             "seconds": sum(g["emmet_seconds"] for g in ings), "pre": summary(pre), **summary(ev)})


# --------------------------------------------------------------------------- part: ablation


def part_ablation(model: Any, h: Any, args: argparse.Namespace) -> None:
    done = read("ablation")
    for tokens in ABLATION_TOKENS:
        C = second_moment(h, args.layer, tokens=tokens, progress=True)
        for data in ("counterfact", "zsre"):
            for index, edit in pick(data, args.n, args.seed):
                path = cache_dir() / f"{data}-{index}-L{args.layer}.pt"
                if not path.exists():
                    print(f"ablation: {data} {index} has no cached keys/values: run --part single first", flush=True)
                    continue
                if all(f"{tokens}/{data}/{index}/{n}" in done for n in ("rome", "r-rome", "emmet")):
                    continue
                pre = evaluation(model, [edit], None, full=False)
                for name, dW in closed_forms(torch.load(path), C).items():
                    undo = applied(h, args.layer, dW)
                    try:
                        ev = evaluation(model, [edit], pre, full=False)
                    finally:
                        undo.restore()
                    write("ablation", {"key": f"{tokens}/{data}/{index}/{name}", "tokens": tokens, "data": data,
                                       "index": index, "editor": name, "update_norm": float(dW.norm()), **summary(ev)})


# --------------------------------------------------------------------------- part: sequential


def rewrite_so_far(model: Any, edits: list[Any]) -> float:
    ev = gl.evaluate(model, edits, generation=False, progress=False)
    return float(ev.teacher_forced["reliability"])


def part_sequential(model: Any, h: Any, args: argparse.Namespace) -> None:
    C = second_moment(h, args.layer, tokens=MOM2_TOKENS, progress=True)
    edits = [e for _, e in pick("counterfact", args.seq, args.seed + 1)]
    texts = heldout_texts()
    with using(h):
        base = text_loss(h, texts)
    for cls in (ROME, RROME):
        name = cls.method.lower()
        done = read("sequential")
        site = h[args.layer]
        w0 = site.parameter.detach().clone()
        with cls(model, args.layer, covariance=C, progress=False) as ed:
            start = 0
            for t in range(len(edits)):  # replay the cached updates of the finished steps
                f = cache_dir() / f"seq-{name}-{args.seed + 1}-L{args.layer}-{t}.pt"
                if f"{name}/{t}" not in done or not f.exists():
                    break
                applied(h, args.layer, torch.load(f))  # the editor's own undo still restores W0 on exit
                start = t + 1
            if start:
                print(f"{name}: resumed after {start} edits", flush=True)
            for t in range(start, len(edits)):
                before = site.parameter.detach().clone()
                t0 = time.perf_counter()
                r = ed.fit([edits[t]])
                s = time.perf_counter() - t0
                dW = site.parameter.detach().double() - before.double()
                torch.save(dW.float(), cache_dir() / f"seq-{name}-{args.seed + 1}-L{args.layer}-{t}.pt")
                with using(h):
                    loss = text_loss(h, texts)
                rec = {"key": f"{name}/{t}", "editor": name, "step": t, "update_norm": r.update_norms[0],
                       "drift": float((site.parameter.detach().double() - w0.double()).norm()),
                       "heldout_loss": loss, "heldout_change": loss - base, "seconds": s,
                       "rewrite_this": rewrite_so_far(model, [edits[t]]), "final_nll": r.final_nll[0]}
                if (t + 1) % 4 == 0 or t == len(edits) - 1:
                    rec["rewrite_so_far"] = rewrite_so_far(model, edits[: t + 1])
                write("sequential", rec)
                print(f"{name} edit {t}: ‖ΔW‖ {rec['update_norm']:.3g}, held-out {loss:.3f} ({loss - base:+.3f})", flush=True)
        if not torch.equal(site.parameter.detach(), w0):
            raise SystemExit(f"{name}: the weight was not restored after the sequential run")


# --------------------------------------------------------------------------- part: report


def ci(values: list[float], seed: int = 0) -> str:
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return "n/a"
    if len(x) == 1:
        return f"{x[0]:.3f}"
    boot = np.random.default_rng(seed).choice(x, (10_000, len(x))).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{x.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def _get(r: dict[str, Any], *path: str) -> float | None:
    for p in path:
        if r is None:
            return None
        r = r.get(p)
    return r  # type: ignore[return-value]


SINGLE_COLUMNS = (("rewrite TF", ("teacher_forced", "reliability")), ("rewrite gen", ("generation", "reliability")),
                  ("paraphrase TF", ("teacher_forced", "generalization")),
                  ("paraphrase gen", ("generation", "generalization")), ("locality TF", ("teacher_forced", "locality")),
                  ("fluency", ("fluency",)), ("held-out Δloss", ("general", "lm_loss_change")),
                  ("‖ΔW‖", ("update_norm",)), ("s", ("seconds",)))


def report_single(recs: list[dict[str, Any]], layer: int) -> list[str]:
    lines = []
    for data in ("counterfact", "zsre"):
        rs = [r for r in recs if r["data"] == data and r["editor"] != "emmet-batch"]
        if not rs:
            continue
        n = len({r["index"] for r in rs})
        lines += [f"### {data}: {n} edits, each alone at layer {layer} (mean [95% bootstrap interval over edits])", "",
                  "| editor | " + " | ".join(c for c, _ in SINGLE_COLUMNS) + " |", "|---" * (len(SINGLE_COLUMNS) + 1) + "|"]
        pre = {r["index"]: r["pre"] for r in rs}
        lines.append("| unedited | " + " | ".join(ci([_get(p, *path) for p in pre.values()]) if path[0] in
                                                 ("teacher_forced", "generation", "fluency") else "—"
                                                 for _, path in SINGLE_COLUMNS) + " |")
        for name in ("rome", "r-rome", "emmet", *LOCFT):
            mine = [r for r in rs if r["editor"] == name]
            if mine:
                lines.append(f"| {name} | " + " | ".join(ci([_get(r, *path) for r in mine]) for _, path in SINGLE_COLUMNS) + " |")
        for r in recs:
            if r["data"] == data and r["editor"] == "emmet-batch":
                lines.append(f"| EMMET, all {r['n_edits']} at once | " + " | ".join(
                    "—" if _get(r, *path) is None else f"{_get(r, *path):.3f}" for _, path in SINGLE_COLUMNS) + " |")
        lines.append("")
    return lines


def report_ablation(recs: list[dict[str, Any]]) -> list[str]:
    if not recs:
        return []
    cols = (("rewrite", ("teacher_forced", "reliability")), ("paraphrase", ("teacher_forced", "generalization")),
            ("locality", ("teacher_forced", "locality")), ("held-out Δloss", ("general", "lm_loss_change")),
            ("‖ΔW‖", ("update_norm",)))
    lines = ["| C tokens | editor | edits | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for tokens in ABLATION_TOKENS:
        for name in ("rome", "r-rome", "emmet"):
            mine = [r for r in recs if r["tokens"] == tokens and r["editor"] == name]
            if mine:
                lines.append(f"| {tokens:,} | {name} | {len(mine)} | "
                             + " | ".join(ci([_get(r, *p) for r in mine]) for _, p in cols) + " |")
    return lines + [""]


def report_sequential(recs: list[dict[str, Any]]) -> list[str]:
    by = {m: sorted((r for r in recs if r["editor"] == m), key=lambda r: r["step"]) for m in ("rome", "r-rome")}
    steps = max((len(v) for v in by.values()), default=0)
    if not steps:
        return []
    lines = ["| edit | ROME ‖ΔW‖ | ROME ‖W−W₀‖ | ROME held-out Δloss | ROME rewrite so far | "
             "R-ROME ‖ΔW‖ | R-ROME ‖W−W₀‖ | R-ROME held-out Δloss | R-ROME rewrite so far |", "|---" * 9 + "|"]
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    for t in range(steps):
        row = [str(t + 1)]
        for m in ("rome", "r-rome"):
            r = by[m][t] if t < len(by[m]) else {}
            row += [f(r.get("update_norm")), f(r.get("drift")), f(r.get("heldout_change")), f(r.get("rewrite_so_far"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plot(single: list[dict[str, Any]], seq: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for m, c in (("rome", "C3"), ("r-rome", "C0")):
        rs = sorted((r for r in seq if r["editor"] == m), key=lambda r: r["step"])
        if rs:
            ax[0].plot([r["step"] + 1 for r in rs], [r["update_norm"] for r in rs], "o-", color=c, label=m)
            ax[1].plot([r["step"] + 1 for r in rs], [r["heldout_change"] for r in rs], "o-", color=c, label=m)
    ax[0].set(xlabel="sequential edit", ylabel="‖ΔW‖ of the update", yscale="log", title="update norm")
    ax[1].set(xlabel="sequential edit", ylabel="held-out loss change (nats)", title="held-out loss")
    names = ("rome", "r-rome", "emmet", *LOCFT)
    for k, data in enumerate(("counterfact", "zsre")):
        vals = [np.nanmean([_get(r, "teacher_forced", "reliability") or 0 for r in single
                            if r["data"] == data and r["editor"] == n] or [np.nan]) for n in names]
        ax[2].bar(np.arange(len(names)) + 0.4 * k, vals, 0.4, label=data)
    ax[2].set_xticks(np.arange(len(names)) + 0.2, names, rotation=30, fontsize=8)
    ax[2].set(ylabel="rewrite (teacher-forced)", title="single edits")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.parent / "rome_study.png", dpi=110)


def part_report(args: argparse.Namespace) -> None:
    if args.model != "smollm2":
        global OUT
        OUT = Path(os.environ.get("ROME_STUDY_OUT", "/tmp/rome_study_smoke"))
    single, abl, seq = (list(read(p).values()) for p in ("single", "ablation", "sequential"))
    lines = [f"# ROME / R-ROME / EMMET / LocFT-BF on SmolLM2-135M-Instruct, layer {args.layer}", "",
             "Generated by `python benchmarks/rome_study.py --part report` from `benchmarks/results/rome_study/*.jsonl`.",
             f"Regimes: ROME / R-ROME with EasyEdit's llama3.2-1b hyper-parameters ({ROME_HPARAMS}), EMMET with "
             f"{ {k: v for k, v in EMMET_HPARAMS.items() if k not in ROME_HPARAMS or ROME_HPARAMS[k] != v} }; "
             f"C over {MOM2_TOKENS:,} tokens of the model's own seeded samples (ablation below); LocFT-BF one edit, "
             "25 epochs, Adam, loss threshold 1e-2, at lr 5e-4 (GradRatio-Select's) and 5e-3. CPU, float32.",
             "TF = teacher-forced token accuracy; gen = greedy generation exact match; locality against the unedited "
             "model; fluency = ROME's weighted bi/tri-gram entropy of 100-token greedy generations from the edit prompt; "
             "held-out Δloss = change of the mean next-token NLL on the 16 held-out paragraphs (nats); "
             "s = seconds of the edit (ROME/R-ROME: keys + v* + update, shared by both; C and templates excluded).", "",
             "## Single edits, side by side", ""]
    lines += report_single(single, args.layer) or ["(not run yet)", ""]
    lines += ["## ROME's collapse under sequential edits, against R-ROME", ""]
    lines += report_sequential(seq) or ["(not run yet)", ""]
    lines += ["## Covariance size (C over 10k / 50k / 200k sampled tokens)", ""]
    lines += report_ablation(abl) or ["(not run yet)", ""]
    (OUT.parent / "rome_study.md").write_text("\n".join(lines) + "\n")
    (OUT.parent / "rome_study.json").write_text(json.dumps({"single": single, "ablation": abl, "sequential": seq},
                                                           indent=1, default=float))
    plot(single, seq)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("single", "ablation", "sequential", "report"), required=True)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--n", type=int, default=8, help="edits per data set (single, ablation)")
    ap.add_argument("--seq", type=int, default=16, help="sequential edits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2", help="gradlocate.models.load_model name (tiny-llama: a smoke test)")
    args = ap.parse_args()
    if args.part == "report":
        return part_report(args)
    if args.model != "smollm2":
        os.environ["GRADLOCATE_CACHE"] = "/tmp/rome_study_smoke/cache"
        for name in ("ROME_HPARAMS", "EMMET_HPARAMS"):  # a smoke test: short v*, short templates
            globals()[name] = {**globals()[name], "v_num_grad_steps": 3, "context_template_length_params": ((4, 5),)}
    torch.set_num_threads(args.threads)
    if args.model != "smollm2":  # a smoke test must not write into the committed records
        global OUT
        OUT = Path(os.environ.get("ROME_STUDY_OUT", "/tmp/rome_study_smoke"))
    model, _ = gl.models.load_model(args.model)
    h = gl.down_projections(model)
    {"single": part_single, "ablation": part_ablation, "sequential": part_sequential}[args.part](model, h, args)


if __name__ == "__main__":
    main()

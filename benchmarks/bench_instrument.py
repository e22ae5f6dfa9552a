"""Benchmark: the matrix's instrument (metrics version 2) against the version-1 scorer, and
its values against a plain PyTorch forward of the edited weight.

For each data set and layer, the single-edit matrix is filled with LocFT-BF on a few edits
(``matrix(..., out=folder)``: the cells as a study writes them); each chunk's weight changes
are kept, and the chunk is scored again, alternating, by

* the version-1 scorer (:func:`v1_scores`, the code of ``score_per_sample`` before the
  instrument: one edited teacher-forced forward per prompt, token accuracy only), and
* :func:`gradlocate.golden.instrument.instrument` (per prompt and token: accuracy,
  log-probability, the old answer's log-probabilities and the margin, KL at the locality
  positions; one more edited forward per old-answer row, one unedited per locality prompt).

Checks (exit 1 after writing if one fails): the token-accuracy aggregates of the two agree;
on two cells per data set every stored log-probability, margin and KL equals a plain
forward (the site's weight + delta, ``model(...).logits``, ``log_softmax``) to 1e-4 relative
to max(1, |value|) (the records keep 6 significant digits).

Also reported: the bytes per cell record (and the new sections' share), per 96 x 30 folder.
Time is process CPU time (one torch thread); wall time beside it.

Run (from the checkout root):  python -m benchmarks.bench_instrument [--n 32 --layers 22 --reps 3]
Writes benchmarks/results/instrument/instrument.json and instrument.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradlocate as gl
from gradlocate.editors.executors import row_delta
from gradlocate.evaluation import _queries, locality_reference
from gradlocate.golden import matrix as matrix_module
from gradlocate.golden.instrument import instrument
from gradlocate.golden.matrix import edit_id, matrix
from gradlocate.golden.table import MATRIX_METRICS
from gradlocate.interventions import edited, no_cache, run, using
from gradlocate.losses import IGNORE, logits_of, tokenize_edits
from gradlocate.state import input_device

RESULTS = Path(__file__).resolve().parent / "results" / "instrument"


@torch.no_grad()
def v1_scores(h: Any, layer: int, edits: Any, delta: torch.Tensor, reference: list[list[list[int]]],
              batch_size: int = 32) -> dict[str, list[float | None]]:
    """``score_per_sample`` of metrics version 1, verbatim: token accuracy only."""
    qs = _queries(edits)
    batch = tokenize_edits(h.require_tokenizer(), [q.prompt for q in qs], [q.answer for q in qs],
                           chat=h.chat).to(input_device(h.root))
    owner = torch.tensor([q.edit for q in qs])
    preds: list[list[int]] = []
    with using(h):
        for rows in torch.arange(len(batch)).split(batch_size):
            mb = batch[rows.to(batch.input_ids.device)]
            kw = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **no_cache(h.root))
            d = delta[owner[rows].to(delta.device)]
            with edited(h, h[layer].path, lambda x, o: o + row_delta(x, d)):
                out = run(h, **kw)
            pred = logits_of(out)[:, :-1].argmax(-1).cpu()
            for p_row, l_row in zip(pred, mb.labels[:, 1:].cpu()):
                preds.append(p_row[l_row != IGNORE].tolist())
    per: list[dict[str, list[float]]] = [{} for _ in edits]
    for k, q in enumerate(qs):
        target = batch.labels[k, 1:][batch.labels[k, 1:] != IGNORE].tolist()
        want = reference[q.edit][q.item] if q.kind == "locality" else target
        per[q.edit].setdefault(q.kind, []).append(sum(a == b for a, b in zip(want, preds[k])) / len(preds[k]))
    return {m: [sum(d[m]) / len(d[m]) if d.get(m) else None for d in per] for m in MATRIX_METRICS}


def _plain(model: Any, tok: Any, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = tokenize_edits(tok, [prompt], [answer])
    with torch.no_grad():
        logits = model(input_ids=b.input_ids).logits[0, :-1].float()
    keep = b.labels[0, 1:] != IGNORE
    return logits.log_softmax(-1)[keep], b.labels[0, 1:][keep]


def _rel(got: Any, want: torch.Tensor) -> float:
    """The largest difference relative to max(1, |want|): stored values have 6 significant digits."""
    g = torch.as_tensor(got, dtype=torch.float32)
    return float(((g - want).abs() / want.abs().clamp_min(1.0)).max())


def plain_check(model: Any, tok: Any, weight: torch.Tensor, delta: torch.Tensor, e: Any, rec: dict[str, Any]) -> float:
    """The largest difference (relative to max(1, |value|)) between the record's values and a
    plain forward with ``weight + delta``: log-probabilities, the margin, KL."""
    before = [_plain(model, tok, p, a)[0] for p, a in e.locality]
    weight += delta
    try:
        diffs = []
        lp, ids = _plain(model, tok, e.prompt, e.target_new)
        new = lp.gather(-1, ids[:, None])[:, 0]
        rw = rec["prompts"]["rewrite"][0]
        diffs.append(_rel(rw["logprob"], new))
        if e.old_answer is not None:
            olp, oids = _plain(model, tok, e.prompt, e.old_answer)
            diffs.append(_rel([rw["margin"]], (new.mean() - olp.gather(-1, oids[:, None])[:, 0].mean())[None]))
        for k, (p, a) in enumerate(e.locality):
            lp, _ = _plain(model, tok, p, a)
            ref = before[k]
            got = rec["prompts"]["locality"][k]
            diffs.append(_rel(got["kl"], (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)))
            diffs.append(_rel(got["logprob"], lp.gather(-1, ref.argmax(-1)[:, None])[:, 0]))
        return max(diffs)
    finally:
        weight -= delta


def _timed(fn: Any) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def bench(model: Any, tok: Any, source: str, n: int, layers: list[int], reps: int) -> dict[str, Any]:
    edits = gl.load_edits(source, n=n)
    h = gl.down_projections(model)
    kept: dict[tuple[int, tuple[str, ...]], tuple[Any, torch.Tensor]] = {}
    real = matrix_module.per_edit_deltas

    def keep(name: str, hh: Any, layer: int, part: Any, *a: Any, **k: Any) -> Any:
        d, s = real(name, hh, layer, part, *a, **k)
        kept[(layer, tuple(edit_id(e) for e in part))] = (part, d)
        return d, s

    folder = Path(tempfile.mkdtemp()) / source
    matrix_module.per_edit_deltas = keep
    try:
        m = matrix(h, edits, layers=layers, out=folder, capability_edits=0, progress=False)
    finally:
        matrix_module.per_edit_deltas = real
    ref = locality_reference(h, edits, generation=False).tokens
    ids = [edit_id(e) for e in edits]
    recs = {(r["edit"], r["layer"]): (r, len(line.encode()))
            for f in (folder / "cells").glob("*.jsonl") for line in f.read_text().splitlines()
            for r in [json.loads(line)]}
    rows, agree, worst = [], True, 0.0
    for (layer, part_ids), (part, delta) in kept.items():
        pref = [ref[ids.index(e)] for e in part_ids]
        t1, t2 = [], []
        for _ in range(reps):
            t1.append(_timed(lambda: v1_scores(h, layer, part, delta, pref)))
            t2.append(_timed(lambda: instrument(h, layer, part, delta, pref)))
        old, new = v1_scores(h, layer, part, delta, pref), instrument(h, layer, part, delta, pref)
        agree &= all(old[mt][i] == new[i]["scores"][mt] or abs(old[mt][i] - new[i]["scores"][mt]) < 1e-6
                     for mt in MATRIX_METRICS for i in range(len(part)) if old[mt][i] is not None)
        train = sum(recs[(e, layer)][0]["timings"]["train"] for e in part_ids) / len(part_ids)
        k = len(part)
        rows.append({"data": source, "layer": layer, "cells": k, "train_s_per_cell": train,
                     "v1_cpu_s_per_cell": float(np.median([c for c, _ in t1])) / k,
                     "v2_cpu_s_per_cell": float(np.median([c for c, _ in t2])) / k,
                     "v1_wall_s_per_cell": float(np.median([w for _, w in t1])) / k,
                     "v2_wall_s_per_cell": float(np.median([w for _, w in t2])) / k})
    for (eid, layer), (rec, _) in list(recs.items())[:2]:
        part, delta = next(v for (l, p), v in kept.items() if l == layer and eid in p)
        row = [edit_id(e) for e in part].index(eid)
        worst = max(worst, plain_check(model, tok, h[layer].weight, delta[row].to(h[layer].weight.dtype),
                                       part[row], rec))
    sizes = [b for _, b in recs.values()]
    extra = [len(json.dumps({k: r[k] for k in ("continuous", "prompts")})) for r, _ in recs.values()]
    return {"rows": rows, "accuracy_agrees": bool(agree), "plain_max_abs_diff": worst,
            "bytes_per_cell": float(np.mean(sizes)), "new_sections_bytes_per_cell": float(np.mean(extra)),
            "golden": m.golden()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="edits per data set (the matrix's default chunk: 32)")
    ap.add_argument("--layers", default="22")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gradlocate.models import smollm2

    model, tok = smollm2()
    layers = [int(x) for x in args.layers.split(",")]
    out = {"model": "SmolLM2-135M-Instruct", "editor": "locft (defaults)", "n": args.n, "layers": layers,
           "reps": args.reps, "machine": platform.platform(), "torch": torch.__version__,
           "data": {s: bench(model, tok, s, args.n, layers, args.reps) for s in ("counterfact", "zsre")}}
    checks = {f"{s}: accuracy aggregates equal version 1": d["accuracy_agrees"] for s, d in out["data"].items()}
    checks.update({f"{s}: plain forward within 1e-4 (relative)": d["plain_max_abs_diff"] < 1e-4 for s, d in out["data"].items()})
    out["checks"] = checks
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instrument.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "instrument.md").write_text(_markdown(out))
    print(_markdown(out))
    return 0 if all(checks.values()) else 1


def _markdown(out: dict[str, Any]) -> str:
    lines = [f"# The matrix's instrument: scoring cost and record size\n",
             f"{out['model']}, {out['editor']}, {out['n']} edits per data set, layers {out['layers']}, one CPU thread, "
             f"median of {out['reps']} alternating repetitions (process CPU time; wall in brackets). "
             f"`python -m benchmarks.bench_instrument`.\n",
             "| data | layer | cells | train s/cell (wall) | v1 score s/cell | v2 instrument s/cell | v2 / v1 (CPU) | score share of cell (v2, wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s, d in out["data"].items():
        for r in d["rows"]:
            share = r["v2_wall_s_per_cell"] / (r["train_s_per_cell"] + r["v2_wall_s_per_cell"])
            lines.append(f"| {s} | {r['layer']} | {r['cells']} | {r['train_s_per_cell']:.3f} | "
                         f"{r['v1_cpu_s_per_cell']:.4f} ({r['v1_wall_s_per_cell']:.4f}) | "
                         f"{r['v2_cpu_s_per_cell']:.4f} ({r['v2_wall_s_per_cell']:.4f}) | "
                         f"{r['v2_cpu_s_per_cell'] / r['v1_cpu_s_per_cell']:.2f} | {share:.1%} |")
    lines += ["", "| data | bytes per cell record | of which continuous + prompts | per 96 x 30 folder |",
              "|---|---:|---:|---:|"]
    for s, d in out["data"].items():
        lines.append(f"| {s} | {d['bytes_per_cell']:.0f} | {d['new_sections_bytes_per_cell']:.0f} | "
                     f"{d['bytes_per_cell'] * 96 * 30 / 2**20:.2f} MiB |")
    lines += ["", "Checks: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in out["checks"].items()),
              "", "Plain-forward max difference (relative to max(1, |value|)): " + ", ".join(f"{s} {d['plain_max_abs_diff']:.2e}"
                                                                  for s, d in out["data"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

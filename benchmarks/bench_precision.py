"""Benchmark: do gradratio and lga pick the same layer on SmolLM2-135M in bfloat16 as
in float32? (gradlocate accumulates losses, gradients and scores in float32 whatever
the model's dtype.)

Three runs of each selector on the same ``--n-edits`` ZsRE edits (and, for gradratio,
``--n-retain`` built-in retain texts cut to 128 tokens):

* ``float32``: the model as loaded;
* ``bfloat16``: the model cast to bfloat16 (what a user with a bf16 checkpoint runs);
* ``float32 (bf16 weights)``: float32 compute on the bfloat16-rounded weights, which
  separates the effect of rounding the weights from that of computing in bfloat16.

Reported: selected layer, the largest relative score difference to the float32 run
(over layers, relative to that layer's float32 score, and relative to the largest
|score|), Spearman's rank correlation of the per-layer scores with float32's, and wall
time (single thread, ``torch.set_num_threads(1)``, one run each: the subject is
agreement, not speed).

The edit loss is gradlocate's default (EOS appended after each target).

Check: each run selects the same layer as the float32 run; the script exits with status
1 after writing its results if one does not.

Run:  python benchmarks/bench_precision.py [--n-edits 8 --n-retain 16]
Writes benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(selector, model, tok, edits, texts):
    import gradlocate as gl

    t0 = time.perf_counter()
    if selector == "gradratio":
        r = gl.gradratio(model, edits, texts, tokenizer=tok, progress=False)
    else:
        r = gl.lga(model, edits, tokenizer=tok, progress=False)
    return r, time.perf_counter() - t0


def compare_scores(got, ref):
    from gradlocate.golden.compare import spearman

    scale = max(abs(s) for s in ref.scores)
    rel = [abs(a - b) / abs(b) for a, b in zip(got.scores, ref.scores) if b != 0]
    return {
        "selected": got.selected,
        "same_layer": got.selected == ref.selected,
        "max_rel_diff": max(rel),
        "median_rel_diff": sorted(rel)[len(rel) // 2],
        "max_diff_over_max_abs": max(abs(a - b) for a, b in zip(got.scores, ref.scores)) / scale,
        "spearman": spearman(got.scores, ref.scores),
        "selected_score_rank_in_float32": ref.ranking().index(got.selected) if got.selected in ref.ranking() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-edits", type=int, default=8)
    ap.add_argument("--n-retain", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gradlocate as gl
    from gradlocate.models import smollm2

    model, tok = smollm2(verbose=False)
    edits = gl.load_edits("zsre", n=args.n_edits)
    texts = gl.default_retain_texts(args.n_retain)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    rounded = copy.deepcopy(bf16).to(torch.float32)
    models = {"float32": model, "bfloat16": bf16, "float32 (bf16 weights)": rounded}

    results = {}
    for selector in ("gradratio", "lga"):
        runs = {}
        for name, m in models.items():
            r, t = run(selector, m, tok, edits, texts)
            runs[name] = (r, t)
            print(f"{selector:9s} {name:24s} selected {r.selected:2d}  {t:6.1f} s", flush=True)
        ref = runs["float32"][0]
        results[selector] = {
            name: {**compare_scores(r, ref), "time_s": t, "scores": [float(s) for s in r.scores]}
            for name, (r, t) in runs.items()
        }
        results[selector]["eligible"] = list(ref.eligible)

    checks = {f"{sel} {name}: same layer as float32": r["same_layer"]
              for sel, runs in results.items() for name, r in runs.items() if name not in ("eligible", "float32")}
    out = {"model": "SmolLM2-135M-Instruct", "n_edits": args.n_edits, "n_retain": args.n_retain,
           "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "results": results, "checks": checks}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "precision.json").write_text(json.dumps(out, indent=1))
    (HERE / "results" / "precision.md").write_text(markdown(out))
    print(markdown(out))
    failed = [k for k, v in checks.items() if not v]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def markdown(out) -> str:
    lines = [f"# Precision: float32 vs bfloat16 on {out['model']}", "",
             f"{out['n_edits']} ZsRE edits (edit loss with EOS, the default); gradratio with {out['n_retain']} built-in retain texts (128 tokens); "
             f"{out['threads']} thread(s), torch {out['torch']}. Scores accumulated in float32 in every run.", "",
             "| selector | run | selected layer | same as float32 | max rel. score diff | median rel. diff | "
             "max diff / max score | Spearman ρ | time (s) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for sel, runs in out["results"].items():
        for name, r in runs.items():
            if name == "eligible":
                continue
            rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.4f}"
            lines.append(f"| {sel} | {name} | {r['selected']} | {'yes' if r['same_layer'] else 'no'} | "
                         f"{r['max_rel_diff']:.2e} | {r['median_rel_diff']:.2e} | {r['max_diff_over_max_abs']:.2e} | "
                         f"{rho} | {r['time_s']:.1f} |")
    lines += ["", "Relative differences are per layer, against the float32 run's score of that layer "
              "(LGA scores near zero make the max relative difference large; the column scaled by the "
              "largest |score| is the robust one).", "",
              "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in out.get("checks", {}).items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

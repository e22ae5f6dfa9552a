"""Benchmark: the sample-wise sweep at one layer against one dataset-level LocFT-BF run
of the same edits there, and against brute force (one LocFT-BF run per edit).

Target: training N edits each alone at one layer, all at once with per-row weight
changes (``gradlocate.editors.locft_rows.train_per_sample``), costs at most 2x one dataset-level
``LocFTBF(...).fit`` of the same N edits at that layer (brute force costs about N x).
Check: each row equals the single-edit LocFT-BF run of its edit (relative Frobenius
difference of the final weights <= 1e-5 at LocFT-BF's default lr 5e-4; measured with
``loss_threshold=0`` so both take the same discrete decisions), on ``--n-check`` of the
edits. At the timed lr the difference is reported too: Adam normalises each element's
gradient, so rounding-level gradient differences move near-zero-gradient elements by up
to ±lr, and the gap grows with lr.

SmolLM2-135M, ZsRE edits (records from ``--offset``), single thread, the same trainer
settings for every run (``--lr``, ``--epochs``, threshold 0 so every epoch trains: the
work is identical whatever converges when). Medians of ``--repeats`` alternating runs.

Run:  python benchmarks/bench_samplewise.py [--n 32 --layers 22,8 --epochs 10 --repeats 3]
Writes benchmarks/results/samplewise.json and samplewise.md; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

import gradlocate as gl
from gradlocate.editors.locft_rows import train_per_sample

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--layers", default="22,8")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-check", type=int, default=4)
    ap.add_argument("--offset", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    model, tok = gl.models.smollm2(verbose=False)
    h = gl.down_projections(model, tokenizer=tok)
    edits = gl.load_edits("zsre", n=args.n, offset=args.offset)
    trainer = {"lr": args.lr, "epochs": args.epochs, "loss_threshold": 0.0}
    rows, checks = [], {}
    for layer in [int(x) for x in args.layers.split(",")]:
        w0 = h[layer].weight.clone()
        times = {"per_sample": [], "dataset": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            delta, _ = train_per_sample(h, layer, edits, **trainer)
            times["per_sample"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with gl.LocFTBF(h, layer, progress=False, **trainer) as ft:
                r = ft.fit(edits)
            times["dataset"].append(time.perf_counter() - t)
        single_times, diffs, diffs_default = [], [], []
        default = {**trainer, "lr": 5e-4}
        delta_default, _ = train_per_sample(h, layer, gl.data.as_edits(edits[:args.n_check]), **default)
        for i in range(args.n_check):  # brute force, on a few edits: one run per edit
            t = time.perf_counter()
            with gl.LocFTBF(h, layer, progress=False, **trainer) as ft:
                ft.fit([edits[i]])
                single = h[layer].weight.clone()
            single_times.append(time.perf_counter() - t)
            diffs.append(float((w0 + delta[i] - single).norm() / single.norm()))
            with gl.LocFTBF(h, layer, progress=False, **default) as ft:
                ft.fit([edits[i]])
                single = h[layer].weight.clone()
            diffs_default.append(float((w0 + delta_default[i] - single).norm() / single.norm()))
        assert torch.equal(h[layer].weight, w0)
        med = {k: statistics.median(v) for k, v in times.items()}
        brute = statistics.mean(single_times) * args.n
        rows.append({"layer": layer, "n": args.n, "per_sample_s": med["per_sample"], "dataset_s": med["dataset"],
                     "ratio": med["per_sample"] / med["dataset"], "brute_force_s": brute,
                     "brute_ratio": brute / med["dataset"], "edits_per_step": r.edits_per_step,
                     "cache_mode": r.cache_mode, "max_rel_diff": max(diffs),
                     "max_rel_diff_default_lr": max(diffs_default), "times": times})
        checks[f"layer {layer}: rows equal single-edit runs at lr 5e-4 (<= 1e-5)"] = max(diffs_default) <= 1e-5
        print(f"layer {layer}: per-sample {med['per_sample']:.1f}s, dataset-level {med['dataset']:.1f}s, ratio "
              f"{med['per_sample'] / med['dataset']:.2f}; brute force ~{brute:.0f}s; max rel diff {max(diffs):.1e} "
              f"(lr 5e-4: {max(diffs_default):.1e})",
              flush=True)
    targets = {f"layer {r['layer']}: per-sample <= 2x dataset-level": r["ratio"] <= 2 for r in rows}
    out = {"model": "SmolLM2-135M-Instruct", "machine": f"{platform.machine()}, torch {torch.__version__}",
           "threads": 1, "trainer": trainer, "repeats": args.repeats, "rows": rows, "checks": checks,
           "targets": targets, "total_s": time.perf_counter() - t_all}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "samplewise.json").write_text(json.dumps(out, indent=1))
    md = ["# Sample-wise sweep vs dataset-level LocFT-BF (benchmarks/bench_samplewise.py)", "",
          f"SmolLM2-135M-Instruct, float32, CPU ({out['machine']}), 1 thread; {args.n} ZsRE edits; lr {args.lr:g}, "
          f"{args.epochs} epochs, loss threshold 0 (every epoch trains: the same work whatever converges); median "
          f"of {args.repeats} alternating runs. Brute force = the mean single-edit run x {args.n} "
          f"(measured on {args.n_check} edits). Total benchmark time {out['total_s']:.0f} s.", "",
          "| layer | edits | per-sample sweep s | one dataset-level run s | **ratio** (target <= 2) | brute force s "
          f"| brute / dataset-level | max rel. diff to single runs, lr {args.lr:g} / 5e-4 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['n']} | {r['per_sample_s']:.1f} | {r['dataset_s']:.1f} | **{r['ratio']:.2f}** "
                  f"| {r['brute_force_s']:.0f} | {r['brute_ratio']:.1f} | {r['max_rel_diff']:.1e} / "
                  f"{r['max_rel_diff_default_lr']:.1e} |")
    md += ["", "Targets (reported, not checked): " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                                             for k, v in targets.items()),
           "", "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items())]
    (RESULTS / "samplewise.md").write_text("\n".join(md) + "\n")
    failed = [k for k, v in checks.items() if not v]
    if failed:
        print("FAILED checks:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()

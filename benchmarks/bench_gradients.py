"""Benchmark: gradlocate's gradratio and lga against plain-PyTorch implementations of
the same computations, side by side on SmolLM2-135M with ZsRE edits.

* gradratio vs a plain forward+backward (``loss.backward()`` into ``.grad`` of the 30
  down-projection weights, same micro-batches). Target: time ratio <= 1.2.
* lga vs the straightforward per-sample loop (two forward+backward passes per edit,
  every per-sample weight gradient materialised). Target: time ratio <= 0.5.

Both must select the same layer as the plain computation, scores within 1e-3 relative
(the agreement checks: the script exits with status 1 if one fails; the time-ratio
targets are reported in the json/md but do not fail the run).

The plain references score the bare target (no EOS), GradRatio's and LGA's published
edit loss; gradlocate's edit loss appends EOS by default, so ``gradratio`` and ``lga``
are called with ``append_eos=False`` here: both sides compute the same loss.

Data: ``--n-edits`` ZsRE edits (``load_edits("zsre")``, records 0..n-1); retain texts are
ZsRE locality questions with their answers ("nq question: ... <answer>") from records
1000 onwards, ``--retain-join`` of them concatenated per text (1 by default: short
texts; GradRatio's paper uses 128-token general text, see ``--retain-join 8``).

Timing: single-threaded (``torch.set_num_threads(1)``) so the ratio is fair on a shared
machine; the four variants run alternately ``--repeats`` times, medians reported.
Peak memory: each variant runs once more in a fresh subprocess; the number is the
rise of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident size just before the call.

Run:  python benchmarks/bench_gradients.py [--n-edits 8 --n-retain 16 --repeats 3]
Writes benchmarks/results/gradients.json and gradients.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain_gradratio", "gradratio", "plain_lga", "lga")


# --------------------------------------------------------------------------- data


def load_data(n_edits: int, n_retain: int, join: int):
    from gradlocate import load_edits

    edits = load_edits("zsre", n=n_edits)
    pool = load_edits("zsre", n=n_retain * join, offset=1000)
    pairs = [f"{q} {a}" for e in pool for q, a in e.locality[:1]]
    texts = [" ".join(pairs[i * join:(i + 1) * join]) for i in range(n_retain)]
    return edits, texts


# --------------------------------------------------------------------------- plain PyTorch references


def down_weights(model):
    return [layer.mlp.down_proj.weight for layer in model.model.layers]


def pad_rows(rows, labels, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], mask[i, :len(r)], lab[i, :len(l)] = torch.tensor(r), 1, torch.tensor(l)
    return ids, mask, lab


def edit_rows(tok, prompts, targets):
    rows, labels = [], []
    for p, t in zip(prompts, targets):
        pi = tok(p)["input_ids"]
        ti = tok(" " + t, add_special_tokens=False)["input_ids"]
        rows.append(pi + ti)
        labels.append([-100] * len(pi) + ti)
    return rows, labels


def nll_sums(logits, labels):
    """Per-row sum of next-token NLL over labelled tokens, and their count."""
    logp = logits[:, :-1].float().log_softmax(-1)
    tgt = labels[:, 1:]
    m = tgt != -100
    nll = -logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * m
    return nll.sum(1), m.sum(1)


class only_down_grads:
    """requires_grad only on the down-projection weights, eval mode; restored after."""

    def __init__(self, model):
        self.model, self.ws = model, down_weights(model)

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in self.ws:
            w.requires_grad_(True)
        return self.ws

    def __exit__(self, *exc):
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)
            p.grad = None


def plain_gradratio(model, tok, edits, texts, batch_size, l_min):
    with only_down_grads(model) as ws:
        rows, labels = edit_rows(tok, [e.prompt for e in edits], [e.target_new for e in edits])
        for s in range(0, len(rows), batch_size):
            ids, mask, lab = pad_rows(rows[s:s + batch_size], labels[s:s + batch_size], tok.pad_token_id)
            tot, cnt = nll_sums(model(input_ids=ids, attention_mask=mask).logits, lab)
            ((tot / cnt).sum() / len(rows)).backward()
        g_edit = [w.grad.clone() for w in ws]
        for w in ws:
            w.grad = None
        rows = [tok(t)["input_ids"][:128] for t in texts]
        n_tok = sum(len(r) - 1 for r in rows)
        for s in range(0, len(rows), batch_size):
            ids, mask, lab = pad_rows(rows[s:s + batch_size], rows[s:s + batch_size], tok.pad_token_id)
            tot, _ = nll_sums(model(input_ids=ids, attention_mask=mask).logits, lab)
            (tot.sum() / n_tok).backward()
        g_ret = [w.grad for w in ws]
        e = [float((g.double() ** 2).sum()) for g in g_edit]
        r = [float((g.double() ** 2).sum()) for g in g_ret]
        cos = [float((a.double() * b.double()).sum()) / math.sqrt(x * y) for a, b, x, y in zip(g_edit, g_ret, e, r)]
    scores = [x / y for x, y in zip(e, r)]
    sel = max(range(l_min, len(scores)), key=lambda l: scores[l])
    return {"scores": scores, "selected": sel, "cos": cos}


def plain_lga(model, tok, edits, fence=1.5):  # lga's default k
    with only_down_grads(model) as ws:
        per = []
        for e in edits:
            grads = []
            for target in (e.target_new, e.old_answer):
                rows, labels = edit_rows(tok, [e.prompt], [target])
                ids, mask, lab = pad_rows(rows, labels, tok.pad_token_id)
                tot, cnt = nll_sums(model(input_ids=ids, attention_mask=mask).logits, lab)
                grads.append(torch.autograd.grad((tot / cnt).sum(), ws))
            per.append([float(torch.dot(a.flatten(), b.flatten())) for a, b in zip(*grads)])
    s = np.asarray(per).sum(0)
    q1, q3 = np.quantile(s, [0.25, 0.75])
    inside = (s >= q1 - fence * (q3 - q1)) & (s <= q3 + fence * (q3 - q1))
    sel = int(np.flatnonzero(inside)[np.argmax(s[inside])])
    return {"scores": s.tolist(), "selected": sel, "inside": inside.tolist()}


# --------------------------------------------------------------------------- runner


def run_variant(name, model, tok, edits, texts, batch_size):
    import gradlocate.selectors as sel

    l_min = sel.adaptive_min_layer(len(down_weights(model)))
    if name == "plain_gradratio":
        return plain_gradratio(model, tok, edits, texts, batch_size, l_min)
    if name == "plain_lga":
        return plain_lga(model, tok, edits)
    if name == "gradratio":
        r = sel.gradratio(model, edits, texts, tokenizer=tok, batch_size=batch_size, append_eos=False, progress=False)
        return {"scores": r.scores, "selected": r.selected, "cos": r.extras["cos"]}
    r = sel.lga(model, edits, tokenizer=tok, batch_size=batch_size, append_eos=False, progress=False)
    return {"scores": r.scores, "selected": r.selected, "inside": r.eligible}


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_probe(args) -> None:
    """Run one variant once in this (fresh) process; print the peak RSS rise in MiB."""
    model, tok, edits, texts = setup(args)
    # Warm-up: page in the memory-mapped weights and first-call buffers, which would
    # otherwise count as this variant's memory.
    run_variant(args.memory_probe, model, tok, edits[:1], texts[:1], args.batch_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kb("VmRSS")
    run_variant(args.memory_probe, model, tok, edits, texts, args.batch_size)
    print(json.dumps({"peak_mib": (rss_kb("VmHWM") - base) / 1024}))


def probe(variant, args, n_edits, n_retain) -> float:
    """Peak memory rise (MiB) of one run of ``variant`` in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS
    cmd = [sys.executable, __file__, "--memory-probe", variant, "--n-edits", str(n_edits),
           "--n-retain", str(n_retain), "--retain-join", str(args.retain_join),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def setup(args):
    torch.set_num_threads(args.threads)
    from gradlocate.models import smollm2

    model, tok = smollm2(verbose=False)
    edits, texts = load_data(args.n_edits, args.n_retain, args.retain_join)
    return model, tok, edits, texts


def rel_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-edits", type=int, default=8)
    ap.add_argument("--n-retain", type=int, default=16)
    ap.add_argument("--retain-join", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--out", default=str(HERE / "results" / "gradients.json"))
    ap.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args)
        return

    model, tok, edits, texts = setup(args)
    retain_tokens = sum(min(128, len(tok(t)["input_ids"])) for t in texts)
    edit_tokens = [len(tok(e.prompt)["input_ids"]) + len(tok(" " + e.target_new, add_special_tokens=False)["input_ids"])
                   for e in edits]
    print(f"SmolLM2: {len(edits)} ZsRE edits ({np.mean(edit_tokens):.1f} tokens each), {len(texts)} retain texts "
          f"({retain_tokens} tokens), batch {args.batch_size}, {args.threads} thread(s)", flush=True)

    for v in VARIANTS:  # warm-up (first-call costs: nnsight, allocator)
        run_variant(v, model, tok, edits[:2], texts[:2], args.batch_size)
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    results = {}
    for rep in range(args.repeats):
        order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            results[v] = run_variant(v, model, tok, edits, texts, args.batch_size)
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        print(f"repeat {rep}: " + ", ".join(f"{v} {times[v][-1]:.2f}s wall / {cpu[v][-1]:.2f}s cpu" for v in VARIANTS),
              flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}

    memory, memory_scaled = {}, {}
    if not args.no_memory:
        for v in VARIANTS:
            memory[v] = probe(v, args, args.n_edits, args.n_retain)
            print(f"peak memory {v}: {memory[v]:.1f} MiB", flush=True)
        # Micro-batching bounds memory: 4x the edits and retain texts, same batch size.
        for v in VARIANTS:
            memory_scaled[v] = probe(v, args, 4 * args.n_edits, 4 * args.n_retain)
            print(f"peak memory {v} with 4x data: {memory_scaled[v]:.1f} MiB", flush=True)

    gr, pgr, lg, plg = (results[k] for k in ("gradratio", "plain_gradratio", "lga", "plain_lga"))
    h = model.model.layers[0].mlp.down_proj.weight
    d_model, d_mlp = h.shape
    t_max = max(edit_tokens)
    report = {
        "model": "SmolLM2-135M-Instruct (30 layers, d_model 576, d_mlp 1536), float32, CPU",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "threads": args.threads, "n_edits": len(edits), "n_retain": len(texts), "retain_tokens": retain_tokens,
        "retain_join": args.retain_join, "batch_size": args.batch_size, "repeats": args.repeats,
        "wall_s": times, "cpu_s": cpu, "median_wall_s": med, "median_cpu_s": med_cpu,
        "ratio_gradratio_vs_plain": med_cpu["gradratio"] / med_cpu["plain_gradratio"],
        "ratio_lga_vs_per_sample_loop": med_cpu["lga"] / med_cpu["plain_lga"],
        "ratio_wall_gradratio_vs_plain": med["gradratio"] / med["plain_gradratio"],
        "ratio_wall_lga_vs_per_sample_loop": med["lga"] / med["plain_lga"],
        "ratio_note": "ratios of median CPU times (single thread, process_time); wall-clock ratios alongside "
                      "(the 2-core machine is shared, so wall times carry other processes' load)",
        "targets": {"gradratio_vs_plain": 1.2, "lga_vs_per_sample_loop": 0.5},
        "gradratio": {"selected": gr["selected"], "plain_selected": pgr["selected"],
                      "max_rel_diff_scores": rel_diff(gr["scores"], pgr["scores"]),
                      "max_abs_diff_cos": float(np.max(np.abs(np.subtract(gr["cos"], pgr["cos"])))),
                      "scores": gr["scores"], "cos": gr["cos"]},
        "lga": {"selected": lg["selected"], "plain_selected": plg["selected"],
                "max_rel_diff_scores": rel_diff(lg["scores"], plg["scores"]),
                "max_diff_over_max_abs": float(np.max(np.abs(np.subtract(lg["scores"], plg["scores"])))
                                               / np.max(np.abs(plg["scores"]))),
                "same_fences": lg["inside"] == plg["inside"], "scores": lg["scores"]},
        "peak_memory_mib": memory,
        "peak_memory_mib_4x_data": memory_scaled,
        "memory_note": "rise of VmHWM over the RSS before one call, in a fresh process after a warm-up; "
                       "dominated by autograd's saved activations of one micro-batch and, for gradratio, "
                       "the float32 gradient buffers (2 x 30 x 576 x 1536 x 4 B = 212 MB)",
        "lga_memory_per_sample_layer_bytes": {
            "ghost (a and delta, longest edit, float32)": 4 * t_max * (d_mlp + d_model),
            "materialized per-sample gradient (float32)": 4 * d_mlp * d_model},
    }
    # Agreement checks (a failure exits with status 1) and speed targets (reported only).
    report["checks"] = {
        "gradratio_same_layer": gr["selected"] == pgr["selected"],
        "gradratio_scores_1e-3": report["gradratio"]["max_rel_diff_scores"] < 1e-3,
        "lga_same_layer": lg["selected"] == plg["selected"],
        "lga_scores_1e-3": report["lga"]["max_rel_diff_scores"] < 1e-3,
    }
    report["targets_met"] = {
        "gradratio_ratio_cpu_<=1.2": report["ratio_gradratio_vs_plain"] <= 1.2,
        "lga_ratio_cpu_<=0.5": report["ratio_lga_vs_per_sample_loop"] <= 0.5,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    failed = [k for k, v in report["checks"].items() if not v]
    if failed:
        print("FAILED checks: " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


def markdown(r) -> str:
    m, w, mem = r["median_cpu_s"], r["median_wall_s"], r["peak_memory_mib"]

    def row(name, ours, plain, ratio, target, sel, psel, diff):
        mm = f"{mem.get(ours, float('nan')):.0f} / {mem.get(plain, float('nan')):.0f}" if mem else "n/a"
        return (f"| {name} | {m[ours]:.2f} / {w[ours]:.2f} | {m[plain]:.2f} / {w[plain]:.2f} | "
                f"**{ratio:.2f}** / {w[ours] / w[plain]:.2f} (target {target}) | {mm} | {sel} / {psel} | {diff:.1e} |")

    return "\n".join([
        "# Gradient selectors vs plain PyTorch (benchmarks/bench_gradients.py)",
        "",
        f"{r['model']}; {r['machine']}; {r['threads']} thread; {r['n_edits']} ZsRE edits, "
        f"{r['n_retain']} retain texts ({r['retain_tokens']} tokens), batch {r['batch_size']}; "
        f"edit loss without EOS (append_eos=False, as the plain references); "
        f"median of {r['repeats']} alternating runs. Ratios: median CPU time (single thread) and wall time; "
        f"the machine is shared, so wall times include other processes' load.",
        "",
        "| method | ours (s, cpu / wall) | plain (s, cpu / wall) | time ratio (cpu / wall) | peak MiB ours / plain "
        "| layer ours / plain | max rel. score diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        row("gradratio vs plain fwd+bwd", "gradratio", "plain_gradratio", r["ratio_gradratio_vs_plain"], "<= 1.2",
            r["gradratio"]["selected"], r["gradratio"]["plain_selected"], r["gradratio"]["max_rel_diff_scores"]),
        row("lga vs per-sample loop", "lga", "plain_lga", r["ratio_lga_vs_per_sample_loop"], "<= 0.5",
            r["lga"]["selected"], r["lga"]["plain_selected"], r["lga"]["max_rel_diff_scores"]),
        "",
        (f"Peak memory (MiB) with 4x the edits and retain texts, same batch size, ours / plain: gradratio "
         f"{r['peak_memory_mib_4x_data']['gradratio']:.0f} / {r['peak_memory_mib_4x_data']['plain_gradratio']:.0f}, "
         f"lga {r['peak_memory_mib_4x_data']['lga']:.0f} / {r['peak_memory_mib_4x_data']['plain_lga']:.0f} "
         f"(set by the widest micro-batch, batch size x longest sequence, not by the number of sequences). "
         f"LGA stores per sample and layer "
         + ", ".join(f"{k}: {v / 1024:.0f} KiB" for k, v in r["lga_memory_per_sample_layer_bytes"].items()) + "."
         if r["peak_memory_mib_4x_data"] else ""),
        "",
        "Targets (reported, not checked): " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                                        for k, v in r["targets_met"].items()),
        "",
        "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()),
        "",
    ])


if __name__ == "__main__":
    main()

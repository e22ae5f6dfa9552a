"""Benchmark: gradlocate's causal_trace against a plain-hooks implementation of ROME's
``calculate_hidden_flow`` (one forward of 1 clean + ``samples`` corrupted rows per
(token, layer) cell, full logits), side by side on SmolLM2-135M with CounterFact prompts.

Both get the same explicit noise (3 x ROME's embedding std over 100 CounterFact
subjects, seeded), so the scores must agree within 1e-4 (and the answer, low and high
scores too): these are the checks, and the script exits with status 1 after writing
its results if one fails. Target (reported, not checked): causal_trace takes at most
1/3 of the baseline's time for ``kind="hidden"`` and ``kind="mlp"``.

Prompts: ``--n-prompts`` CounterFact records (default 2, records 4 and 8: one with the
subject first, "Henry Maudsley's occupation is", and one with it in the middle, "The
twin city of New York City is"). Layers: ``--layers`` (default ``5:30:10``: columns 5,
15, 25 of the 30, every token; the full model still runs, only fewer columns are
traced). These columns cost what the full grid costs per cell on average, for both
kinds: restoring layer l skips l + 1 blocks for ``hidden`` (mean over 5, 15, 25: as over
0..29) and max(0, l - 5) for ``mlp`` (0, 10, 20: mean 10, as over 0..29).

Timing: single-threaded (``torch.set_num_threads(1)``) on a shared machine; baseline
and causal_trace run alternately ``--repeats`` times per (prompt, kind), medians of the
per-repeat totals reported. Peak memory: each variant runs once more in a fresh
subprocess, on the first prompt; the number is the rise of the resident set's high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) over the resident size just before the call.

Run:  python benchmarks/bench_tracing.py [--repeats 3 --layers 5:30:10 --kinds hidden mlp]
Writes benchmarks/results/tracing.json and tracing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_RECORDS = (4, 8)
SAMPLES, WINDOW, NOISE_MULTIPLE, SEED = 10, 10, 3.0, 1
SCORE_TOL = 1e-4  # scores, low and high: max abs difference to the plain-hooks baseline
TARGET_RATIO = 1 / 3  # causal_trace's time over the baseline's (a target, not a check)

# SmolLM2 is a LLaMA: ROME's layername() for it, written by hand.
EMBED = "model.embed_tokens"
SITE = {"hidden": "model.layers.{}", "mlp": "model.layers.{}.mlp", "attn": "model.layers.{}.self_attn"}


# --------------------------------------------------------------------------- ROME, plain hooks


def rome_trace_with_patch(model, inp, patches, answer, s_range, noise):
    """ROME's trace_with_patch: row 0 clean, rows 1.. get the noise on the subject's
    embeddings; each (token, module) in ``patches`` is restored from row 0."""
    s0, s1 = s_range
    hooks = []

    def add_noise(m, a, out):
        out[1:, s0:s1] += noise.to(out.dtype)
        return out

    hooks.append(model.get_submodule(EMBED).register_forward_hook(add_noise))
    by_module: dict[str, list[int]] = {}
    for t, name in patches:
        by_module.setdefault(name, []).append(t)
    for name, toks in by_module.items():
        def restore(m, a, out, toks=toks):
            h = out[0] if isinstance(out, tuple) else out
            for t in toks:
                h[1:, t] = h[0, t]

        hooks.append(model.get_submodule(name).register_forward_hook(restore))
    try:
        logits = model(**inp).logits
    finally:
        for h in hooks:
            h.remove()
    return torch.softmax(logits[1:, -1, :].float(), dim=1).mean(dim=0)[answer]


def rome_hidden_flow(model, tok, prompt, s_range, noise, kind, layers, window=WINDOW):
    """ROME's calculate_hidden_flow restricted to the columns ``layers``."""
    n_layers = model.config.num_hidden_layers
    ids = tok(prompt)["input_ids"]
    rows = noise.shape[0] + 1
    inp = {"input_ids": torch.tensor([ids] * rows), "attention_mask": torch.ones(rows, len(ids), dtype=torch.long)}
    with torch.no_grad():
        probs = torch.softmax(model(**inp).logits[:, -1].float(), dim=1)
        answer = int(probs[0].argmax())
        high = float(probs[0, answer])
        low = float(rome_trace_with_patch(model, inp, [], answer, s_range, noise))
        grid = torch.zeros(len(ids), len(layers))
        for t in range(len(ids)):
            for c, l in enumerate(layers):
                if kind == "hidden":
                    patch = [(t, SITE[kind].format(l))]
                else:
                    patch = [(t, SITE[kind].format(j))
                             for j in range(max(0, l - window // 2), min(n_layers, l - (-window // 2)))]
                grid[t, c] = rome_trace_with_patch(model, inp, patch, answer, s_range, noise)
    return {"scores": grid, "low": low, "high": high, "answer": answer}


# --------------------------------------------------------------------------- setup


def setup(n_prompts: int):
    from gradlocate import load_edits
    from gradlocate.models import smollm2
    from gradlocate.trace.core import embedding_std, subject_token_range

    model, tok = smollm2(verbose=False)
    pool = load_edits("counterfact", n=100)
    std = embedding_std(model, [e.subject for e in pool], tokenizer=tok)
    records = list(DEFAULT_RECORDS[:n_prompts]) + list(range(20, 20 + max(0, n_prompts - len(DEFAULT_RECORDS))))
    prompts = []
    for i, r in enumerate(records):
        e = pool[r]
        s_range = subject_token_range(tok, e.prompt, e.subject)
        g = torch.Generator().manual_seed(SEED + i)
        noise = torch.randn(SAMPLES, s_range[1] - s_range[0], model.config.hidden_size, generator=g) * (NOISE_MULTIPLE * std)
        prompts.append({"record": r, "prompt": e.prompt, "subject": e.subject, "s_range": s_range, "noise": noise,
                        "n_tokens": len(tok(e.prompt)["input_ids"])})
    return model, tok, std, prompts


def run_variant(name, model, tok, p, kind, layers):
    from gradlocate.trace import causal_trace

    if name == "rome":
        return rome_hidden_flow(model, tok, p["prompt"], p["s_range"], p["noise"], kind, layers)
    r = causal_trace(model, p["prompt"], p["subject"], tokenizer=tok, kind=kind, noise=p["noise"], window=WINDOW,
                     layers=layers, progress=False)
    return {"scores": r.scores, "low": r.low_score, "high": r.high_score, "answer": r.answer, "stats": r.stats}


# --------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(args) -> None:
    torch.set_num_threads(1)
    model, tok, _, prompts = setup(args.n_prompts)
    layers = parse_layers(args.layers)
    p = prompts[args.prompt_index]
    with torch.no_grad():  # the same warm-up for both: one plain forward of the prompt
        model(torch.tensor([tok(p["prompt"])["input_ids"]]))
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    run_variant(args.variant, model, tok, p, args.kind, layers)
    print(json.dumps({"peak_rise_mib": max(0, _rss_kib("VmHWM") - before) / 1024}))


def measure_memory(args, variant, kind, prompt_index) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", "--variant", variant, "--kind", kind,
           "--prompt-index", str(prompt_index), "--layers", args.layers, "--n-prompts", str(args.n_prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_rise_mib"]
    print(out.stderr[-2000:], file=sys.stderr)
    return None


# --------------------------------------------------------------------------- main


def parse_layers(spec: str) -> list[int]:
    if ":" in spec:
        a, b, *c = (int(x) for x in spec.split(":"))
        return list(range(a, b, c[0] if c else 1))
    return [int(x) for x in spec.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--layers", default="5:30:10")
    ap.add_argument("--kinds", nargs="+", default=["hidden", "mlp"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "tracing"))
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    torch.set_num_threads(1)
    model, tok, std, prompts = setup(args.n_prompts)
    layers = parse_layers(args.layers)
    results = []
    for kind in args.kinds:
        times = {"rome": [0.0] * args.repeats, "ours": [0.0] * args.repeats}
        per_times = {name: [[0.0] * args.repeats for _ in prompts] for name in times}
        outputs: dict[str, list] = {"rome": [], "ours": []}
        for rep in range(args.repeats):
            order = ("rome", "ours") if rep % 2 == 0 else ("ours", "rome")
            for pi, p in enumerate(prompts):
                for name in order:
                    t0 = time.perf_counter()
                    out = run_variant(name, model, tok, p, kind, layers)
                    dt = time.perf_counter() - t0
                    times[name][rep] += dt
                    per_times[name][pi][rep] = dt
                    if rep == 0:
                        outputs[name].append(out)
            print(f"{kind} repeat {rep}: rome {times['rome'][rep]:.1f} s, causal_trace {times['ours'][rep]:.1f} s",
                  flush=True)
        per_prompt = []
        for pi, (p, a, b) in enumerate(zip(prompts, outputs["rome"], outputs["ours"])):
            st = b["stats"]
            m_rome, m_ours = (statistics.median(per_times[n][pi]) for n in ("rome", "ours"))
            per_prompt.append({
                "median_s": {"rome": m_rome, "ours": m_ours}, "ratio": m_ours / m_rome,
                "record": p["record"], "prompt": p["prompt"], "subject": p["subject"], "n_tokens": p["n_tokens"],
                "subject_range": list(p["s_range"]), "answer_same": a["answer"] == b["answer"],
                "max_abs_diff_scores": float((a["scores"] - b["scores"]).abs().max()),
                "abs_diff_low": abs(a["low"] - b["low"]), "abs_diff_high": abs(a["high"] - b["high"]),
                "score_range": [float(a["scores"].min()), float(a["scores"].max())],
                "low": a["low"], "high": a["high"], "stats": st,
            })
        med = {k: statistics.median(v) for k, v in times.items()}
        fw = sum(pp["stats"]["forwards"] for pp in per_prompt)
        fw_rome = sum(pp["stats"]["rome_forwards"] for pp in per_prompt)
        ev = sum(pp["stats"]["token_block_evals"] for pp in per_prompt)
        ev_rome = sum(pp["stats"]["rome_token_block_evals"] for pp in per_prompt)
        mem = {}
        if not args.no_memory:
            for name in ("rome", "ours"):  # on the first prompt
                mem[name] = measure_memory(args, name, kind, 0)
        results.append({
            "kind": kind, "median_s": med, "all_s": times, "ratio": med["ours"] / med["rome"],
            "max_abs_diff": max(pp["max_abs_diff_scores"] for pp in per_prompt),
            "forwards": fw, "rome_forwards": fw_rome, "forwards_saved": fw_rome - fw,
            "token_block_evals": ev, "rome_token_block_evals": ev_rome, "eval_ratio": ev / ev_rome,
            "peak_rss_rise_mib": mem, "prompts": per_prompt,
        })
    checks, targets = {}, {}
    for r in results:
        k = r["kind"]
        checks[f"{k}_answer_same"] = all(pp["answer_same"] for pp in r["prompts"])
        checks[f"{k}_scores_{SCORE_TOL:g}"] = r["max_abs_diff"] <= SCORE_TOL
        checks[f"{k}_low_high_{SCORE_TOL:g}"] = all(max(pp["abs_diff_low"], pp["abs_diff_high"]) <= SCORE_TOL
                                                    for pp in r["prompts"])
        targets[f"{k}_ratio_<=1/3"] = r["ratio"] <= TARGET_RATIO
    report = {
        "benchmark": "causal_trace vs plain-hooks ROME calculate_hidden_flow",
        "model": "SmolLM2-135M-Instruct (30 layers, d_model 576)", "samples": SAMPLES, "window": WINDOW,
        "noise": f"{NOISE_MULTIPLE} x embedding std over 100 CounterFact subjects = {NOISE_MULTIPLE * std:.5f}",
        "layers": layers, "repeats": args.repeats, "threads": 1, "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "results": results, "checks": checks, "targets_met": targets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    failed = [k for k, v in checks.items() if not v]
    if failed:
        print("FAILED checks: " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


def markdown(rep: dict) -> str:
    lines = [
        f"# causal_trace vs ROME (plain hooks), {rep['model']}", "",
        f"samples {rep['samples']}, window {rep['window']}, noise {rep['noise']}, layers {rep['layers']}, "
        f"all tokens; {rep['threads']} thread, median of {rep['repeats']} alternating repeats; torch {rep['torch']}.", "",
        "| kind | ROME s | causal_trace s | time ratio (target <= 0.333) | max abs diff | forwards (ROME -> ours) | token-block evals ratio | peak RSS rise MiB (ROME / ours) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rep["results"]:
        m = r["peak_rss_rise_mib"]
        mem = f"{m['rome']:.0f} / {m['ours']:.0f}" if m.get("rome") is not None and m.get("ours") is not None else "-"
        lines.append(
            f"| {r['kind']} | {r['median_s']['rome']:.1f} | {r['median_s']['ours']:.1f} | {r['ratio']:.3f} | "
            f"{r['max_abs_diff']:.1e} | {r['rome_forwards']} -> {r['forwards']} | {r['eval_ratio']:.3f} | {mem} |")
    lines += ["", "Per prompt:", ""]
    for r in rep["results"]:
        for p in r["prompts"]:
            lines.append(
                f"- {r['kind']}: {p['prompt']!r} (subject {p['subject']!r}, tokens {p['subject_range']} of "
                f"{p['n_tokens']}): {p['median_s']['rome']:.1f} s -> {p['median_s']['ours']:.1f} s, ratio "
                f"{p['ratio']:.3f}; max abs diff {p['max_abs_diff_scores']:.1e}, low {p['low']:.4f}, high "
                f"{p['high']:.4f}, forwards {p['stats']['rome_forwards']} -> {p['stats']['forwards']}, "
                f"cells before the subject {p['stats']['cells_before_subject']}")
    lines += ["", "Targets (reported, not checked): " + ", ".join(
        f"{k} {'met' if v else 'MISSED'}" for k, v in rep.get("targets_met", {}).items()),
              "", "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in rep.get("checks", {}).items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

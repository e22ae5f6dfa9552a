"""Second-moment statistics (ROME's ``mom2``) on SmolLM2-135M: gradlocate's collection beside
a plain-PyTorch loop, and the wall time of a first R-ROME edit on a fresh machine.

Run from the repository root (about 15 min on one CPU thread)::

    python benchmarks/bench_mom2.py                      # every part
    python benchmarks/bench_mom2.py --part sampler       # or text, fresh; then --part report

Writes ``benchmarks/results/mom2.{json,md}`` (each part merges its numbers into the JSON).

* ``sampler``: the model's own text, the offline default. gradlocate
  (:func:`gradlocate.editors.covariance.second_moment_stats`, ``corpus="sampled"``: 128 rows x
  64 tokens, a key/value cache, one traced forward per step, inverse-CDF sampling) against
  the plain loop a user would write: ``model.generate(do_sample=True, top_k=0, top_p=1,
  temperature=1)`` on the same 128 x 64 batch, with ``torch`` forward pre-hooks on the
  down-projections adding ``kᵀk`` of each step's new token (the BOS forward left out, as
  gradlocate leaves it out). Both compute the same work: 64 forwards per batch, 63 keys per
  row. Layer 6 alone, and every layer (the matrix's case).
* ``text``: real text (the built-in retain texts, about 12k tokens), forward-only, both sides
  stopped after layer 6's site (ROME's ``Trace(stop=True)``); the plain loop is ROME's
  ``layer_stats`` loop: pad a batch, hook, flatten the masked keys, add ``kᵀk``. The two
  results must agree to 1e-5 (relative Frobenius).
* ``size``: how R-ROME's update direction ``C⁻¹k / (kᵀC⁻¹k)`` for real edit keys moves when
  C comes from 10k or 20k sampled tokens instead of 50k (the default's justification).
* ``fresh``: ``python -m gradlocate edit --model smollm2 --edits counterfact_3k.json -n 2
  --layer 6 --editor r-rome`` with ``GRADLOCATE_CACHE`` an empty folder (the GGUF
  dequantized first), and again with the dequantized model already cached (statistics
  still to compute). The issue's target: under 3 minutes.

Timings alternate the two sides (A B A B) and report both wall and process CPU seconds: on a
shared machine the CPU seconds are the steadier number. One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS, LENGTH = 128, 64


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def plain_sampled(model, tok, sites, tokens, seed=0):
    """``generate`` + forward pre-hooks: ``Σ kᵀk`` of every generated token at ``sites``."""
    d = sites[0].in_features
    sums = [torch.zeros(d, d, dtype=torch.float64) for _ in sites]
    state = {"calls": 0, "n": 0}

    def hook(i):
        def fn(module, args):
            if state["calls"] >= len(sites):          # the first forward of a batch is the BOS: not text
                k = args[0][:, -1].float()
                sums[i] += (k.T @ k).double()
            state["calls"] += 1
        return fn

    handles = [s.register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    try:
        for b in range(math.ceil(tokens / (ROWS * (LENGTH - 1)))):
            torch.manual_seed(seed * 100_003 + b)
            state["calls"] = 0
            ids = torch.full((ROWS, 1), start)
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=LENGTH, min_new_tokens=LENGTH,
                           pad_token_id=tok.pad_token_id)
            state["n"] += ROWS * (LENGTH - 1)
    finally:
        for hd in handles:
            hd.remove()
    return [s / state["n"] for s in sums], state["n"]


class _Stop(Exception):
    pass


def plain_text(model, tok, sites, texts, tokens, rows=32, length=256):
    """ROME's ``layer_stats`` loop: batches of texts, hooks, masked keys, stop after the last site."""
    d = sites[0].in_features
    sums, keys, n = [torch.zeros(d, d, dtype=torch.float64) for _ in sites], {}, 0

    def hook(i):
        def fn(module, args):
            keys[i] = args[0]
            if i == len(sites) - 1:
                raise _Stop
        return fn

    handles = [s.register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)]
    texts = [t for t in texts if t.strip()]
    try:
        for i in range(0, len(texts), rows):
            enc = [tok(t)["input_ids"][:length] for t in texts[i:i + rows]]
            w = max(map(len, enc))
            ids = torch.tensor([e + [tok.pad_token_id] * (w - len(e)) for e in enc])
            mask = torch.tensor([[1] * len(e) + [0] * (w - len(e)) for e in enc])
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            take = min(int(mask.sum()), tokens - n)
            for j in range(len(sites)):
                k = keys[j][mask.bool()][:take].float()
                sums[j] += (k.T @ k).double()
            n += take
            if n >= tokens:
                break
    finally:
        for hd in handles:
            hd.remove()
    return [s / n for s in sums], n


def part_sampler(model, tok, args):
    from gradlocate.editors.covariance import second_moment_stats

    out = {}
    for name, layers, tokens in (("layer 6", [6], args.tokens), ("all 30 layers", list(range(30)), args.all_tokens)):
        sites = [model.model.layers[l].mlp.down_proj for l in layers]
        runs = {"gradlocate": [], "plain": []}
        for rep in range(args.reps):
            for side in (("gradlocate", "plain") if rep % 2 == 0 else ("plain", "gradlocate")):
                if side == "plain":
                    _, wall, cpu = timed(lambda: plain_sampled(model, tok, sites, tokens))
                else:
                    _, wall, cpu = timed(lambda: second_moment_stats(model, layers, tokens=tokens, cache=False,
                                                                     progress=False))
                runs[side].append({"wall": wall, "cpu": cpu, "tokens": tokens})
                print(f"sampler {name} {side}: {tokens / cpu:.0f} tok/s (CPU), {tokens / wall:.0f} tok/s (wall)",
                      flush=True)
        out[name] = summarise(runs)
    return out


def part_text(model, tok, args):
    from gradlocate.data import default_retain_texts
    from gradlocate.editors.covariance import second_moment_stats

    texts, tokens = default_retain_texts(), args.text_tokens
    site = model.model.layers[6].mlp.down_proj
    runs, res = {"gradlocate": [], "plain": []}, {}
    for rep in range(args.reps):
        for side in (("gradlocate", "plain") if rep % 2 == 0 else ("plain", "gradlocate")):
            if side == "plain":
                (C, n), wall, cpu = timed(lambda: plain_text(model, tok, [site], texts, tokens))
                res["plain"] = C[0]
            else:
                s, wall, cpu = timed(lambda: second_moment_stats(model, [6], tokens=tokens, corpus=texts,
                                                                 cache=False, progress=False))
                res["gradlocate"] = s[6].sum / s[6].count
            runs[side].append({"wall": wall, "cpu": cpu, "tokens": tokens})
            print(f"text {side}: {tokens / cpu:.0f} tok/s (CPU), {tokens / wall:.0f} tok/s (wall)", flush=True)
    out = summarise(runs)
    out["rel_diff"] = float((res["gradlocate"] - res["plain"]).norm() / res["plain"].norm())
    return {"layer 6": out}


def edit_keys(model, tok, layer, n):
    """The site input at the subject's last token of ``n`` CounterFact prompts (ROME's key, bare prompt)."""
    import gradlocate

    data = Path(os.environ.get("GRADLOCATE_DATA", ROOT.parent / "shared" / "data")) / "counterfact_3k.json"
    store, keys = {}, []
    hd = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: store.__setitem__("k", a[0][0].detach()))
    try:
        for e in gradlocate.load_edits(data, n=n):
            end = e.prompt.index(e.subject) + len(e.subject)
            with torch.no_grad():
                model(input_ids=torch.tensor([tok(e.prompt)["input_ids"]]), use_cache=False)
            keys.append(store["k"][len(tok(e.prompt[:end])["input_ids"]) - 1])
    finally:
        hd.remove()
    return torch.stack(keys).double()


def part_size(model, tok, args):
    """How R-ROME's update direction u = C⁻¹k / (kᵀC⁻¹k) moves with the tokens behind C (sampled
    text, layer 6), against C from the most tokens: ΔW = r uᵀ, so ‖ΔW‖ scales with ‖u‖."""
    from gradlocate.editors.covariance import second_moment

    sizes = sorted(args.sizes)
    K = edit_keys(model, tok, 6, 16)
    U = {}
    for n in sizes:
        C = second_moment(model, 6, tokens=n, progress=True).double()
        X = torch.linalg.solve(C, K.T).T                              # C⁻¹k per key
        U[n] = X / (K * X).sum(-1, keepdim=True)
    ref = U[sizes[-1]]
    out = {"reference_tokens": sizes[-1], "keys": len(K), "sizes": {}}
    for n in sizes[:-1]:
        rel = ((U[n] - ref).norm(dim=-1) / ref.norm(dim=-1))
        norm = U[n].norm(dim=-1) / ref.norm(dim=-1)
        out["sizes"][str(n)] = {"rel_change_median": float(rel.median()), "rel_change_max": float(rel.max()),
                                "norm_ratio_median": float(norm.median())}
        print(f"size {n}: u moves {float(rel.median()):.3f} (median, max {float(rel.max()):.3f}) from "
              f"{sizes[-1]}; ‖u‖ ratio {float(norm.median()):.3f}", flush=True)
    return out


def summarise(runs):
    out = {}
    for side, rs in runs.items():
        out[side] = {"tok_per_s_cpu": [r["tokens"] / r["cpu"] for r in rs],
                     "tok_per_s_wall": [r["tokens"] / r["wall"] for r in rs], "tokens": rs[0]["tokens"]}
    for kind in ("cpu", "wall"):
        out[f"ratio_{kind}"] = pooled(out["gradlocate"][f"tok_per_s_{kind}"]) / pooled(out["plain"][f"tok_per_s_{kind}"])
    return out


def pooled(rates):
    """Tokens per second over all runs together (each run the same tokens): n / Σ 1/rate."""
    return len(rates) / sum(1 / r for r in rates)


def part_fresh(args):
    """The CLI from nothing (empty cache), and with only the dequantized model cached."""
    data = Path(os.environ.get("GRADLOCATE_DATA", ROOT.parent / "shared" / "data")) / "counterfact_3k.json"
    from gradlocate.models import cache_dir

    model_cache = cache_dir() / "SmolLM2-135M-Instruct"
    out = {}
    for name in ("empty cache", "model cached"):
        with tempfile.TemporaryDirectory() as tmp:
            if name == "model cached":
                os.symlink(model_cache, Path(tmp) / "SmolLM2-135M-Instruct")
            cmd = [sys.executable, "-m", "gradlocate", "edit", "--model", "smollm2", "--edits", str(data), "-n", "2",
                   "--layer", "6", "--editor", "r-rome", "--json", str(Path(tmp) / "out.json")]
            env = {**os.environ, "GRADLOCATE_CACHE": tmp, "OMP_NUM_THREADS": str(args.threads)}
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            fit = json.loads((Path(tmp) / "out.json").read_text())["fit"]
            line = next((ln[ln.index("gradlocate: second"):] for ln in re.split(r"[\r\n]", p.stderr)
                         if "gradlocate: second moments of" in ln), None)
            out[name] = {"wall": wall, "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
                         "covariance_s": fit["timings"].get("covariance"), "timings": fit["timings"],
                         "cost_line": line}
            print(f"fresh, {name}: {wall:.0f} s wall, {out[name]['cpu']:.0f} s CPU; C {out[name]['covariance_s']:.0f} s;"
                  f" {line}", flush=True)
    return out


def markdown(res):
    env = res.get("environment", {})
    lines = ["# Second-moment statistics (mom2) on SmolLM2-135M", "",
             f"Machine: {env.get('machine', '?')}, torch {env.get('torch', '?')}, {env.get('threads', 1)} thread(s); "
             f"a shared machine: CPU seconds are the steadier measure. Produced by `python benchmarks/bench_mom2.py`.",
             *([f"Conditions: {env['note']}"] if env.get("note") else []), ""]
    for part, title in (("sampler", "The model's own text (offline default): gradlocate vs generate + hooks"),
                        ("text", "Real text, forward-only to layer 6: gradlocate vs ROME's layer_stats loop")):
        if part not in res:
            continue
        lines += [f"## {title}", "", "Each run's tokens/s (CPU seconds); the ratio is gradlocate's over the plain "
                  "loop's, pooled over the runs (total tokens / total seconds).", "",
                  "| sites | tokens | gradlocate tok/s (CPU) | plain tok/s (CPU) | ratio (CPU) | ratio (wall) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in res[part].items():
            g, p = r["gradlocate"], r["plain"]
            ratio = {k: pooled(g[f"tok_per_s_{k}"]) / pooled(p[f"tok_per_s_{k}"]) for k in ("cpu", "wall")}
            lines.append(f"| {name} | {g['tokens']:,} | {_list(g['tok_per_s_cpu'])} | {_list(p['tok_per_s_cpu'])} | "
                         f"{ratio['cpu']:.2f} | {ratio['wall']:.2f} |")
            if "rel_diff" in r:
                lines += ["", f"gradlocate's C and the plain loop's differ by {r['rel_diff']:.1e} (relative Frobenius)."]
        lines.append("")
    if "size" in res:
        r = res["size"]
        lines += ["## How many tokens", "", f"R-ROME's update is ΔW = r uᵀ with u = C⁻¹k / (kᵀC⁻¹k): how far u moves "
                  f"when C comes from fewer sampled tokens than {r['reference_tokens']:,} (layer 6, the subject-last "
                  f"keys of {r['keys']} CounterFact prompts; relative change ‖u_n − u_ref‖ / ‖u_ref‖, and ‖u‖'s ratio, "
                  f"which ‖ΔW‖ follows):", "", "| tokens | change of u (median) | (max) | ‖u‖ ratio (median) |",
                  "|---:|---:|---:|---:|"]
        for n, v in r["sizes"].items():
            lines.append(f"| {int(n):,} | {v['rel_change_median']:.3f} | {v['rel_change_max']:.3f} | "
                         f"{v['norm_ratio_median']:.3f} |")
        lines.append("")
    if "fresh" in res:
        lines += ["## First R-ROME edit from a fresh machine", "",
                  "`python -m gradlocate edit --model smollm2 --edits counterfact_3k.json -n 2 --layer 6 "
                  "--editor r-rome` (evaluation before and after included), `GRADLOCATE_CACHE` a new folder, "
                  f"{env.get('threads', 1)} thread(s); C is 20,000 sampled tokens (the default), its seconds wall. "
                  "On an idle machine the wall time is about the CPU time.", "",
                  "| cache | wall s | CPU s | of which C (s) |", "|---|---:|---:|---:|"]
        for name, r in res["fresh"].items():
            lines.append(f"| {name} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['covariance_s']:.0f} |")
        line = next((r["cost_line"] for r in res["fresh"].values() if r["cost_line"]), None)
        if line:
            lines += ["", f"The line printed before C: `{line}`"]
    return "\n".join(lines) + "\n"


def _list(xs):
    return " / ".join(f"{x:.0f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "sampler", "text", "size", "fresh", "report"])
    ap.add_argument("--sizes", type=lambda x: [int(v) for v in x.split(",")], default=[10_000, 20_000, 50_000],
                    help="token counts for --part size (the largest is the reference)")
    ap.add_argument("--tokens", type=int, default=ROWS * (LENGTH - 1), help="sampled tokens per run (layer 6)")
    ap.add_argument("--all-tokens", type=int, default=ROWS * (LENGTH - 1), help="sampled tokens per run (30 layers)")
    ap.add_argument("--text-tokens", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default=None, help="a remark on the conditions, printed under the machine line")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "mom2.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["environment"] = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": args.threads}
    if args.note:
        res["environment"]["note"] = args.note
    if args.part in ("all", "sampler", "text", "size"):
        from gradlocate.models import smollm2

        model, tok = smollm2(verbose=False)
        if args.part in ("all", "sampler"):
            res["sampler"] = part_sampler(model, tok, args)
        if args.part in ("all", "text"):
            res["text"] = part_text(model, tok, args)
        if args.part in ("all", "size"):
            res["size"] = part_size(model, tok, args)
    if args.part in ("all", "fresh"):
        res["fresh"] = part_fresh(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    (RESULTS / "mom2.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

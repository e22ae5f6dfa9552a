"""ROME's v* optimisation with what δ cannot change computed once (the frozen blocks,
and the positions before the subject), beside full forwards and a plain-PyTorch loop, on
SmolLM2-135M at a few layers.

Run from the repository root (about 10 min on one CPU thread)::

    python benchmarks/bench_value_cache.py --layers 0,14,28 --steps 10

Writes ``benchmarks/results/value_cache.{json,md}``.

The v* loss does not depend on the blocks below the edited layer, nor (on a
residual-additive block such as LLaMA's) on the edited block itself: their output is
computed once and each step runs only the blocks above
(:func:`gradlocate.editors.rank_one.optimise_value`, ``cache=True``, the default). Nor do the
positions before each prompt's subject-last token (causal attention): their keys and values
come from a cache computed once, and each step runs only the positions from δ on
(``reuse_prefix=True``, the default). Timed side by side, one edit, the same context
templates and ``--steps`` v* steps:

* ``prefix``: gradlocate, ``cache=True, reuse_prefix=True`` (the default);
* ``cached``: gradlocate, ``cache=True, reuse_prefix=False``;
* ``full``: gradlocate, ``cache=False`` (every step runs the whole model);
* ``plain``: ROME's computation in plain PyTorch (``bench_rome.plain_rome``: forward hooks,
  one prompt per forward, full logits), whose ΔW the others are checked against.

Checks (exit status 1 after writing if one fails): prefix, cached and full δ agree to
1e-5 (relative); the plain loop's ΔW and gradlocate's agree to 1e-4 (relative Frobenius).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def one_layer(h, model, tok, layer, edit, prefixes, C, hp):
    from bench_rome import plain_rome

    from gradlocate.editors.rank_one import optimise_value, rank_one, site_io, locate, subject_of

    kw = dict(steps=hp["v_num_grad_steps"], lr=hp["v_lr"], kl_factor=hp["kl_factor"],
              weight_decay=hp["v_weight_decay"], clamp_norm_factor=hp["clamp_norm_factor"])
    row = {"layer": layer}
    fits = {}
    for name, cache, prefix in (("full", False, False), ("cached", True, False), ("prefix", True, True)):
        t0, c0 = time.perf_counter(), time.process_time()
        fits[name] = optimise_value(h, layer, edit, prefixes, cache=cache, reuse_prefix=prefix, **kw)
        row[name] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "steps": len(fits[name].history)}
    t0, c0 = time.perf_counter(), time.process_time()
    d_plain = plain_rome(model, tok, layer, edit, prefixes, C, hp)
    row["plain"] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    b = fits["full"].delta
    for name in ("cached", "prefix"):
        row[f"rel_diff_{name}_full"] = float((fits[name].delta - b).norm() / b.norm().clamp_min(1e-12))
    K, O = site_io(h, layer, [locate(h.require_tokenizer(), p + edit.prompt, subject_of(edit), len(p)) for p in prefixes])
    v_star = fits["prefix"].v_star.double()
    d_lib = rank_one(C, K.mean(0), K[0], v_star - O[0].double())  # ROME's denominator and residual, as plain_rome
    row["rel_diff_plain"] = float((d_lib.double() - d_plain).norm() / d_plain.norm())
    row["ratio_cached_vs_full_cpu"] = row["cached"]["cpu"] / row["full"]["cpu"]
    row["ratio_prefix_vs_full_cpu"] = row["prefix"]["cpu"] / row["full"]["cpu"]
    row["ratio_prefix_vs_cached_cpu"] = row["prefix"]["cpu"] / row["cached"]["cpu"]
    row["ratio_prefix_vs_plain_cpu"] = row["prefix"]["cpu"] / row["plain"]["cpu"]
    print(json.dumps(row), flush=True)
    return row


def markdown(res) -> str:
    lines = [f"### v* with what δ cannot change computed once, SmolLM2-135M-Instruct ({res['n_layers']} layers)", "",
             f"{res['machine']}; 1 thread; one CounterFact edit ({res['edit']}), {len(res['prefixes'])} prompts "
             f"(ROME's context templates), at most {res['steps']} v* steps (early stop 0.05). *full*: every step runs "
             "the whole model; *cached*: the blocks below the edited layer (and the edited block) computed once; "
             "*prefix*: also the positions before each prompt's subject-last token (their keys and values cached), "
             "the default. Times are the v* optimisation for gradlocate and the whole ROME edit for the plain loop "
             "(its key pass included: one forward per prompt). CPU time is this process's own" +
             (f"; load average {res['load'][0]:.1f} at start, {res['load'][1]:.1f} at end." if "load" in res else "."), "",
             "| layer | steps | prefix s (cpu) | cached s (cpu) | full forwards s (cpu) | plain loop s (cpu) | "
             "**prefix / full** | prefix / cached | prefix / plain | δ cached vs full | δ prefix vs full | ΔW vs plain |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['layer']} | {r['prefix']['steps']} | {r['prefix']['cpu']:.1f} | {r['cached']['cpu']:.1f} | "
                     f"{r['full']['cpu']:.1f} | {r['plain']['cpu']:.1f} | **{r['ratio_prefix_vs_full_cpu']:.2f}** | "
                     f"{r['ratio_prefix_vs_cached_cpu']:.2f} | {r['ratio_prefix_vs_plain_cpu']:.2f} | "
                     f"{r['rel_diff_cached_full']:.1e} | {r['rel_diff_prefix_full']:.1e} | {r['rel_diff_plain']:.1e} |")
    tot = {k: sum(r[k]["cpu"] for r in res["rows"]) for k in ("prefix", "cached", "full", "plain")}
    lines += ["", f"All layers: full / prefix = **{tot['full'] / tot['prefix']:.2f}x**, cached / prefix = "
              f"{tot['cached'] / tot['prefix']:.2f}x, plain / prefix = {tot['plain'] / tot['prefix']:.1f}x (CPU seconds)."]
    checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in res["checks"].items())
    lines += ["", f"Checks: {checks}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,14,28")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mom2-tokens", type=int, default=2048, help="C only enters the ΔW check")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gradlocate
    from gradlocate.data import default_retain_texts
    from gradlocate.editors.covariance import second_moment
    from gradlocate.editors.rome import ROME
    from gradlocate.handles import resolve
    from gradlocate.models import smollm2

    load0 = os.getloadavg()[0]
    model, tok = smollm2(verbose=False)
    h = resolve(model, tokenizer=tok)
    edit = gradlocate.load_edits(gradlocate.data.shared_data_path("counterfact_3k.json"), n=1)[0]
    ed = ROME(model, 0, progress=False, v_num_grad_steps=args.steps)
    prefixes = [p for g in ed.templates() for p in g]
    rows = []
    for layer in (int(x) for x in args.layers.split(",")):
        C = second_moment(model, layer, tokens=args.mom2_tokens, corpus=default_retain_texts(), cache=False,
                          progress=False)
        rows.append(one_layer(h, model, tok, layer, edit, prefixes, C, ed.hp))
    res = {"machine": f"{platform.machine()}, torch {torch.__version__}", "n_layers": h.n_layers,
           "edit": f"{edit.prompt!r} -> {edit.target_new!r}", "prefixes": prefixes, "steps": args.steps, "rows": rows,
           "load": [load0, os.getloadavg()[0]],
           "checks": {"cached_matches_full_1e-5": all(r["rel_diff_cached_full"] <= 1e-5 for r in rows),
                      "prefix_matches_full_1e-5": all(r["rel_diff_prefix_full"] <= 1e-5 for r in rows),
                      "delta_matches_plain_1e-4": all(r["rel_diff_plain"] <= 1e-4 for r in rows)}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "value_cache.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "value_cache.md").write_text(markdown(res))
    print(markdown(res))
    if not all(res["checks"].values()):
        raise SystemExit(f"checks failed: {res['checks']}")


if __name__ == "__main__":
    main()

"""Selectors on a new-knowledge set: what each picks when the data has no old answers.

Takes CounterFact records (by default 24 from offset 2400, disjoint from the study's
edits) with every old answer removed (``ground_truth`` / ``pred`` dropped: prompt,
subject, target, rephrase and locality only), splits them as ``gradlocate compare`` does
(25% proxy, seed 0) and runs every selector on the proxy edits, with LGA under each
definition of the old answer (``old="greedy"``: the model's own greedy answer;
``old="eos"``: EasyEdit's convention, the EOS token) and each sign convention, with and
without the chat template (SmolLM2 is an instruct model). The model's greedy answers are
recorded so the "old answer" LGA used can be read.

The sweep that judges these picks is ``gradlocate compare`` on the same file (the
command is printed, and its JSON is read if present).

Run:  python benchmarks/new_knowledge.py            (about 10 minutes on one core)
Writes benchmarks/results/new_knowledge.{json,md} and the edit file
benchmarks/out/new_knowledge.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

import gradlocate as gl
from gradlocate.golden.compare import split_edits

RESULTS = ROOT / "benchmarks" / "results"
EDITS = ROOT / "benchmarks" / "out" / "new_knowledge.json"
COMPARE = RESULTS / "new_knowledge_compare.json"


def new_knowledge(n: int, offset: int) -> list[dict]:
    edits = gl.load_edits(gl.data.shared_data_path("counterfact_3k.json"), n=n, offset=offset)
    rows = []
    for e in edits:  # the fields a new-knowledge record has; no ground_truth, no pred
        r = {"prompt": e.prompt, "target_new": e.target_new, "subject": e.subject}
        if e.rephrase_prompts:
            r["rephrase_prompt"] = e.rephrase_prompts[0]
        if e.locality:
            r["locality_prompt"], r["locality_ground_truth"] = e.locality[0]
        rows.append(r)
    return rows


def top(scores: gl.LayerScores, k: int = 3) -> list[int]:
    """The k eligible layers ranked by what the selector maximises (LGA: its sign convention)."""
    return scores.ranking()[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--offset", type=int, default=2400)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = new_knowledge(args.n, args.offset)
    EDITS.parent.mkdir(parents=True, exist_ok=True)
    EDITS.write_text(json.dumps(rows, indent=1))
    proxy, test = split_edits(rows, 0.25, seed=0)
    model, tok = gl.models.smollm2()
    plain = gl.down_projections(model, tokenizer=tok)
    chat = gl.down_projections(model, tokenizer=tok, chat=True)
    prompts = [r["prompt"] for r in proxy]
    answers = {"plain": gl.selectors.greedy_answers(plain, prompts), "chat": gl.selectors.greedy_answers(chat, prompts)}
    eos = tok.eos_token

    picks = []

    def record(selector: str, template: str, fn) -> None:
        t = time.process_time()
        try:
            s = fn()
            picks.append({"selector": selector, "template": template, "layer": s.selected, "top3": top(s),
                          "cpu_s": round(time.process_time() - t, 1)})
        except Exception as exc:  # reported in its place; the rest still runs
            picks.append({"selector": selector, "template": template, "error": f"{type(exc).__name__}: {exc}"})
        print(picks[-1], flush=True)

    for name, h in (("plain", plain), ("chat", chat)):
        record("gradratio", name, lambda: gl.gradratio(h, proxy, gl.default_retain_texts(16)))
        for old in ("greedy", "eos"):
            for sign in ("signed", "negative", "abs"):
                record(f"lga old={old} sign={sign}", name, lambda: gl.lga(h, proxy, old=old, sign=sign))
        record("cma", name, lambda: gl.cma_layer(h, proxy))

    compare = json.loads(COMPARE.read_text()) if COMPARE.exists() else None
    out = {"n": len(rows), "offset": args.offset, "proxy": len(proxy), "test": len(test),
           "greedy_answers": answers, "eos_token": eos, "picks": picks, "compare": compare,
           "torch": torch.__version__}
    (RESULTS / "new_knowledge.json").write_text(json.dumps(out, indent=1, default=float))

    frac = {k: sum(a == eos for a in v) / len(v) for k, v in answers.items()}
    md = [f"# Selectors on a new-knowledge set (benchmarks/new_knowledge.py)", "",
          f"SmolLM2-135M-Instruct; {len(rows)} CounterFact records from offset {args.offset} with every old "
          f"answer removed; the selectors see the {len(proxy)} proxy edits (25%, seed 0) only.", "",
          f"The model's greedy answer (LGA's `old='greedy'`) is the EOS token for "
          f"{frac['plain']:.0%} of the proxy prompts without the chat template and {frac['chat']:.0%} with it.", "",
          "| selector | template | layer | top 3 (by what it maximises, eligible layers) | CPU s |", "|---|---|---|---|---|"]
    for p in picks:
        if "error" in p:
            md.append(f"| {p['selector']} | {p['template']} | error: {p['error']} | | |")
        else:
            md.append(f"| {p['selector']} | {p['template']} | **{p['layer']}** | {p['top3']} | {p['cpu_s']} |")
    if compare:
        md += ["", "The sweep on the test edits (`gradlocate compare ... --method all`, "
               f"{RESULTS.name}/{COMPARE.name}): golden layer **{compare.get('golden')}**.", ""]
        md += ["| selector | layer | regret | Spearman |", "|---|---|---|---|"]
        for r in compare.get("rows", []):
            def f(v):
                return "n/a" if v is None else f"{v:.3f}"
            md.append(f"| {r.get('selector')} | {r.get('layer') if r.get('error') is None else 'error: ' + r['error']} "
                      f"| {f(r.get('regret'))} | {f(r.get('spearman'))} |")
    md += ["", "Greedy answers, proxy prompts (plain / chat):", ""]
    for p, a, c in zip(prompts, answers["plain"], answers["chat"]):
        md.append(f"- {p!r}: {a!r} / {c!r}")
    (RESULTS / "new_knowledge.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nsweep: gradlocate compare --model smollm2 --edits {EDITS.relative_to(ROOT)} --method all "
          f"--proxy 0.25 --layers 0:30:6 --no-generation --lr 5e-3 --epochs 100 --json {COMPARE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""How many torch threads a gradlocate command should use: the same CLI command timed
with torch's default thread count (one per physical core) and with fewer, alternating
the settings so that a change in the machine's load hits each of them alike.

Run from the repository root (about 5 min on a 2-core machine)::

    python benchmarks/bench_threads.py                      # gradratio and lga, 2 rounds
    python benchmarks/bench_threads.py --methods lga --rounds 3 --threads 1,2

Each run is a fresh process (``python -m gradlocate select --model smollm2 --edits
$GRADLOCATE_DATA/zsre_3k.json -n 8 --method M``, model load included, as a user types
it) with ``GRADLOCATE_THREADS`` and ``OMP_NUM_THREADS`` set to the thread count under
test. The machine's 1-minute load average (``/proc/loadavg``) is recorded before every
run: on a shared machine the numbers are only comparable within one round.

Writes ``benchmarks/results/threads.{json,md}``. Check (exit status 1 after writing if
it fails): every setting selects the same layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
THREAD_VARS = ("GRADLOCATE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def torch_default_threads() -> int:
    """torch's own thread count in a fresh process with no thread variable set."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def one_run(method: str, threads: int, edits: str, n: int) -> dict:
    env = {**os.environ, "GRADLOCATE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "gradlocate", "select", "--model", "smollm2", "--edits", edits,
           "-n", str(n), "--method", method]
    load = loadavg()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    # The selected layers ("gradratio: layer 17   (3.1 s)"): the scores' last digits may
    # differ with the thread count (summation order), the choice must not.
    selected = dict(re.findall(r"^\s*(\w+): layer (\d+)", out.stdout, flags=re.M))
    return {"method": method, "threads": threads, "wall_s": round(wall, 2), "load_before": load,
            "selected": selected}


def summary_md(meta: dict, runs: list[dict]) -> str:
    lo, hi = min(meta["threads"]), max(meta["threads"])
    lines = ["# Threads: the same command at different torch thread counts", "",
             f"Machine: {meta['machine']}, {meta['cpus']} logical CPUs, shared with other jobs; torch's default "
             f"here: {meta['torch_default']} threads. Command: `{meta['command']}`.", "",
             "Wall seconds per run (a fresh process each, model load included), in the order run; "
             "the 1-minute load average before each run in brackets. Ratio: the total time with "
             f"{hi} threads over the total with {lo}.", "",
             "| method | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in meta["threads"])
             + f" | {hi} / {lo} threads |",
             "|---|" + "---|" * (len(meta["threads"]) + 1)]
    for method in meta["methods"]:
        cells, totals = [], {}
        for t in meta["threads"]:
            rs = [r for r in runs if r["method"] == method and r["threads"] == t]
            cells.append(", ".join(f"{r['wall_s']:.1f} [{r['load_before']}]" for r in rs))
            totals[t] = sum(r["wall_s"] for r in rs)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {totals[hi] / totals[lo]:.2f}x |")
    lines += ["", f"Check, the same layer selected at every thread count: {meta['checks']['same_output']}.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="gradratio,lga")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and torch's default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--edits", default=None, help="default: $GRADLOCATE_DATA/zsre_3k.json")
    ap.add_argument("--render", action="store_true", help="only rewrite threads.md from threads.json")
    args = ap.parse_args()
    if args.render:
        d = json.loads((RESULTS / "threads.json").read_text())
        (RESULTS / "threads.md").write_text(summary_md(d["meta"], d["runs"]))
        return 0
    data = os.environ.get("GRADLOCATE_DATA")
    edits = args.edits or (str(Path(data) / "zsre_3k.json") if data else None)
    if edits is None:
        raise SystemExit("give --edits FILE or set GRADLOCATE_DATA")
    default = torch_default_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default})
    methods = args.methods.split(",")
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for method in methods:
            order = threads if rnd % 2 == 0 else threads[::-1]
            for t in order:
                r = one_run(method, t, edits, args.n)
                print(f"round {rnd + 1} {method:9s} threads={t}: {r['wall_s']:6.1f} s (load {r['load_before']})",
                      flush=True)
                runs.append(r)
    same = all(len({json.dumps(r["selected"]) for r in runs if r["method"] == m}) == 1 for m in methods)
    same = same and all(r["selected"] for r in runs)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_default": default, "threads": threads, "methods": methods, "rounds": args.rounds,
            "command": f"python -m gradlocate select --model smollm2 --edits zsre_3k.json -n {args.n} --method M",
            "checks": {"same_output": same}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    (RESULTS / "threads.md").write_text(summary_md(meta, runs))
    print(summary_md(meta, runs))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

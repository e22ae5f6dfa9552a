"""The selectors over several proxy draws of each complete matrix (resumable, one command).

docs/results.md judges every selector on one proxy draw (seed 0, a quarter of the edits).
A pick can move with the draw, so this script draws more proxies of the same size (seeds
0 .. K-1; seed 0 is the page's own), runs the selectors on each (cached in
``<folder>/selections/draw<seed>-first<n>.jsonl``; seed 0 reads the page's
``first<n>.jsonl``), judges each draw on its own test rows
(:func:`gradlocate.golden.draws.over_draws`) and writes ``<folder>/proxy_draws.json``
after every draw; ``benchmarks/report.py`` shows it under the folder's judgment.

The selectors see only the model and the proxy edits, not the editor: folders of one model
whose first n edits are the same (LocFT-BF and R-ROME on the same CounterFact edits) share
each draw's selections, computed once and copied (the copy is checked by its fingerprint
when read).

    python benchmarks/proxy_draws.py --draws 8                      # every complete folder
    python benchmarks/proxy_draws.py --draws 8 --folders smollm2-counterfact-r-rome
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import MATRICES, edit_of, regime_of  # noqa: E402

from gradlocate.golden.draws import over_draws  # noqa: E402
from gradlocate.golden.judge import DAMAGE_THRESHOLD  # noqa: E402
from gradlocate.golden.load import load_matrix  # noqa: E402
from gradlocate.golden.study import select, split_rows  # noqa: E402

#: The selectors drawn by default: the papers' LGA, CMA and GradRatio with and without its l_min.
SELECTORS = ("lga", "cma", "gradratio", "gradratio (no l_min)")


def selection_file(folder: Path, seed: int, n: int) -> Path:
    return folder / "selections" / (f"first{n}.jsonl" if seed == 0 else f"draw{seed}-first{n}.jsonl")


def edit_ids(folder: Path, n: int) -> list[str]:
    return [r["id"] for r in json.loads((folder / "edits.json").read_text())["edits"][:n]]


def borrow(folder: Path, seed: int, n: int, model: str, others: list[Path]) -> bool:
    """Copy a draw's selections from a folder of the same model and first n edits, if one has it."""
    target = selection_file(folder, seed, n)
    if target.exists():
        return False
    for o in others:
        src = selection_file(o, seed, n)
        if o != folder and src.exists() and regime_of(o)["model"] == model and edit_ids(o, n) == edit_ids(folder, n):
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, target)
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    import gradlocate as gl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=8, help="proxy draws per folder (seeds 0 .. K-1)")
    ap.add_argument("--folders", default="", help="comma-separated matrix folder names (default: every complete one)")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=DAMAGE_THRESHOLD)
    args = ap.parse_args(argv)
    if args.draws < 1:
        raise SystemExit(f"--draws must be >= 1, got {args.draws}")
    torch.set_num_threads(1)
    names = [s.strip() for s in args.selectors.split(",") if s.strip()]
    wanted = [s for s in args.folders.split(",") if s]
    folders = sorted(p for p in MATRICES.glob("*") if (p / "edits.json").exists() and (not wanted or p.name in wanted))
    missing = set(wanted) - {p.name for p in folders}
    if missing:
        raise SystemExit(f"no matrix folder {sorted(missing)} under {MATRICES}")
    loaded, models = {}, {}
    for folder in folders:
        regime = regime_of(folder)
        m, done = load_matrix(folder, regime["n_layers"], editor=regime["editor"], hparams=regime["hparams"])
        if not done.done:
            print(f"{folder.name}: partial ({done}), skipped", flush=True)
            continue
        loaded[folder] = (regime, m)
    draws: dict[Path, list[Any]] = {f: [] for f in loaded}
    for seed in range(args.draws):
        for folder, (regime, m) in loaded.items():
            n = m.n_edits
            proxy = split_rows(n, max(1, n // 4), seed=seed)
            if borrow(folder, seed, n, regime["model"], list(loaded)):
                print(f"{folder.name} draw {seed}: selections copied from a folder with the same edits", flush=True)
            if regime["model"] not in models:
                models[regime["model"]] = gl.models.load_model(regime["model"])
            model, tok = models[regime["model"]]
            rows = json.loads((folder / "edits.json").read_text())["edits"]
            t0 = time.perf_counter()
            out = selection_file(folder, seed, n)
            out.parent.mkdir(exist_ok=True)
            picked = select(model, [edit_of(rows[i]) for i in proxy], None, names, out=out, tokenizer=tok,
                            progress=False)
            for k, e in picked.errors.items():
                print(f"{folder.name} draw {seed}: selector {k} could not run: {e}", flush=True)
            draws[folder].append((seed, proxy, picked.scores))
            d = over_draws(m, draws[folder], threshold=args.threshold, n_boot=args.n_boot)
            (folder / "proxy_draws.json").write_text(json.dumps({"selectors": names, **d.to_dict()}, indent=1))
            print(f"{folder.name} draw {seed} ({time.perf_counter() - t0:.0f} s): "
                  f"{ {k: s.selected for k, s in picked.scores.items()} }; {d!r}", flush=True)


if __name__ == "__main__":
    main()

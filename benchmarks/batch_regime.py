"""The batch regime beside a single-edit matrix: all of the matrix's test edits edited
**together** at each layer (LocFT-BF's own use: breadth-first mini-batches over the whole
set), scored per edit on the same teacher-forced metrics, with the held-out LM loss change.

The single-edit matrix asks "which layer is best for one edit?"; this asks "which layer is
best for editing this set at once?". Both use the matrix folder's model, editor and
hyper-parameters and the same test edits (the rows :func:`gradlocate.golden.study.split_rows`
does not make proxy, seed 0, as ``benchmarks/report.py`` splits them), so the two golden
layers are comparable; ``report.py`` puts them side by side.

Each finished layer is one record in ``<matrix>/batch/shard<K>of<N>.jsonl`` (a
:func:`gradlocate.sweep` store: resumable, refuses another regime's records).

Run (two processes on one machine):

    python benchmarks/batch_regime.py benchmarks/results/matrix/smollm2-counterfact-locft-lr5e-4 --shard 0/2 &
    python benchmarks/batch_regime.py benchmarks/results/matrix/smollm2-counterfact-locft-lr5e-4 --shard 1/2 &

Smoke test (a tiny matrix folder made by ``matrix.py --model tiny-llama``):
    python benchmarks/batch_regime.py /tmp/mx --epochs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gradlocate as gl  # noqa: E402
from gradlocate.golden.study import split_rows  # noqa: E402
from matrix import shard_layers  # noqa: E402
from report import edit_of, regime_of  # noqa: E402


def test_edits(folder: Path) -> tuple[list[Any], list[int]]:
    """The matrix's test edits (its rows that are not proxy) and their row numbers."""
    rows = json.loads((folder / "edits.json").read_text())["edits"]
    proxy = set(split_rows(len(rows), max(1, len(rows) // 4), seed=0))
    test = [i for i in range(len(rows)) if i not in proxy]
    return [edit_of(rows[i]) for i in test], test


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a matrix folder (its edits.json gives model, editor, hparams and edits)")
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th layer, starting at layer index K")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--epochs", type=int, default=None, help="override the regime's epochs (smoke tests only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    regime = regime_of(folder)
    hparams = dict(regime["hparams"])
    if args.epochs is not None:
        hparams["epochs"] = args.epochs
    edits, rows = test_edits(folder)
    extra = {"n_ctx": 1024} if regime["model"].startswith("tiny-") else {}
    model, tok = gl.models.load_model(regime["model"], **extra)
    every = list(range(regime["n_layers"])) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    layers, name = shard_layers(args.shard, every)
    out = folder / "batch" / f"{name}.jsonl"
    out.parent.mkdir(exist_ok=True)
    print(f"{regime['model']}: {len(edits)} test edits edited together with {regime['editor']} {hparams} at "
          f"layers {layers} -> {out}", flush=True)
    res = gl.sweep(model, edits, tokenizer=tok, layers=layers, editor=regime["editor"], trainer=hparams, out=out,
                   generation=False, capability=True, fluency=False, overall="edit-only", progress=True)
    for r in res.records:
        print(f"layer {r.layer}: {r.teacher_forced} lm_loss_change {r.general.get('lm_loss_change')} "
              f"converged {r.converged} error {r.error}", flush=True)


if __name__ == "__main__":
    main()

"""The single-edit matrix on a real model: every edit alone at every layer.

Reads ``--n`` edits of the shared ZsRE or CounterFact file (shuffled with ``--seed``; the
records used are written to ``<out>/edits.json`` with their index in the file), edits each
alone at each layer with ``--editor`` (:func:`gradlocate.golden.matrix.matrix`) and writes
one record per (edit, layer) cell to ``<out>/shard<K>of<N>.jsonl`` as each chunk
finishes. A re-run resumes from every shard in ``<out>``; ``--shard K/N`` takes every
N-th layer starting at layer index K, so N processes (or machines, their shard files
copied into one folder) split the work. A later run with a larger ``--n`` (same seed,
model and regime) grows the folder: its first edits are the old ones, whose cells are
kept. When every cell is in ``<out>``, the process that finishes last writes
``matrix.json`` and ``matrix.png`` there.

Run (two processes on one machine):

    python benchmarks/matrix.py --model smollm2 --data zsre --n 96 --shard 0/2 --out benchmarks/results/matrix/smollm2-zsre/ &
    python benchmarks/matrix.py --model smollm2 --data zsre --n 96 --shard 1/2 --out benchmarks/results/matrix/smollm2-zsre/ &

R-ROME (the LGA paper's editor; EasyEdit's settings unless ``--set``; every layer's C is
sampled once, in one pass, before the cells):

    python benchmarks/matrix.py --model smollm2 --data counterfact --n 16 --editor r-rome --set mom2_n_tokens=50000 \
        --layers 0,3,6,9,12,15,18,21,24,27 --out benchmarks/results/matrix/smollm2-counterfact-r-rome/

Smoke test:  python benchmarks/matrix.py --model tiny-llama --n 3 --epochs 2 --out /tmp/mx/

The data files are found as :func:`gradlocate.data.shared_data_path` finds them
(``../shared/data`` of the checkout, or ``GRADLOCATE_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradlocate as gl  # noqa: E402
from gradlocate.golden.matrix import edit_id, matrix  # noqa: E402
from gradlocate.golden.store import RecordStore, relative_path  # noqa: E402

DATA = {"zsre": "zsre_3k.json", "counterfact": "counterfact_3k.json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, tiny-llama (gradlocate.models.load_model)")
    ap.add_argument("--data", choices=sorted(DATA), default="zsre")
    ap.add_argument("--n", type=int, default=96, help="edits (after a seeded shuffle of the file)")
    ap.add_argument("--seed", type=int, default=0, help="the shuffle's seed")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--editor", default="locft", help="a registered editor (gradlocate.editors.EDITORS)")
    ap.add_argument("--lr", type=float, default=5e-4, help="LocFT-BF's learning rate (editor locft)")
    ap.add_argument("--epochs", type=int, default=25, help="LocFT-BF's epochs (editor locft)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a hyper-parameter of a rank-one editor (rome, r-rome, emmet), e.g. --set mom2_n_tokens=50000; "
                         "repeatable; the editor's defaults otherwise")
    ap.add_argument("--chunk", type=int, default=32, help="edits edited together")
    ap.add_argument("--capability-edits", type=int, default=8, help="the first k edits get the capability measurement")
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th layer, starting at layer index K")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", required=True, help="the folder of shard files (made if missing)")
    return ap.parse_args(argv)


def pick_edits(data: str, n: int, seed: int) -> tuple[gl.data.Edits, list[int]]:
    """``n`` edits of the shared file after a shuffle with ``seed``, and their indices in the file."""
    every = gl.load_edits(gl.data.shared_data_path(DATA[data]))
    if n > len(every):
        raise SystemExit(f"--n {n}: the {data} file has only {len(every)} records")
    order = list(range(len(every)))
    random.Random(seed).shuffle(order)
    chosen = order[:n]
    return gl.data.as_edits([every[i] for i in chosen]), chosen


def shard_layers(spec: str, layers: list[int]) -> tuple[list[int], str]:
    """The layers of shard ``K/N`` (every N-th, from index K) and the shard's file name."""
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard {spec!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard {spec!r}: K must be in 0..N-1")
    return layers[k::n], f"shard{k}of{n}"


def editor_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The editor's settings as the cells' fingerprint records them: LocFT-BF's ``--lr`` /
    ``--epochs``; a rank-one editor's ``--set`` values (numbers parsed as JSON)."""
    if args.editor == "locft":
        if args.set:
            raise SystemExit("--set is for the rank-one editors; LocFT-BF takes --lr and --epochs")
        return {"lr": args.lr, "epochs": args.epochs}
    out: dict[str, Any] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def write_manifest(out: Path, args: argparse.Namespace, edits: gl.data.Edits, chosen: list[int], n_layers: int) -> None:
    """Which records were used (index in the file, content id) and the regime (model,
    layers, editor and its settings: ``benchmarks/report.py`` states it and checks it
    against the records' fingerprint), written atomically: every shard writes the same.
    A larger ``--n`` with the same seed grows the folder (its edits are the old ones
    followed by new ones; a smaller ``--n`` leaves the manifest as it is); a folder that
    holds another run's edits is refused."""
    rows = [{"index": i, "id": edit_id(e), **e.to_dict()} for i, e in zip(chosen, edits)]
    manifest = {"data": DATA[args.data], "seed": args.seed, "model": args.model, "n_layers": n_layers,
                "editor": args.editor, "hparams": editor_hparams(args), "edits": rows}
    old = out / "edits.json"
    if old.exists():
        had = json.loads(old.read_text())
        was, now = [r["id"] for r in had.get("edits", [])], [r["id"] for r in rows]
        n = min(len(was), len(now))
        same = all(had[k] == manifest[k] for k in ("model", "editor", "hparams") if k in had)
        if was[:n] != now[:n] or not same:
            raise SystemExit(f"{relative_path(out)} holds a matrix of other edits or another regime ({had.get('data')}, "
                             f"seed {had.get('seed')}, {len(was)} edits, {had.get('editor')} {had.get('hparams')}): "
                             f"use another --out")
        if len(now) <= len(was):
            return
        manifest["sizes"] = sorted(set(had.get("sizes", [len(was)])) | {len(now)})
    tmp = out / f".edits.{os.getpid()}.json"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, old)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    edits, chosen = pick_edits(args.data, args.n, args.seed)
    # A tiny random model reads bytes: real records need a longer context than its default.
    extra = {"n_ctx": 1024} if args.model.startswith("tiny-") else {}
    model, tok = gl.models.load_model(args.model, **extra)
    h = gl.down_projections(model, tokenizer=tok)
    write_manifest(out, args, edits, chosen, h.n_layers)
    every = list(range(h.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    mine, shard = shard_layers(args.shard, every)
    hparams = editor_hparams(args)
    if args.editor != "locft":  # every layer's C in one sampling pass (cached), not one pass per layer
        from gradlocate.editors import editor_class
        from gradlocate.editors.covariance import second_moments

        hp = editor_class(args.editor)(h, mine[0], progress=False, **hparams).hp
        if hp["mom2_adjustment"]:
            second_moments(h, mine, tokens=hp["mom2_n_tokens"], progress=True)
    print(f"{args.model} on {args.n} {args.data} edits (file indices {chosen[:8]}{' ...' if args.n > 8 else ''}); "
          f"{args.editor} at layers {mine} -> {relative_path(out / shard)}.jsonl", flush=True)
    t0 = time.perf_counter()
    m = matrix(h, edits, editor=args.editor, hparams=hparams, layers=mine, out=out, shard=shard, chunk=args.chunk,
               capability_edits=args.capability_edits, progress=True)
    print(f"{m}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    write_whole(out, h, edits, args)


def write_whole(out: Path, h: Any, edits: gl.data.Edits, args: argparse.Namespace) -> None:
    """Once every edit has a cell at every layer of the model (all shards, all runs), the
    whole matrix's ``matrix.json`` and ``matrix.png``; before that, how far the folder is."""
    stored = RecordStore(out).read()
    done = [l for l in range(h.n_layers) if all(f"{edit_id(e)}/{l}" in stored for e in edits)]
    if len(done) < h.n_layers:
        print(f"the folder holds all {len(edits)} edits at {len(done)} of {h.n_layers} layers {done}; "
              f"matrix.json is written once every layer is in", flush=True)
        return
    whole = matrix(h, edits, editor=args.editor, hparams=editor_hparams(args), layers=done, out=out, chunk=args.chunk,
                   capability_edits=args.capability_edits, progress=False)
    (out / "matrix.json").write_text(json.dumps({"model": args.model, "data": args.data, **whole.to_dict()}, indent=1))
    whole.plot(title=f"{args.model} on {args.n} {args.data} edits: overall per edit x layer"
               ).savefig(out / "matrix.png", dpi=110, bbox_inches="tight")
    print(f"whole matrix: {whole}; golden layer {whole.golden()}; wrote {relative_path(out / 'matrix.json')}")


if __name__ == "__main__":
    main()

"""Benchmark: the single-edit matrix against a plain-PyTorch loop that trains and scores
each (edit, layer) cell alone.

The plain loop (:func:`plain_cell`) is what one would write without gradlocate: for one
edit at one layer, Adam (torch's defaults) on that layer's down-projection weight alone,
a full forward with full logits each epoch, LocFT-BF's stopping rule (no step below
the loss threshold, stop after the first epoch below it), then a teacher-forced forward
per query to score the cell, and the weight put back. The tokenization is gradlocate's
(``edit_batch`` / ``tokenize_edits``: the same tokens, so the same cells), nothing else.

Checks (exit 1 after writing if one fails): on the timed cells, the plain loop's scores
equal the matrix's, and its weight changes equal ``per_edit_deltas`` rows (relative
Frobenius difference <= 1e-3; Adam's elementwise normalisation turns float rounding of
the gradients into differences up to lr on near-zero-gradient elements).

Time is process CPU time (``time.process_time``, one torch thread), so other work on the
machine changes it little; wall time is reported beside it.

Run:  python benchmarks/bench_matrix.py [--n 32 --layers 2,14,26 --epochs 25 --lr 5e-4]
Writes benchmarks/results/matrix_speed.json and matrix_speed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent

import gradlocate as gl
from gradlocate.editors import per_edit_deltas
from gradlocate.evaluation import _queries
from gradlocate.gradients import edit_batch
from gradlocate.losses import IGNORE, tokenize_edits

RESULTS = ROOT / "benchmarks" / "results"


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the scored tokens (labels shifted by one, as a causal LM predicts)."""
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE)


def plain_cell(model: Any, weight: torch.nn.Parameter, tok_batch: Any, queries: Any, reference: list[list[int]],
               *, lr: float, epochs: int, loss_threshold: float) -> tuple[torch.Tensor, dict[str, float | None]]:
    """Train one edit alone (``tok_batch``: its one tokenized row) on ``weight`` and score it
    on its queries (``queries``: (kind, TokenBatch row) pairs; locality against
    ``reference``, the unedited predictions). Returns the weight change and the scores;
    the weight is put back."""
    w0 = weight.detach().clone()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    try:
        for _ in range(epochs):
            loss = _nll(model(input_ids=tok_batch.input_ids, attention_mask=tok_batch.attention_mask).logits,
                        tok_batch.labels)
            if loss.item() < loss_threshold:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        delta = weight.detach() - w0
        per: dict[str, list[float]] = {}
        with torch.no_grad():
            for j, (kind, q) in enumerate(queries):
                pred = model(input_ids=q.input_ids, attention_mask=q.attention_mask).logits[0, :-1].argmax(-1)
                lab = q.labels[0, 1:]
                got = pred[lab != IGNORE].tolist()
                want = reference[j] if kind == "locality" else lab[lab != IGNORE].tolist()
                per.setdefault(kind, []).append(sum(a == b for a, b in zip(want, got)) / len(got))
    finally:
        with torch.no_grad():
            weight.copy_(w0)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return delta, {k: sum(v) / len(v) for k, v in per.items()}


def plain_queries(h: Any, edit: Any) -> list[tuple[str, Any]]:
    qs = _queries([edit])
    batch = tokenize_edits(h.require_tokenizer(), [q.prompt for q in qs], [q.answer for q in qs], chat=h.chat)
    return [(q.kind, batch[torch.tensor([k])]) for k, q in enumerate(qs)]


def plain_reference(model: Any, queries: list[tuple[str, Any]]) -> list[list[int]]:
    """The unedited model's predictions at each query's answer positions."""
    out = []
    with torch.no_grad():
        for _, q in queries:
            pred = model(input_ids=q.input_ids, attention_mask=q.attention_mask).logits[0, :-1].argmax(-1)
            lab = q.labels[0, 1:]
            out.append(pred[lab != IGNORE].tolist())
    return out


def plain_matrix(model: Any, h: Any, edits: Any, layers: list[int], hp: dict[str, Any]) -> dict[str, Any]:
    """Every cell by :func:`plain_cell`: scores ``[edit][layer]`` and weight changes."""
    batch = edit_batch(h, [e.prompt for e in edits], [e.target_new for e in edits], True)
    scores: dict[tuple[int, int], dict[str, float | None]] = {}
    deltas: dict[tuple[int, int], torch.Tensor] = {}
    for i, e in enumerate(edits):
        qs = plain_queries(h, e)
        ref = plain_reference(model, qs)
        row = batch[torch.tensor([i])]
        for l in layers:
            deltas[i, l], scores[i, l] = plain_cell(model, h[l].parameter, row, qs, ref, **hp)
    return {"scores": scores, "deltas": deltas}


def estimate(rows: list[dict[str, Any]], n_layers: int, n_edits: int = 64) -> dict[str, float]:
    """CPU seconds of an ``n_edits`` x ``n_layers`` matrix (and of the plain loop), from
    the measured per-cell CPU time, fitted as ``a + b * (layers above the edited one)``."""
    import numpy as np

    above = np.array([n_layers - 1 - r["layer"] for r in rows], dtype=float)
    out = {}
    for key in ("matrix_cpu_s", "plain_cpu_s"):
        per_cell = np.array([r[key] / r["edits"] for r in rows])
        b, a = np.polyfit(above, per_cell, 1) if len(rows) > 1 else (0.0, float(per_cell[0]))
        out[key] = float(sum(a + b * (n_layers - 1 - l) for l in range(n_layers)) * n_edits)
    return {"cpu_s": out["matrix_cpu_s"], "plain_cpu_s": out["plain_cpu_s"],
            "wall_2_processes_min": out["matrix_cpu_s"] / 2 / 60}


def timed(fn: Any) -> tuple[Any, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="edits (one chunk of the matrix: it trains 32 at once)")
    ap.add_argument("--layers", default="2,14,26")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--out", default=str(RESULTS / "matrix_speed"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = gl.models.load_model("smollm2")
    h = gl.down_projections(model)
    every = gl.load_edits(gl.data.shared_data_path(args.data))
    order = list(range(len(every)))
    random.Random(7).shuffle(order)
    edits = gl.data.as_edits([every[i] for i in order[: args.n]])
    layers = [int(x) for x in args.layers.split(",")]
    hp = {"lr": args.lr, "epochs": args.epochs, "loss_threshold": 1e-2}
    rows = []
    checks: dict[str, bool] = {}
    for l in layers:
        m, m_cpu, m_wall = timed(lambda: gl.matrix(h, edits, hparams={"lr": args.lr, "epochs": args.epochs}, layers=[l],
                                                   capability_edits=0, progress=False))
        p, p_cpu, p_wall = timed(lambda: plain_matrix(model, h, edits, [l], hp))
        d, _ = per_edit_deltas("locft", h, l, edits, lr=args.lr, epochs=args.epochs)
        rel = max(float((d[i].double() - h[l].canonical(p["deltas"][i, l]).double()).norm()
                        / max(float(p["deltas"][i, l].double().norm()), 1e-30)) for i in range(len(edits)))
        diff = max(abs(m.scores[k][i, 0] - p["scores"][i, l][k]) for i in range(len(edits))
                   for k in p["scores"][i, l] if k in m.scores)
        checks[f"layer {l}: weight changes equal the plain loop's (<= 1e-3)"] = rel <= 1e-3
        checks[f"layer {l}: scores equal the plain loop's (<= 1e-6)"] = bool(diff <= 1e-6)
        rows.append({"layer": l, "edits": len(edits), "matrix_cpu_s": m_cpu, "matrix_wall_s": m_wall,
                     "plain_cpu_s": p_cpu, "plain_wall_s": p_wall, "ratio_cpu": p_cpu / m_cpu,
                     "max_rel_delta_diff": rel, "max_score_diff": float(diff)})
        print(rows[-1], flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("matrix_cpu_s", "plain_cpu_s", "matrix_wall_s", "plain_wall_s")}
    res = {"model": "SmolLM2-135M-Instruct", "data": args.data, "n": args.n, "layers": layers, "lr": args.lr,
           "epochs": args.epochs, "torch": torch.__version__, "machine": platform.machine(), "rows": rows,
           "total": total, "ratio_cpu": total["plain_cpu_s"] / total["matrix_cpu_s"], "checks": checks}
    ok = all(checks.values())
    res["estimate_64x30"] = estimate(rows, h.n_layers)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# The single-edit matrix against a plain per-(edit, layer) loop (benchmarks/bench_matrix.py)", "",
             f"SmolLM2-135M-Instruct, float32, CPU ({platform.machine()}, torch {torch.__version__}), one torch thread; "
             f"{args.n} {args.data} edits; LocFT-BF lr {args.lr:g}, {args.epochs} epochs, loss threshold 1e-2; "
             "both train and score every cell (teacher-forced reliability / generalization / locality / portability). "
             "Process CPU seconds (wall beside it: other work shared the machine).", "",
             "| layer | edits | matrix CPU s | plain loop CPU s | **plain / matrix** | matrix wall s | plain wall s | "
             "max rel. ΔW diff | max score diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['edits']} | {r['matrix_cpu_s']:.1f} | {r['plain_cpu_s']:.1f} | "
                     f"**{r['ratio_cpu']:.2f}** | {r['matrix_wall_s']:.1f} | {r['plain_wall_s']:.1f} | "
                     f"{r['max_rel_delta_diff']:.1e} | {r['max_score_diff']:.1e} |")
    lines += ["", f"All layers: plain / matrix = **{res['ratio_cpu']:.2f}x** (CPU seconds). "
              f"Checks (ΔW rows ≤ 1e-3, scores ≤ 1e-6): {'ok' if ok else 'FAILED'}."]
    e = res["estimate_64x30"]
    lines += ["", f"A 64-edit x {h.n_layers}-layer matrix, from these per-cell CPU seconds (linear in the number of layers "
              f"above the edited one, fitted to the rows above): {e['cpu_s'] / 60:.0f} CPU-minutes, "
              f"**{e['wall_2_processes_min']:.0f} min** wall as two processes on two cores (target: 45 min); "
              f"the plain loop: {e['plain_cpu_s'] / 60:.0f} CPU-minutes."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not ok:
        raise SystemExit("the plain loop and the matrix disagree")


if __name__ == "__main__":
    main()

"""R-ROME cells of the single-edit matrix: v* one edit at a time against v* for a chunk of
edits at once, beside a plain-PyTorch loop, on SmolLM2-135M at a few layers.

Run from the repository root (about 30 min on one quiet CPU thread at the defaults)::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_vstar --layers 2,14,26 --n 16

Writes ``benchmarks/results/vstar.{json,md}``.

A cell is one edit's R-ROME ΔW alone on the unedited model: its keys over ROME's 21
context templates, its v* (at most ``v_num_grad_steps`` Adam steps, early stop 0.05)
and the rank-one update. EasyEdit's settings (:data:`gradlocate.editors.rome.ROME_HPARAMS`)
except ``mom2_adjustment=False`` (C = I): the covariance is built once per layer and
is not what is timed. ``--n`` CounterFact edits, in the same run, each layer:

* ``one at a time``: today's per-edit loop, :func:`gradlocate.editors.rome.rome_update`
  edit after edit (keys, then :func:`~gradlocate.editors.rank_one.optimise_value`);
* ``batched``: :func:`gradlocate.editors.rome.rome_updates` on the whole chunk (what
  :func:`~gradlocate.editors.rome.rrome_per_edit`, and so the matrix, now calls): keys
  for the chunk together, v* by :func:`~gradlocate.editors.values.optimise_values`;
* ``plain``: the same computation in plain PyTorch (:func:`plain_rrome`: a loop over the
  first ``--plain-edits`` edits, each edit's rows right-padded in one forward of the whole
  model with a forward hook adding δ, full logits, ``torch.optim.Adam``).

CPU seconds are ``time.process_time`` of this process (1 torch thread); wall seconds
beside them. ``--profile-steps`` > 0 adds a ``torch.profiler`` breakdown of both paths
at ``--profile-layer`` (a few steps): where the time goes; and the throughput of the
MLP's matrix product at one edit's size and at a chunk's, in float32 and bfloat16.

Checks (exit status 1 after writing if one fails): every edit runs the same number of
v* steps in both paths; its batched ΔW equals its one-at-a-time ΔW to 1e-5 (relative
Frobenius) or, for the edit that differs most, to within twice the one-at-a-time path's
difference from itself in other shapes (keys one prompt per forward, the prefix cache
off: float32 reduction-order noise that Adam's steps amplify); the plain loop's ΔW equals gradlocate's
to 1e-4 (other padding, full forwards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def subject_last(tok: Any, text: str, subject: str, start: int) -> tuple[list[int], int]:
    """``text``'s ids and the index of the last token of ``subject`` (first found at or after ``start``)."""
    enc = tok(text, return_offsets_mapping=True)
    c0 = text.find(subject, start)
    c1 = c0 + len(subject)
    last = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0][-1]
    return list(enc["input_ids"]), last


def padded(tok: Any, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def plain_rrome(model: Any, tok: Any, layer: int, edit: Any, prefixes: list[str], hp: dict[str, Any]) -> tuple:
    """One edit's R-ROME ΔW (C = I) in plain PyTorch; returns ``(ΔW, v* steps)``."""
    site = model.model.layers[layer].mlp.down_proj
    located = [subject_last(tok, p + edit.prompt, edit.subject, len(p)) for p in prefixes]
    store: dict[str, torch.Tensor] = {}
    hd = site.register_forward_hook(lambda m, a, o: store.update(k=a[0].detach(), o=o.detach()))
    with torch.no_grad():
        model(**padded(tok, [ids for ids, _ in located]))
    hd.remove()
    rows = torch.arange(len(located))
    last = torch.tensor([i for _, i in located])
    K, O = store["k"][rows, last], store["o"][rows, last]
    tgt = tok(" " + edit.target_new, add_special_tokens=False)["input_ids"]
    kl_ids, kl_last = subject_last(tok, f"{edit.subject} is a", edit.subject, 0)
    batch = padded(tok, [ids + tgt[:-1] for ids, _ in located] + [kl_ids])
    where = torch.zeros(batch["input_ids"].shape + (1,))
    where[torch.arange(len(located) + 1), torch.cat([last, torch.tensor([kl_last])])] = 1.0
    delta = torch.zeros(O.shape[1], requires_grad=True)
    opt, init, kl0 = torch.optim.Adam([delta], lr=hp["v_lr"]), None, None

    def add(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        nonlocal init
        init = o[0, last[0]].detach().clone() if init is None else init
        return o + where * delta
    hd = site.register_forward_hook(add)
    try:
        for it in range(hp["v_num_grad_steps"]):
            logp = torch.log_softmax(model(**batch).logits.float(), -1)
            nll = -sum(sum(logp[r, len(ids) - 1 + j, t] for j, t in enumerate(tgt)) / len(tgt)
                       for r, (ids, _) in enumerate(located)) / len(located)
            now = logp[-1, kl_last][None]
            kl0 = now.detach() if kl0 is None else kl0
            loss = nll + hp["kl_factor"] * (now.exp() * (now - kl0)).sum() + \
                hp["v_weight_decay"] * delta.norm() / init.norm() ** 2
            if loss.item() < 5e-2 or it == hp["v_num_grad_steps"] - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                cap = hp["clamp_norm_factor"] * init.norm()
                if delta.norm() > cap:
                    delta.mul_(cap / delta.norm())
    finally:
        hd.remove()
    k_bar, residual = K.mean(0).double(), (init + delta.detach() - O.mean(0)).double()
    return torch.outer(residual, k_bar) / (k_bar @ k_bar), it + 1


def timed(fn: Any) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def noise_floor(h: Any, layer: int, edit: Any, groups: list, hp: dict, dW: torch.Tensor) -> float:
    """How far the one-at-a-time path is from itself on ``edit``: its ΔW with the keys
    read one prompt per forward and v* with the prefix key/value cache off (the same
    computation in other shapes) against ``dW`` (its usual shapes)."""
    from gradlocate.editors.rank_one import locate, optimise_value, rank_one, site_io

    prefixes = [p for g in groups for p in g]
    io = [site_io(h, layer, [locate(h.require_tokenizer(), p + edit.prompt, edit.subject, len(p))]) for p in prefixes]
    K, O = torch.cat([k for k, _ in io]), torch.cat([o for _, o in io])
    vf = optimise_value(h, layer, edit, prefixes, steps=hp["v_num_grad_steps"], lr=hp["v_lr"], kl_factor=hp["kl_factor"],
                        weight_decay=hp["v_weight_decay"], clamp_norm_factor=hp["clamp_norm_factor"], reuse_prefix=False)
    other = rank_one(None, K.mean(0), K.mean(0), vf.v_star - O.mean(0))
    return float((other - dW).norm() / dW.norm())


def one_layer(h: Any, model: Any, tok: Any, layer: int, edits: list, groups: list, hp: dict, n_plain: int) -> dict:
    from gradlocate.editors.rome import rome_update, rome_updates

    old, c_old, w_old = timed(lambda: [rome_update(h, layer, e, groups, None, hp, averaged=True) for e in edits])
    new, c_new, w_new = timed(lambda: rome_updates(h, layer, edits, groups, None, hp, averaged=True))
    prefixes = [p for g in groups for p in g]
    plain, c_plain, w_plain = timed(lambda: [plain_rrome(model, tok, layer, e, prefixes, hp) for e in edits[:n_plain]])
    n = len(edits)
    rel = [float((a - b).norm() / b.norm()) for (a, _), (b, _) in zip(new, old)]
    rel_plain = [float((a - b).norm() / b.norm()) for (b, _), (a, _) in zip(old, plain)]
    row = {"layer": layer, "edits": n, "plain_edits": n_plain,
           "steps_one_at_a_time": [len(i["history"]) for _, i in old], "steps_batched": [len(i["history"]) for _, i in new],
           "steps_plain": [s for _, s in plain],
           "one_at_a_time": {"cpu_per_cell": c_old / n, "wall_per_cell": w_old / n},
           "batched": {"cpu_per_cell": c_new / n, "wall_per_cell": w_new / n},
           "plain": {"cpu_per_cell": c_plain / max(1, n_plain), "wall_per_cell": w_plain / max(1, n_plain)},
           "max_abs_dW_diff": max(float((a - b).abs().max()) for (a, _), (b, _) in zip(new, old)),
           "max_rel_dW_diff": max(rel), "max_rel_dW_diff_plain": max(rel_plain, default=0.0)}
    worst = max(range(n), key=lambda i: rel[i])
    row["worst_edit"], row["worst_edit_self_diff"] = worst, noise_floor(h, layer, edits[worst], groups, hp, old[worst][0])
    row["ratio_cpu"] = row["one_at_a_time"]["cpu_per_cell"] / row["batched"]["cpu_per_cell"]
    row["ratio_wall"] = row["one_at_a_time"]["wall_per_cell"] / row["batched"]["wall_per_cell"]
    row["plain_over_batched_cpu"] = row["plain"]["cpu_per_cell"] / row["batched"]["cpu_per_cell"]
    print(json.dumps(row), flush=True)
    return row


def _category(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix products"
    if "scaled_dot_product" in name:
        return "attention kernels"
    return "other operators (elementwise, copies, indexing, reductions)"


def profile_paths(h: Any, layer: int, edits: list, groups: list, hp: dict) -> dict:
    """Where each path's time goes over a few v* steps (``torch.profiler``, self time per
    operator; not ``with_flops``, which held ~20 GB on the batched path)."""
    from torch.profiler import ProfilerActivity, profile

    from gradlocate.editors.rome import rome_update, rome_updates

    out: dict[str, Any] = {}
    for name, fn in (("one at a time", lambda: [rome_update(h, layer, e, groups, None, hp, averaged=True) for e in edits]),
                     ("batched", lambda: rome_updates(h, layer, edits, groups, None, hp, averaged=True))):
        c0 = time.process_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        cpu = time.process_time() - c0
        cats: dict[str, float] = {}
        for e in prof.key_averages():
            cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + e.self_cpu_time_total / 1e6
        total = sum(cats.values())
        out[name] = {"cpu_seconds_profiled": cpu, "operator_seconds": total,
                     "shares": {k: v / total for k, v in cats.items()}}
        print(name, json.dumps(out[name]), flush=True)
    out["matmul_gflops_per_s"] = matmul_rates()
    return out


def matmul_rates() -> dict[str, float]:
    """GFLOP/s (CPU time) of ``[m, 576] @ [576, 1536]`` (SmolLM2's MLP) for one edit's
    ~90 suffix positions and for a chunk's 2048, in float32 and bfloat16."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        for m in (90, 2048):
            a, b = torch.randn(m, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
            n = max(20, 40_000 // m)
            _, c, _ = timed(lambda: [a @ b for _ in range(n)])
            rates[f"{str(dtype).removeprefix('torch.')} m={m}"] = n * 2 * m * 576 * 1536 / c / 1e9
    return rates


def markdown(res: dict) -> str:
    lines = [f"### R-ROME cells: v* one edit at a time vs a chunk of {res['n']} at once, SmolLM2-135M-Instruct", "",
             f"{res['machine']}; 1 torch thread; {res['n']} CounterFact edits (the first of the shared file), "
             f"{res['prompts']} prompts each (ROME's context templates), EasyEdit's R-ROME settings "
             f"(v_num_grad_steps {res['hparams']['v_num_grad_steps']}, v_lr {res['hparams']['v_lr']}, early stop 0.05) with "
             "mom2_adjustment=False (C = I: the covariance is built once per layer and is not what is timed). A cell: "
             "keys, v*, ΔW. *one at a time*: `rome_update` per edit (the path before this change); *batched*: "
             "`rome_updates` on the chunk (what `rrome_per_edit` and the matrix now run); *plain*: the same computation "
             f"in plain PyTorch on the first {res['plain_edits']} edits (hooks, whole model every step, full logits). "
             f"CPU seconds of this process; load average {res['load'][0]:.1f} at start, {res['load'][1]:.1f} at end "
             "(2 shared cores: provisional).", "",
             "| layer | v* steps (mean) | one at a time: CPU s / cell (wall) | batched: CPU s / cell (wall) | "
             "**one at a time / batched (CPU)** | plain: CPU s / cell | plain / batched | max abs ΔW diff | "
             "max rel ΔW diff | that edit, one at a time vs itself | plain vs gradlocate ΔW |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        steps = sum(r["steps_batched"]) / len(r["steps_batched"])
        lines.append(f"| {r['layer']} | {steps:.1f} | {r['one_at_a_time']['cpu_per_cell']:.2f} "
                     f"({r['one_at_a_time']['wall_per_cell']:.2f}) | {r['batched']['cpu_per_cell']:.2f} "
                     f"({r['batched']['wall_per_cell']:.2f}) | **{r['ratio_cpu']:.2f}x** | {r['plain']['cpu_per_cell']:.1f} | "
                     f"{r['plain_over_batched_cpu']:.1f}x | {r['max_abs_dW_diff']:.1e} | {r['max_rel_dW_diff']:.1e} | "
                     f"{r['worst_edit_self_diff']:.1e} | {r['max_rel_dW_diff_plain']:.1e} |")
    tot = {k: sum(r[k]["cpu_per_cell"] for r in res["rows"]) for k in ("one_at_a_time", "batched")}
    lines += ["", f"All layers: one at a time / batched = **{tot['one_at_a_time'] / tot['batched']:.2f}x** CPU seconds "
              "per cell (target of issue 44: >= 5x)."]
    lines += ["", "ΔW differences are relative Frobenius norms, per edit, the largest of the chunk. *That edit, one at "
              "a time vs itself*: the edit with the largest difference, its one-at-a-time ΔW with the keys read one "
              "prompt per forward and the prefix key/value cache off, against its usual run - the same computation in "
              "other shapes: the size of float32 reduction-order noise after Adam's steps for that edit."]
    lines += _profile_md(res.get("profile"))
    checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in res["checks"].items())
    return "\n".join(lines + ["", f"Checks: {checks}.", ""])


def _profile_md(prof: dict | None) -> list[str]:
    if not prof:
        return []
    lines = ["", f"Where the time goes (`torch.profiler`, layer {prof['layer']}, {prof['edits']} edits, "
             f"{prof['steps']} v* steps; shares of operator self time):", "",
             "| path | CPU s | matrix products | attention kernels | other operators |", "|---|---:|---:|---:|---:|"]
    for name in ("one at a time", "batched"):
        p = prof[name]
        sh = p["shares"]
        lines.append(f"| {name} | {p['cpu_seconds_profiled']:.1f} | {sh.get('matrix products', 0):.0%} | "
                     f"{sh.get('attention kernels', 0):.0%} | "
                     f"{sh.get('other operators (elementwise, copies, indexing, reductions)', 0):.0%} |")
    rates = ", ".join(f"{k}: {v:.0f}" for k, v in prof["matmul_gflops_per_s"].items())
    lines += ["", "SmolLM2's MLP product `[m, 576] @ [576, 1536]` on the same core, GFLOP/s (CPU time; m = 90: one "
              f"edit's suffix positions, m = 2048: a chunk's): {rates}."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,14,26")
    ap.add_argument("--n", type=int, default=16, help="edits: the chunk the batched path takes at once")
    ap.add_argument("--plain-edits", type=int, default=2, help="edits the plain loop runs (it is slow)")
    ap.add_argument("--profile-layer", type=int, default=14)
    ap.add_argument("--profile-steps", type=int, default=5, help="0: no profile")
    ap.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: EasyEdit's 25)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gradlocate
    from gradlocate.data import shared_data_path
    from gradlocate.editors.rome import RROME
    from gradlocate.handles import resolve
    from gradlocate.models import smollm2

    load0 = os.getloadavg()[0]
    model, tok = smollm2(verbose=False)
    h = resolve(model, tokenizer=tok)
    edits = list(gradlocate.load_edits(shared_data_path("counterfact_3k.json"), n=args.n))
    ed = RROME(model, 0, progress=False, mom2_adjustment=False,
               **({} if args.steps is None else {"v_num_grad_steps": args.steps}))
    groups = ed.templates()
    rows = [one_layer(h, model, tok, int(x), edits, groups, ed.hp, args.plain_edits) for x in args.layers.split(",")]
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, torch {torch.__version__}", "n": args.n, "plain_edits": args.plain_edits,
        "prompts": sum(len(g) for g in groups), "hparams": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in ed.hp.items()}, "rows": rows}
    if args.profile_steps > 0:
        hp = {**ed.hp, "v_num_grad_steps": args.profile_steps}
        res["profile"] = {"layer": args.profile_layer, "edits": args.n, "steps": args.profile_steps,
                          **profile_paths(h, args.profile_layer, edits, groups, hp)}
    res["load"] = [load0, os.getloadavg()[0]]
    res["checks"] = {"same_steps": all(r["steps_one_at_a_time"] == r["steps_batched"] for r in rows),
                     # 1e-5, or within twice the one-at-a-time path's own reduction-order noise on that edit
                     "batched_dW_matches_1e-5_or_noise": all(r["max_rel_dW_diff"] <= max(1e-5, 2 * r["worst_edit_self_diff"])
                                                             for r in rows),
                     "plain_dW_matches_1e-4": all(r["max_rel_dW_diff_plain"] <= 1e-4 for r in rows)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vstar.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "vstar.md").write_text(markdown(res))
    print(markdown(res))
    if not all(res["checks"].values()):
        raise SystemExit(f"checks failed: {res['checks']}")


if __name__ == "__main__":
    main()

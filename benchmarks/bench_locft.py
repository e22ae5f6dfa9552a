"""LocFT-BF on SmolLM2-135M: edit quality with the default settings, and the speed of
:class:`gradlocate.LocFTBF` against a plain-PyTorch loop of the same algorithm.

Run from the repository root::

    python benchmarks/bench_locft.py            # ~8 min on 1 CPU thread (a shared 2-core machine)

Writes ``benchmarks/results/locft.json`` and ``benchmarks/results/locft.md``.

Parts:

1. *Quality* (the issue's "done when"): 8 ZsRE edits, default hyper-parameters, at
   layer 22 and layer 8: teacher-forced and generation-EM reliability, generalization,
   locality (against the unedited model's predictions), fluency; every other tensor
   of the model bitwise unchanged after fit; restore bit-exact.
2. *Speed*: per-epoch wall time of LocFTBF (activation cache + LM head on scored
   positions) and of a plain loop (full forward and full logits every step, written
   below from the algorithm's definition), same seed and batch order, run alternately,
   median of ``--reps``. Both use ``loss_threshold=0`` here so that every mini-batch
   steps and the two do identical work per epoch. Also the final-weight agreement.
3. *Memory*: peak resident memory of one epoch of each variant, each in a fresh
   subprocess (model load included; the difference is the training's own memory).

Checks (the script exits with status 1 after writing the results if one fails): after
each quality fit no other tensor changed and restore is bit-exact; in every speed row
the final weights of LocFTBF and the plain loop agree, ``||W - W_plain|| / ||W_plain||``
(Frobenius) <= 1e-4. The speed target (LocFTBF <= 0.5x the plain loop per epoch at
layer 22) is reported in the json/md but does not fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: Final weights of LocFTBF and the plain loop: ||W - W_plain||_F / ||W_plain||_F at most this.
WEIGHTS_REL_TOL = 1e-4
#: Target: LocFTBF's time per epoch over the plain loop's at a late layer (22).
SPEED_TARGET = 0.5


# --------------------------------------------------------------------------- plain reference


def plain_batches(tok, edits):
    """Independent tokenization: prompt ids (with the tokenizer's special tokens),
    then the target with a leading space, then EOS; labels -100 on the prompt."""
    rows = []
    for e in edits:
        p = tok(e.prompt)["input_ids"]
        # LocFT: a leading space unless the target already has one.
        target = e.target_new if e.target_new.startswith(" ") else " " + e.target_new
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p, t))
    return rows


def plain_collate(tok, rows):
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        am[i, : len(p) + len(t)] = 1
        lab[i, len(p): len(p) + len(t)] = torch.tensor(t)
    return ids, am, lab


def plain_locft(model, tok, edits, layer, *, lr, batch_size, epochs, seed, threshold, epoch_times=None):
    """LocFT-BF as a plain loop: full forward, full logits, masked mean NLL, Adam."""
    weight = model.model.layers[layer].mlp.down_proj.weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    model.eval()
    opt = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    rows = plain_batches(tok, edits)
    history = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=gen)
            total = 0.0
            for idx in order.split(batch_size):
                ids, am, lab = plain_collate(tok, [rows[i] for i in idx.tolist()])
                logits = model(input_ids=ids, attention_mask=am).logits
                lp = torch.log_softmax(logits[:, :-1].float(), -1)
                tgt = lab[:, 1:]
                mask = tgt != -100
                nll = -lp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * mask
                loss = (nll.sum(1) / mask.sum(1)).mean()
                total += loss.item() * len(idx)
                if loss.item() >= threshold:
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            history.append(total / len(rows))
            if epoch_times is not None:
                epoch_times.append((time.perf_counter(), time.process_time()))
            if history[-1] < threshold:
                break
    finally:
        weight.grad = None
        for p, f in flags:
            p.requires_grad_(f)
    return history


# --------------------------------------------------------------------------- parts


def all_tensors(model):
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def changed(model, before):
    now = dict(model.named_parameters())
    now.update({n: b for n, b in model.named_buffers()})
    diff = []
    for key, t in before.items():
        name = key.split(":", 1)[1]
        if not torch.equal(now[name].detach(), t):
            diff.append(name)
    return diff


def quality(model, tok, edits, layers):
    from gradlocate import LocFTBF, evaluate

    t0 = time.perf_counter()
    pre = evaluate(model, edits, fluency=True)
    out = {"pre": pre.to_dict(rows=False), "pre_eval_s": time.perf_counter() - t0, "layers": {}}
    print("pre-edit:", pre, flush=True)
    for layer in layers:
        before = all_tensors(model)
        ft = LocFTBF(model, layer, progress=False)
        t0 = time.perf_counter()
        fit = ft.fit(edits)
        fit_s = time.perf_counter() - t0
        name = ft.handle.path + ".weight"
        others = [n for n in changed(model, before) if n != name]
        post = evaluate(model, edits, pre=pre, fluency=True)
        ft.restore()
        restored = changed(model, before)
        print(f"layer {layer}:", post, f"fit {fit_s:.1f}s", flush=True)
        out["layers"][str(layer)] = {
            "trainer": ft.to_dict(), "fit": fit.to_dict(), "fit_s": fit_s, "post": post.to_dict(rows=True),
            "other_tensors_changed": others, "restore_bit_exact": not restored,
        }
    return out


def _per_epoch(stamps):
    """Mean (wall, cpu) seconds per epoch from end-of-epoch time stamps, leaving out the
    first epoch (it overlaps LocFTBF's setup and warms caches for both variants)."""
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    n = len(stamps) - 1
    return (w1 - w0) / n, (c1 - c0) / n


def speed(model, tok, edits, layer, batch_size, epochs, reps):
    """Per-epoch time of LocFTBF and of the plain loop, alternating, median of reps.
    Wall time and this process's CPU time (less sensitive to other jobs on a shared
    machine) are both recorded; epochs 2..`epochs` are timed."""
    from gradlocate import LocFTBF

    weight = model.model.layers[layer].mlp.down_proj.weight
    w0 = weight.detach().clone()
    n_batches = -(-len(edits) // batch_size)
    times = {k: [] for k in ("plain_wall", "plain_cpu", "locftbf_wall", "locftbf_cpu", "locftbf_setup")}
    final = {}
    for r in range(reps):
        for variant in ("plain", "locftbf") if r % 2 == 0 else ("locftbf", "plain"):
            stamps = []
            if variant == "plain":
                plain_locft(model, tok, edits, layer, lr=5e-4, batch_size=batch_size, epochs=epochs, seed=0,
                            threshold=0.0, epoch_times=stamps)
            else:
                def stamp(step):
                    if step.batch == n_batches - 1:
                        stamps.append((time.perf_counter(), time.process_time()))

                ft = LocFTBF(model, layer, edits_per_step=batch_size, epochs=epochs, loss_threshold=0.0,
                             progress=False, callback=stamp)
                fit = ft.fit(edits)
                times["locftbf_setup"].append(fit.timings["setup"])
                mode, head_mode = fit.cache_mode, fit.head_mode
            wall, cpu = _per_epoch(stamps)
            times[f"{variant}_wall"].append(wall)
            times[f"{variant}_cpu"].append(cpu)
            if r == 0:
                final[variant] = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(w0)
    a, b = final["locftbf"], final["plain"]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "layer": layer, "n_edits": len(edits), "batch_size": batch_size, "epochs_timed": epochs - 1, "reps": reps,
        "cache_mode": mode, "head_mode": head_mode,
        "plain_epoch_s": med["plain_wall"], "locftbf_epoch_s": med["locftbf_wall"],
        "plain_epoch_cpu_s": med["plain_cpu"], "locftbf_epoch_cpu_s": med["locftbf_cpu"],
        "locftbf_setup_s": med["locftbf_setup"],
        "ratio_per_epoch": med["locftbf_wall"] / med["plain_wall"],
        "ratio_per_epoch_cpu": med["locftbf_cpu"] / med["plain_cpu"],
        "ratio_25_epochs_incl_setup": (25 * med["locftbf_wall"] + med["locftbf_setup"]) / (25 * med["plain_wall"]),
        "all_times": times,
        # ||W_locftbf - W_plain|| / ||W_plain|| (Frobenius), the agreement criterion;
        "weights_rel_diff": float((a - b).norm() / b.norm()),
        # and two stricter views: the largest element difference over the largest
        # weight, and the difference relative to the size of the update itself.
        "weights_max_abs_diff_over_max_abs": float((a - b).abs().max() / b.abs().max()),
        "weights_rel_diff_of_update": float((a - b).norm() / (b - w0).norm()),
    }
    print(f"speed layer {layer} bs {batch_size}: plain {med['plain_wall']:.3f}s/epoch, LocFTBF {med['locftbf_wall']:.3f}s/epoch "
          f"(+{med['locftbf_setup']:.2f}s setup) ratio {res['ratio_per_epoch']:.3f} wall, "
          f"{res['ratio_per_epoch_cpu']:.3f} cpu; weights rel diff {res['weights_rel_diff']:.2e} "
          f"(max abs {res['weights_max_abs_diff_over_max_abs']:.2e}, of update {res['weights_rel_diff_of_update']:.2e})",
          flush=True)
    return res


def _proc_mib(field):
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def memory_child(variant, layer, n_edits, batch_size):
    """Run one epoch of one variant in this fresh process; print the peak resident
    memory reached during training minus the resident memory just before it (the
    kernel's high-water mark is reset after the model is loaded)."""
    torch.set_num_threads(1)
    from gradlocate import LocFTBF, load_edits
    from gradlocate.models import smollm2

    model, tok = smollm2(verbose=False)
    edits = load_edits("zsre", n=n_edits)
    # The weights are memory-mapped: a first forward pages them all in. Do it before
    # measuring so that the measure is the training's own memory.
    with torch.no_grad():
        model(input_ids=torch.tensor([tok("warm up")["input_ids"]]))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_mib("VmRSS")
    extra = {}
    if variant == "plain":
        plain_locft(model, tok, edits, layer, lr=5e-4, batch_size=batch_size, epochs=1, seed=0, threshold=0.0)
    else:
        ft = LocFTBF(model, layer, edits_per_step=batch_size, epochs=1, loss_threshold=0.0, progress=False,
                     cache=(variant == "locftbf"))
        fit = ft.fit(edits)
        extra = {"cache_mib": fit.cache_bytes / 2**20, "cache_mode": fit.cache_mode, "head_mode": fit.head_mode}
    peak = _proc_mib("VmHWM")
    print(json.dumps({"rss_before_mib": before, "peak_mib": peak, "training_mib": peak - before, **extra}))


def memory(layer, n_edits, batch_size):
    out = {}
    for variant in ("plain", "locftbf", "locftbf_nocache"):
        r = subprocess.run([sys.executable, __file__, "--memory-child", variant, str(layer), str(n_edits), str(batch_size)],
                           capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        out[variant] = d
        print(f"memory {variant}: +{d['training_mib']:.0f} MiB peak over the loaded model "
              f"({d['peak_mib']:.0f} MiB resident)", flush=True)
    return out


def markdown(res):
    q = res["quality"]
    lines = ["# LocFT-BF on SmolLM2-135M-Instruct", "",
             f"{res['env']['cpu']}, torch {res['env']['torch']}, {res['env']['threads']} thread(s). "
             f"Total benchmark time {res['total_s']:.0f} s.", "",
             "## Quality: 8 ZsRE edits, default settings (lr 5e-4, auto edits per step, <= 25 epochs)", "",
             "| | layer | epochs | steps | fit s | rel TF | gen TF | loc TF | rel EM | gen EM | loc EM | fluency | others unchanged | restore exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pre = q["pre"]
    lines.append(f"| unedited | - | - | - | - | {pre['teacher_forced']['reliability']:.3f} | "
                 f"{pre['teacher_forced']['generalization']:.3f} | - | {pre['generation']['reliability']:.3f} | "
                 f"{pre['generation']['generalization']:.3f} | - | {pre['fluency']:.3f} | | |")
    for layer, d in q["layers"].items():
        tf, em = d["post"]["teacher_forced"], d["post"]["generation"]
        fit = d["fit"]
        lines.append(f"| LocFT-BF | {layer} | {fit['epochs']} | {fit['steps']} | {d['fit_s']:.1f} | "
                     f"{tf['reliability']:.3f} | {tf['generalization']:.3f} | {tf['locality']:.3f} | "
                     f"{em['reliability']:.3f} | {em['generalization']:.3f} | {em['locality']:.3f} | "
                     f"{d['post']['fluency']:.3f} | {not d['other_tensors_changed']} | {d['restore_bit_exact']} |")
    lines += ["", "## Speed: per-epoch time, LocFTBF vs a plain-PyTorch loop (same seed and batch order)", "",
              "| layer | edits | edits/step | cache / head | plain s/epoch | LocFTBF s/epoch | **ratio (wall)** | ratio (CPU time) | setup s | ratio over 25 epochs incl. setup | weights rel diff | max abs diff / max abs | diff / update |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["speed"]:
        lines.append(f"| {s['layer']} | {s['n_edits']} | {s['batch_size']} | {s['cache_mode']} / {s['head_mode']} | "
                     f"{s['plain_epoch_s']:.3f} | {s['locftbf_epoch_s']:.3f} | **{s['ratio_per_epoch']:.2f}** | "
                     f"{s['ratio_per_epoch_cpu']:.2f} | {s['locftbf_setup_s']:.2f} | {s['ratio_25_epochs_incl_setup']:.2f} | "
                     f"{s['weights_rel_diff']:.1e} | {s['weights_max_abs_diff_over_max_abs']:.1e} | "
                     f"{s['weights_rel_diff_of_update']:.1e} |")
    reps = sorted({s["reps"] for s in res["speed"]})
    lines += ["", f"Median of {' or '.join(map(str, reps))} alternating runs per row (epochs 2-"
              f"{res['speed'][0]['epochs_timed'] + 1} of each run timed); load average: {res['env']['load']}. "
              "CPU time is this process's own, less sensitive than wall time to the other jobs on the machine."]
    lines += ["", "Targets (reported, not checked): " + ", ".join(
        f"{k} {'met' if v else 'MISSED'}" for k, v in res["targets"].items())]
    m = res["memory"]
    lines += ["", f"## Peak memory, one epoch at layer {m['layer']} ({m['n_edits']} edits, {m['batch_size']} per step)",
              "",
              "| variant | peak RSS during training MiB | above the loaded model MiB | of which the activation cache MiB |",
              "|---|---|---|---|"]
    for k, d in m["variants"].items():
        cache = f"{d['cache_mib']:.1f}" if "cache_mib" in d else "-"
        lines.append(f"| {k} | {d['peak_mib']:.0f} | {d['training_mib']:.0f} | {cache} |")
    lines += ["", "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in res["checks"].items())]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per timed run (the first is not timed)")
    ap.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "LAYER", "N", "BS"))
    args = ap.parse_args()
    if args.memory_child:
        v, layer, n, bs = args.memory_child
        memory_child(v, int(layer), int(n), int(bs))
        return
    torch.set_num_threads(1)
    from gradlocate import load_edits
    from gradlocate.models import smollm2

    t_start = time.perf_counter()
    model, tok = smollm2(verbose=False)
    edits8 = load_edits("zsre", n=8)
    edits16 = load_edits("zsre", n=16)
    res = {"env": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "python": platform.python_version()}}
    res["quality"] = quality(model, tok, edits8, [22, 8])
    res["speed"] = []
    load0 = os.getloadavg()[0]
    for layer in (22, 2):
        res["speed"].append(speed(model, tok, edits8, layer, batch_size=1, epochs=args.epochs, reps=args.reps))
    for layer in (22, 2):
        res["speed"].append(speed(model, tok, edits16, layer, batch_size=8, epochs=args.epochs,
                                  reps=max(3, args.reps - 2)))
    res["env"]["load"] = f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end of the speed part (2 cores)"
    res["memory"] = {"layer": 22, "n_edits": 16, "batch_size": 8, "variants": memory(22, 16, 8)}
    res["total_s"] = time.perf_counter() - t_start
    # Agreement checks (a failure exits with status 1) and the speed target (reported only).
    res["checks"] = {}
    for layer, d in res["quality"]["layers"].items():
        res["checks"][f"layer {layer}: other tensors unchanged"] = not d["other_tensors_changed"]
        res["checks"][f"layer {layer}: restore bit-exact"] = d["restore_bit_exact"]
    for s in res["speed"]:
        res["checks"][f"layer {s['layer']}, {s['n_edits']} edits / {s['batch_size']} per step: weights rel diff "
                      f"<= {WEIGHTS_REL_TOL:g}"] = s["weights_rel_diff"] <= WEIGHTS_REL_TOL
    res["targets"] = {f"layer {s['layer']}, {s['n_edits']} edits / {s['batch_size']} per step: ratio per epoch "
                      f"<= {SPEED_TARGET}": s["ratio_per_epoch"] <= SPEED_TARGET
                      for s in res["speed"] if s["layer"] >= 15}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "locft.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / "locft.md").write_text(markdown(res))
    print(markdown(res))
    failed = [k for k, v in res["checks"].items() if not v]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

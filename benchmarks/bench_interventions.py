"""Benchmark: the cost of nnsight in gradlocate's interventions, against the same
computation intercepted with plain torch hooks and forward replacement, side by side
on SmolLM2-135M.

Every intervention in gradlocate goes through :mod:`gradlocate.interventions`, which
runs each forward as an nnsight trace. This script measures what that costs over a
plain-PyTorch implementation of exactly the same interventions (written below, used
nowhere else), in the three places where gradlocate spends its time:

(a) *LocFT-BF training step* at layer 22 with the activation cache: gradlocate's
    :class:`~gradlocate.editors.executors.Executor` (``cache="down_input"``: blocks 0..22 skipped
    through ``from_layer``, block 22's output rebuilt as ``c + down_proj(x)``; the LM head
    only at the scored positions through ``head_at``), forward + backward into the
    down-projection weight, for 1 edit per step (an epoch of the 8 edits, one at a time)
    and for 8 edits per step. Both head modes the trainer chooses between: ``select``
    (the head runs on the scored positions only) and ``fused`` (``head_at(skip=...)``: the
    head does not run, the loss comes from ``head_nll``). The plain path replaces the
    skipped blocks' ``forward`` and gathers the head's input with a forward pre-hook (or
    replaces the head's ``forward`` for ``fused``). Same cache tensors, same loss code.
(b) *Causal-tracing forward*: 10 corrupted rows, noise on the subject's embeddings
    (``noised``), clean MLP outputs restored at the last subject token at 3 layers
    (``restored``, layers 14-16) and the head at the last position (``head_at``), under
    ``torch.no_grad``, as :func:`gradlocate.trace.reference.reference_scores` runs a cell. Plain
    path: ROME's ``trace_with_patch`` with forward hooks, the head's input gathered by a
    pre-hook.
(c) *LGA capture*: the inputs of the 30 down-projections and the gradients of the loss
    w.r.t. their outputs for 8 edits, one forward + backward (``capture(inputs=True)`` +
    ``Capture.grads``, head at the scored positions), as
    :func:`gradlocate.gradients.per_sample_inner_products` does. Plain path: forward hooks
    recording inputs and outputs, ``torch.autograd.grad`` into the outputs.

Data: ZsRE edits 0..7 (``load_edits("zsre", n=8)``, tokenized by
``gradlocate.gradients.edit_batch`` with EOS, the trainer's loss) and CounterFact record
4 ("Henry Maudsley's occupation is") with noise 3 x the embedding std over the vocabulary.
Both paths compute the loss with the same gradlocate functions (``edit_nll``,
``head_nll``): only the interception differs.

Timing: single thread (``torch.set_num_threads(1)``); for each case the two paths run
alternately ``--repeats`` times (after a warm-up of each); each repeat times ``--inner``
iterations in one block (inside one ``using`` block for gradlocate, as a call of
``LocFTBF.fit`` / ``causal_trace`` / ``lga`` runs all its forwards inside one), medians of
the per-iteration wall and CPU times reported. ``using()``'s own cost (nnsight wraps the
model on entry and unwraps it on exit, once per gradlocate call) is measured separately.

Checks (the script exits with status 1 if one fails): the two paths give the same losses,
probabilities and gradients: max abs diff <= 1e-5 x the largest |value| of the plain
path, per compared tensor. The 10 % overhead line is a target, reported but not checked.

Run:  python benchmarks/bench_interventions.py [--repeats 9 --inner 3]
Writes benchmarks/results/interventions.json and interventions.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LAYER = 22
TRACE_RECORD, TRACE_ROWS, TRACE_LAYERS, NOISE_MULTIPLE, SEED = 4, 10, (14, 15, 16), 3.0, 1
REL_TOL = 1e-5
OVERHEAD_TARGET = 1.10


# --------------------------------------------------------------------------- plain PyTorch helpers


@contextlib.contextmanager
def only_grad(model, params):
    """Eval mode, requires_grad only on ``params`` (what ``using(h, params)`` sets), their
    ``.grad`` cleared; all restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p in params:
            p.grad = None
        for p, f in flags:
            p.requires_grad_(f)
        model.train(training)


@contextlib.contextmanager
def hooks(*handles):
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextlib.contextmanager
def forwards(replacements):
    """Replace modules' ``forward`` (instance attribute) for the block."""
    for m, fn in replacements:
        m.forward = fn
    try:
        yield
    finally:
        for m, _ in replacements:
            del m.forward


def gather_pre_hook(rows, pos):
    """A head pre-hook: the head sees only the states at (rows, pos), as one [1, k, d] row."""
    def hook(module, args):
        return (args[0][rows, pos][None], *args[1:])
    return hook


# --------------------------------------------------------------------------- case (a): LocFT-BF step


def locft_case(h, batch, rows_list, head_mode):
    """Both paths of a LocFT-BF training step (forward + backward into the site weight)
    over the mini-batches ``rows_list``; returns (ours, plain, teardown) callables that
    each run all the mini-batches once and return their losses and the last gradient."""
    from gradlocate.editors.executors import Executor
    from gradlocate.interventions import using
    from gradlocate.losses import edit_nll, head_nll, row_means, scored_positions

    site = h[LAYER]
    param, model, head = site.parameter, h.root, h.head
    stack = contextlib.ExitStack()
    with using(h, [param]):  # build the activation cache once, as fit() does before its epochs
        ex = stack.enter_context(Executor(h, LAYER, batch, "down_input", head_mode))
    c, x = ex.cached["c"], ex.cached["x"]

    def ours():
        losses = []
        with using(h, [param]), torch.enable_grad(), Timer() as tm:
            for rows in rows_list:
                param.grad = None
                loss = ex.losses(rows).mean()
                loss.backward()
                losses.append(loss.detach())
            tm.stop()
            grad = param.grad.detach().clone()
        return (losses, grad), tm

    def plain_step(rows):
        mb = batch[rows]
        width = mb.input_ids.shape[1]
        r, p = scored_positions(mb.labels)

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        def edited_block(hidden_states, *args, **kwargs):  # block 22's output, c + down_proj(x)
            return c[rows, :width] + site.module(x[rows, :width])

        repl = [(h.blocks[j], passthrough) for j in range(LAYER)] + [(h.blocks[LAYER], edited_block)]
        kept = []
        if head_mode == "fused":
            def head_fwd(states):  # the head does not run: keep its input, stand in for the logits
                kept.append(states[r, p])
                return kept[-1][None, :, :1]

            repl.append((head, head_fwd))
            ctx = hooks()
        else:
            ctx = hooks(head.register_forward_pre_hook(gather_pre_hook(r, p)))
        with forwards(repl), ctx:
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        if head_mode == "fused":
            return row_means(head_nll(kept[0], head, mb.labels[r, p + 1]), r, len(rows))
        return edit_nll(out.logits, mb.labels, scored_only=True)

    def plain():
        losses = []
        with only_grad(model, [param]), torch.enable_grad(), Timer() as tm:
            for rows in rows_list:
                param.grad = None
                loss = plain_step(rows).mean()
                loss.backward()
                losses.append(loss.detach())
            tm.stop()
            grad = param.grad.detach().clone()
        return (losses, grad), tm

    def compare(a, b):
        return {"losses": max_rel(torch.stack(a[0]), torch.stack(b[0])), "weight_grad": max_rel(a[1], b[1])}

    return ours, plain, compare, stack.close


# --------------------------------------------------------------------------- case (b): causal-tracing forward


def trace_case(h, tok):
    from gradlocate import load_edits
    from gradlocate.interventions import Patch, head_at, no_cache, noised, restored, run, using
    from gradlocate.trace.core import embedding_std, subject_token_range

    model = h.root
    e = load_edits("counterfact", n=TRACE_RECORD + 1)[TRACE_RECORD]
    s0, s1 = subject_token_range(tok, e.prompt, e.subject)
    ids = torch.tensor([tok(e.prompt)["input_ids"]])
    T, S = ids.shape[1], TRACE_ROWS
    std = embedding_std(model)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(S, s1 - s0, model.config.hidden_size, generator=g) * (NOISE_MULTIPLE * std)
    paths = [f"{h.block_paths[j]}.mlp" for j in TRACE_LAYERS]
    mods = [model.get_submodule(p) for p in paths]
    clean = {}
    with torch.no_grad(), hooks(*[m.register_forward_hook(
            lambda m, a, o, p=p: clean.__setitem__(p, o[0].detach().clone())) for p, m in zip(paths, mods)]):
        clean_probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
    answer = int(clean_probs.argmax())
    t = s1 - 1  # the last subject token
    rows, pos = torch.arange(S), torch.full((S,), t)
    patches = {p: Patch(rows, pos, clean[p][t].expand(S, -1)) for p in paths}
    last_rows, last_pos = torch.arange(S), torch.full((S,), T - 1)
    inp = ids.expand(S, -1)
    info = {"prompt": e.prompt, "subject": e.subject, "subject_range": [s0, s1], "tokens": T, "restored": paths,
            "restored_token": t, "answer": tok.decode([answer]), "answer_prob_clean": float(clean_probs[answer])}

    def ours_once():
        with noised(h, noise, s0), restored(h, patches, rows=S), head_at(h, last_rows, last_pos):
            out = run(h, input_ids=inp, **no_cache(model))
        return torch.softmax(out.logits[0].float(), -1)

    def plain_once():
        def add_noise(m, a, out):
            out = out.clone()
            out[:, s0:s1] += noise.to(out.dtype)
            return out

        def restore(m, a, out, p):
            out[rows, pos] = patches[p].values.to(out.dtype)

        hs = [model.get_input_embeddings().register_forward_hook(add_noise)]
        hs += [m.register_forward_hook(lambda m, a, o, p=p: restore(m, a, o, p)) for p, m in zip(paths, mods)]
        hs.append(h.head.register_forward_pre_hook(gather_pre_hook(last_rows, last_pos)))
        with hooks(*hs):
            out = model(input_ids=inp, use_cache=False)
        return torch.softmax(out.logits[0].float(), -1)

    def ours(n):
        with using(h), torch.no_grad(), Timer() as tm:
            return [ours_once() for _ in range(n)][-1], tm.stop()

    def plain(n):
        model.eval()
        with torch.no_grad(), Timer() as tm:
            return [plain_once() for _ in range(n)][-1], tm.stop()

    def compare(a, b):
        info["answer_prob_traced_mean"] = float(b[:, answer].mean())  # the interventions did something
        return {"answer_probs": max_rel(a[:, answer], b[:, answer]), "last_position_probs": max_rel(a, b)}

    return ours, plain, compare, info


# --------------------------------------------------------------------------- case (c): LGA capture


def capture_case(h, batch):
    from gradlocate.interventions import capture, head_at, run, states, using
    from gradlocate.losses import edit_nll, logits_of, scored_positions

    model = h.root
    paths = [x.path for x in h]
    params = [x.parameter for x in h]
    mods = [x.module for x in h]
    r, p = scored_positions(batch.labels)
    n = len(batch)

    def ours_once():
        with capture(h, paths, inputs=True) as cap, head_at(h, r, p):
            logits = logits_of(run(h, input_ids=batch.input_ids, attention_mask=batch.attention_mask))
        per_row = edit_nll(logits, batch.labels, scored_only=True)
        grads = cap.grads(per_row.sum(), paths)
        return ([states(cap.inputs[q].detach(), n) for q in paths], [states(g.detach(), n) for g in grads],
                per_row.detach())

    def plain_once():
        ins, outs = {}, {}

        def rec(m, args, out, q):
            ins[q], outs[q] = args[0], out

        hs = [m.register_forward_hook(lambda m, a, o, q=q: rec(m, a, o, q)) for q, m in zip(paths, mods)]
        hs.append(h.head.register_forward_pre_hook(gather_pre_hook(r, p)))
        with hooks(*hs):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_row = edit_nll(logits, batch.labels, scored_only=True)
        grads = torch.autograd.grad(per_row.sum(), [outs[q] for q in paths])
        return [ins[q].detach() for q in paths], [g.detach() for g in grads], per_row.detach()

    def ours(k):
        with using(h, params), torch.enable_grad(), Timer() as tm:
            return [ours_once() for _ in range(k)][-1], tm.stop()

    def plain(k):
        with only_grad(model, params), torch.enable_grad(), Timer() as tm:
            return [plain_once() for _ in range(k)][-1], tm.stop()

    def compare(a, b):
        return {"losses": max_rel(a[2], b[2]),
                "down_proj_inputs": max(max_rel(x, y) for x, y in zip(a[0], b[0])),
                "down_proj_output_grads": max(max_rel(x, y) for x, y in zip(a[1], b[1]))}

    return ours, plain, compare


# --------------------------------------------------------------------------- timing


def max_rel(a, b) -> float:
    """max |a - b| over max |b| (0 for two zero tensors)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


class Timer:
    """Wall and CPU time from entering the block to :meth:`stop` (or to its end): the
    loop of iterations only, not the ``using`` / flag setup entered before it."""

    def __enter__(self):
        self.wall = self.cpu = None
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def stop(self):
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def time_pair(ours, plain, repeats, per_call):
    """Alternate the two (after one warm-up each). Each returns ``(output, Timer)``, the
    timer covering its loop of ``per_call`` iterations only."""
    out = {"ours": ours()[0], "plain": plain()[0]}  # warm-up, and the outputs compared
    wall = {"ours": [], "plain": []}
    cpu = {"ours": [], "plain": []}
    for rep in range(repeats):
        order = ("ours", "plain") if rep % 2 == 0 else ("plain", "ours")
        for name in order:
            fn = ours if name == "ours" else plain
            gc.collect()
            _, tm = fn()
            wall[name].append(tm.wall / per_call)
            cpu[name].append(tm.cpu / per_call)
    return out, wall, cpu


def summarize(name, desc, wall, cpu, diffs, per_call, repeats):
    mw = {k: statistics.median(v) for k, v in wall.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    row = {
        "case": name, "description": desc, "iterations_per_repeat": per_call, "repeats": repeats,
        "ours_ms": 1e3 * mw["ours"], "plain_ms": 1e3 * mw["plain"], "ratio": mw["ours"] / mw["plain"],
        "overhead_ms": 1e3 * (mw["ours"] - mw["plain"]),
        "ours_cpu_ms": 1e3 * mc["ours"], "plain_cpu_ms": 1e3 * mc["plain"], "ratio_cpu": mc["ours"] / mc["plain"],
        "all_wall_s": wall, "all_cpu_s": cpu, "max_rel_diff": diffs,
        "same_numbers": all(v <= REL_TOL for v in diffs.values()),
    }
    row["overhead_within_10pct"] = row["ratio"] <= OVERHEAD_TARGET
    print(f"{name}: nnsight {row['ours_ms']:.1f} ms, plain {row['plain_ms']:.1f} ms, ratio {row['ratio']:.3f} "
          f"(cpu {row['ratio_cpu']:.3f}), overhead {row['overhead_ms']:+.1f} ms; max rel diff "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    return row


def using_cost(h, repeats):
    """Wall time of entering and leaving ``using`` (nnsight wraps and unwraps the model)."""
    from gradlocate.interventions import using

    params = [x.parameter for x in h]
    for _ in range(2):
        with using(h, params):
            pass
    ts = []
    for _ in range(max(repeats, 7)):
        t0 = time.perf_counter()
        with using(h, params):
            pass
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="alternating repeats per case (medians; at least 7)")
    ap.add_argument("--inner", type=int, default=3, help="iterations per timed block for the 8-edit step, "
                                                         "the tracing forward and the capture")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "interventions"))
    args = ap.parse_args()
    if args.repeats < 7:
        ap.error("--repeats must be at least 7")
    torch.set_num_threads(args.threads)
    import nnsight

    from gradlocate import down_projections, load_edits
    from gradlocate.gradients import edit_batch
    from gradlocate.models import smollm2

    t_start = time.perf_counter()
    model, tok = smollm2(verbose=False)
    h = down_projections(model)
    edits = load_edits("zsre", n=8)
    batch = edit_batch(h, [e.prompt for e in edits], [e.target_new for e in edits], True)
    print(f"SmolLM2: {len(edits)} ZsRE edits ({batch.input_ids.shape[1]} tokens wide), {args.threads} thread(s), "
          f"{args.repeats} repeats", flush=True)

    rows_out = []
    for head_mode in ("select", "fused"):
        for per_step, rows_list in ((1, [torch.tensor([i]) for i in range(len(edits))]),
                                    (8, [torch.arange(len(edits))] * args.inner)):
            ours, plain, compare, close = locft_case(h, batch, rows_list, head_mode)
            out, wall, cpu = time_pair(ours, plain, args.repeats, len(rows_list))
            desc = (f"LocFT-BF step, layer {LAYER}, cache down_input, head {head_mode}, {per_step} edit(s) per step: "
                    f"forward + backward")
            rows_out.append(summarize(f"a: LocFT-BF step, {per_step} edit{'s' if per_step > 1 else ''}, "
                                      f"head {head_mode}", desc, wall, cpu, compare(out["ours"], out["plain"]),
                                      len(rows_list), args.repeats))
            close()

    ours, plain, compare, info = trace_case(h, tok)
    out, wall, cpu = time_pair(lambda: ours(args.inner), lambda: plain(args.inner), args.repeats, args.inner)
    rows_out.append(summarize(f"b: tracing forward, {TRACE_ROWS} rows, 3 restored", "causal-tracing forward: "
                              f"{TRACE_ROWS} corrupted rows, noise on the subject, MLP outputs restored at layers "
                              f"{list(TRACE_LAYERS)}, head at the last position, no_grad",
                              wall, cpu, compare(out["ours"], out["plain"]), args.inner, args.repeats))
    rows_out[-1]["trace"] = info

    ours, plain, compare = capture_case(h, batch)
    out, wall, cpu = time_pair(lambda: ours(args.inner), lambda: plain(args.inner), args.repeats, args.inner)
    rows_out.append(summarize("c: LGA capture, 30 sites, 8 edits", "capture of the 30 down-projection inputs and "
                              "output gradients for 8 edits, head at the scored positions: forward + backward",
                              wall, cpu, compare(out["ours"], out["plain"]), args.inner, args.repeats))

    using_ms = using_cost(h, args.repeats)
    print(f"using() enter + exit: {using_ms:.1f} ms", flush=True)

    checks = {f"{r['case']}: same numbers": r["same_numbers"] for r in rows_out}
    report = {
        "benchmark": "gradlocate interventions (nnsight) vs plain torch hooks / forward replacement",
        "model": "SmolLM2-135M-Instruct (30 layers, d_model 576, d_mlp 1536), float32, CPU",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"nnsight {nnsight.__version__}",
        "threads": args.threads, "repeats": args.repeats, "inner": args.inner, "n_edits": len(edits),
        "edit_width_tokens": int(batch.input_ids.shape[1]), "rel_tol": REL_TOL,
        "overhead_target_ratio": OVERHEAD_TARGET, "using_enter_exit_ms": using_ms,
        "cases": rows_out, "checks": checks,
        "targets": {f"{r['case']}: overhead <= 10%": r["overhead_within_10pct"] for r in rows_out},
        "total_s": time.perf_counter() - t_start,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out_path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    failed = [k for k, v in checks.items() if not v]
    if failed:
        print("FAILED checks: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def markdown(r) -> str:
    lines = [
        "# gradlocate interventions (nnsight) vs plain torch hooks (benchmarks/bench_interventions.py)",
        "",
        f"{r['model']}; {r['machine']}; {r['threads']} thread; {r['n_edits']} ZsRE edits (EOS appended, "
        f"{r['edit_width_tokens']} tokens wide); median of {r['repeats']} alternating repeats, each timing "
        f"{r['inner']} iterations (1-edit steps: an epoch of 8) inside one `using` block; times per iteration "
        f"(wall; CPU-time ratio alongside). Total benchmark time {r['total_s']:.0f} s.",
        "",
        "| case | nnsight path ms | plain hooks ms | **ratio** (wall) | ratio (CPU) | overhead ms | "
        "max rel. diff | overhead <= 10% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in r["cases"]:
        diff = max(c["max_rel_diff"].values())
        lines.append(f"| {c['case']} | {c['ours_ms']:.1f} | {c['plain_ms']:.1f} | **{c['ratio']:.3f}** | "
                     f"{c['ratio_cpu']:.3f} | {c['overhead_ms']:+.1f} | {diff:.1e} | "
                     f"{'yes' if c['overhead_within_10pct'] else 'no'} |")
    lines += [
        "",
        f"Once per gradlocate call (`LocFTBF.fit`, `causal_trace`, `lga`, ...): entering and leaving `using` "
        f"(nnsight wraps the model's modules, then unwraps them) takes {r['using_enter_exit_ms']:.1f} ms.",
        "",
        *[f"Case b: {c['trace']['prompt']!r}, subject {c['trace']['subject']!r} (tokens {c['trace']['subject_range']}) "
          f"noised, `{c['trace']['restored'][0]}` .. `{c['trace']['restored'][-1]}` restored at token "
          f"{c['trace']['restored_token']}; answer {c['trace']['answer']!r}: p = {c['trace']['answer_prob_clean']:.4f} "
          f"clean, {c['trace']['answer_prob_traced_mean']:.4f} mean over the traced rows." for c in r["cases"]
          if "trace" in c],
        "",
        "Max rel. diff: the largest |nnsight - plain| over the largest |plain| among the losses, probabilities, "
        f"gradients (and captured inputs) of the case; the check is <= {r['rel_tol']:g}.",
        "",
        "Targets (reported, not checked): " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                                        for k, v in r["targets"].items()),
        "",
        "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

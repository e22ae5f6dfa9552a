"""The verbs that look at one model and edit it: ``layers``, ``select``, ``trace``, ``edit``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gradlocate.cli.common import (CLIError, check_out_path, load_edits_arg, report_result, resolved, retain_texts,
                                   save_plot, settings_from, write_json)

__all__ = ["cmd_layers", "cmd_select", "cmd_trace", "cmd_edit"]


def cmd_layers(args: argparse.Namespace) -> int:
    hs = resolved(args)
    print(repr(hs))
    print(hs.to_table())
    write_json(args.json, {"model": args.model, "blocks_path": hs.blocks_path, "down_path": hs.down_path,
                            "layers": [{"layer": h.layer, "path": h.path, "shape": [h.d_model, h.d_mlp]} for h in hs]})
    return 0


def _methods(spec: str) -> list[str]:
    if spec == "all":
        return ["gradratio", "lga", "cma"]
    out = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in out if m not in ("gradratio", "lga", "cma")]
    if bad or not out:
        raise CLIError(f"--method {spec!r}: choose gradratio, lga, cma or all")
    return out


def _select(h: Any, edits: list[Any], method: str, args: argparse.Namespace, append_eos: bool | None = None) -> Any:
    from gradlocate.golden.compare import run_selector
    from gradlocate.handles import HandleError

    # append_eos=None: the selector's own default (the papers' answer-tokens-only loss).
    eos = {} if append_eos is None else {"append_eos": append_eos}
    kw: dict[str, Any] = {"cma": {"samples": args.samples}}.get(method, eos)
    retain = retain_texts(args.retain, args.edits, args.n_retain) if method == "gradratio" else None
    try:
        return run_selector(method, h, edits, retain, **kw)
    except (ValueError, TypeError, HandleError) as e:
        raise CLIError(f"{method}: {e}") from None


def _combined_table(results: dict[str, Any]) -> str:
    from gradlocate.results import _fmt

    names = list(results)
    layers = sorted({l for r in results.values() for l in r.layers})
    head = f"{'layer':>5} " + " ".join(f"{n:>12}" for n in names) + "  selected by"
    lines = [head]
    for l in layers:
        cells = []
        for n in names:
            r = results[n]
            if l in r.layers:
                i = r.layers.index(l)
                mark = "*" if l == r.selected else (" " if r.eligible[i] else "x")
                cells.append(f"{_fmt(r.scores[i]):>11}{mark}")
            else:
                cells.append(f"{'':>12}")
        by = ", ".join(n for n in names if results[n].selected == l)
        lines.append(f"{l:>5} " + " ".join(cells) + (f"  <- {by}" if by else ""))
    lines.append("(* selected, x excluded: below GradRatio's l_min or outside LGA's Tukey fences)")
    return "\n".join(lines)


def cmd_select(args: argparse.Namespace) -> int:
    methods = _methods(args.method)
    check_out_path(args.plot, "--plot")
    h = resolved(args)
    edits = load_edits_arg(args.edits, args.n, args.offset)
    results, failed = {}, {}
    for m in methods:
        print(f"running {m} on {len(edits)} edits ...", file=sys.stderr)
        try:
            results[m] = _select(h, edits, m, args)
        except CLIError as e:
            if len(methods) == 1:
                raise
            failed[m] = str(e)  # one selector that cannot run on this data: the others still report
    if not results:
        raise CLIError("no selector could run: " + "; ".join(failed.values()))
    print(f"model: {args.model} ({type(h.root).__name__}, {h.n_layers} layers); "
          f"{len(edits)} edits from {args.edits}")
    print(_combined_table(results))
    print()
    for m, r in results.items():
        t = sum(r.timings.values())
        print(f"{m:>10}: layer {r.selected}   ({t:.1f} s)")
    for m, why in failed.items():
        print(f"{m:>10}: could not run: {why}")
    write_json(args.json, {**{m: r.to_dict() for m, r in results.items()}, **{m: {"error": w} for m, w in failed.items()}})
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.8 * len(results)), squeeze=False)
        for ax, r in zip(axes[:, 0], results.values()):
            r.plot(ax=ax)
        fig.tight_layout()
        save_plot(fig, args.plot)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from gradlocate.trace import causal_trace

    check_out_path(args.plot, "--plot")
    h = resolved(args)
    try:
        res = causal_trace(h, args.prompt, args.subject, kind=args.kind, samples=args.samples, window=args.window,
                           noise=args.noise, method=args.trace_method, verify=args.verify)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return report_result(res, _trace_table(res), args)


def _trace_table(res: Any) -> str:
    """Tokens down, layers across: the answer probability with that state restored."""
    s0, s1 = res.subject_range
    width = max(8, max(len(repr(res.tokens[t])) for t in res.token_indices) + 2)
    head = f"{'token':<{width}}" + "".join(f"{l:>7}" for l in res.layers)
    what = " (AtP estimate)" if res.estimated else ""
    lines = [f"P({res.answer_text!r}) with the {res.kind} state restored{what}; low {res.low_score:.4f}, "
             f"high {res.high_score:.4f}; * = subject token", head]
    for i, t in enumerate(res.token_indices):
        name = repr(res.tokens[t]) + ("*" if s0 <= t < s1 else "")
        lines.append(f"{name:<{width}}" + "".join(f"{float(v):>7.4f}" for v in res.scores[i]))
    return "\n".join(lines)


def cmd_edit(args: argparse.Namespace) -> int:
    from gradlocate.editors import make, spec
    from gradlocate.evaluation import evaluate

    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise CLIError(f"--save {args.save!r} exists and is not empty")
    h = resolved(args)
    edits = load_edits_arg(args.edits, args.n, args.offset)
    settings = settings_from(args)
    if args.layer == "auto":
        # The selector scores the loss the editor then minimises (LocFT-BF's append_eos).
        from gradlocate.losses import APPEND_EOS

        sel = _select(h, edits, args.method, args, append_eos=getattr(settings, "append_eos", APPEND_EOS))
        layer = sel.selected
        print(f"{args.method} selects layer {layer}")
    else:
        try:
            layer = int(args.layer)
        except ValueError:
            raise CLIError(f"--layer {args.layer!r}: give an int or 'auto'") from None
    gen = not args.no_generation
    try:
        ft = make(args.editor, h, layer, settings, progress=True)
    except (ValueError, TypeError, IndexError) as e:
        raise CLIError(str(e)) from None
    pre = evaluate(h, edits, generation=gen)
    fit = ft.fit(edits)
    post = evaluate(h, edits, pre=pre, generation=gen)
    print(f"edited layer {ft.layer} with {spec(args.editor).label} ({settings!r}): {fit!r}")
    print("before:")
    print(pre.to_table())
    print("after:")
    print(post.to_table())
    write_json(args.json, {"layer": layer, "fit": fit.to_dict(), "before": pre.to_dict(), "after": post.to_dict()})
    if args.save:
        ft.commit()
        h.root.save_pretrained(args.save)
        h.tokenizer.save_pretrained(args.save)
        print(f"saved the edited model to {args.save}")
    else:
        ft.restore()
    return 0



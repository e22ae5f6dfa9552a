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


SELECTORS = ("gradratio", "lga", "cma")


def _methods(spec: str) -> list[str]:
    out = [x for m in spec.split(",") if m.strip() for x in (SELECTORS if m.strip() == "all" else [m.strip()])]
    bad = [m for m in out if m not in (*SELECTORS, "search")]
    if bad or not out:
        raise CLIError(f"--method {spec!r}: choose gradratio, lga, cma, search or all (a comma list works too)")
    return out


def _select(h: Any, edits: list[Any], method: str, args: argparse.Namespace, append_eos: bool | None = None) -> Any:
    from gradlocate.golden.compare import run_selector
    from gradlocate.handles import HandleError

    # append_eos=None: the selector's own default (the papers' answer-tokens-only loss).
    eos = {} if append_eos is None else {"append_eos": append_eos}
    kw: dict[str, Any] = {"cma": {"samples": args.samples}}.get(method, eos)
    retain = retain_texts(args.retain, args.edits, args.n_retain) if method == "gradratio" else None
    try:
        return run_selector(method, h, edits, retain, progress=True, **kw)
    except (ValueError, TypeError, HandleError) as e:
        raise CLIError(f"{method}: {e}") from None


def _combined_table(results: dict[str, Any]) -> str:
    """Layers down, methods across (under 100 columns), what each score is and what its
    "x" (excluded) means, method by method."""
    import textwrap

    from gradlocate.golden.recommend import WHAT_THE_SCORES_MEAN
    from gradlocate.results import _fmt

    names = list(results)
    layers = sorted({l for r in results.values() for l in r.layers})
    lines = [f"{'layer':>5} " + " ".join(f"{n:>12}" for n in names) + "  selected by"]
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
    lines.append("* selected; x excluded by the method's own rule:")
    for n in names:
        lines += textwrap.wrap(f"{n}: {WHAT_THE_SCORES_MEAN.get(n, '')}", 98, initial_indent="  ",
                               subsequent_indent="    ")
    return "\n".join(lines)


def _time_one_cell(h: Any, edits: Any, editor: str, settings: Any, layer: int) -> float | None:
    """Seconds one matrix cell (one edit alone at one layer, scored) takes here, or None."""
    import time

    from gradlocate.golden.matrix import matrix

    t0 = time.perf_counter()
    try:
        matrix(h, edits[:1], editor=editor, hparams=settings, layers=[layer], capability_edits=0, progress=False)
    except Exception:  # noqa: BLE001 - the estimate is optional: no estimate, said so
        return None
    return time.perf_counter() - t0


def _recommend(h: Any, edits: Any, results: dict[str, Any], found: Any, args: argparse.Namespace) -> Any:
    from gradlocate.editors import spec
    from gradlocate.golden.recommend import recommend

    if found is not None:
        rec = recommend(results, spec(args.editor).label, h.n_layers, searched=found)
        print()
        print("\n".join(rec.lines()))
        return rec
    settings = settings_from(args)
    print(f"timing one {spec(args.editor).label} cell for the cost of a check ...", file=sys.stderr)
    rec = recommend(results, spec(args.editor).label, h.n_layers,
                    seconds_per_cell=_time_one_cell(h, edits, args.editor, settings, h.n_layers // 2))
    cmd = (f"gradlocate select --model {args.model} --edits {args.edits}" + (f" -n {args.n}" if args.n else "")
           + f" --method search --editor {args.editor}")
    print()
    print("\n".join(rec.lines(cmd)))
    return rec


def _search(h: Any, edits: Any, args: argparse.Namespace) -> Any:
    from gradlocate.golden.search import search

    try:
        return search(h, edits, editor=args.editor, hparams=settings_from(args), budget=args.budget, out=args.out,
                      progress=True)
    except (ValueError, TypeError) as e:
        raise CLIError(f"search: {e}") from None


def cmd_select(args: argparse.Namespace) -> int:
    methods = _methods(args.method)
    check_out_path(args.plot, "--plot")
    h = resolved(args)
    edits = load_edits_arg(args.edits, args.n, args.offset)
    results, failed, found = _run_methods(h, edits, methods, args)
    print(f"model: {args.model} ({type(h.root).__name__}, {h.n_layers} layers); "
          f"{len(edits)} edits from {Path(args.edits).name}")
    if results:
        print(_combined_table(results))
        print()
    for m, r in results.items():
        print(f"{m:>10}: layer {r.selected}   ({sum(r.timings.values()):.1f} s)")
    if found is not None:
        print(repr(found))
    for m, why in failed.items():
        print(f"{m:>10}: could not run: {why}")
    rec = _recommend(h, edits, results, found, args) if len(results) + (found is not None) > 1 else None
    write_json(args.json, {**{m: r.to_dict() for m, r in results.items()}, **{m: {"error": w} for m, w in failed.items()},
                           **({"search": found.to_dict()} if found is not None else {}),
                           **({"recommendation": rec.to_dict()} if rec is not None else {})})
    if args.plot:
        _plot_selection(results, found, args)
    return 0


def _run_methods(h: Any, edits: Any, methods: list[str], args: argparse.Namespace) -> tuple[dict, dict, Any]:
    results, failed, found = {}, {}, None
    for m in methods:
        print(f"running {m} on {len(edits)} edits ...", file=sys.stderr)
        try:
            if m == "search":
                found = _search(h, edits, args)
            else:
                results[m] = _select(h, edits, m, args)
        except CLIError as e:
            if len(methods) == 1:
                raise
            failed[m] = str(e)  # one selector that cannot run on this data: the others still report
    if not results and found is None:
        raise CLIError("no selector could run: " + "; ".join(failed.values()))
    return results, failed, found


def _plot_selection(results: dict[str, Any], found: Any, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(results.values()) + ([found] if found is not None else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for ax, r in zip(axes[:, 0], panels):
        r.plot(ax=ax)
    fig.suptitle(f"{args.model}: {', '.join(list(results) + (['search'] if found is not None else []))} on "
                 f"{args.n or 'all'} edits of {Path(args.edits).name}")
    fig.tight_layout()
    save_plot(fig, args.plot)


def cmd_trace(args: argparse.Namespace) -> int:
    from gradlocate.trace import causal_trace

    check_out_path(args.plot, "--plot")
    h = resolved(args)
    try:
        res = causal_trace(h, args.prompt, args.subject, kind=args.kind, samples=args.samples, window=args.window,
                           noise=args.noise, method=args.trace_method, verify=args.verify,
                           answer=args.target, progress=True)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return report_result(res, _trace_table(res), args)


def _trace_table(res: Any, width: int = 100) -> str:
    """Layers down, tokens across (so it fits ``width`` columns; the tokens after the subject
    and its neighbours are dropped first if there are too many): the answer's probability
    with that (layer, token) state restored."""
    s0, s1 = res.subject_range
    cols = list(range(len(res.token_indices)))
    while 6 + 9 * len(cols) > width and len(cols) > 1:  # keep the subject tokens and the last token
        keep = [k for k in cols if s0 <= res.token_indices[k] < s1 or k == cols[-1]]
        drop = [k for k in cols if k not in keep]
        if not drop:
            break
        cols.remove(drop[0])
    def name(k: int) -> str:
        tok = res.tokens[res.token_indices[k]]
        shown = repr(tok)[1:-1] if tok.strip() else repr(tok)  # a space shows as ' ', not blank
        return shown[:7] + ("*" if s0 <= res.token_indices[k] < s1 else "")

    names = [name(k) for k in cols]
    what = " (AtP estimate)" if res.estimated else ""
    lines = [f"P({res.answer_text!r}) with the {res.kind} state restored{what}: clean {res.high_score:.4f}, "
             f"corrupted {res.low_score:.4f}; * = subject token",
             "layer " + "".join(f"{n:>9}" for n in names)]
    if res.low_score >= res.high_score:
        lines[1:1] = ["(the corrupted run is not below the clean one: noise does not hurt this answer, so",
                      " restoring a state cannot show an effect; give --target the answer you expect)"]
    for j, l in enumerate(res.layers):
        lines.append(f"{l:>5} " + "".join(f"{float(res.scores[k][j]):>9.4f}" for k in cols))
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



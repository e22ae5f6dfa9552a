"""The ``gradlocate`` command line.

Human-readable tables go to stdout, progress bars to stderr, ``--json`` writes the
machine-readable result. Bad arguments, missing files, unknown models and any argument the library refuses end
with a one-line error and exit code 2, as argparse's own do; a failure inside a
computation prints one line and exits with 1 (``GRADLOCATE_DEBUG=1`` shows its traceback).

Examples::

    gradlocate layers --model smollm2
    gradlocate select --model smollm2 --edits zsre -n 8 --method all
    gradlocate trace  --model smollm2 --prompt "The Eiffel Tower is in" --subject "Eiffel Tower"
    gradlocate edit   --model smollm2 --edits zsre -n 8 --layer auto --save edited/
    gradlocate sweep  --model smollm2 --edits zsre -n 8 --layers 0:30:3 --out sweep.jsonl
    gradlocate compare --model smollm2 --edits zsre -n 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- helpers


def _load_model(spec: str, dtype: str) -> tuple[Any, Any]:
    import torch

    from gradlocate.models import MissingModelPackage, load_model

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        return load_model(spec, dtype=dt)
    except MissingModelPackage as e:
        raise CLIError(str(e)) from None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise CLIError(f"unknown model {spec!r}: {str(e).splitlines()[0]}") from None


def _resolved(args: argparse.Namespace) -> Any:
    """The model named by --model, resolved once (with --blocks / --down if given)."""
    from gradlocate.handles import HandleError, down_projections

    model, tok = _load_model(args.model, args.dtype)
    try:
        return down_projections(model, tokenizer=tok, blocks=getattr(args, "blocks", None),
                                down=getattr(args, "down", None), chat=getattr(args, "chat", False))
    except (HandleError, ValueError) as e:
        raise CLIError(str(e)) from None


def _load_edits(spec: str, n: int | None, offset: int = 0) -> list[Any]:
    from gradlocate.data import load_edits

    try:
        return load_edits(spec, n=n, offset=offset)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CLIError(f"bad edits file {spec!r}: {e}") from None


def _retain_texts(spec: str | None, edits_spec: str, n: int) -> list[str]:
    from gradlocate.data import load_texts

    if spec:
        try:
            return load_texts(spec, n=n)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
        except (ValueError, TypeError) as e:
            raise CLIError(f"bad retain file {spec!r}: {e}") from None
    from gradlocate.data import default_retain_texts

    if n < 1:
        raise CLIError(f"--n-retain must be >= 1 (retain texts for GradRatio), got {n}")
    try:
        return default_retain_texts(n)
    except ValueError:
        raise CLIError(f"--n-retain {n}: gradlocate ships {len(default_retain_texts(None))} retain texts; "
                       f"give more with --retain FILE") from None


def _parse_layers(spec: str | None) -> list[int] | None:
    """``"3,5,7"`` or ``"0:30:3"`` (a Python range) or ``None``."""
    if spec is None:
        return None
    try:
        if ":" in spec:
            parts = [int(p) if p else None for p in spec.split(":")]
            start = parts[0] or 0
            stop = parts[1]
            step = parts[2] if len(parts) > 2 and parts[2] else 1
            if stop is None:
                raise CLIError(f"--layers {spec!r}: a range needs an end, e.g. 0:30:3")
            return list(range(start, stop, step))
        return [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise CLIError(f"--layers {spec!r}: expected comma-separated ints or start:stop[:step]") from None


def _write_json(path: str | None, obj: Any) -> None:
    if not path:
        return
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise CLIError(f"--json: folder {str(p.parent)!r} does not exist")
    p.write_text(json.dumps(obj, indent=2, default=_json_default))
    print(f"wrote {p}", file=sys.stderr)


def _json_default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save_plot(ax_or_fig: Any, path: str | None) -> None:
    if not path:
        return
    fig = getattr(ax_or_fig, "figure", ax_or_fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}", file=sys.stderr)


def _report(result: Any, table: str, args: argparse.Namespace) -> int:
    """Print a result's repr and table; write --json and --plot if asked."""
    print(repr(result))
    print(table)
    _write_json(args.json, result.to_dict())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        _save_plot(result.plot(), args.plot)
    return 0


def _check_out_path(path: str | None, flag: str) -> None:
    if path and not Path(path).resolve().parent.exists():
        raise CLIError(f"{flag}: folder {str(Path(path).parent)!r} does not exist")


# --------------------------------------------------------------------------- commands


def cmd_layers(args: argparse.Namespace) -> int:
    hs = _resolved(args)
    print(repr(hs))
    print(hs.to_table())
    _write_json(args.json, {"model": args.model, "blocks_path": hs.blocks_path, "down_path": hs.down_path,
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
    retain = _retain_texts(args.retain, args.edits, args.n_retain) if method == "gradratio" else None
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
    _check_out_path(args.plot, "--plot")
    h = _resolved(args)
    edits = _load_edits(args.edits, args.n, args.offset)
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
    _write_json(args.json, {**{m: r.to_dict() for m, r in results.items()}, **{m: {"error": w} for m, w in failed.items()}})
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.8 * len(results)), squeeze=False)
        for ax, r in zip(axes[:, 0], results.values()):
            r.plot(ax=ax)
        fig.tight_layout()
        _save_plot(fig, args.plot)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from gradlocate.trace import causal_trace

    _check_out_path(args.plot, "--plot")
    h = _resolved(args)
    try:
        res = causal_trace(h, args.prompt, args.subject, kind=args.kind, samples=args.samples, window=args.window,
                           noise=args.noise, method=args.trace_method, verify=args.verify)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return _report(res, _trace_table(res), args)


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


def _trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The editor's settings from the command line (--lr/--epochs/--edits-per-step are LocFT-BF's)."""
    kw: dict[str, Any] = {}
    if getattr(args, "editor", "locft") != "locft":
        given = [f for f, v in (("--lr", args.lr), ("--epochs", args.epochs), ("--edits-per-step", args.edits_per_step))
                 if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)}: LocFT-BF settings; --editor {args.editor} uses its published "
                           f"hyper-parameters (override them from Python)")
        return {"seed": args.seed} if getattr(args, "seed", 0) else {}
    if args.lr is not None:
        kw["lr"] = args.lr
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.edits_per_step is not None:
        kw["edits_per_step"] = args.edits_per_step
    if getattr(args, "seed", 0):
        kw["seed"] = args.seed
    return kw


def cmd_edit(args: argparse.Namespace) -> int:
    from gradlocate.editors import editor_class
    from gradlocate.evaluation import evaluate

    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise CLIError(f"--save {args.save!r} exists and is not empty")
    h = _resolved(args)
    edits = _load_edits(args.edits, args.n, args.offset)
    trainer = _trainer_kwargs(args)
    if args.layer == "auto":
        # The selector scores the loss the trainer then minimises (the same append_eos).
        from gradlocate.losses import APPEND_EOS

        sel = _select(h, edits, args.method, args, append_eos=trainer.get("append_eos", APPEND_EOS))
        layer = sel.selected
        print(f"{args.method} selects layer {layer}")
    else:
        try:
            layer = int(args.layer)
        except ValueError:
            raise CLIError(f"--layer {args.layer!r}: give an int or 'auto'") from None
    gen = not args.no_generation
    try:
        ft = editor_class(args.editor)(h, layer, progress=True, **trainer)
    except (ValueError, TypeError, IndexError) as e:
        raise CLIError(str(e)) from None
    pre = evaluate(h, edits, generation=gen)
    fit = ft.fit(edits)
    post = evaluate(h, edits, pre=pre, generation=gen)
    print(f"edited layer {layer} with {type(ft).__name__}: {fit!r}")
    print("before:")
    print(pre.to_table())
    print("after:")
    print(post.to_table())
    _write_json(args.json, {"layer": layer, "fit": fit.to_dict(), "before": pre.to_dict(), "after": post.to_dict()})
    if args.save:
        ft.commit()
        h.root.save_pretrained(args.save)
        h.tokenizer.save_pretrained(args.save)
        print(f"saved the edited model to {args.save}")
    else:
        ft.restore()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gradlocate.golden.sweep import sweep

    _check_out_path(args.plot, "--plot")
    _check_out_path(args.out, "--out")
    h = _resolved(args)
    edits = _load_edits(args.edits, args.n, args.offset)
    try:
        res = sweep(h, edits, layers=_parse_layers(args.layers), trainer=_trainer_kwargs(args), editor=args.editor,
                    out=args.out, generation=not args.no_generation)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return _report(res, res.to_markdown(), args)


def cmd_compare(args: argparse.Namespace) -> int:
    from gradlocate.golden.compare import compare

    _check_out_path(args.plot, "--plot")
    _check_out_path(args.out, "--out")
    h = _resolved(args)
    edits = _load_edits(args.edits, args.n, args.offset)
    retain = _retain_texts(args.retain, args.edits, args.n_retain)
    try:
        cmp = compare(h, edits, retain, selectors=_methods(args.method), proxy=args.proxy,
                      seed=args.seed, layers=_parse_layers(args.layers), trainer=_trainer_kwargs(args),
                      editor=args.editor, out=args.out,
                      generation=not args.no_generation, selector_kwargs={"cma": {"samples": args.samples}})
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return _report(cmp, cmp.to_markdown(), args)


def cmd_study(args: argparse.Namespace) -> int:
    from gradlocate.golden.study import study

    _check_out_path(args.plot, "--plot")
    h = _resolved(args)
    edits = _load_edits(args.edits, args.n, args.offset)
    retain = _retain_texts(args.retain, args.edits, args.n_retain)
    try:
        res = study(h, edits, retain, name=args.name or f"{args.model} on {Path(args.edits).stem}",
                    n_proxy=args.n_proxy, seed=args.seed, layers=_parse_layers(args.layers), editor=args.editor,
                    hparams=_trainer_kwargs(args), capability_edits=args.capability_edits, batch=args.batch,
                    threshold=args.threshold, n_boot=args.bootstrap, out_dir=args.out)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(res.to_markdown())
    _write_json(args.json, res.to_dict())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        _save_plot(res.plot(), args.plot)
    return 0


COMMANDS = {"layers": cmd_layers, "select": cmd_select, "trace": cmd_trace, "edit": cmd_edit,
            "sweep": cmd_sweep, "compare": cmd_compare, "study": cmd_study}


def _add_select_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retain", default=None, help="general texts for GradRatio (txt/json/jsonl; default: built-in)")
    p.add_argument("--n-retain", type=int, default=16, help="number of retain texts (paper: 256)")
    p.add_argument("--samples", type=int, default=10, help="causal tracing: corrupted samples per cell")


def _add_trainer_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--editor", default="locft", choices=["locft", "rome", "r-rome", "emmet"],
                   help="the editor (default: LocFT-BF)")
    p.add_argument("--lr", type=float, default=None, help="LocFT-BF learning rate")
    p.add_argument("--epochs", type=int, default=None, help="LocFT-BF maximum epochs")
    p.add_argument("--edits-per-step", type=int, default=None, help="LocFT-BF edits per optimizer step")
    p.add_argument("--no-generation", action="store_true", help="skip generation exact-match scoring (faster)")
    p.add_argument("--seed", type=int, default=0, help="seeds the proxy/test split and the trainer's shuffles")


def _parsers(sub: Any) -> None:
    p = sub.add_parser("select", help="select the layer to edit (GradRatio, LGA, causal tracing)")
    _common(p)
    p.add_argument("--method", default="gradratio", help="gradratio | lga | cma | all (or a comma list)")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    _add_select_opts(p)

    p = sub.add_parser("trace", help="ROME causal trace of one prompt")
    _common(p, edits=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--kind", default="hidden", choices=["hidden", "mlp", "attn"])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--noise", type=float, default=3.0, help="noise scale, in multiples of the embedding std")
    p.add_argument("--method", dest="trace_method", default="exact", choices=["exact", "atp"],
                   help="exact (ROME) or atp (attribution patching: an estimate from two forwards and one backward)")
    p.add_argument("--verify", type=int, default=0, help="with --method atp: re-run the K highest cells exactly")
    p.add_argument("--plot", default=None, metavar="OUT.png")

    p = sub.add_parser("edit", help="edit one layer with LocFT-BF and evaluate")
    _common(p)
    p.add_argument("--layer", required=True, help="layer index, or auto (the --method selector's layer)")
    p.add_argument("--method", default="gradratio", choices=["gradratio", "lga", "cma"])
    p.add_argument("--save", default=None, metavar="DIR", help="save the edited model (transformers format)")
    _add_select_opts(p)
    _add_trainer_opts(p)

    p = sub.add_parser("sweep", help="edit at every candidate layer and find the golden layer")
    _common(p)
    p.add_argument("--layers", default=None, help="e.g. 0:30:3 or 4,8,12 (default: all)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append results here; a re-run resumes")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    _add_trainer_opts(p)

    p = sub.add_parser("compare", help="selectors against the sweep (proxy/test split)")
    _common(p)
    p.add_argument("--method", default="all", help="selectors: gradratio,lga,cma or all")
    p.add_argument("--proxy", type=float, default=0.1, help="fraction of edits the selectors see")
    p.add_argument("--layers", default=None, help="sweep layers, e.g. 0:30:3 (selected layers are added)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    _add_select_opts(p)
    _add_trainer_opts(p)

    p = sub.add_parser("study", help="the golden-layer study: the single-edit matrix, judged; selectors against it")
    _common(p)
    p.add_argument("--name", default=None, help="the study's title")
    p.add_argument("--n-proxy", type=int, default=16, help="edits the selectors see (the rest are the test rows)")
    p.add_argument("--layers", default=None, help="the matrix's layers (default: all)")
    p.add_argument("--capability-edits", type=int, default=8,
                   help="edits whose held-out loss change is measured at every layer (the damage gate)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="damage gate: a layer whose edits raise the held-out loss by more nats cannot be golden")
    p.add_argument("--batch", action="store_true", help="also the batch regime: all test edits edited together")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the test edits for the intervals")
    p.add_argument("--out", default=None, metavar="DIR", help="write each part here as it finishes; a re-run resumes")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    _add_select_opts(p)
    _add_trainer_opts(p)


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, edits: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="smollm2 | gemma3-270m | tiny-<arch> | a local folder | a Hugging Face hub name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true",
                   help="feed prompts through the tokenizer's chat template (instruct models), in every step")
    p.add_argument("--blocks", default=None, help="override: path of the decoder-block list (e.g. model.layers)")
    p.add_argument("--down", default=None,
                   help="override: path of the editing site in a block (e.g. mlp.down_proj, or self_attn.o_proj)")
    if edits:
        p.add_argument("--edits", required=True,
                       help="JSON/JSONL file of edits (CounterFact, ZsRE or KnowEdit spelling), or zsre / counterfact")
        p.add_argument("-n", type=int, default=None, help="use the first N edits")
        p.add_argument("--offset", type=int, default=0, help="skip this many edits first")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlocate", description="Which layer should I edit? Find it, then edit it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layers", help="list the MLP down-projections gradlocate finds")
    _common(p, edits=False)
    _parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if getattr(args, "n", None) is not None and args.n < 1:
            raise CLIError(f"-n must be >= 1, got {args.n}")
        if getattr(args, "offset", 0) < 0:
            raise CLIError(f"--offset must be >= 0 (records to skip), got {args.offset}")
        return COMMANDS[args.command](args)
    except CLIError as e:
        return _fail(args.command, f"error: {e}", 2)
    except (ValueError, TypeError) as e:  # the library refused an argument: a usage error, as argparse's are
        return _fail(args.command, f"error: {_first_line(e)}", 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
    except Exception as e:  # noqa: BLE001 - one line; GRADLOCATE_DEBUG=1 shows the traceback
        if os.environ.get("GRADLOCATE_DEBUG"):
            raise
        return _fail(args.command, f"failed: {type(e).__name__}: {_first_line(e)} (GRADLOCATE_DEBUG=1 for the "
                                   f"traceback)", 1)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _fail(command: str, message: str, code: int) -> int:
    print(f"gradlocate {command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

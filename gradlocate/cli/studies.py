"""The verbs of the golden-layer study: ``sweep``, ``compare``, ``study``, ``matrix``,
``report``, ``migrate`` and ``editors``. Each is the library function of the same name,
with its arguments from the command line; a study folder made by any of them is read by
the others."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gradlocate.cli.common import (CLIError, check_out_path, load_edits_arg, parse_layers, parse_shard,
                                   report_result, resolved, retain_texts, save_plot, settings_from, write_json)

__all__ = ["cmd_sweep", "cmd_compare", "cmd_study", "cmd_matrix", "cmd_report", "cmd_migrate", "cmd_editors"]


def _edits(args: argparse.Namespace) -> Any:
    return load_edits_arg(args.edits, args.n, args.offset, getattr(args, "sample", None))


def cmd_sweep(args: argparse.Namespace) -> int:
    from gradlocate.golden.sweep import sweep

    check_out_path(args.plot, "--plot")
    check_out_path(args.out, "--out")
    h = resolved(args)
    try:
        res = sweep(h, _edits(args), layers=parse_layers(args.layers), trainer=settings_from(args), editor=args.editor,
                    out=args.out, generation=not args.no_generation)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return report_result(res, res.to_markdown(), args)


def cmd_compare(args: argparse.Namespace) -> int:
    from gradlocate.golden.compare import compare

    check_out_path(args.plot, "--plot")
    check_out_path(args.out, "--out")
    h = resolved(args)
    retain = retain_texts(args.retain, args.edits, args.n_retain)
    from gradlocate.cli.single import _methods

    try:
        cmp = compare(h, _edits(args), retain, selectors=_methods(args.method), proxy=args.proxy,
                      seed=args.seed, layers=parse_layers(args.layers), trainer=settings_from(args),
                      editor=args.editor, out=args.out, generation=not args.no_generation,
                      selector_kwargs={"cma": {"samples": args.samples}})
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return report_result(cmp, cmp.to_markdown(), args)


def cmd_study(args: argparse.Namespace) -> int:
    from gradlocate.golden.study import study

    check_out_path(args.plot, "--plot")
    h = resolved(args)
    retain = retain_texts(args.retain, args.edits, args.n_retain)
    try:
        res = study(h, _edits(args), retain, name=args.name or f"{args.model} on {Path(args.edits).stem}",
                    n_proxy=args.n_proxy, seed=args.seed, layers=parse_layers(args.layers), editor=args.editor,
                    hparams=settings_from(args), capability_edits=args.capability_edits, batch=args.batch,
                    threshold=args.threshold, n_boot=args.bootstrap, out_dir=args.out, model_spec=args.model)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(res.to_markdown())
    if args.out:
        print(f"wrote the study folder {args.out} (read it again with `gradlocate report {args.out}`)", file=sys.stderr)
    write_json(args.json, res.to_dict())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        save_plot(res.plot(), args.plot)
    return 0


def _from_manifest(args: argparse.Namespace) -> None:
    """A study folder's own model, edits and regime, where the command line does not give
    them: ``gradlocate matrix --out FOLDER --shard 1/2`` resumes the study in FOLDER."""
    from gradlocate.golden.folder import StudyFolder

    if not StudyFolder.is_folder(args.out):
        missing = [f for f, v in (("--model", args.model), ("--edits", args.edits)) if v is None]
        if missing:
            raise CLIError(f"{args.out} is not a study folder yet: give {' and '.join(missing)} to start one")
        return
    try:
        man = StudyFolder.open(args.out).manifest
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.model is None:
        if not man.model.get("spec"):
            raise CLIError(f"{args.out}'s manifest does not say how to load its model: give --model")
        args.model = man.model["spec"]
    if args.edits is None:
        args.folder_edits = StudyFolder.open(args.out).edits()
    if args.editor is None and not args.set and not args.hparams:  # the folder's regime, as it was made
        args.editor = man.regime["editor"]
        args.set = [f"{k}={_json(v)}" for k, v in man.regime["settings"].items()]
    if args.layers is None and man.layers is not None:  # the layers it plans
        args.layers = ",".join(map(str, man.layers))


def _json(v: Any) -> str:
    import json

    return json.dumps(v)


def cmd_matrix(args: argparse.Namespace) -> int:
    from gradlocate.editors import DEFAULT_EDITOR
    from gradlocate.golden.matrix import matrix

    _from_manifest(args)
    args.editor = args.editor or DEFAULT_EDITOR
    h = resolved(args)
    edits = getattr(args, "folder_edits", None) or _edits(args)
    settings = settings_from(args)
    every = parse_layers(args.layers) or list(range(h.n_layers))
    k, n = parse_shard(args.shard)
    mine, shard = every[k::n], f"shard{k}of{n}"
    if args.batch:
        return _batch(h, edits, args, settings, mine, shard)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    try:
        m = matrix(h, edits, editor=args.editor, hparams=settings, layers=mine, planned_layers=every,
                   out=args.out, seeds=seeds,
                   chunk=args.chunk, capability_edits=args.capability_edits, shard=shard, engine=args.engine,
                   address=args.address, workers=args.workers, model_spec=args.model, progress=True)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(repr(m))
    _whole(args.out, h.n_layers)
    return 0


def _whole(out: str, n_layers: int) -> None:
    """Once every cell of the folder is in (all shards), its whole ``matrix.json`` and
    ``matrix.png``; before that, how far it is."""
    import json

    from gradlocate.golden.folder import StudyFolder

    folder = StudyFolder.open(out)
    m, done = folder.load(complete_only=False)
    if not done.done:
        print(f"{out}: {done}; `gradlocate report {out}` judges it once half its layers are complete", file=sys.stderr)
        return
    (folder.path / "matrix.json").write_text(json.dumps(m.to_dict(), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    m.plot(title=f"{folder.path.name}: every edit alone at every layer").savefig(
        folder.path / "matrix.png", dpi=110, bbox_inches="tight")
    print(f"{out}: complete ({done}); wrote matrix.json and matrix.png; judge it with `gradlocate report {out}`",
          file=sys.stderr)


def _batch(h: Any, edits: Any, args: argparse.Namespace, settings: Any, layers: list[int], shard: str) -> int:
    """The batch regime of a study folder: its test edits edited together at each of ``layers``."""
    from gradlocate.golden.folder import StudyFolder
    from gradlocate.golden.study import BATCH_EVALUATION
    from gradlocate.golden.sweep import sweep

    if not StudyFolder.is_folder(args.out):
        raise CLIError(f"--batch edits a study folder's test edits: {args.out} is not a study folder yet (run "
                       f"`gradlocate matrix --out {args.out} ...` first)")
    folder = StudyFolder.open(args.out)
    test = [e for i, e in enumerate(folder.edits()) if i not in set(folder.manifest.proxy_rows())]
    folder.batch_dir.mkdir(exist_ok=True)
    ev = BATCH_EVALUATION
    try:
        res = sweep(h, test, layers=layers, trainer=settings, editor=args.editor, out=folder.batch_dir / f"{shard}.jsonl",
                    generation=ev["generation"], capability=ev["capability"], fluency=ev["fluency"],
                    overall=ev["overall"], progress=True)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(repr(res))
    print(res.to_markdown())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gradlocate.golden.report import report

    check_out_path(args.out, "--out")
    appendix = "\n" + Path(args.append).read_text() if args.append else ""
    sel: Any = False if args.no_selectors else True
    r = report(args.folders, selectors=sel, cma=not args.no_cma, draws=args.draws, threshold=args.threshold,
               n_boot=args.n_boot, figures=args.figures, appendix=appendix,
               compute=not args.cached, progress=True)
    text = r.to_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.print or not args.out:
        print(text)
    for name, why in r.failures.items():
        print(f"{name}: not judged: {why}", file=sys.stderr)
    print(repr(r), file=sys.stderr)
    return 0 if r.studies or not args.folders else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from gradlocate.golden.folder import migrate

    for f in args.folders:
        try:
            print(repr(migrate(f, identity_from=args.model)))
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
    return 0


def cmd_editors(args: argparse.Namespace) -> int:
    from gradlocate.editors import registry, spec

    chosen = [spec(args.name)] if args.name else list(registry().values())
    for s in chosen:
        print(f"{s.name} ({s.label}): {s.description}")
        for name, info in s.settings.sources().items():
            print(f"    {name} = {info['default']!r}: {info.get('doc', '')} [{info.get('source', '')}]")
    return 0

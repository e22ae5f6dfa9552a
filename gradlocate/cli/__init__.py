"""The ``gradlocate`` command line.

Human-readable tables go to stdout, progress bars to stderr, ``--json`` writes the
machine-readable result. Bad arguments, missing files, unknown models and any argument the
library refuses end with a one-line error and exit code 2, as argparse's own do; a failure
inside a computation prints one line and exits with 1 (``GRADLOCATE_DEBUG=1`` shows its
traceback).

Examples::

    gradlocate layers  --model smollm2
    gradlocate select  --model smollm2 --edits zsre -n 8 --method all
    gradlocate trace   --model smollm2 --prompt "The Eiffel Tower is in" --subject "Eiffel Tower"
    gradlocate edit    --model smollm2 --edits zsre -n 8 --layer auto --editor r-rome --set v_num_grad_steps=40
    gradlocate sweep   --model smollm2 --edits zsre -n 8 --layers 0:30:3 --out sweep.jsonl
    gradlocate compare --model smollm2 --edits zsre -n 32
    gradlocate matrix  --model smollm2 --edits counterfact -n 96 --sample 0 --editor r-rome --shard 0/2 --out studies/x
    gradlocate report  studies/x studies/y --out results.md --figures figures/
    gradlocate editors r-rome
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gradlocate.cli.common import CLIError, add_editor_opts
from gradlocate.cli.single import cmd_edit, cmd_layers, cmd_select, cmd_trace
from gradlocate.cli.studies import (cmd_compare, cmd_editors, cmd_matrix, cmd_migrate, cmd_report, cmd_study,
                                    cmd_sweep)

__all__ = ["main", "build_parser"]

COMMANDS = {"layers": cmd_layers, "select": cmd_select, "trace": cmd_trace, "edit": cmd_edit, "sweep": cmd_sweep,
            "compare": cmd_compare, "study": cmd_study, "matrix": cmd_matrix, "report": cmd_report,
            "migrate": cmd_migrate, "editors": cmd_editors}


def _common(p: argparse.ArgumentParser, edits: bool = True, required: bool = True) -> None:
    from gradlocate.models import KNOWN_NAMES

    p.add_argument("--model", required=required, default=None,
                   help=f"{' | '.join(KNOWN_NAMES)} | tiny-<arch> | a local folder | a Hugging Face hub name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the model is loaded in")
    p.add_argument("--chat", action="store_true",
                   help="feed prompts through the tokenizer's chat template (instruct models), in every step")
    p.add_argument("--blocks", default=None, help="override: path of the decoder-block list (e.g. model.layers)")
    p.add_argument("--down", default=None,
                   help="override: path of the editing site in a block (e.g. mlp.down_proj, or self_attn.o_proj)")
    if edits:
        p.add_argument("--edits", required=required, default=None,
                       help="JSON/JSONL file of edits (CounterFact, ZsRE or KnowEdit spelling), or zsre / counterfact")
        p.add_argument("-n", type=int, default=None, help="use the first N edits (with --sample: N drawn at random)")
        p.add_argument("--offset", type=int, default=0, help="skip this many edits first")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")


def _select_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retain", default=None, help="general texts for GradRatio (txt/json/jsonl; default: built-in)")
    p.add_argument("--n-retain", type=int, default=16, help="number of retain texts (paper: 256)")
    p.add_argument("--samples", type=int, default=10, help="causal tracing: corrupted samples per cell")


def _editing_opts(p: argparse.ArgumentParser, generation: bool = True) -> None:
    add_editor_opts(p)
    if generation:
        p.add_argument("--no-generation", action="store_true", help="skip generation exact-match scoring (faster)")


def _single_parsers(sub: Any) -> None:
    p = _verb(sub, "layers", "list the MLP down-projections gradlocate finds")
    _common(p, edits=False)
    p = _verb(sub, "select", "select the layer to edit (GradRatio, LGA, causal tracing, the budgeted search)")
    _common(p)
    p.add_argument("--method", default="gradratio",
                   help="gradratio | lga | cma | search | all (the three selectors; or a comma list)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="the methods' scores per layer, one panel each")
    p.add_argument("--budget", type=int, default=None,
                   help="--method search: cells at most (one edit alone at one layer; default 4 per layer)")
    p.add_argument("--out", default=None, metavar="DIR", help="--method search: a study folder its cells go to (resume)")
    _select_opts(p)
    add_editor_opts(p)
    p = _verb(sub, "trace", "ROME causal trace of one prompt")
    _common(p, edits=False)
    p.add_argument("--prompt", required=True, help="the prompt whose answer is traced")
    p.add_argument("--subject", required=True, help="the subject inside the prompt (its tokens are corrupted)")
    p.add_argument("--target", default=None,
                   help="the answer whose probability is traced (default: the model's own next token)")
    p.add_argument("--kind", default="hidden", choices=["hidden", "mlp", "attn"],
                   help="the state restored: the block output, its MLP or its attention ")
    p.add_argument("--samples", type=int, default=10, help="corrupted runs per cell ")
    p.add_argument("--window", type=int, default=10, help="layers restored around each (mlp/attn)")
    p.add_argument("--noise", type=float, default=3.0, help="noise scale, in multiples of the embedding std")
    p.add_argument("--method", dest="trace_method", default="exact", choices=["exact", "atp"],
                   help="exact (ROME) or atp (attribution patching: an estimate from two forwards and one backward)")
    p.add_argument("--verify", type=int, default=0, help="with --method atp: re-run the K highest cells exactly")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="the trace as a heatmap")
    p = _verb(sub, "edit", "edit one layer with any registered editor, and evaluate")
    _common(p)
    p.add_argument("--layer", required=True,
                   help="layer index (negative counts from the end, as in Python), or auto (the --method selector's)")
    p.add_argument("--method", default="gradratio", choices=["gradratio", "lga", "cma"],
                   help="the selector that picks the layer with --layer auto")
    p.add_argument("--save", default=None, metavar="DIR", help="save the edited model (transformers format)")
    _select_opts(p)
    _editing_opts(p)


def _study_parsers(sub: Any) -> None:
    p = _verb(sub, "sweep", "edit all the edits together at every candidate layer (the batch regime)")
    _common(p)
    p.add_argument("--layers", default=None, help="e.g. 0:30:3 or 4,8,12 (default: all)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append results here; a re-run resumes")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="the metrics per layer")
    _editing_opts(p)
    p = _verb(sub, "compare", "selectors against the sweep (proxy/test split)")
    _common(p)
    p.add_argument("--method", default="all", help="selectors: gradratio,lga,cma or all")
    p.add_argument("--proxy", type=float, default=0.1, help="fraction of edits the selectors see")
    p.add_argument("--seed", type=int, default=0, help="seeds the proxy/test split")
    p.add_argument("--layers", default=None, help="sweep layers, e.g. 0:30:3 (selected layers are added)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="the judging sweep's records (a re-run resumes)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="each selector's layer against the sweep")
    _select_opts(p)
    _editing_opts(p)
    _study_parser(sub)
    _matrix_parser(sub)
    _report_parsers(sub)


def _study_parser(sub: Any) -> None:
    p = _verb(sub, "study", "the golden-layer study: the single-edit matrix, judged; selectors against it")
    _common(p)
    p.add_argument("--sample", type=int, default=None, metavar="SEED", help="draw the -n edits at random with SEED")
    p.add_argument("--name", default=None, help="the study's title")
    p.add_argument("--n-proxy", type=int, default=None, help="edits the selectors see (default: a quarter)")
    p.add_argument("--seed", type=int, default=0, help="seeds the proxy/test split")
    p.add_argument("--layers", default=None, help="the matrix's layers, e.g. 0:30:3 (default: all)")
    p.add_argument("--capability-edits", type=int, default=8,
                   help="edits whose held-out loss change is measured at every layer (the damage gate)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="damage gate: a layer whose edits raise the held-out loss by more nats cannot be golden")
    p.add_argument("--batch", action="store_true", help="also the batch regime: all test edits edited together")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the test edits for the intervals")
    p.add_argument("--out", default=None, metavar="DIR", help="the study folder: each part written as it finishes")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="the golden layer by definition of overall")
    _select_opts(p)
    _editing_opts(p, generation=False)


def _matrix_parser(sub: Any) -> None:
    p = _verb(sub, "matrix", "fill a study folder: every edit alone at every layer (resumable, shardable)")
    _common(p, required=False)
    p.add_argument("--sample", type=int, default=None, metavar="SEED", help="draw the -n edits at random with SEED")
    add_editor_opts(p)
    p.set_defaults(editor=None)  # None: the folder's own editor when resuming (else LocFT-BF)
    p.add_argument("--layers", default=None, help="e.g. 0:30:3 or 4,8,12 (default: all)")
    p.add_argument("--seeds", default=None, help="replicate seeds, e.g. 0,1 (default: the editor's seed)")
    p.add_argument("--shard", default="0/1", help="K/N: this process takes every N-th layer from index K")
    p.add_argument("--chunk", type=int, default=32, help="edits edited together")
    p.add_argument("--capability-edits", type=int, default=8, help="the first K edits get the capability measurement")
    p.add_argument("--engine", default="local", choices=["local", "ray", "auto"], help="where the jobs run")
    p.add_argument("--address", default=None, help="a Ray cluster to join (with --engine ray)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers on a local instance (default: every core)")
    p.add_argument("--batch", action="store_true", help="instead: the batch regime of the folder's test edits")
    p.add_argument("--out", required=True, metavar="DIR", help="the study folder (made, or resumed: then --model, "
                   "--edits and the editor may be left out)")


def _report_parsers(sub: Any) -> None:
    p = _verb(sub, "report", "judge study folders and write the report (markdown and figures)")
    p.add_argument("folders", nargs="+", help="study folders")
    p.add_argument("--out", default=None, metavar="FILE.md", help="write the page here (default: print it)")
    p.add_argument("--figures", default=None, metavar="DIR", help="write each study's judgment plot here")
    p.add_argument("--draws", type=int, default=0, help="also judge the selectors over K proxy draws")
    p.add_argument("--no-cma", action="store_true", help="leave causal tracing out (minutes when not cached)")
    p.add_argument("--no-selectors", action="store_true", help="judge the golden layer only (no model is loaded)")
    p.add_argument("--cached", action="store_true", help="use the selections cached in the folders only")
    p.add_argument("--threshold", type=float, default=0.5, help="the damage gate, nats of held-out loss rise")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test edits")
    p.add_argument("--append", default=None, metavar="FILE.md", help="markdown appended at the end of the page")
    p.add_argument("--print", action="store_true", help="also print the page")
    p = _verb(sub, "migrate", "bring study folders of schema 0 (benchmarks/matrix.py) to this schema")
    p.add_argument("folders", nargs="+", help="study folders written by gradlocate 0.3's benchmarks/matrix.py")
    p.add_argument("--model", default=None, help="the model spec for the manifest's identity (default: the folder's)")
    p = _verb(sub, "editors", "list the registered editors and their settings (defaults, sources)")
    p.add_argument("name", nargs="?", default=None, help="one editor")


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one the help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _verb(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A verb's parser: defaults shown in its help, and ``--threads`` like every verb."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for this process (default: $GRADLOCATE_THREADS, else gradlocate's default "
                        "for this machine)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("gradlocate")
    except PackageNotFoundError:  # a checkout that was never installed
        installed = "unknown (not installed)"
    parser = argparse.ArgumentParser(prog="gradlocate", description="Which layer should I edit? Find it, then edit it.")
    parser.add_argument("--version", action="version", version=f"gradlocate {installed}")
    sub = parser.add_subparsers(dest="command", required=True)
    _single_parsers(sub)
    _study_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _threads(args.threads)
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


def _threads(n: int | None) -> None:
    """The process's torch threads (:func:`gradlocate.threads.set_threads`: ``--threads``, else
    ``$GRADLOCATE_THREADS``, else ``$OMP_NUM_THREADS`` as it is, else half the cores, at most 4)."""
    from gradlocate.threads import set_threads

    if n is not None and n < 1:
        raise SystemExit(f"gradlocate: error: --threads must be >= 1, got {n}")
    set_threads(n)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _fail(command: str, message: str, code: int) -> int:
    print(f"gradlocate {command}: {message}", file=sys.stderr)
    return code

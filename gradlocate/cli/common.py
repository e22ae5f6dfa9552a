"""What every verb of the command line shares: loading the model and the edits, the one
``--layers`` syntax, the editor's settings (``--editor``, ``--hparams``, ``--set``), and output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "load_model_arg", "resolved", "load_edits_arg", "retain_texts", "parse_layers", "write_json",
           "save_plot", "report_result", "check_out_path", "settings_from", "add_editor_opts", "parse_shard"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- helpers


def load_model_arg(spec: str, dtype: str) -> tuple[Any, Any]:
    import torch

    from gradlocate.models import MissingModelPackage, load_model

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        return load_model(spec, dtype=dt)
    except MissingModelPackage as e:
        raise CLIError(str(e)) from None
    except (FileNotFoundError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIError(first if first.startswith("unknown model") else f"unknown model {spec!r}: {first}") from None


def resolved(args: argparse.Namespace) -> Any:
    """The model named by --model, resolved once (with --blocks / --down if given)."""
    from gradlocate.handles import HandleError, down_projections

    model, tok = load_model_arg(args.model, args.dtype)
    try:
        return down_projections(model, tokenizer=tok, blocks=getattr(args, "blocks", None),
                                down=getattr(args, "down", None), chat=getattr(args, "chat", False))
    except (HandleError, ValueError) as e:
        raise CLIError(str(e)) from None


def load_edits_arg(spec: str, n: int | None, offset: int = 0, sample: int | None = None) -> Any:
    from gradlocate.data import load_edits

    try:
        edits = load_edits(spec, n=n, offset=offset, sample=sample)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CLIError(f"bad edits file {spec!r}: {e}") from None
    if n is not None and len(edits) < n:
        skipped = f" after the {offset} skipped by --offset" if offset else ""
        raise CLIError(f"-n {n}: {spec} holds {len(edits)} edits{skipped}; give -n {len(edits)} or fewer")
    return edits


def retain_texts(spec: str | None, edits_spec: str, n: int) -> list[str]:
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


def parse_layers(spec: str | None) -> list[int] | None:
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


def write_json(path: str | None, obj: Any) -> None:
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


def save_plot(ax_or_fig: Any, path: str | None) -> None:
    if not path:
        return
    fig = getattr(ax_or_fig, "figure", ax_or_fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}", file=sys.stderr)


def report_result(result: Any, table: str, args: argparse.Namespace) -> int:
    """Print a result's repr and table; write --json and --plot if asked."""
    print(repr(result))
    print(table)
    write_json(args.json, result.to_dict())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        save_plot(result.plot(), args.plot)
    return 0


def check_out_path(path: str | None, flag: str) -> None:
    if path and not Path(path).resolve().parent.exists():
        raise CLIError(f"{flag}: folder {str(Path(path).parent)!r} does not exist")




# --------------------------------------------------------------------------- the editor's settings


def settings_from(args: argparse.Namespace) -> Any:
    """The editor's typed settings from ``--editor``, ``--hparams FILE.yaml`` and ``--set NAME=VALUE``
    (the registry's settings class: unknown names refused by name, what a YAML file names of
    the model's structure set aside and said)."""
    from gradlocate.editors import spec
    from gradlocate.editors.settings import SettingsError

    s = spec(args.editor)
    try:
        base = s.settings()
        if getattr(args, "hparams", None):
            base, aside = s.settings.from_yaml(args.hparams)
            if aside:
                print(f"{args.hparams}: set aside {', '.join(sorted(aside))} (gradlocate finds the site "
                      f"structurally and takes the layer as an argument)", file=sys.stderr)
        return s.settings.parse(getattr(args, "set", None) or [], base)
    except (SettingsError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None


def add_editor_opts(p: argparse.ArgumentParser) -> None:
    """``--editor`` (the registry's names), ``--hparams``, ``--set``."""
    from gradlocate.editors import DEFAULT_EDITOR, names, registry

    listed = "; ".join(f"{n}: {s.label}" for n, s in registry().items())
    p.add_argument("--editor", default=DEFAULT_EDITOR, choices=names(),
                   help=f"the editor ({listed}); `gradlocate editors NAME` lists its settings")
    p.add_argument("--hparams", default=None, metavar="FILE.yaml",
                   help="the editor's settings from an EasyEdit hparams YAML (structural keys set aside)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="one setting of the editor, e.g. --set lr=1e-4 --set epochs=50 (repeatable; after --hparams)")


def parse_shard(spec: str) -> tuple[int, int]:
    """``K/N``: this process takes every N-th layer from index K."""
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise CLIError(f"--shard {spec!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise CLIError(f"--shard {spec!r}: K must be in 0..N-1")
    return k, n

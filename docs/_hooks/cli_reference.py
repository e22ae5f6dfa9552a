"""mkdocs hook: the command-line reference, generated from ``gradlocate.cli.build_parser()``
at every docs build, so it can never go stale. A page holds ``<!-- cli-reference -->``
where the reference goes (``docs/index.md``).

Only argparse's public interface is used: the verbs are read from the top-level usage
line (``{layers,select,...}``) and each verb's page is its ``--help`` output.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = "<!-- cli-reference -->"
COLUMNS = "100"


def verbs(parser: Any) -> list[str]:
    """The sub-commands a parser offers, in its order."""
    m = re.search(r"\{([\w,-]+)\}", parser.format_usage())
    return m.group(1).split(",") if m else []


def help_text(parser: Any, argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        parser.parse_args([*argv, "--help"])
    return buf.getvalue().rstrip()


def cli_reference() -> str:
    """Markdown: ``gradlocate --help``, then one section per verb with its ``--help``."""
    from gradlocate.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS  # argparse wraps at the terminal width: fix it
    try:
        parser = build_parser()
        parts = ["```text", help_text(parser, []), "```"]
        for verb in verbs(parser):
            parts += ["", f"### gradlocate {verb}", "", "```text", help_text(build_parser(), [verb]), "```"]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown

"""The documentation builds: ``mkdocs build --strict`` (API reference from the
docstrings included), so broken links, bad docstrings and stale references fail here.

Every page listed in ``mkdocs.yml``'s nav must exist: a missing page fails the build
test (it would be a broken link on the site).

``docs/benchmarks.md`` embeds every ``benchmarks/results/*.md`` between
``<!-- results: NAME.md -->`` / ``<!-- /results: NAME.md -->`` markers (headings moved two
levels down). After re-running a benchmark, refresh the page with::

    python tests/test_docs.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_PAGE = DOCS / "benchmarks.md"
BLOCK = re.compile(r"<!-- results: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /results: (?P=name) -->", re.S)


# --------------------------------------------------------------------------- helpers


def nav_pages(nav: Any) -> list[str]:
    """Every page file named in a mkdocs nav (nested sections included)."""
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return []


def load_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def demote(markdown: str, levels: int = 2) -> str:
    """Move every ATX heading ``levels`` levels down (``# T`` -> ``### T``), outside code fences."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out).strip() + "\n"


def results_blocks(page: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(page)}


def sync_benchmarks_page() -> list[str]:
    """Rewrite the embedded results in ``docs/benchmarks.md`` from ``benchmarks/results``;
    returns the names refreshed. A results file without a section is an error: add its
    section (with the command that reproduces it) by hand first."""
    page = BENCHMARKS_PAGE.read_text()
    names = {p.name for p in RESULTS.glob("*.md")}
    missing = sorted(names - set(results_blocks(page)))
    if missing:
        raise SystemExit(f"docs/benchmarks.md has no section for {missing}: add "
                         f"'<!-- results: NAME.md -->' / '<!-- /results: NAME.md -->' markers with its command")
    done = []

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in names:
            raise SystemExit(f"docs/benchmarks.md embeds {name}, which benchmarks/results no longer has")
        done.append(name)
        return f"<!-- results: {name} -->\n{demote((RESULTS / name).read_text())}<!-- /results: {name} -->"

    BENCHMARKS_PAGE.write_text(BLOCK.sub(fill, page))
    return done


# --------------------------------------------------------------------------- tests


def test_cli_reference_is_every_verbs_help():
    """The hook that writes the home page's command-line reference, run directly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "_hooks" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    from gradlocate.cli import COMMANDS, build_parser

    assert sorted(hook.verbs(build_parser())) == sorted(COMMANDS)
    text = hook.cli_reference()
    assert text.startswith("```text\nusage: gradlocate [-h]")
    for verb in COMMANDS:
        section = text.split(f"### gradlocate {verb}\n", 1)[1].split("### ", 1)[0]
        assert f"usage: gradlocate {verb} [-h]" in section
        assert section.count("```") == 2
    page = hook.on_page_markdown(f"a\n{hook.MARKER}\nb", None, None, None)
    assert hook.MARKER not in page and "### gradlocate select" in page


def test_demote_and_nav_pages():
    assert demote("# A\ntext\n```\n# not a heading\n```\n## B") == "### A\ntext\n```\n# not a heading\n```\n#### B\n"
    nav = [{"Home": "index.md"}, {"Part": [{"A": "a.md"}, "b.md"]}, {"Ext": "https://x.org/y.md"}]
    assert nav_pages(nav) == ["index.md", "a.md", "b.md"]


def test_benchmarks_page_embeds_the_current_results():
    """Every number on the benchmarks page is the one in benchmarks/results (not a copy
    that went stale): each results file is embedded verbatim, headings demoted."""
    blocks = results_blocks(BENCHMARKS_PAGE.read_text())
    names = sorted(p.name for p in RESULTS.glob("*.md"))
    assert names, "benchmarks/results has no .md results"
    assert sorted(blocks) == names, f"docs/benchmarks.md embeds {sorted(blocks)}, benchmarks/results has {names}"
    stale = [n for n in names if blocks[n] != demote((RESULTS / n).read_text())]
    assert not stale, f"docs/benchmarks.md is stale for {stale}: run `python tests/test_docs.py` to refresh it"


def test_mkdocs_build_strict(tmp_path: Path):
    cfg = load_config()
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    missing = [p for p in nav_pages(cfg.get("nav", [])) if not (DOCS / p).exists()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist: {missing}"

    # The same configuration, with paths made absolute for a build outside the checkout.
    cfg["docs_dir"] = str(docs)
    cfg["site_dir"] = str(tmp_path / "site")
    for plugin in cfg.get("plugins", []):
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str((ROOT / p).resolve()) for p in python.get("paths", ["."])]
            opts = python.get("options", {})
            opts["extensions"] = [str(ROOT / e) if isinstance(e, str) and ".py" in e else e
                                  for e in opts.get("extensions", [])]
    cfg["hooks"] = [str(ROOT / h) for h in cfg.get("hooks", [])]
    config_file = tmp_path / "mkdocs.yml"
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    problems = [l for l in (proc.stdout + proc.stderr).splitlines() if "WARNING" in l or "ERROR" in l]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [proc.stderr[-3000:]])
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    # The API reference was generated from the docstrings, and doctests render as code.
    for obj in ("handles.down_projections", "selectors.gradratio", "selectors.lga", "trace.causal_trace",
                "editors.locft.LocFTBF", "evaluation.evaluate"):
        assert f'id="gradlocate.{obj}"' in api, f"gradlocate.{obj} is missing from the API reference"
    assert 'class="gp">&gt;&gt;&gt;' in api, "doctest examples did not render as code"
    assert ":func:" not in api and ":class:" not in api
    # The home page's command-line reference was generated from the parser: every verb's --help.
    from gradlocate.cli import COMMANDS

    home = (site / "index.html").read_text()
    for verb in COMMANDS:
        assert f"gradlocate {verb}" in home and f"usage: gradlocate {verb} [-h]" in home, \
            f"the CLI reference on the home page lacks `gradlocate {verb}`"
    for page in nav_pages(cfg.get("nav", [])):
        built = site / (Path(page).with_suffix("").as_posix() + "/index.html" if page != "index.md" else "index.html")
        assert built.exists(), f"{page} was not built"
        if page.endswith(".ipynb"):  # a tutorial: shown with the outputs of its executed copy
            assert "jp-OutputArea-output" in built.read_text(), f"{page} renders without outputs"


if __name__ == "__main__":
    print("refreshed:", ", ".join(sync_benchmarks_page()))

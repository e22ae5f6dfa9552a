"""The budgeted layer search replayed on every committed matrix (issue 43, item 2).

For each complete study folder under studies/ (manifest, cells,
draws.json): :func:`gradlocate.golden.search_report.search_replay`, i.e. the search
(3, 4 and 8 cells per layer), brute force on 1, 2, 4, 8, 16, 24 proxy edits, a random layer
and the best constant layer over random proxy draws with two-level bootstrap intervals,
and the published selectors (GradRatio with and without l_min, LGA, CMA) on the 16
committed draws beside the search and brute force on the same proxy rows.

Run from the repository root (single-threaded numpy; about 40 min for the seven studies at the defaults):

    python -m benchmarks.search_replay [--draws 200 --boot 200 --boot-draws 200 --folders a,b]
    python -m benchmarks.search_replay --render      # the .md and docs tables again, from the .json

Writes benchmarks/results/search_replay.json (every number, per-draw regrets included),
search_replay.md (the summary table, embedded in docs/benchmarks.md) and refreshes the tables
of docs/search.md (between its ``<!-- search_replay -->`` markers).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from gradlocate.golden.search_report import SearchReplay, search_replay, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
MATRICES = ROOT / "studies"
OUT = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "search.md"
BLOCK = re.compile(r"(<!-- search_replay -->\n).*?(<!-- /search_replay -->)", re.S)


def refresh_docs(r: SearchReplay) -> None:
    """Put the replay's tables between docs/search.md's markers."""
    page = DOCS.read_text()
    if not BLOCK.search(page):
        raise SystemExit(f"{DOCS} has no <!-- search_replay --> ... <!-- /search_replay --> block")
    DOCS.write_text(BLOCK.sub(lambda m: m.group(1) + r.docs_markdown() + "\n" + m.group(2), page))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=200, help="random proxy draws per study")
    ap.add_argument("--pool", type=int, default=24, help="proxy rows per draw (capped at half the rows)")
    ap.add_argument("--boot", type=int, default=200, help="two-level bootstrap replicates")
    ap.add_argument("--boot-draws", type=int, default=None, help="draws per replicate (default: --draws)")
    ap.add_argument("--folders", default="", help="comma-separated folder names (default: every one with proxy draws)")
    ap.add_argument("--out", default="search_replay", help="result file stem under benchmarks/results/")
    ap.add_argument("--render", action="store_true", help="only re-write the .md and docs tables from the .json")
    args = ap.parse_args(argv)
    if args.render:
        write(SearchReplay.load(OUT / f"{args.out}.json"), args.out)
        return
    wanted = [s for s in args.folders.split(",") if s]
    folders = sorted(p for p in MATRICES.glob("*") if (p / "draws.json").exists()
                     and (not wanted or p.name in wanted))
    if wanted and len(folders) != len(wanted):
        raise SystemExit(f"not found (or no draws.json): {sorted(set(wanted) - {p.name for p in folders})}")
    t0 = time.perf_counter()
    r = search_replay(folders, n_draws=args.draws, pool=args.pool, n_boot=args.boot, boot_draws=args.boot_draws)
    r.settings["seconds"] = round(time.perf_counter() - t0, 1)
    (OUT / f"{args.out}.json").write_text(json.dumps(r.to_dict()))
    write(r, args.out)


def write(r: SearchReplay, stem: str) -> None:
    """The summary (.md) and docs/search.md's tables, from a replay."""
    settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
    (OUT / f"{stem}.md").write_text(
        f"# The budgeted layer search, replayed\n\nSettings: {settings}. Per study and score: the search at its "
        "default budget (4 cells per layer) against brute force on 16 edits (random draws) and the best published "
        "selector (the 16 committed draws); every method and study: docs/search.md.\n\n" + summary_markdown(r))
    if stem == "search_replay":
        refresh_docs(r)
    print(repr(r))
    print(r.to_markdown(details=False))


if __name__ == "__main__":
    main()

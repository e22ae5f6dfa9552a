"""The golden-layer study on real models, written to docs/results.md (one command).

Each study (:func:`gradlocate.golden.study.study`) splits one edit set into proxy edits (the
selectors see only these) and test edits, runs every selector (GradRatio with and
without l_min, LGA with each sign convention, CMA), sweeps LocFT-BF over every layer on
the test edits (the golden layer) and on the proxy edits (transfer), trains each of
``--n-sample`` test edits alone at every second layer (sample-wise optima), and judges
every selector with bootstrap intervals. Every part is written under
``benchmarks/out/<study>/`` as it finishes: an interrupted run resumes where it stopped.
``--only`` runs some studies; the page is rewritten from whatever has finished (a study
still running is listed as such).

CPU-sized (the defaults; about two to three hours per SmolLM2 study on one core, run
two at once with ``--only``)::

    nohup python benchmarks/report.py --only smollm2-zsre > /tmp/study1.log 2>&1 &
    nohup python benchmarks/report.py --only smollm2-counterfact > /tmp/study2.log 2>&1 &
    python benchmarks/report.py --only gemma-counterfact
    python benchmarks/report.py --write            # docs/results.md from what has finished

Quick-sized (about an hour per SmolLM2 study on one core; see :data:`QUICK`)::

    nohup python benchmarks/report.py --quick --only smollm2-zsre > /tmp/quick1.log 2>&1 &

GPU-sized (both models, >= 300 test edits, every layer, sample-wise included)::

    python benchmarks/report.py --gpu --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradlocate as gl  # noqa: E402
from gradlocate.golden.study import Study, study  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "results" / "study"
FIGURES = ROOT / "docs" / "figures"
DATA = {"zsre": "zsre_3k.json", "counterfact": "counterfact_3k.json"}
#: name -> (model, data set, n_test, n_proxy, n_sample)
STUDIES = {
    "smollm2-zsre": ("smollm2", "zsre", 64, 16, 32),
    "smollm2-counterfact": ("smollm2", "counterfact", 64, 16, 32),
    "gemma-counterfact": ("gemma3-270m", "counterfact", 32, 16, 16),
}
GPU = {k: (m, d, 320, 32, 64) for k, (m, d, *_) in STUDIES.items()} | {
    "gemma-zsre": ("gemma3-270m", "zsre", 320, 32, 64)}
#: ``--quick``: a smaller study that fits about an hour per SmolLM2 study on one core - 24
#: test / 12 proxy edits, every third layer (plus every layer a selector picks), 8 edits
#: trained alone at every sixth layer. Written as ``<study>-quick``; too small to decide
#: between selectors whose regrets are close (see the intervals), large enough to show
#: what the full run is for.
QUICK = {f"{k}-quick": (m, d, 24, 12, 8) for k, (m, d, *_) in STUDIES.items()}
QUICK_STEP = {"layers": 3, "sample_layers": 6}
#: The trainer every sweep uses: LocFT-BF's defaults with a learning rate and epoch budget
#: at which training converges at the layers people edit (measured; see docs/results.md).
TRAINER = {"lr": 5e-3, "epochs": 100}


def run(name: str, spec: tuple, device: str, edits_offset: int, step: dict[str, int] | None = None) -> Study:
    model_name, data, n_test, n_proxy, n_sample = spec
    model, tok = gl.models.load_model(model_name, device=device)
    h = gl.down_projections(model, tokenizer=tok)
    step = step or {"layers": 1, "sample_layers": 2}
    layers = list(range(0, h.n_layers, step["layers"]))
    sample_layers = list(range(0, h.n_layers, step["sample_layers"]))
    edits = gl.load_edits(gl.data.shared_data_path(DATA[data]), n=n_test + n_proxy, offset=edits_offset)
    title = f"{type(model).__name__.replace('ForCausalLM', '')} ({model_name}), {data}"
    res = study(h, edits, name=title, n_proxy=n_proxy, n_test=n_test, n_sample=n_sample, trainer=TRAINER,
                layers=layers, sample_layers=sample_layers, out_dir=OUT / name, progress=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res.to_dict(), default=float, indent=1))
    (RESULTS / f"{name}.md").write_text(res.to_markdown() + "\n")
    import matplotlib

    matplotlib.use("Agg")
    res.plot(str(FIGURES / f"study_{name}.png"))
    return res


def write_page(names: list[str]) -> None:
    parts = []
    for name in names:
        md = RESULTS / f"{name}.md"
        if not md.exists() and (RESULTS / f"{name}-quick.md").exists():
            name, md = f"{name}-quick", RESULTS / f"{name}-quick.md"
            parts.append(f"*{name}: the `--quick` size (not the full study; `python benchmarks/report.py --only "
                         f"{name[:-6]}` runs that)*\n\n" + md.read_text().strip()
                         + f"\n\n![{name}](figures/study_{name}.png)")
        elif md.exists():
            parts.append(md.read_text().strip() + f"\n\n![{name}](figures/study_{name}.png)")
        else:
            parts.append(f"### {name}\n\nNot finished yet: `python benchmarks/report.py --only {name}` resumes it.")
    head = f"""# Results: does the selector pick the golden layer?

Written by `python benchmarks/report.py` ({datetime.date.today().isoformat()}, {platform.machine()}, torch
{torch.__version__}, CPU, one thread per study). For each model and edit set, the
selectors see only the proxy edits; LocFT-BF (lr {TRAINER['lr']:g}, at most {TRAINER['epochs']} epochs,
stopping when an epoch's mean loss falls below 1e-2, otherwise LocFT-BF's defaults) is
swept over every layer on the test edits. Scores are teacher-forced (EasyEdit's token
accuracy); the **overall** of a layer is the mean of reliability, generalization,
locality, capability (held-out text's perplexity before / after, capped at 1) and fluency
(n-gram entropy after / before, capped at 1), each weighted 1 — so an edit that damages
the model's general ability scores lower even when its locality prompts survive. Regret
is the overall lost against the golden layer; Spearman ρ and Kendall τ compare a
selector's per-layer scores with the sweep's overall; the intervals are bootstrap 95%
over the test edits (1000 resamples). The sample-wise part trains each of a set of test
edits alone at every second layer (`sweep(..., per_sample=True)`) and compares each
edit's own best layer with the golden layer (paired t-test).

How to read it, and what the numbers do and do not say, is in the discussion at the end.
"""
    page = head + "\n" + "\n\n".join(parts) + "\n"
    discussion = ROOT / "benchmarks" / "results" / "study" / "discussion.md"
    if discussion.exists():
        page += "\n" + discussion.read_text()
    (ROOT / "docs" / "results.md").write_text(page)
    print(f"wrote {ROOT / 'docs' / 'results.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"comma list of studies: {', '.join(STUDIES)} (default: all)")
    ap.add_argument("--gpu", action="store_true", help="the GPU-sized studies (>= 300 test edits)")
    ap.add_argument("--quick", action="store_true", help="the quick-sized studies (24 test edits, every 3rd layer)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per study process")
    ap.add_argument("--offset", type=int, default=1000, help="skip this many records (held out from the tests)")
    ap.add_argument("--write", action="store_true", help="only rewrite docs/results.md from finished studies")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = GPU if args.gpu else QUICK if args.quick else STUDIES
    names = list(specs) if args.only is None else [n.strip() + ("-quick" if args.quick and not n.strip().endswith(
        "-quick") else "") for n in args.only.split(",")]
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown studies {unknown}: choose from {list(specs)}")
    if not args.write:
        for name in names:
            t0 = time.perf_counter()
            res = run(name, specs[name], args.device, args.offset, QUICK_STEP if args.quick else None)
            print(res, f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    write_page(list(STUDIES if args.quick else specs))


if __name__ == "__main__":
    main()

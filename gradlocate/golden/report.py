"""A report of study folders: each judged, with its selectors, batch regime and proxy draws.

:func:`report` is what ``gradlocate report FOLDER...`` runs, and what docs/results.md is
made of. For each study folder (:class:`~gradlocate.golden.folder.StudyFolder`) it

1. loads the matrix (no model needed): the layers every edit has are judged, and the page
   says how complete the matrix is (a partial matrix is judged once half its layers are);
2. takes the proxy rows by the folder's proxy rule and the selectors' scores on them
   (cached in ``selections/``; computed when a model is at hand: the one given, or the one
   the manifest names);
3. judges (:func:`~gradlocate.golden.judge.judge`) and writes ``judgment.json``;
4. optionally judges the selectors over ``draws`` proxy draws (``draws.json``);
5. writes one section per folder, the batch regime and growth check where there are
   any, the regimes side by side, and the summary of the Golden Layers paper's claims.

One folder's failure is reported in its place; the others still run.

Example:
    >>> import tempfile
    >>> from gradlocate.models import tiny
    >>> from gradlocate.golden.matrix import matrix
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
    >>> d = tempfile.mkdtemp()
    >>> edits = [{"prompt": f"{i} + 1 =", "target_new": str(i + 2)} for i in range(5)]
    >>> _ = matrix(model, edits, hparams={"lr": 1e-2, "epochs": 2}, out=d, capability_edits=0, progress=False)
    >>> r = report([d], selectors=False, n_boot=20, n_null=20)
    >>> r.studies[0].golden in (0, 1), "## Single-edit matrices" in r.to_markdown()
    (True, True)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.judge import DAMAGE_THRESHOLD
from gradlocate.golden.selections import select
from gradlocate.golden.study import MIN_JUDGED_SHARE, NotJudgedYet, Study, _judgeable, _model, judge_folder
from gradlocate.golden.table import layer_span
from gradlocate.golden import report_sections as sections

__all__ = ["report", "Report", "judge_folder", "judge_draws", "NotJudgedYet", "MIN_JUDGED_SHARE"]

def judge_draws(folder: StudyFolder | str | os.PathLike[str], draws: int, *, model: Any = None,
                selectors: Sequence[str] = ("lga", "cma", "gradratio", "gradratio (no l_min)"),
                threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000, progress: bool | None = None) -> Any:
    """The selectors over ``draws`` proxy draws of the folder's complete matrix (seeds
    ``0 .. draws-1`` of its proxy rule; the first is the judged one), each draw's selections
    cached in ``selections/`` (run with ``model`` or the manifest's where missing), judged on
    its own test rows (:func:`~gradlocate.golden.draws.over_draws`); ``draws.json`` is
    written after every draw, so an interrupted run keeps what it has."""
    from tqdm.auto import tqdm

    from gradlocate.golden.draws import over_draws

    folder = folder if isinstance(folder, StudyFolder) else StudyFolder.open(folder)
    m, done = folder.load()
    if not done.done:
        raise NotJudgedYet(f"{folder.path}: proxy draws are judged on a complete matrix; {done}")
    mdl, tok = _model(folder, model)
    edits = folder.edits(m.n_edits)
    got: list[Any] = []
    result = None
    for seed in tqdm(range(draws), desc=f"proxy draws ({folder.path.name})", disable=None if progress is None else not progress):
        proxy = folder.manifest.proxy_rows(m.n_edits, seed)
        picked = select(mdl, [edits[i] for i in proxy], folder.manifest.retain, list(selectors), out=folder.selections_path(m.n_edits, seed),
                        tokenizer=tok, identity=folder.manifest.model.get("identity"), progress=False)
        got.append((seed, proxy, picked.scores))
        result = over_draws(m, got, threshold=threshold, n_boot=n_boot)
        folder.draws_path.write_text(json.dumps({"selectors": list(selectors), **result.to_dict()}, indent=1))
    return result


@dataclass
class Report:
    """The judged studies of several folders and the page made of them (:meth:`to_markdown`)."""

    studies: list[Study]
    sections: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    threshold: float = DAMAGE_THRESHOLD
    folders: list[str] = field(default_factory=list)
    appendix: str = ""
    summary: str = ""

    def to_markdown(self) -> str:
        listed = ", ".join(f"`{f}`" for f in self.folders)
        return sections.page(self.sections, self.threshold, self.summary, listed, self.appendix)

    def to_dict(self) -> dict[str, Any]:
        return {"studies": {s.name: s.judgment.to_dict() for s in self.studies}, "failures": self.failures}

    def __repr__(self) -> str:
        return (f"Report({len(self.studies)} judged: {', '.join(f'{s.name} golden {s.golden}' for s in self.studies)}"
                + (f"; not judged: {', '.join(self.failures)}" if self.failures else "") + ")")


def report(folders: Sequence[str | os.PathLike[str]], *, model: Any = None, selectors: bool | Sequence[str] = True,
           cma: bool = True, draws: int = 0, threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000,
           n_null: int = 1000, figures: str | os.PathLike[str] | None = None, appendix: str = "",
           compute: bool = True, progress: bool | None = None) -> Report:
    """Judge every study folder and assemble the page (see the module doc).

    Args:
        folders: study folders (each judged on its complete layers; one that cannot be is
            reported in its place).
        model: the model for selectors not cached yet (default: each manifest's, loaded).
        selectors: run and judge the study's selectors (``False``: none; or their names).
        cma: include causal tracing (minutes per folder when not cached).
        draws: judge the selectors over this many proxy draws too (``draws.json``).
        figures: a folder for each study's judgment plot (referenced from its section).
        appendix: markdown appended at the end (e.g. a superseded study kept for the record).
        compute: run missing selectors (``False``: use what is cached only).
    """
    out = Report([], [], threshold=threshold, folders=[str(f) for f in folders], appendix=appendix)
    runs, studies, draws_of, partial = [], [], {}, {}
    for path in folders:
        name = Path(path).name
        try:
            s = judge_folder(path, model=model, selectors=selectors, cma=cma, threshold=threshold, n_boot=n_boot,
                             n_null=n_null, compute=compute, write=True)
            folder = StudyFolder.open(path)
            if draws:
                judge_draws(folder, draws, model=model, threshold=threshold, n_boot=n_boot, progress=progress)
        except NotJudgedYet as e:
            out.sections.append(f"### {name}\n\nMatrix: **partial**, not judged yet: {e}.\n")
            out.failures[name] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - one folder's failure is reported in its place; the rest still run
            out.sections.append(f"### {name}\n\nNot judged: {type(e).__name__}: {e}\n")
            out.failures[name] = f"{type(e).__name__}: {e}"
            continue
        out.studies.append(s)
        out.sections.append(_section(folder, s, threshold, n_boot, figures))
        j, done, man = s.judgment, s.params["completeness"], folder.manifest
        runs.append((name, _regime(man), s.matrix))
        studies.append((name, f"{j.n_edits} edits x {len(j.layers)} layers" + ("" if done.done else " (partial)"), j))
        if len(j.layers) < man.n_layers:
            partial[name] = set(range(man.n_layers)) - set(j.layers)
        if (d := sections.read_draws(folder)) is not None and d.n_edits == j.n_edits:
            draws_of[name] = d
    side = sections.regimes_section(runs, threshold, n_boot)
    out.sections += [side] if side else []
    out.summary = sections.claims(studies, draws_of, partial)
    return out


def _regime(man: Any) -> dict[str, Any]:
    return {"model": man.model.get("spec") or man.model.get("class"), "data": man.data.get("source"),
            "n_layers": man.n_layers, "editor": man.regime["editor"],
            "hparams": man.regime["fingerprint"].get("hparams", {})}


def _section(folder: StudyFolder, s: Study, threshold: float, n_boot: int,
             figures: str | os.PathLike[str] | None) -> str:
    """One folder's section: the judgment, its batch regime, growth check and proxy draws."""
    j, done = s.judgment, s.params["completeness"]
    extra = sections.batch_section(folder, j, folder.manifest.n_layers, threshold, n_boot)
    grown = sections.complete_at_every_edit(folder, done.edits_used)
    extra += sections.growth_section(*grown, threshold) if grown else ""
    extra += sections.draws_section(folder, j)
    text = sections.section(folder.path.name, j, done, s.selections if s.selections.scores else None, extra)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        Path(figures).mkdir(parents=True, exist_ok=True)
        png = Path(figures) / f"{folder.path.name}.png"
        s.plot().savefig(png, dpi=110, bbox_inches="tight")
        text += f"\n![{folder.path.name}: mean overall per layer by definition]({os.path.relpath(png, Path(figures).parent)})\n"
    return text

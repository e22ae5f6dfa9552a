"""A report of study folders: each judged, with its selectors, regret tables, batch regime and proxy draws.

:func:`report` is what ``gradlocate report FOLDER...`` runs, and what docs/results.md is
made of. For each study folder (:class:`~gradlocate.golden.folder.StudyFolder`) it

1. loads the matrix (no model needed): the layers every edit has are judged, and the page
   says how complete the matrix is (a partial matrix is judged once half its layers are);
   a folder with two replicate seeds is judged with the second as the replicate;
2. takes the proxy rows by the folder's proxy rule and the selectors' scores on them
   (cached in ``selections/``; computed when a model is at hand: the one given, or the one
   the manifest names);
3. judges (:func:`~gradlocate.golden.judge.judge`) and writes ``judgment.json``;
4. optionally runs the selectors over ``draws`` proxy draws (``draws.json``);
5. answers (:func:`~gradlocate.golden.answer.answer`): regret over random proxy draws of
   brute force, the baselines and the search; the published selectors on the committed
   draws; the cost of brute force in stored seconds;

then Holm-adjusts every test across the studies (:func:`~gradlocate.golden.answer.holm_family`)
and writes the page: the first screen (per study: the layer to edit, the selector to
trust, brute force instead), how to read it, the paper's claims, one section per folder,
the regimes side by side.

One folder's failure is reported in its place; the others still run.

Example:
    >>> import tempfile
    >>> from gradlocate.models import tiny
    >>> from gradlocate.golden.matrix import matrix
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
    >>> d = tempfile.mkdtemp()
    >>> edits = [{"prompt": f"{i} + 1 =", "target_new": str(i + 2)} for i in range(8)]
    >>> _ = matrix(model, edits, hparams={"lr": 1e-2, "epochs": 2}, out=d, capability_edits=0, progress=False)
    >>> r = report([d], selectors=False, n_boot=20, regret=RegretSettings(n_boot=20, boot_draws=5, search=False))
    >>> r.studies[0].golden in (0, 1), "## Which layer to edit" in r.to_markdown()
    (True, True)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlocate.golden.answer import Answer, RegretSettings, answer, holm_family
from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.judge import DAMAGE_THRESHOLD
from gradlocate.golden.selections import select
from gradlocate.golden.study import MIN_JUDGED_SHARE, NotJudgedYet, Study, _model, judge_folder
from gradlocate.golden import report_sections as sections

__all__ = ["report", "Report", "judge_folder", "judge_draws", "NotJudgedYet", "MIN_JUDGED_SHARE", "RegretSettings"]


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
    """The judged studies of several folders and the page made of them (:meth:`to_markdown`).

    Attributes:
        studies, answers: per judged folder, its :class:`~gradlocate.golden.study.Study`
            and :class:`~gradlocate.golden.answer.Answer`.
        family: every test on the page, ``"study: test" -> Holm-adjusted p``.
    """

    studies: list[Study]
    sections: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    threshold: float = DAMAGE_THRESHOLD
    folders: list[str] = field(default_factory=list)
    appendix: str = ""
    summary: str = ""
    answers: list[Answer] = field(default_factory=list)
    family: dict[str, float] = field(default_factory=dict)
    first: str = ""

    def to_markdown(self) -> str:
        listed = ", ".join(f"`{f}`" for f in self.folders)
        return sections.page(self.sections, self.threshold, self.summary, listed, self.appendix, self.first)

    def to_dict(self) -> dict[str, Any]:
        return {"studies": {s.name: s.judgment.to_dict() for s in self.studies},
                "answers": {a.name: a.to_dict() for a in self.answers}, "family": self.family,
                "failures": self.failures}

    def __repr__(self) -> str:
        return (f"Report({len(self.studies)} judged: {', '.join(f'{s.name} golden {s.golden}' for s in self.studies)}"
                + (f"; not judged: {', '.join(self.failures)}" if self.failures else "") + ")")


def _announce(name: str, n_boot: int, rs: RegretSettings) -> None:
    print(f"report: {name}: judging ({n_boot} bootstrap resamples per definition) and regret over {rs.n_draws} random "
          f"proxy draws ({rs.n_boot} x {rs.boot_draws} bootstrap draws"
          + (f"; the search {rs.search_boot} x {rs.search_draws}, about half a minute" if rs.search else "")
          + f"); the committed draws ({rs.committed_boot} resamples)", file=sys.stderr, flush=True)


def _one(path: str | os.PathLike[str], model: Any, selectors: bool | Sequence[str], cma: bool, draws: int,
         threshold: float, n_boot: int, rs: RegretSettings, compute: bool, progress: bool | None
         ) -> tuple[StudyFolder, Study, Answer]:
    """One folder judged and answered (its errors propagate to :func:`report`)."""
    if progress:
        _announce(Path(path).name, n_boot, rs)
    s = judge_folder(path, model=model, selectors=selectors, cma=cma, threshold=threshold, n_boot=n_boot,
                     compute=compute, write=True)
    folder = StudyFolder.open(path)
    if draws:
        try:
            judge_draws(folder, draws, model=model, threshold=threshold, n_boot=n_boot, progress=progress)
        except NotJudgedYet as e:  # a partial matrix is judged; its proxy draws wait for the whole one
            print(f"report: {folder.path.name}: proxy draws skipped until the matrix is complete ({e})",
                  file=sys.stderr, flush=True)
    return folder, s, answer(folder, s.judgment, s.matrix, threshold=threshold, settings=rs)


def report(folders: Sequence[str | os.PathLike[str]], *, model: Any = None, selectors: bool | Sequence[str] = True,
           cma: bool = True, draws: int = 0, threshold: float = DAMAGE_THRESHOLD, n_boot: int = 1000,
           regret: RegretSettings | None = None, figures: str | os.PathLike[str] | None = None, appendix: str = "",
           compute: bool = True, progress: bool | None = None) -> Report:
    """Judge every study folder and assemble the page (see the module doc).

    Args:
        folders: study folders (each judged on its complete layers; one that cannot be is
            reported in its place).
        model: the model for selectors not cached yet (default: each manifest's, loaded).
        selectors: run and judge the study's selectors (``False``: none; or their names).
        cma: include causal tracing (minutes per folder when not cached).
        draws: run the selectors over this many proxy draws too (``draws.json``).
        n_boot: bootstrap resamples of the judgment.
        regret: how the regret tables are made (:class:`~gradlocate.golden.answer.RegretSettings`;
            the default takes about half a minute per 96 x 30 study on one core).
        figures: a folder for each study's judgment plot (referenced from its section).
        appendix: markdown appended at the end (e.g. a superseded study kept for the record).
        compute: run missing selectors (``False``: use what is cached only).
    """
    rs = regret or RegretSettings()
    out = Report([], [], threshold=threshold, folders=[str(f) for f in folders], appendix=appendix)
    slots: list[str | tuple[StudyFolder, Study, Answer]] = []
    for path in folders:
        name = Path(path).name
        try:
            slots.append(_one(path, model, selectors, cma, draws, threshold, n_boot, rs, compute, progress))
        except NotJudgedYet as e:
            slots.append(f"### {name}\n\nMatrix: **partial**, not judged yet: {e}.\n")
            out.failures[name] = str(e)
        except Exception as e:  # noqa: BLE001 - one folder's failure is reported in its place; the rest still run
            slots.append(f"### {name}\n\nNot judged: {type(e).__name__}: {e}\n")
            out.failures[name] = f"{type(e).__name__}: {e}"
    done = [x for x in slots if not isinstance(x, str)]
    out.studies, out.answers = [s for _, s, _ in done], [a for _, _, a in done]
    out.family = holm_family(out.answers)  # before any section prints an adjusted p
    out.sections = [x if isinstance(x, str) else _section(*x, threshold, n_boot, figures) for x in slots]
    side = sections.regimes_section([(s.name, _regime(f.manifest), s.matrix) for f, s, _ in done], threshold, n_boot)
    out.sections += [side] if side else []
    out.first = sections.first_screen_text(out.answers)
    out.summary = sections.claims(out.answers)
    return out


def _regime(man: Any) -> dict[str, Any]:
    return {"model": man.model.get("spec") or man.model.get("class"), "data": man.data.get("source"),
            "n_layers": man.n_layers, "editor": man.regime["editor"],
            "hparams": man.regime["fingerprint"].get("hparams", {})}


def _section(folder: StudyFolder, s: Study, a: Answer, threshold: float, n_boot: int,
             figures: str | os.PathLike[str] | None) -> str:
    """One folder's section: the judgment, its regret tables, batch regime and growth check."""
    j, done = s.judgment, s.params["completeness"]
    extra = sections.regret_section(a)
    extra += sections.batch_section(folder, j, folder.manifest.n_layers, threshold, n_boot)
    grown = sections.complete_at_every_edit(folder, done.edits_used)
    extra += sections.growth_section(*grown, threshold) if grown else ""
    text = sections.section(folder.path.name, j, done, s.selections if s.selections.scores else None, extra)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        Path(figures).mkdir(parents=True, exist_ok=True)
        png = Path(figures) / f"{folder.path.name}.png"
        s.plot().savefig(png, dpi=110, bbox_inches="tight")
        text += f"\n![{folder.path.name}: mean overall per layer by definition]({os.path.relpath(png, Path(figures).parent)})\n"
    return text

"""The report's sections, on study folders: the batch regime (``gradlocate matrix --batch``:
the folder's test edits edited together at each layer), the proxy draws, the growth check,
the regimes side by side, and a partial folder judged once half its layers are complete."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gradlocate.cli import main
from gradlocate.golden import report_sections as sections
from gradlocate.golden.folder import StudyFolder
from gradlocate.golden.report import NotJudgedYet, _judgeable, judge_draws, judge_folder
from gradlocate.golden.store import RecordStore
from gradlocate.golden.table import Matrix

FIXTURE = str(Path(__file__).parent / "fixtures" / "edits_small.json")
TINY = ["--model", "tiny-llama", "--edits", FIXTURE, "--set", "epochs=3", "--set", "lr=1e-2"]


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies") / "tiny-run"
    # four edits: one proxy, three test edits; the cells of layer 0 make the folder
    assert main(["matrix", *TINY, "--layers", "0", "--capability-edits", "0", "--out", str(folder)]) == 0
    assert main(["matrix", "--out", str(folder), "--batch"]) == 0  # resumed from the manifest: model, edits, regime
    return folder


def _lines(folder):
    return [json.loads(l) for f in sorted((folder / "batch").glob("*.jsonl")) for l in f.read_text().splitlines()
            if l.strip()]


def test_every_layer_edits_the_test_rows_together(batch_folder, monkeypatch):
    recs = _lines(batch_folder)
    assert sorted(r["layer"] for r in recs) == [0, 1, 2, 3]
    man = StudyFolder.open(batch_folder).manifest
    assert man.proxy_rows() == [man.proxy_rows()[0]] and len(man.edits) == 4  # a quarter of 4: one proxy edit
    for r in recs:
        assert r["n_edits"] == r["n_eval"] == 3
        assert len(r["per_edit"]["reliability"]) == 3 and r["train"]["epochs"] <= 3
        assert r["general"]["lm_loss_change"] is not None
        assert r["train"]["trajectory"] and "converged" in r["train"]  # the editor protocol's summary
    # a second run resumes: nothing is trained or appended again
    assert main(["matrix", "--out", str(batch_folder), "--batch"]) == 0
    assert len(_lines(batch_folder)) == len(recs)


def test_report_reads_the_golden_layer_and_the_regret_off_the_records(batch_folder):
    recs = sorted(_lines(batch_folder), key=lambda r: r["layer"])
    means = {k: np.array([np.mean(r["per_edit"][k]) for r in recs]) for k in ("reliability", "locality")}
    j = SimpleNamespace(definitions={d: SimpleNamespace(golden=1) for d in ("reliability", "locality", "edit-only")})
    text = sections.batch_section(StudyFolder.open(batch_folder), j, 4, threshold=0.5, n_boot=50)
    assert "complete" in text and "3 test edits edited *together*" in text
    for k, mean in means.items():
        row = next(l for l in text.splitlines() if l.startswith(f"| {k} |")).split("|")
        golden = int(np.argmax(mean))  # ties go to the first layer, as golden_layer does
        assert int(row[2]) == golden
        assert float(row[4].split()[0]) == pytest.approx(mean[golden], abs=5e-4)
        assert float(row[6].split()[0]) == pytest.approx(mean[golden] - mean[1], abs=5e-4)
    per_layer = [l for l in text.splitlines() if l.startswith("| 2 |")][0].split("|")
    assert float(per_layer[5]) == pytest.approx(recs[2]["general"]["lm_loss_change"], abs=5e-4)


def test_a_single_edit_golden_layer_that_damages_the_batch_is_named(batch_folder):
    recs = sorted(_lines(batch_folder), key=lambda r: r["layer"])
    change = np.array([r["general"]["lm_loss_change"] for r in recs])
    worst = int(np.argmax(change))
    j = SimpleNamespace(definitions={"reliability": SimpleNamespace(golden=worst)})
    text = sections.batch_section(StudyFolder.open(batch_folder), j, 4, threshold=float(change[worst]) - 1e-9,
                                  n_boot=20)
    row = next(l for l in text.splitlines() if l.startswith("| reliability |"))
    assert f"damaging in the batch (Δloss {change[worst]:.2f})" in row and int(row.split("|")[2]) != worst
    rows = [l for l in text.splitlines() if l.startswith("| reliability |") or l.startswith("| locality |")]
    assert len(rows) == 1  # a definition the judgment lacks gets no row


def test_a_folder_without_batch_records_adds_nothing(tmp_path, make_folder):
    folder, _ = make_folder(tmp_path / "f", ["a", "b"], 2)
    assert sections.batch_section(folder, SimpleNamespace(definitions={}), 4, 0.5, 10) == ""


def test_regimes_side_by_side_judge_the_shared_edits_and_layers():
    rng = np.random.default_rng(0)

    def built(ids, layers, best):
        rel = rng.uniform(0, 0.5, (len(ids), len(layers)))
        rel[:, layers.index(best)] += 0.5
        cap = np.full((len(ids), len(layers)), np.nan)
        cap[:2] = 0.01 * np.arange(len(layers))
        return Matrix(layers, ids, {"reliability": rel, "locality": np.ones_like(rel)},
                      {"converged": np.ones_like(rel)}, cap, 3.0, "locft")

    a = built(list("abcdef"), [0, 1, 2, 3], best=1)
    b = built(list("abcdefgh"), [0, 2, 3], best=3)            # g, h and layer 1 are not shared
    c = built(list("xyz"), [0, 1], best=0)                     # another data set: not compared
    runs = [("lr-a", {"model": "m", "data": "d", "editor": "locft", "hparams": {"lr": 1}, "n_layers": 4}, a),
            ("lr-b", {"model": "m", "data": "d", "editor": "locft", "hparams": {"lr": 2}, "n_layers": 4}, b),
            ("other", {"model": "m", "data": "e", "editor": "locft", "hparams": {"lr": 1}, "n_layers": 4}, c)]
    text = sections.regimes_section(runs, threshold=0.5, n_boot=50)
    assert "The same 6 edits" in text and "layers every folder has (0, 2, 3)" in text and "other" not in text
    assert "These are 3 of the model's 4 layers (lr-b partial): every row is restricted to them" in text
    for name, m, worst in (("lr-a", a, "+0.030 (3)"), ("lr-b", b, "+0.020 (3)")):
        row = next(l for l in text.splitlines() if l.startswith(f"| {name} |")).split("|")
        shared = m.scores["reliability"][:6][:, [m.layers.index(l) for l in (0, 2, 3)]]
        assert int(row[5].split()[0]) == (0, 2, 3)[int(np.argmax(shared.mean(0)))]
        assert row[4].strip() == worst                          # the worst held-out loss change, its own cells
    assert sections.regimes_section(runs[:1], 0.5, 10) == ""
    assert sections._restricted(runs[:1], [0, 1, 2, 3]) == ""  # every layer shared: nothing to say


def test_growth_check_compares_the_first_and_the_new_edits_on_the_layers_both_have(tmp_path, make_folder):
    from scipy.stats import spearmanr

    ids = [f"e{i}" for i in range(8)]
    folder, s = make_folder(tmp_path / "grown", ids, 7, sizes=[4, 8])
    rel = np.random.default_rng(1).uniform(0, 1, (8, 7))
    rel[:, 2] += 1.0  # the most reliable layer, but it damages: the gate must keep it from being best
    for i, e in enumerate(ids):
        for l in (range(7) if i < 4 else (0, 1, 2, 3) if i == 4 else (0, 1, 2)):
            cap = {"lm_loss": 3.0, "lm_loss_change": 1.0 if l == 2 else 0.01} if i < 2 else None
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": rel[i, l]},
                                  "train": {"converged": True}, "capability": cap})
    _, done = folder.load()  # what the page judges
    m, first = sections.complete_at_every_edit(folder, done.edits_used)
    assert (m.layers, m.n_edits, first) == ([0, 1, 2], 8, 4)  # 4 x 7 cells are judged; 8 x 3 are checked
    text = sections.growth_section(m, first, threshold=0.5)
    row = next(l for l in text.splitlines() if l.startswith("| reliability |")).split("|")
    halves = (rel[:4, :3], rel[4:, :3], rel[:, :3])
    for cell, half in zip(row[2:5], halves):
        mean = half.mean(0)
        best = int(np.argmax(mean[:2]))  # layer 2 is gated
        assert cell.strip() == f"{best} ({mean[best]:.3f})"
    assert float(row[5]) == pytest.approx(spearmanr(halves[0].mean(0), halves[1].mean(0)).statistic, abs=5e-3)
    assert "4 edits added to the first 4" in text
    # once the page judges every row there is nothing to check
    for i in range(4, 8):
        for l in range(3, 7):
            s.append(f"{ids[i]}/{l}", {"edit": ids[i], "layer": l, "scores": {"reliability": 0.5}, "train": {}})
    _, done = folder.load()
    assert done.edits_used == 8 and sections.complete_at_every_edit(folder, done.edits_used) is None
    assert sections.growth_section(m, 8, threshold=0.5) == ""


def test_proxy_draws_judge_each_draw_and_resume(tmp_path, monkeypatch):
    from gradlocate.golden.draws import Draws
    from gradlocate.golden.folder import proxy_split
    from gradlocate.models import load_model

    folder = tmp_path / "draws"
    assert main(["matrix", *TINY, "--capability-edits", "0", "--out", str(folder)]) == 0
    model = load_model("tiny-llama")
    d = judge_draws(folder, 2, model=model, selectors=("lga", "gradratio"), n_boot=20, progress=False)
    got = json.loads((folder / "draws.json").read_text())
    assert got["selectors"] == ["lga", "gradratio"] and [x.seed for x in d.draws] == [0, 1]
    assert [x.proxy for x in d.draws] == [proxy_split(4, None, s)[0] for s in (0, 1)]
    assert d.n_proxy == 1 and set(d.draws[0].regret) == {"lga", "gradratio"}
    sel = folder / "selections"
    assert sorted(p.name for p in sel.iterdir()) == ["draw1-first4.jsonl", "first4.jsonl"]
    # a re-run reads every draw back: no selector runs again
    stamps = {p: p.stat().st_mtime_ns for p in sel.iterdir()}
    import gradlocate.golden.selections as selections

    def no_rerun(*a, **k):
        raise AssertionError("a selector ran again")

    monkeypatch.setattr(selections, "run_selector", no_rerun)
    again = judge_draws(folder, 2, model=model, selectors=("lga", "gradratio"), n_boot=20, progress=False)
    assert {p: p.stat().st_mtime_ns for p in sel.iterdir()} == stamps
    assert all(set(x.regret) == {"lga", "gradratio"} for x in again.draws)
    # the report shows it under the judgment at the judged size, and calls it stale at another
    f = StudyFolder.open(folder)
    text = sections.draws_section(f, SimpleNamespace(n_edits=4))
    assert "**Selectors over 2 proxy draws** (1 proxy / 3 test edits each" in text and "| lga |" in text
    assert "stale" in sections.draws_section(f, SimpleNamespace(n_edits=16))
    assert isinstance(Draws.from_dict(got), Draws)


def test_a_partial_folder_is_judged_once_half_its_layers_are_complete(tmp_path, make_folder):
    ids = ["e0", "e1", "e2", "e3"]
    folder, s = make_folder(tmp_path / "partial", ids, 6)
    with pytest.raises(NotJudgedYet, match="no complete layer yet"):
        judge_folder(folder, selectors=False, n_boot=10, n_null=10)

    def fill(layer, rows=ids):
        for e in rows:
            s.append(f"{e}/{layer}", {"edit": e, "layer": layer, "scores": {"reliability": 0.5}, "train": {}})

    fill(4), fill(1), fill(2, ids[:1])
    _, done = folder.load()
    with pytest.raises(NotJudgedYet, match=r"complete layers: 1, 4\. .*once 3 of its 6"):
        _judgeable(done)
    fill(2, ids[1:])
    _, done = folder.load()
    _judgeable(done)  # 3 of 6: judged
    s2 = judge_folder(folder, selectors=False, n_boot=10, n_null=10)
    assert s2.judgment.layers == [1, 2, 4]

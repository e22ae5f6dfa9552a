"""benchmarks/batch_regime.py and report.py's extra sections: the batch regime (the matrix's test
edits edited together at each layer) and regimes side by side."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory):
    from gradlocate.data import load_edits
    from gradlocate.golden.matrix import edit_id

    folder = tmp_path_factory.mktemp("matrix") / "tiny-run"
    folder.mkdir()
    edits = load_edits("zsre", n=8)
    rows = [{"index": i, "id": edit_id(e), **e.to_dict()} for i, e in enumerate(edits)]
    (folder / "edits.json").write_text(json.dumps({"model": "tiny-llama", "n_layers": 4, "editor": "locft",
                                                   "hparams": {"lr": 1e-2, "epochs": 3}, "edits": rows}))
    _module("batch_regime").main([str(folder)])
    return folder


def _lines(folder):
    return [json.loads(l) for l in (folder / "batch" / "shard0of1.jsonl").read_text().splitlines() if l.strip()]


def test_every_layer_edits_the_test_rows_together(batch_folder):
    from gradlocate.golden.study import split_rows

    recs = _lines(batch_folder)
    assert sorted(r["layer"] for r in recs) == [0, 1, 2, 3]
    proxy = split_rows(8, 2, seed=0)
    for r in recs:
        assert r["n_edits"] == r["n_eval"] == 8 - len(proxy)
        assert len(r["per_edit"]["reliability"]) == 6 and r["train"]["epochs"] <= 3
        assert r["general"]["lm_loss_change"] is not None
    # a second run resumes: nothing is trained or appended again
    _module("batch_regime").main([str(batch_folder)])
    assert len(_lines(batch_folder)) == len(recs)


def test_report_reads_the_golden_layer_and_the_regret_off_the_records(batch_folder):
    report = _module("report")
    recs = sorted(_lines(batch_folder), key=lambda r: r["layer"])
    means = {k: np.array([np.mean(r["per_edit"][k]) for r in recs]) for k in ("reliability", "locality")}
    j = SimpleNamespace(definitions={d: SimpleNamespace(golden=1) for d in ("reliability", "locality", "edit-only")})
    text = report.batch_section(batch_folder, j, 4, threshold=0.5, n_boot=50)
    assert "complete" in text and "6 test edits edited *together*" in text
    for k, mean in means.items():
        row = next(l for l in text.splitlines() if l.startswith(f"| {k} |")).split("|")
        golden = int(np.argmax(mean))  # ties go to the first layer, as golden_layer does
        assert int(row[2]) == golden
        assert float(row[4].split()[0]) == pytest.approx(mean[golden], abs=5e-4)
        assert float(row[6].split()[0]) == pytest.approx(mean[golden] - mean[1], abs=5e-4)
    per_layer = [l for l in text.splitlines() if l.startswith("| 2 |")][0].split("|")
    assert float(per_layer[5]) == pytest.approx(recs[2]["general"]["lm_loss_change"], abs=5e-4)


def test_a_single_edit_golden_layer_that_damages_the_batch_is_named(batch_folder):
    report = _module("report")
    recs = sorted(_lines(batch_folder), key=lambda r: r["layer"])
    change = np.array([r["general"]["lm_loss_change"] for r in recs])
    worst = int(np.argmax(change))
    j = SimpleNamespace(definitions={"reliability": SimpleNamespace(golden=worst)})
    text = report.batch_section(batch_folder, j, 4, threshold=float(change[worst]) - 1e-9, n_boot=20)
    row = next(l for l in text.splitlines() if l.startswith("| reliability |"))
    assert f"damaging in the batch (Δloss {change[worst]:.2f})" in row and int(row.split("|")[2]) != worst
    rows = [l for l in text.splitlines() if l.startswith("| reliability |") or l.startswith("| locality |")]
    assert len(rows) == 1  # a definition the judgment lacks gets no row


def test_a_folder_without_batch_records_adds_nothing(tmp_path):
    assert _module("report").batch_section(tmp_path, SimpleNamespace(definitions={}), 4, 0.5, 10) == ""


def test_regimes_side_by_side_judge_the_shared_edits_and_layers():
    from gradlocate.golden.matrix import Matrix

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
    text = _module("report").regimes_section(runs, threshold=0.5, n_boot=50)
    assert "The same 6 edits" in text and "layers every folder has (0, 2, 3)" in text and "other" not in text
    assert "These are 3 of the model's 4 layers (lr-b partial): every row is restricted to them" in text
    for name, m, worst in (("lr-a", a, "+0.030 (3)"), ("lr-b", b, "+0.020 (3)")):
        row = next(l for l in text.splitlines() if l.startswith(f"| {name} |")).split("|")
        shared = m.scores["reliability"][:6][:, [m.layers.index(l) for l in (0, 2, 3)]]
        assert int(row[5].split()[0]) == (0, 2, 3)[int(np.argmax(shared.mean(0)))]
        assert row[4].strip() == worst                          # the worst held-out loss change, its own cells
    assert _module("report").regimes_section(runs[:1], 0.5, 10) == ""
    assert _module("report")._restricted(runs[:1], [0, 1, 2, 3]) == ""  # every layer shared: nothing to say


def test_growth_check_compares_the_first_and_the_new_edits_on_the_layers_both_have(tmp_path):
    from scipy.stats import spearmanr

    from gradlocate.golden.store import RecordStore

    report = _module("report")
    hp = {"lr": 1e-3, "epochs": 5}
    regime = {"model": "tiny", "n_layers": 7, "editor": "locft", "hparams": hp}
    ids = [f"e{i}" for i in range(8)]
    (tmp_path / "edits.json").write_text(json.dumps({**regime, "edits": [{"id": e} for e in ids], "sizes": [4, 8]}))
    s = RecordStore(tmp_path, lambda k: {"editor": {"name": "locft", "hparams": hp}}, shard="shard0of1")
    rel = np.random.default_rng(1).uniform(0, 1, (8, 7))
    rel[:, 2] += 1.0  # the most reliable layer, but it damages: the gate must keep it from being best
    for i, e in enumerate(ids):
        for l in (range(7) if i < 4 else (0, 1, 2, 3) if i == 4 else (0, 1, 2)):
            cap = {"lm_loss": 3.0, "lm_loss_change": 1.0 if l == 2 else 0.01} if i < 2 else None
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": rel[i, l]},
                                  "train": {"converged": True}, "capability": cap})
    _, done = report.load_matrix(tmp_path, 7, editor="locft", hparams=hp)  # what the page judges
    m, first = report.complete_at_every_edit(tmp_path, regime, done.edits_used)
    assert (m.layers, m.n_edits, first) == ([0, 1, 2], 8, 4)  # 4 x 7 cells are judged; 8 x 3 are checked
    text = report.growth_section(m, first, threshold=0.5)
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
    _, done = report.load_matrix(tmp_path, 7, editor="locft", hparams=hp)
    assert done.edits_used == 8 and report.complete_at_every_edit(tmp_path, regime, done.edits_used) is None
    assert report.growth_section(m, 8, threshold=0.5) == ""


def test_proxy_draws_judge_each_draw_share_selections_and_resume(tmp_path, monkeypatch):
    from gradlocate.golden.draws import Draws
    from gradlocate.golden.study import split_rows

    matrices = tmp_path / "matrix"
    base = ["--model", "tiny-llama", "--data", "zsre", "--n", "8", "--epochs", "1", "--chunk", "8",
            "--capability-edits", "2"]
    _module("matrix").main(base + ["--lr", "1e-3", "--out", str(matrices / "a")])
    _module("matrix").main(base + ["--lr", "1e-2", "--out", str(matrices / "b")])  # the same edits, another regime
    draws = _module("proxy_draws")
    monkeypatch.setattr(draws, "MATRICES", matrices)
    args = ["--draws", "2", "--selectors", "lga,gradratio", "--n-boot", "20"]
    draws.main(args)
    for name in ("a", "b"):
        got = json.loads((matrices / name / "proxy_draws.json").read_text())
        d = Draws.from_dict(got)
        assert got["selectors"] == ["lga", "gradratio"] and [x.seed for x in d.draws] == [0, 1]
        assert [x.proxy for x in d.draws] == [split_rows(8, 2, seed=s) for s in (0, 1)]
        assert d.n_proxy == 2 and set(d.draws[0].regret) == {"lga", "gradratio"}
    sel = matrices / "a" / "selections"
    assert sorted(p.name for p in sel.iterdir()) == ["draw1-first8.jsonl", "first8.jsonl"]
    # b's selections are a's, copied (the selectors do not see the editor)
    assert (matrices / "b" / "selections" / "first8.jsonl").read_text() == (sel / "first8.jsonl").read_text()
    # a re-run reads every draw back: no selector runs again
    stamps = {p: p.stat().st_mtime_ns for p in sel.iterdir()}
    import gradlocate.golden.study as study

    def no_rerun(*a, **k):
        raise AssertionError("a selector ran again")

    monkeypatch.setattr(study, "run_selector", no_rerun)
    draws.main(args)
    assert {p: p.stat().st_mtime_ns for p in sel.iterdir()} == stamps
    again = Draws.from_dict(json.loads((matrices / "a" / "proxy_draws.json").read_text()))
    assert all(set(x.regret) == {"lga", "gradratio"} for x in again.draws)  # a selector that ran again failed
    # the report shows it under the judgment at the judged size, and calls it stale at another
    report = _module("report")
    text = report.draws_section(matrices / "a", SimpleNamespace(n_edits=8))
    assert "**Selectors over 2 proxy draws** (2 proxy / 6 test edits each" in text and "| lga |" in text
    assert "stale" in report.draws_section(matrices / "a", SimpleNamespace(n_edits=16))
    assert report.draws_section(tmp_path, SimpleNamespace(n_edits=8)) == ""
    with pytest.raises(SystemExit, match="no matrix folder"):
        draws.main(["--folders", "nope"])



def test_a_partial_folder_is_judged_once_half_its_layers_are_complete(tmp_path):
    from gradlocate.golden.store import RecordStore

    report = _module("report")
    hp = {"lr": 1e-3, "epochs": 5}
    ids = ["e0", "e1"]
    (tmp_path / "edits.json").write_text(json.dumps({"model": "tiny", "n_layers": 6, "editor": "locft",
                                                     "hparams": hp, "edits": [{"id": e} for e in ids]}))
    args = SimpleNamespace(no_selectors=True, no_cma=True, threshold=0.5, n_boot=10, n_null=10)
    with pytest.raises(report.NotJudgedYet, match="no complete layer yet.*once 3 of its 6"):
        report.judge_folder(tmp_path, args)
    s = RecordStore(tmp_path, lambda k: {"editor": {"name": "locft", "hparams": hp}}, shard="shard0of1")

    def fill(layer, rows=ids):
        for e in rows:
            s.append(f"{e}/{layer}", {"edit": e, "layer": layer, "scores": {"reliability": 0.5}, "train": {}})

    fill(4), fill(1), fill(2, ids[:1])
    _, done = report.load_matrix(tmp_path, 6, editor="locft", hparams=hp)
    with pytest.raises(report.NotJudgedYet, match=r"complete layers: 1, 4\. .*once 3 of its 6"):
        report.judgeable(done)
    fill(2, ids[1:])
    _, done = report.load_matrix(tmp_path, 6, editor="locft", hparams=hp)
    report.judgeable(done)  # 3 of 6: judged

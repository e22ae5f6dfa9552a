"""The judgment's numbers recomputed independently (numpy/scipy, not gradlocate.stats) on hand-built matrices."""

import json

import numpy as np
import pytest
from scipy import stats as sps

import gradlocate as gl

from gradlocate.golden.judge import judge, matrix_metrics
from gradlocate.golden.load import NoLayerYet, load_matrix
from gradlocate.golden.matrix import Matrix
from gradlocate.golden.store import RecordStore
from gradlocate.results import LayerScores

N, L = 16, 4


def _built(seed=0, damaging=2):
    """Reliability best at layer 2, locality best at layer 0; layer ``damaging`` raises the held-out loss by 2 nats."""
    rng = np.random.default_rng(seed)
    rel = np.clip(np.array([0.3, 0.6, 0.95, 0.5]) + rng.normal(0, 0.1, (N, L)), 0, 1)
    loc = np.clip(np.array([0.95, 0.7, 0.5, 0.6]) + rng.normal(0, 0.1, (N, L)), 0, 1)
    gen = np.clip(np.array([0.2, 0.5, 0.6, 0.45]) + rng.normal(0, 0.1, (N, L)), 0, 1)
    cap = np.full((N, L), np.nan)
    cap[:4] = 0.05
    if damaging is not None:
        cap[:4, damaging] = 2.0
    train = {"converged": (rng.random((N, L)) < 0.5).astype(float), "final_loss": rng.random((N, L))}
    m = Matrix(list(range(10, 10 + L)), [f"e{i}" for i in range(N)],
               {"reliability": rel, "locality": loc, "generalization": gen}, train, cap)
    return m, rel, loc, gen, cap, train


def _quick(m, **kw):
    return judge(m, **{"n_boot": 100, "n_null": 100, "n_splits": 20, **kw})


def _by_hand(rel, loc, gen, cap, rows):
    """Each definition's cells on ``rows``, written out."""
    capmean = np.nanmean(cap, axis=0)
    r, lo, g = rel[rows], loc[rows], gen[rows]
    edit = (r + lo + g) / 3
    weighted = (r + lo + g + np.exp(-capmean)[None, :]) / 4

    def mm(x):
        mu = x.mean(0)
        return (x - mu.min()) / (mu.max() - mu.min())
    lm = np.broadcast_to(-capmean, r.shape)
    gl = (mm(r) + mm(g) + mm(lo) + mm(lm)) / 4
    return {"reliability": r, "locality": lo, "generalization": g, "edit-only": edit, "weighted": weighted,
            "golden-layers": gl}


def test_golden_per_definition_recomputed_and_gate_excludes_damaging_layer():
    m, rel, loc, gen, cap, _ = _built()
    proxy = [0, 1, 2, 3]
    j = _quick(m, proxy=proxy)
    test = np.arange(4, N)
    assert j.gate.damaging == [2]
    for d, cells in _by_hand(rel, loc, gen, cap, test).items():
        means = cells.mean(0)
        np.testing.assert_allclose(j.definition(d).layer_mean, means, atol=1e-12)
        assert j.definition(d).golden_ungated == 10 + int(np.argmax(means)), d
        gated = means.copy()
        gated[2] = -np.inf
        assert j.definition(d).golden == 10 + int(np.argmax(gated)), d
    # the gate changes the answer: reliability's best layer (2) is damaging
    assert j.definition("reliability").golden_ungated == 12 and j.definition("reliability").golden != 12


def test_definitions_disagree_on_a_constructed_matrix():
    m, *_ = _built(damaging=None)
    j = _quick(m)
    assert j.definition("reliability").golden == 12
    assert j.definition("locality").golden == 10
    assert len({r.golden for r in j.definitions.values()}) >= 2
    assert "the definitions **disagree**" in j.to_markdown()
    same = _quick(m, definitions=["reliability"], primary="reliability")
    assert "every definition agrees" in same.to_markdown()


def test_versus_paired_tests_and_selection_bias_recomputed():
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    j = _quick(m, definitions=["edit-only"], primary="edit-only")
    cells = (rel + loc + gen) / 3
    g = int(np.argmax(cells.mean(0)))
    best = cells.max(1)
    v = j.definition("edit-only").versus
    t = sps.ttest_rel(best, cells[:, g])
    assert v["in_sample"]["t"] == pytest.approx(t.statistic) and v["in_sample"]["p_t"] == pytest.approx(t.pvalue)
    nz = (best - cells[:, g])[best != cells[:, g]]
    assert v["in_sample"]["p_wilcoxon"] == pytest.approx(sps.wilcoxon(nz).pvalue)
    assert v["null"]["observed"] == pytest.approx(np.mean(best - cells[:, g]))
    assert v["null"]["corrected"] == pytest.approx(v["null"]["observed"] - v["null"]["null_mean"])
    assert v["null"]["null_mean"] > 0  # the winner's curse is positive on noisy cells
    assert sum(v["optimum_layers"]) == N and v["optimum_layers"][int(np.argmax(np.bincount(cells.argmax(1))))] > 0


def test_bootstrap_resamples_rows_jointly():
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    j = _quick(m, definitions=["edit-only"], primary="edit-only", seed=3, n_boot=200)
    rng = np.random.default_rng(3)
    cells = (rel + loc + gen) / 3
    goldens = [int(np.argmax(cells[rng.integers(0, N, N)].mean(0))) for _ in range(200)]
    freq = np.bincount(goldens, minlength=L) / 200
    np.testing.assert_allclose(j.definition("edit-only").boot.golden_freq, freq)


def test_transfer_agreement_recomputed():
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    j = judge(m, proxy=range(5), definitions=["reliability"], primary="reliability", n_boot=10, n_null=10,
              n_splits=200, seed=1)
    rng = np.random.default_rng(1)
    agree = []
    for _ in range(200):
        o = rng.permutation(N)
        agree.append(np.argmax(rel[o[:5]].mean(0)) == np.argmax(rel[o[5:]].mean(0)))
    assert j.definition("reliability").transfer.agreement == pytest.approx(np.mean(agree))
    assert j.definition("reliability").transfer.n_splits == 200


def test_selector_regret_and_rank_recomputed():
    m, rel, *_ = _built(damaging=None)
    sel = LayerScores("lga", [0.1, 0.5, 0.2, 0.9], [False, True, True, True], 13, layers=[10, 11, 12, 13])
    j = _quick(m, proxy=[0, 1], selections={"lga": sel}, definitions=["reliability"], primary="reliability")
    means = rel[2:].mean(0)
    row = j.selectors[0]
    assert row.layer == 13 and row.regret["reliability"][0] == pytest.approx(means.max() - means[3])
    assert row.rank.spearman == pytest.approx(sps.spearmanr([0.1, 0.5, 0.2, 0.9], means).statistic)
    assert row.rank.kendall_allowed == pytest.approx(sps.kendalltau([0.5, 0.2, 0.9], means[1:]).statistic)
    neg = LayerScores("lga", [0.1, 0.5, 0.2, 0.9], [True] * 4, 10, params={"sign": "negative"}, layers=[10, 11, 12, 13])
    j = _quick(m, proxy=[0, 1], selections={"neg": neg}, definitions=["reliability"], primary="reliability")
    assert j.selectors[0].rank.spearman == pytest.approx(sps.spearmanr([-0.1, -0.5, -0.2, -0.9], means).statistic)


def test_convergence_and_capability_metrics():
    m, _, _, _, cap, train = _built()
    j = _quick(m)
    np.testing.assert_allclose(j.convergence.converged, train["converged"].mean(0))
    np.testing.assert_allclose(j.convergence.final_loss, train["final_loss"].mean(0))
    np.testing.assert_allclose(matrix_metrics(m)["capability"], np.exp(-np.nanmean(cap, 0)))
    assert "| 12 |" in j.to_markdown() and "damaging" in j.to_markdown()
    assert json.dumps(j.to_dict())  # JSON-ready


def test_unconverged_cells_are_called_under_training_only_when_the_edits_did_not_take():
    from gradlocate.golden.judge_report import reading

    m, rel, loc, gen, cap, _ = _built()
    never = {"converged": np.zeros((N, L)), "final_loss": np.tile([2.0, 1.0, 3.0, 1.5], (N, 1))}

    def said(r):
        mx = Matrix(m.layers, m.edit_ids, {"reliability": r, "locality": loc, "generalization": gen}, never, cap)
        return " ".join(reading(_quick(mx)))

    low = said(rel * 0.5)  # the edits did not take: best mean reliability about 0.47
    best = np.nanmax(rel[4:].mean(0) * 0.5)  # the test rows (the first 4 are the proxy)
    assert "the edits do not fully take at any judged layer" in low and "missed the threshold" not in low
    assert f"mean reliability peaks at {best:.2f}, layer 12" in low and "mean final loss 1.00 (layer 11) to 3.00 (layer 12)" in low
    high = said(np.ones((N, L)))
    assert "missed the threshold, not the edit" in high and "do not fully take" not in high
    assert "did not converge (mean fraction 0.00)" in high


def test_errors_say_what_was_expected():
    m, *_ = _built()
    with pytest.raises(ValueError, match="proxy rows must be in"):
        judge(m, proxy=[99])
    with pytest.raises(ValueError, match="n_null"):
        judge(m, n_null=0)
    with pytest.raises(ValueError, match="primary"):
        judge(m, definitions=["reliability"], primary="weighted")


def test_load_matrix_partial_folder_and_regime_check(tmp_path):
    ids = ["a", "b", "c"]
    (tmp_path / "edits.json").write_text(json.dumps({"edits": [{"id": e} for e in ids]}))
    fp = {"editor": {"name": "locft", "hparams": {"lr": 5e-4, "epochs": 25}}}  # the store digests each part
    s = RecordStore(tmp_path, lambda k: fp, shard="shard0of1")
    for l in (0, 1):
        for e in ids[: 3 if l == 0 else 2]:
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 0.5 + l}, "train": {},
                                  "capability": {"lm_loss": 3.0, "lm_loss_change": 0.1} if e == "a" else None})
    m, c = load_matrix(tmp_path, 4, editor="locft", hparams={"lr": 5e-4, "epochs": 25})
    assert m.layers == [0] and (c.cells, c.total, c.partial_layers) == (5, 12, [1])
    assert m.capability[0, 0] == pytest.approx(0.1) and m.capability_base == pytest.approx(2.9)
    with pytest.raises(ValueError, match="editor fingerprint") as e:  # a wrong regime is not "not yet"
        load_matrix(tmp_path, 4, editor="locft", hparams={"lr": 5e-3, "epochs": 100})
    assert not isinstance(e.value, NoLayerYet)
    # a fourth edit without cells: no layer is complete any more, but the partial ones still show
    s.append("c/1", {"edit": "c", "layer": 1, "scores": {"reliability": 1.5}, "train": {}})
    (tmp_path / "edits.json").write_text(json.dumps({"edits": [{"id": e} for e in ids + ["d"]]}))
    with pytest.raises(NoLayerYet, match=r"no complete layer yet \(6 cells\)"):
        load_matrix(tmp_path, 4, editor="locft", hparams={"lr": 5e-4, "epochs": 25})
    m, _ = load_matrix(tmp_path, 4, editor="locft", hparams={"lr": 5e-4, "epochs": 25}, complete_only=False)
    assert m.layers == [0, 1] and np.isnan(m.scores["reliability"][3]).all()


def test_a_grown_folder_shows_its_complete_rows_until_the_new_ones_hold_more(tmp_path):
    ids = ["a", "b", "c", "d"]
    (tmp_path / "edits.json").write_text(json.dumps({"edits": [{"id": e} for e in ids], "sizes": [2, 4]}))
    s = RecordStore(tmp_path, shard="shard0of1")
    for e in ("a", "b"):
        for l in range(3):
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 1.0}, "train": {}})
    s.append("c/0", {"edit": "c", "layer": 0, "scores": {"reliability": 0.0}, "train": {}})
    m, c = load_matrix(tmp_path, 3)
    assert (m.edit_ids, m.layers) == (["a", "b"], [0, 1, 2])  # 2 x 3 cells beat 4 x 0
    assert (c.n_edits, c.edits_used, c.total) == (4, 2, 12) and "first 2 of 4 edits" in str(c)
    for e in ("c", "d"):
        for l in range(2):
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 0.0}, "train": {}})
    m, c = load_matrix(tmp_path, 3)
    assert (m.edit_ids, m.layers) == (ids, [0, 1])  # 4 x 2 = 8 > 2 x 3
    # without the growth history a partial layer does not trade rows for layers
    (tmp_path / "edits.json").write_text(json.dumps({"edits": [{"id": e} for e in ids]}))
    assert load_matrix(tmp_path, 3)[0].edit_ids == ids


def test_matrix_script_grows_a_folder_and_refuses_other_edits(tmp_path):
    import argparse
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "matrix_script", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    every = gl.data.as_edits([gl.data.EditRequest(f"p{i}", f" t{i}", subject=f"s{i}") for i in range(6)])

    def write(n, editor="locft", lr=5e-4, order=range(6)):
        args = argparse.Namespace(data="counterfact", seed=0, model="tiny", editor=editor, lr=lr, epochs=25, set=[])
        rows = [every[i] for i in list(order)[:n]]
        script.write_manifest(tmp_path, args, gl.data.as_edits(rows), list(order)[:n], 4)
        return json.loads((tmp_path / "edits.json").read_text())

    assert len(write(2)["edits"]) == 2
    grown = write(4)
    assert len(grown["edits"]) == 4 and grown["sizes"] == [2, 4]
    assert len(write(3)["edits"]) == 4  # a smaller run leaves the manifest as it is
    with pytest.raises(SystemExit, match="other edits or another regime"):
        write(4, order=[5, 4, 3, 2, 1, 0])
    with pytest.raises(SystemExit, match="other edits or another regime"):
        write(5, lr=5e-5)


def test_report_page_from_a_partial_matrix_folder(tmp_path, monkeypatch):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "report", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    folder = tmp_path / "matrix" / "tiny-run"
    folder.mkdir(parents=True)
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    (folder / "edits.json").write_text(json.dumps({"model": "tiny", "n_layers": 6, "editor": "locft",
                                                   "hparams": {"lr": 1e-3, "epochs": 5},
                                                   "edits": [{"id": e} for e in m.edit_ids]}))
    s = RecordStore(folder, lambda k: {"editor": {"name": "locft", "hparams": {"lr": 1e-3, "epochs": 5}}},
                    shard="shard0of1")
    for i, e in enumerate(m.edit_ids):
        for j in range(L):
            s.append(f"{e}/{j}", {"edit": e, "layer": j, "train": {"converged": True, "final_loss": 0.0},
                                  "scores": {"reliability": rel[i, j], "locality": loc[i, j],
                                             "generalization": gen[i, j]},
                                  "capability": {"lm_loss": 3.0, "lm_loss_change": 0.01} if i < 4 else None})
    started = tmp_path / "matrix" / "a-started"  # sorted first: its failure must not stop the other folder
    started.mkdir()
    (started / "edits.json").write_text(json.dumps({"model": "tiny", "n_layers": 6, "editor": "locft",
                                                    "hparams": {"lr": 1e-3, "epochs": 5},
                                                    "edits": [{"id": e} for e in m.edit_ids]}))
    foreign = tmp_path / "matrix" / "b-foreign"  # records of another regime: reported in place, the rest runs
    foreign.mkdir()
    (foreign / "edits.json").write_text((started / "edits.json").read_text())
    RecordStore(foreign, lambda k: {"editor": {"name": "locft", "hparams": {"lr": 1.0, "epochs": 5}}}).append(
        f"{m.edit_ids[0]}/0", {"edit": m.edit_ids[0], "layer": 0, "scores": {"reliability": 1.0}, "train": {}})
    monkeypatch.setattr(report, "MATRICES", tmp_path / "matrix")
    out = tmp_path / "results.md"
    report.main(["--no-selectors", "--n-boot", "20", "--n-null", "20", "--out", str(out)])
    text = out.read_text()
    assert "### a-started\n\nMatrix: **partial**, not judged yet: " in text and "no complete layer yet (0 cells)" in text
    assert "### b-foreign\n\nNot judged: ValueError:" in text and "is not 'locft'" in text.split("### b-foreign")[1].split("###")[0]
    assert not (started / "judgment.json").exists() and not (foreign / "judgment.json").exists()
    assert f"**partial**: {N * L}/{N * 6} cells" in text and "lr 0.001, epochs 5" in text
    assert "| edit-only |" in text and "Superseded" in text
    assert json.loads((folder / "judgment.json").read_text())["completeness"]["complete_layers"] == [0, 1, 2, 3]


def test_plot_marks_each_definition():
    import matplotlib

    matplotlib.use("Agg")
    m, *_ = _built()
    fig = _quick(m).plot()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 6 and any(l.startswith("weighted (") for l in labels)


def test_lga_versus_cma_is_decided_by_the_paired_difference():
    from types import SimpleNamespace

    from gradlocate.golden.judge_report import _lga_versus_cma
    from gradlocate.golden.inference import RegretDifference

    def j(lga, cma, diff):
        sel = [SimpleNamespace(name="lga", layer=3, regret={"golden-layers": lga, "weighted": lga}),
               SimpleNamespace(name="cma", layer=9, regret={"golden-layers": cma, "weighted": None})]
        d = RegretDifference("lga", "cma", *diff)
        boot = SimpleNamespace(difference=lambda a, b: d if (a, b) == ("lga", "cma") else d.flipped())
        return SimpleNamespace(selectors=sel, primary="weighted",
                               definitions={"golden-layers": SimpleNamespace(boot=boot)})

    # separate intervals overlap, the paired one excludes 0: decided by the paired difference
    line = _lga_versus_cma(j((0.1, 0.0, 0.2), (0.15, 0.1, 0.3), (-0.05, -0.08, -0.01, 0.99, 0.0)))[0]
    assert "holds" in line and "paired difference -0.050 [-0.080, -0.010] (LGA lower in 99% of resamples)" in line
    assert "reversed" in _lga_versus_cma(j((0.2, 0.1, 0.3), (0.01, 0.0, 0.05), (0.19, 0.05, 0.3, 0.0, 1.0)))[0]
    # a bound just above 0 is printed so that it does not read 0.000 beside "reversed"
    line = _lga_versus_cma(j((0.03, 0.0, 0.06), (0.01, 0.0, 0.04), (0.021, 3e-4, 0.047, 0.0, 0.97)))[0]
    assert "paired difference 0.021 [3.0e-04, 0.047]" in line and "reversed" in line
    # disjoint separate intervals never override a paired interval that covers 0
    line = _lga_versus_cma(j((0.01, 0.0, 0.05), (0.2, 0.1, 0.3), (-0.19, -0.3, 0.01, 0.9, 0.1)))[0]
    assert "not resolved" in line and "layer 3 vs 9" in line and "weighted" not in line  # CMA has no weighted regret
    assert "a tie" in _lga_versus_cma(j((0.1, 0.0, 0.2), (0.1, 0.0, 0.2), (0.0, 0.0, 0.0, 0.0, 0.0)))[0]
    assert _lga_versus_cma(SimpleNamespace(selectors=[], primary="weighted")) == []


def test_claims_table_reads_each_claim_off_the_judgment():
    from gradlocate.golden.judge_report import claims_table

    m, rel, *_ = _built(damaging=None)
    layers = [10, 11, 12, 13]
    lga = LayerScores("lga", [0.1, 0.2, 0.9, 0.3], [True] * 4, 12, layers=layers)  # the golden layer (12)
    cma = LayerScores("cma", [0.9, 0.2, 0.1, 0.3], [True] * 4, 10, layers=layers)  # the worst one
    j = _quick(m, proxy=[0, 1, 2, 3], selections={"lga": lga, "cma": cma}, definitions=["reliability"],
               primary="reliability")
    r = j.definition("reliability")
    nul, t = r.versus["null"], r.transfer
    means = rel[4:].mean(0)
    assert r.golden == 12 and j.selectors[1].regret["reliability"][0] == pytest.approx(means.max() - means[0])
    lines = claims_table([("toy", "16 edits x 4 layers", j)], definition="reliability")
    row = lines[2]
    fixed = "yes: a per-edit choice is better" if nul["p_value"] < 0.05 and nul["corrected"] > 0 else "not shown"
    assert row.startswith(f"| toy | 16 edits x 4 layers | 12, {r.boot.p_golden:.2f} | {fixed} ")
    assert f"holds ({t.agreement:.2f} vs" in row and t.p_null < 0.05  # layer 12 is far ahead: transfer holds
    d = r.boot.difference("lga", "cma")
    assert d.value == pytest.approx(-(means.max() - means[0])) and d.hi < 0
    assert f"| holds (0.000 vs {j.selectors[1].regret['reliability'][0]:.3f}; difference [{d.lo:.3f}, {d.hi:.3f}]) |" in row
    assert "| lga 0.000 [0.000, 0.000] |" in row
    # over proxy draws: LGA (the golden layer) is lower in every draw, resolved where its interval says so
    from gradlocate.golden.draws import over_draws

    dr = over_draws(m, [(s, [s, s + 1, s + 2, s + 3], {"lga": lga, "cma": cma}) for s in range(3)],
                    definitions=["reliability"], n_boot=50)
    rs = dr.resolved("reliability")
    with_draws = claims_table([("toy", "16 edits x 4 layers", j)], definition="reliability", draws={"toy": dr})[2]
    assert f"; over 3 proxy draws LGA lower in 3, CMA in 0 (resolved: {rs['lga']} / {rs['cma']}) |" in with_draws
    assert rs["lga"] == 3
    assert claims_table([("toy", "x", j)], definition="reliability", draws={"other": dr})[2].count("proxy draws") == 0
    # no CMA row -> not measured; a definition the judgment lacks is named
    j2 = _quick(m, proxy=[0, 1, 2, 3], selections={"lga": lga}, definitions=["reliability"], primary="reliability")
    assert "| not measured |" in claims_table([("a", "x", j2)], definition="reliability")[2]
    off = LayerScores("cma", [0.0] * 5, [True] * 5, 14, layers=[10, 11, 12, 13, 14])  # picks a layer with no cells
    j3 = _quick(m, proxy=[0, 1, 2, 3], selections={"lga": lga, "cma": off}, definitions=["reliability"],
                primary="reliability")
    assert "not judged yet (layers 12 / 14 not in the matrix)" in claims_table([("a", "x", j3)], "reliability")[2]
    # a partial matrix: the lowest regret is only over the picks it has; golden 12 is inside 10..13
    part = claims_table([("a", "x", j3)], "reliability", partial={"a": {14}})[2]
    assert "| lga 0.000 [0.000, 0.000] (1 of 2 picks judged; regret vs the best judged layer) |" in part
    assert f"| 12, {j3.definition('reliability').boot.p_golden:.2f} | " in part  # 12 borders no unjudged layer
    # edits that never take (reliability < 0.5): under-trained only if the cells did not converge either
    top = np.nanmax(rel[4:].mean(0) * 0.5)
    for conv, said in ((0.0, "under-trained"), (1.0, "the edits do not take")):
        low = _quick(Matrix(m.layers, m.edit_ids, {"reliability": rel[:, ::-1] * 0.5}, {"converged": np.full((N, L), conv)}),
                     proxy=[0, 1, 2, 3], definitions=["reliability"], primary="reliability")
        row = claims_table([("e", "x", low)], "reliability")[2]
        assert f"| 11, {low.definition('reliability').boot.p_golden:.2f} ({said}: reliability peaks at {top:.2f}) |" in row
    # a golden layer next to a layer the partial matrix lacks (at the model's end or beside a gap)
    edge = _quick(Matrix(m.layers, m.edit_ids, {"reliability": rel[:, [2, 0, 1, 3]]}), proxy=[0, 1, 2, 3],
                  definitions=["reliability"], primary="reliability")
    assert edge.definition("reliability").golden == 10
    for unjudged, flagged in (({9}, True), ({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, True), ({14, 15}, False), ((), False)):
        row = claims_table([("e", "x", edge)], "reliability", partial={"e": unjudged})[2]
        assert ("(next to layers not judged yet)" in row) is flagged, unjudged
    assert "no golden-layers definition judged" in claims_table([("a", "x", j2)])[2]


def test_matrix_script_writes_the_whole_matrix_only_once_every_layer_is_in(tmp_path, monkeypatch, capsys):
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "matrix_script", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    edits = gl.data.as_edits([gl.data.EditRequest("Paris is in", " Rome", subject="Paris"),
                              gl.data.EditRequest("Oslo is in", " Peru", subject="Oslo")])
    monkeypatch.setattr(script, "pick_edits", lambda data, n, seed: (edits, [0, 1]))
    base = ["--model", "tiny-gpt2", "--data", "counterfact", "--n", "2", "--epochs", "1", "--chunk", "2",
            "--out", str(tmp_path)]
    script.main(base + ["--layers", "0,2"])  # a subset: 2 of the model's layers
    n_layers = json.loads((tmp_path / "edits.json").read_text())["n_layers"]
    assert n_layers > 2 and not (tmp_path / "matrix.json").exists()
    assert f"at 2 of {n_layers} layers [0, 2]" in capsys.readouterr().out
    rest = ",".join(str(l) for l in range(n_layers) if l not in (0, 2))
    script.main(base + ["--layers", rest])
    whole = json.loads((tmp_path / "matrix.json").read_text())
    assert whole["layers"] == list(range(n_layers))


def test_golden_layers_is_flagged_when_the_held_out_loss_it_normalises_is_noise():
    from gradlocate.golden.judge_report import reading

    m, rel, loc, gen, _, train = _built(damaging=None)
    rng = np.random.default_rng(5)
    noise = np.full((N, L), np.nan)
    noise[:8] = rng.normal(0.001, 1e-4, (8, L))  # no layer effect: layer means within noise
    quiet = judge(Matrix(m.layers, m.edit_ids, m.scores, train, noise), n_boot=50, n_null=50, n_splits=10)
    e = quiet.capability_effect
    by_hand = sps.friedmanchisquare(*noise[:8].T)
    assert e.n_edits == 8 and e.p_value == pytest.approx(by_hand.pvalue) and e.p_value >= 0.05
    assert e.spread == pytest.approx(np.ptp(noise[:8].mean(0)))
    text = " ".join(reading(quiet))
    assert "may rank the layers by noise" in text and f"Friedman p {e.p_value:.2g}" in text
    assert "Layer effect on the held-out loss change" in quiet.to_markdown()
    assert json.loads(json.dumps(quiet.to_dict()))["capability_effect"]["n_edits"] == 8
    loud = noise.copy()
    loud[:8, 2] += 0.5  # layer 2 costs half a nat in every edit: a real effect, no flag
    j = judge(Matrix(m.layers, m.edit_ids, m.scores, train, loud), n_boot=50, n_null=50, n_splits=10)
    assert j.capability_effect.p_value < 0.05 and "may rank the layers by noise" not in " ".join(reading(j))
    no_golden_layers = judge(Matrix(m.layers, m.edit_ids, m.scores, train, noise), n_boot=20, n_null=20,
                             n_splits=10, definitions=["edit-only", "weighted"], primary="weighted")
    assert "may rank the layers by noise" not in " ".join(reading(no_golden_layers))

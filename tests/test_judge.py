"""The judgment's numbers recomputed independently (numpy/scipy, not gradlocate.stats) on hand-built matrices."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

import gradlocate as gl

from gradlocate.golden.folder import FolderError, NoLayerYet
from gradlocate.golden.judge import judge
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
    return judge(m, **{"n_boot": 100, **kw})


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


def test_the_primary_score_is_edit_only_and_its_near_best_layers_are_recomputed():
    m, rel, loc, gen, cap, _ = _built()
    j = _quick(m, proxy=[0, 1, 2, 3])
    assert j.primary == "edit-only" and j.golden == j.definition("edit-only").golden
    means = ((rel + loc + gen) / 3)[4:].mean(0)
    allowed = np.array([True, True, False, True])  # layer 12 is damaging
    best = means[allowed].max()
    near = [10 + l for l in range(L) if allowed[l] and means[l] >= best - 0.02 - 1e-9]
    r = j.definition("edit-only")
    assert r.near == near and r.tied == [10 + int(np.argmax(np.where(allowed, means, -1)))]
    tied = _quick(Matrix(m.layers, m.edit_ids, {"reliability": np.tile([0.5, 0.9, 0.9, 0.2], (N, 1))}),
                  definitions=["reliability"], primary="reliability")
    assert tied.definition("reliability").tied == [11, 12] and "(tied: 11, 12)" in tied.to_markdown()
    text = j.to_markdown()
    assert "| edit-only (primary) |" in text
    assert "golden-layers (gradlocate's min-max construction, not the paper's)" in text


def test_own_optimum_without_a_replicate_is_not_estimated():
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    j = _quick(m, definitions=["edit-only"], primary="edit-only")
    cells = (rel + loc + gen) / 3  # every row: no selector is involved
    g = int(np.argmax(cells.mean(0)))
    v = j.own_optimum
    assert not v.estimable and v.oracle is None and v.equivalence is None and v.tests() == {}
    assert v.n == N and v.in_sample_gain == pytest.approx(np.mean(cells.max(1) - cells[:, g]))
    assert v.optimum_layers == np.bincount(cells.argmax(1), minlength=L).tolist()
    text = j.to_markdown()
    assert "not estimable without a replicate" in text and "biased upward" in text
    section = text.split("**Own optimum vs golden layer**")[1].split("**Selectors")[0]
    assert "p_t" not in section and " p " not in section.replace("|", " ")  # no p-value presented as evidence
    assert json.loads(json.dumps(j.to_dict()))["definitions"]["edit-only"]["versus"]["estimable"] is False


def _crossfit_by_hand(a, b):
    """The cross-fit gain written out: choose on one table, score on the other, both ways."""
    gains = []
    for x, y in ((a, b), (b, a)):
        g = int(np.argmax(x.mean(0)))
        own = np.array([y[i, int(np.argmax(x[i]))] for i in range(len(x))])
        gains.append(own - y[:, g])
    return np.mean((gains[0] + gains[1]) / 2)


def test_own_optimum_with_a_replicate_is_cross_fit_with_tost_beside_the_papers_t():
    m, rel, loc, gen, cap, train = _built(damaging=None)
    rng = np.random.default_rng(9)
    noisy = {k: np.clip(v + rng.normal(0, 0.1, v.shape), 0, 1) for k, v in m.scores.items()}
    rep = Matrix(m.layers, m.edit_ids, noisy, train, cap)
    j = judge(m, definitions=["edit-only", "reliability"], n_boot=300, replicate=rep)
    v = j.own_optimum
    a, b = (rel + loc + gen) / 3, sum(noisy[k] for k in ("reliability", "locality", "generalization")) / 3
    assert v.estimable and v.oracle.gain == pytest.approx(_crossfit_by_hand(a, b), abs=1e-12)
    assert v.oracle.ci[0] <= v.oracle.gain <= v.oracle.ci[1] and v.oracle.gain <= v.oracle.in_sample + 1e-12
    e = v.equivalence
    boot = v.oracle.boot
    assert e.margin == 0.02 and e.p_upper == pytest.approx((1 + np.sum(boot >= 0.02)) / (1 + boot.size))
    d = v.oracle.per_edit
    assert e.p_paired_t == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    assert set(v.tests()) == {"oracle gain > 0", "equivalent within 0.02 (TOST)"}
    text = j.to_markdown()
    assert "cross-fit over two replicates" in text and "paper's paired t" in text and "not estimable" not in text
    d = json.loads(json.dumps(j.to_dict()))["definitions"]["edit-only"]["versus"]
    assert d["estimable"] and "boot" not in d["oracle"] and d["equivalence"]["margin"] == 0.02
    with pytest.raises(ValueError, match="same edits and layers"):
        judge(m, replicate=Matrix(m.layers[:3], m.edit_ids, {k: v[:, :3] for k, v in noisy.items()}))


def test_bootstrap_resamples_rows_jointly():
    m, rel, loc, gen, cap, _ = _built(damaging=None)
    j = _quick(m, definitions=["edit-only"], primary="edit-only", seed=3, n_boot=200)
    rng = np.random.default_rng(3)
    cells = (rel + loc + gen) / 3
    goldens = [int(np.argmax(cells[rng.integers(0, N, N)].mean(0))) for _ in range(200)]
    freq = np.bincount(goldens, minlength=L) / 200
    np.testing.assert_allclose(j.definition("edit-only").boot.golden_freq, freq)


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
    np.testing.assert_allclose(m.metrics()["capability"], np.exp(-np.nanmean(cap, 0)))
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
    with pytest.raises(ValueError, match="n_boot"):
        judge(m, n_boot=0)
    with pytest.raises(ValueError, match="primary"):
        judge(m, definitions=["reliability"], primary="weighted")


def test_a_folder_loads_partially_and_checks_its_regime(tmp_path, make_folder):
    ids = ["a", "b", "c"]
    folder, s = make_folder(tmp_path / "f", ids, 4, hparams={"lr": 5e-4, "epochs": 25})
    for l in (0, 1):
        for e in ids[: 3 if l == 0 else 2]:
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 0.5 + l}, "train": {},
                                  "capability": {"lm_loss": 3.0, "lm_loss_change": 0.1} if e == "a" else None})
    m, c = folder.load()
    assert m.layers == [0] and (c.cells, c.total, c.partial_layers) == (5, 12, [1])
    assert m.capability[0, 0] == pytest.approx(0.1) and m.capability_base == pytest.approx(2.9)
    other, _ = make_folder(tmp_path / "g", ids, 4, hparams={"lr": 5e-3, "epochs": 100})
    for f in s.files:  # cells of one regime in a folder that says another
        (other.cells_dir).mkdir(exist_ok=True)
        (other.cells_dir / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FolderError, match="editor fingerprint") as e:  # a wrong regime is not "not yet"
        other.load()
    assert not isinstance(e.value, NoLayerYet)
    # a fourth edit without cells: no layer is complete any more, but the partial ones still show
    s.append("c/1", {"edit": "c", "layer": 1, "scores": {"reliability": 1.5}, "train": {}})
    folder.manifest.edits.append({"id": "d", "index": 3, "prompt": "d", "target_new": "x"})
    folder.manifest.sizes = [4]
    with pytest.raises(NoLayerYet, match=r"no complete layer yet \(6 cells\)"):
        folder.load()
    m, _ = folder.load(complete_only=False)
    assert m.layers == [0, 1] and np.isnan(m.scores["reliability"][3]).all()


def test_a_grown_folder_shows_its_complete_rows_until_the_new_ones_hold_more(tmp_path, make_folder):
    ids = ["a", "b", "c", "d"]
    folder, s = make_folder(tmp_path / "f", ids, 3, sizes=[2, 4])
    for e in ("a", "b"):
        for l in range(3):
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 1.0}, "train": {}})
    s.append("c/0", {"edit": "c", "layer": 0, "scores": {"reliability": 0.0}, "train": {}})
    m, c = folder.load()
    assert (m.edit_ids, m.layers) == (["a", "b"], [0, 1, 2])  # 2 x 3 cells beat 4 x 0
    assert (c.n_edits, c.edits_used, c.total) == (4, 2, 12) and "first 2 of 4 edits" in str(c)
    for e in ("c", "d"):
        for l in range(2):
            s.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": 0.0}, "train": {}})
    m, c = folder.load()
    assert (m.edit_ids, m.layers) == (ids, [0, 1])  # 4 x 2 = 8 > 2 x 3
    # without the growth history a partial layer does not trade rows for layers
    folder.manifest.sizes = [4]
    assert folder.load()[0].edit_ids == ids


def test_matrix_grows_a_folder_and_refuses_other_edits(tmp_path):
    from gradlocate.golden.folder import StudyFolder

    model, _ = gl.models.tiny("gpt2", n_layers=2, d_model=16)
    every = gl.data.as_edits([gl.data.EditRequest(f"p{i}", f" t{i}", subject=f"s{i}") for i in range(6)])
    out = tmp_path / "f"
    run = lambda rows, **kw: gl.matrix(model, rows, hparams={"lr": 1e-2, "epochs": 1, **kw}, layers=[0], out=out,  # noqa: E731
                                       capability_edits=0, progress=False)
    run(every[:2])
    assert len(StudyFolder.open(out).manifest.edits) == 2
    run(every[:4])
    man = StudyFolder.open(out).manifest
    assert len(man.edits) == 4 and man.sizes == [2, 4]
    run(gl.data.as_edits(list(every[1:3])))  # some of its edits, another order: the manifest stays
    assert len(StudyFolder.open(out).manifest.edits) == 4
    with pytest.raises(FolderError, match="other edits"):
        run(gl.data.as_edits(list(reversed(every))))  # not an extension of its list
    with pytest.raises(FolderError, match="another regime"):
        run(every[:5], lr=5e-2)


def test_matrix_cli_writes_the_whole_matrix_only_once_every_layer_is_in(tmp_path, capsys):
    from gradlocate.cli import main

    fixture = str(Path(__file__).parent / "fixtures" / "edits_small.json")
    base = ["matrix", "--model", "tiny-gpt2", "--edits", fixture, "-n", "2", "--set", "epochs=1", "--chunk", "2",
            "--out", str(tmp_path)]
    assert main(base + ["--shard", "0/2"]) == 0  # every layer planned, half of them done
    n_layers = json.loads((tmp_path / "manifest.json").read_text())["model"]["n_layers"]
    assert n_layers > 2 and not (tmp_path / "matrix.json").exists()
    assert f"{(n_layers + 1) // 2}/{n_layers} layers complete" in capsys.readouterr().err
    assert main(["matrix", "--out", str(tmp_path), "--shard", "1/2"]) == 0
    whole = json.loads((tmp_path / "matrix.json").read_text())
    assert whole["layers"] == list(range(n_layers))


def test_a_planned_subset_is_whole_once_its_layers_are_in(tmp_path, capsys):
    from gradlocate.cli import main

    fixture = str(Path(__file__).parent / "fixtures" / "edits_small.json")
    base = ["matrix", "--model", "tiny-gpt2", "--edits", fixture, "-n", "2", "--set", "epochs=1", "--chunk", "2",
            "--out", str(tmp_path)]
    assert main(base + ["--layers", "0,2"]) == 0  # a study of 2 of the model's layers
    assert json.loads((tmp_path / "matrix.json").read_text())["layers"] == [0, 2]
    assert "2/2 layers complete" in capsys.readouterr().err
    assert main(base + ["--layers", "1"]) == 0  # the plan grows
    assert json.loads((tmp_path / "manifest.json").read_text())["layers"] == [0, 1, 2]
    assert json.loads((tmp_path / "matrix.json").read_text())["layers"] == [0, 1, 2]


def test_report_page_from_a_partial_folder(tmp_path, make_folder):
    from gradlocate.golden.report import RegretSettings, report

    m, rel, loc, gen, cap, _ = _built(damaging=None)
    folder, s = make_folder(tmp_path / "tiny-run", m.edit_ids, 6)
    for i, e in enumerate(m.edit_ids):
        for j in range(L):
            s.append(f"{e}/{j}", {"edit": e, "layer": j, "train": {"converged": True, "final_loss": 0.0},
                                  "scores": {"reliability": rel[i, j], "locality": loc[i, j],
                                             "generalization": gen[i, j]},
                                  "capability": {"lm_loss": 3.0, "lm_loss_change": 0.01} if i < 4 else None})
    started, _ = make_folder(tmp_path / "a-started", m.edit_ids, 6)  # its failure must not stop the other folder
    foreign, _ = make_folder(tmp_path / "b-foreign", m.edit_ids, 6)  # cells of another regime: reported in place
    from gradlocate.golden.store import RecordStore

    RecordStore(foreign.cells_dir, lambda k: {"editor": {"name": "locft", "hparams": {"lr": 1.0}}}).append(
        f"{m.edit_ids[0]}/0", {"edit": m.edit_ids[0], "layer": 0, "scores": {"reliability": 1.0}, "train": {}})
    r = report([started.path, foreign.path, folder.path], selectors=False, n_boot=20, appendix="\n## Superseded\n\nold",
               regret=RegretSettings(n_draws=20, n_boot=5, boot_draws=5, search=False))
    text = r.to_markdown()
    assert "### a-started\n\nMatrix: **partial**, not judged yet: " in text and "no complete layer yet (0 cells)" in text
    assert "### b-foreign\n\nNot judged: FolderError:" in text and "editor fingerprint" in text
    assert not (started.path / "judgment.json").exists() and not (foreign.path / "judgment.json").exists()
    assert f"**partial**: {N * L}/{N * 6} cells" in text and "lr 0.001, epochs 5" in text
    assert "| edit-only (primary) |" in text and "## Superseded\n\nold" in text
    assert "of 6 layers (partial: the judged layers only)" in text
    assert json.loads(folder.judgment_path.read_text())["completeness"]["complete_layers"] == [0, 1, 2, 3]
    assert set(r.failures) == {"a-started", "b-foreign"}
    # proxy draws asked of a partial folder: skipped until it is complete, the folder still judged
    r = report([folder.path], selectors=False, draws=2, n_boot=20,
               regret=RegretSettings(n_draws=20, n_boot=5, boot_draws=5, search=False))
    assert not r.failures and not folder.draws_path.exists() and "of 6 layers (partial" in r.to_markdown()


def test_golden_layers_is_flagged_when_the_held_out_loss_it_normalises_is_noise():
    from gradlocate.golden.judge_report import reading

    m, rel, loc, gen, _, train = _built(damaging=None)
    rng = np.random.default_rng(5)
    noise = np.full((N, L), np.nan)
    noise[:8] = rng.normal(0.001, 1e-4, (8, L))  # no layer effect: layer means within noise
    quiet = judge(Matrix(m.layers, m.edit_ids, m.scores, train, noise), n_boot=50)
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
    j = judge(Matrix(m.layers, m.edit_ids, m.scores, train, loud), n_boot=50)
    assert j.capability_effect.p_value < 0.05 and "may rank the layers by noise" not in " ".join(reading(j))
    no_golden_layers = judge(Matrix(m.layers, m.edit_ids, m.scores, train, noise), n_boot=20,
                             definitions=["edit-only", "weighted"], primary="weighted")
    assert "may rank the layers by noise" not in " ".join(reading(no_golden_layers))

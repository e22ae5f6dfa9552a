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
from gradlocate.golden.report import NotJudgedYet, judge_draws, judge_folder
from gradlocate.golden.study import _judgeable
from gradlocate.golden.store import RecordStore
from gradlocate.golden.table import Matrix

FIXTURE = str(Path(__file__).parent / "fixtures" / "edits_small.json")
TINY = ["--model", "tiny-llama", "--edits", FIXTURE, "--set", "epochs=3", "--set", "lr=1e-2"]


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies") / "tiny-run"
    # four edits: one proxy, three test edits; the cells of layer 0 make the folder
    assert main(["matrix", *TINY, "--layers", "0", "--capability-edits", "0", "--out", str(folder)]) == 0
    # resumed from the manifest (model, edits, regime); the batch at every layer, not only the planned one
    assert main(["matrix", "--out", str(folder), "--batch", "--layers", "0:4"]) == 0
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
    # the report judges the selectors on these draws by mean regret (no count of draws won),
    # at the judged size only
    from gradlocate.golden.answer import RegretSettings, answer

    f = StudyFolder.open(folder)
    s = judge_folder(f, selectors=("lga", "gradratio"), n_boot=10)
    a = answer(f, s.judgment, s.matrix, settings=RegretSettings(n_draws=20, n_boot=5, boot_draws=5, search=False,
                                                                committed_boot=20))
    text = sections.regret_section(a)
    assert a.committed.n_draws == 2 and "| lga | " in text and "layer per draw" in text
    assert "lower in" not in text and "draws won" not in text
    stale = answer(f, s.judgment, s.matrix.__class__(s.matrix.layers, s.matrix.edit_ids[:3],
                                                      {k: v[:3] for k, v in s.matrix.scores.items()}),
                   settings=RegretSettings(n_draws=5, n_boot=2, boot_draws=2, search=False))
    assert stale.committed is None and any("stale" in n for n in stale.notes)
    assert isinstance(Draws.from_dict(got), Draws)


def test_a_partial_folder_is_judged_once_half_its_layers_are_complete(tmp_path, make_folder):
    ids = ["e0", "e1", "e2", "e3"]
    folder, s = make_folder(tmp_path / "partial", ids, 6)
    with pytest.raises(NotJudgedYet, match="no complete layer yet"):
        judge_folder(folder, selectors=False, n_boot=10)

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
    s2 = judge_folder(folder, selectors=False, n_boot=10)
    assert s2.judgment.layers == [1, 2, 4]


# --------------------------------------------------------------------------- the first screen, by hand

N_SYN, L_SYN, K_DRAWS = 32, 6, 16
PROFILE = np.array([0.30, 0.50, 0.70, 0.90, 0.60, 0.95])  # layer 5 is the best but damaging


def _synthetic(make_folder, path, seed, scale=1.0):
    """A hand-built study folder: edit-only best at layer 3 once layer 5 is gated out (its
    held-out loss rises 2 nats); stored seconds per cell 1.0 + 0.1 * layer + 0.5; 16
    committed draws where LGA always picks the golden layer, CMA the worst, GradRatio
    layer 2 and GradRatio (no l_min) layer 4."""
    rng = np.random.default_rng(seed)
    ids = [f"e{seed}-{i}" for i in range(N_SYN)]
    folder, store = make_folder(path, ids, L_SYN)
    cells = {k: np.clip(scale * PROFILE + rng.normal(0, 0.15, (N_SYN, L_SYN)), 0, 1)
             for k in ("reliability", "generalization", "locality")}
    for i, e in enumerate(ids):
        for l in range(L_SYN):
            cap = {"lm_loss": 3.0, "lm_loss_change": 2.0 if l == 5 else 0.01} if i < 4 else None
            store.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {k: float(v[i, l]) for k, v in cells.items()},
                                      "train": {"converged": True, "final_loss": 0.0}, "capability": cap,
                                      "timings": {"train": 1.0 + 0.1 * l, "score": 0.5}})
    man = folder.manifest
    picks = {"lga": 3, "cma": 0, "gradratio": 2, "gradratio (no l_min)": 4}
    draws = [{"seed": s, "proxy": man.proxy_rows(N_SYN, s), "picks": picks, "regret": {}, "difference": {}}
             for s in range(K_DRAWS)]
    folder.draws_path.write_text(json.dumps({"selectors": list(picks), "n_edits": N_SYN, "n_proxy": N_SYN // 4,
                                             "definitions": ["edit-only"], "pair": ["lga", "cma"], "draws": draws}))
    return folder, sum(cells.values()) / 3, picks


@pytest.fixture
def synthetic(tmp_path, make_folder):
    from gradlocate.golden.report import RegretSettings, report

    made = [_synthetic(make_folder, tmp_path / f"s{k}", k, scale) for k, scale in ((0, 1.0), (1, 1.0), (2, 0.4))]
    # 300 resamples of the committed draws resolve p = 1/301: below 0.05 after Holm over the 10 tests
    rs = RegretSettings(n_draws=200, n_boot=40, boot_draws=10, search=False, committed_boot=300)
    r = report([f.path for f, _, _ in made], selectors=False, n_boot=100, regret=rs)
    return r, made


def test_the_first_screen_is_recomputed_by_hand(synthetic):
    r, made = synthetic
    folder, score, picks = made[0]
    a = r.answers[0]
    allowed = np.arange(L_SYN) != 5
    proxy = folder.manifest.proxy_rows(N_SYN)
    test = np.setdiff1d(np.arange(N_SYN), proxy)
    means = score[test].mean(0)
    golden = int(np.argmax(np.where(allowed, means, -np.inf)))
    rng = np.random.default_rng(0)  # the judgment's bootstrap: test rows resampled, seed 0
    bests = [np.max(np.where(allowed, score[test][rng.integers(0, test.size, test.size)].mean(0), -np.inf))
             for _ in range(100)]
    lo, hi = np.percentile(bests, [2.5, 97.5])
    near = [l for l in range(L_SYN) if allowed[l] and means[l] >= means[golden] - 0.02 - 1e-9]
    # brute force and the random layer over random draws: the harness's draws, replayed
    rng, pool = np.random.default_rng([0, 0]), N_SYN // 4
    rand, bf = [], {k: [] for k in (1, 2, 4, 8)}
    for _ in range(200):
        perm = rng.permutation(N_SYN)
        mu = score[perm[pool:]].mean(0)
        best = mu[allowed].max()
        rand.append(np.mean(best - mu[allowed]))
        for k in bf:
            bf[k].append(best - mu[int(np.argmax(np.where(allowed, score[perm[:k]].mean(0), -np.inf)))])
    committed = {}
    for s, layer in picks.items():
        regs = []
        for d in range(K_DRAWS):
            rows = np.setdiff1d(np.arange(N_SYN), folder.manifest.proxy_rows(N_SYN, d))
            mu = score[rows].mean(0)
            regs.append(mu[allowed].max() - mu[layer])
        committed[s] = np.mean(regs)
    secs = np.mean([1.5 + 0.1 * l for l in range(L_SYN)])
    k = next(k for k in (1, 2, 4, 8) if np.mean(bf[k]) <= min(committed.values()) + 1e-12)
    row = next(l for l in r.first.splitlines() if l.startswith(f"| {a.name} |")).split(" | ")
    assert row[3] == f"**{golden}** (P {a.judgment.definitions['edit-only'].boot.p_golden:.2f})"
    assert row[4] == f"{means[golden]:.3f} [{lo:.3f}, {hi:.3f}]" and row[5] == ", ".join(map(str, near))
    assert row[6].startswith(f"**lga** {committed['lga']:.3f} [")  # the one selector below a random layer's
    assert row[7].startswith(f"{np.mean(rand):.3f} [")
    assert row[8].startswith(f"k={k}: {np.mean(bf[k]):.3f} [") and f"{k * L_SYN} cells, " in row[8]
    assert a.cost(k) == pytest.approx(k * L_SYN * secs)
    for s, v in committed.items():
        assert a.committed.row("edit-only", s).mean == pytest.approx(v)


def test_holm_runs_across_the_folders_and_leaves_the_under_trained_one_out(synthetic):
    from gradlocate.golden.oracle import holm

    r, made = synthetic
    ok, low = r.answers[:2], r.answers[2]
    assert not ok[0].under_trained and "reliability peaks at" in low.under_trained
    raw = {f"{a.name}: {t}": p for a in ok for t, p in a.tests().items()}
    assert set(r.family) == set(raw) and len(raw) == 10  # 4 selectors + transfer, per folder
    assert r.family == pytest.approx(holm(raw))
    assert low.adjusted == {} and not any(k.startswith(low.name) for k in r.family)
    for a in ok:
        assert a.trusted().name == "lga" and a.rejected("lga: regret below a random layer's")
        assert not a.rejected("cma: regret below a random layer's")
    text = r.to_markdown()
    assert "not tested: under-trained" in text and "**under-trained**" in text
    assert "in 2 of 2 studies" in text  # the tallies leave the under-trained folder out


def test_the_page_opens_with_the_answer_and_counts_no_wins(synthetic):
    import re

    r, _ = synthetic
    text = r.to_markdown()
    order = [text.index(h) for h in ("# Results", "## Which layer to edit", "## How to read it",
                                     "## The Golden Layers paper's claims", "## Single-edit matrices")]
    assert order == sorted(order)
    assert not re.search(r"lower in \d+|in \d+ of \d+ draws|draws won|winner's curse corrected", text)
    assert "null_selection_bias" not in text and "p_null" not in text and "chance (null)" not in text
    assert "golden-layers (gradlocate's min-max construction, not the paper's)" in text
    assert "not estimable without a replicate" in text
    assert json.loads(json.dumps(r.to_dict(), default=float))["family"]


def test_a_second_replicate_seed_makes_the_own_optimum_estimable(tmp_path, make_folder):
    from gradlocate.golden.report import RegretSettings, report

    rng = np.random.default_rng(3)
    ids = [f"r{i}" for i in range(16)]
    folder, store = make_folder(tmp_path / "replicated", ids, 4)
    folder.manifest.regime["seeds"] = [0, 1]
    folder.write_manifest()
    mu = np.tile([0.2, 0.8, 0.5, 0.4], (16, 1))
    tables = {}
    for seed in (0, 1):
        t = tables[seed] = np.clip(mu + rng.normal(0, 0.1, mu.shape), 0, 1)
        for i, e in enumerate(ids):
            for l in range(4):
                store.append(f"{e}/{l}/{seed}", {"edit": e, "layer": l, "seed": seed, "train": {},
                                                 "scores": {"reliability": float(t[i, l])}})
    s = judge_folder(folder, selectors=False, n_boot=50)
    v = s.judgment.own_optimum
    assert v.estimable and s.judgment.regime["replicate"] == "seed 1"
    by_hand = np.mean([np.mean([y[i, int(np.argmax(x[i]))] for i in range(16)]) - y[:, int(np.argmax(x.mean(0)))].mean()
                       for x, y in ((tables[0], tables[1]), (tables[1], tables[0]))])  # choose on one, score on the other
    assert v.oracle.gain == pytest.approx(by_hand, abs=1e-12)
    r = report([folder.path], selectors=False, n_boot=20, regret=RegretSettings(n_draws=20, n_boot=5, boot_draws=5,
                                                                               search=False))
    assert {"replicated: oracle gain > 0", "replicated: equivalent within 0.02 (TOST)"} <= set(r.family)
    assert "oracle gain" in r.summary and "not estimable" not in r.summary
    # a replicate that does not cover the judged cells is not used, and the page says why
    store.append(f"{ids[0]}/9", {"edit": ids[0], "layer": 3, "seed": 2, "train": {}, "scores": {"reliability": 0.1}})
    folder.manifest.regime["seeds"] = [0, 2]
    j = judge_folder(folder, selectors=False, n_boot=10).judgment
    assert not j.own_optimum.estimable and j.regime["replicate"].startswith("none: replicate seed 2 does not hold")

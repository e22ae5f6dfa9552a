"""gradlocate.golden.search (the budgeted layer search) and gradlocate.golden.regret (regret
over proxy draws), against plain numpy loops, synthetic matrices with a known truth, and
a tiny model edited live."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from gradlocate.golden import regret as rg
from gradlocate.golden import search as gs
from gradlocate.golden.table import Matrix, edit_id
from gradlocate.golden.store import RecordStore


def _matrix(n=40, layers=10, best=None, gap=0.25, noise=0.15, seed=0, quarter=False):
    """Scores around a rising line, layer ``best`` (default: 6 of 10, else the middle) lifted by ``gap``."""
    rng = np.random.default_rng(seed)
    mu = np.linspace(0.3, 0.5, layers)
    mu[(6 if layers == 10 else layers // 2) if best is None else best] += gap
    s = np.clip(mu + rng.normal(0, 0.1, (n, 1)) + rng.normal(0, noise, (n, layers)), 0, 1)
    if quarter:
        s = np.round(s * 4) / 4
    return Matrix(list(range(100, 100 + layers)), [f"e{i}" for i in range(n)], {"reliability": s})


# --------------------------------------------------------------------------- the policy, replayed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_finds_a_clearly_best_layer(seed):
    m = _matrix(seed=seed)
    s = gs.search(replay=m, proxy_edits=range(20), definition="reliability", budget=40, seed=seed)
    assert s.layer == 106 and 106 in s.contenders
    assert s.cost.cells <= 40 and s.cost.edited == 0
    assert s.confidence > 0.5  # a 0.25 gap over 0.15 noise: sure, once it has enough edits


def _naive_policy(score, budget, eta=3, first=2):
    """Successive halving as the docs describe it, written out: (picked column, edits per column)."""
    n, L = score.shape
    edits = [0] * L
    alive = list(range(L))
    rounds, k = 1, L
    while k > 2 and math.ceil(k / eta) > 1:
        k, rounds = math.ceil(k / eta), rounds + 1
    spent, r = 0, 0
    while True:
        have = edits[alive[0]]
        if r == 0:
            upto = min(n, first if rounds > 1 else max(first, budget // len(alive)))
        else:
            upto = min(n, have + ((budget - spent) // max(1, rounds - r)) // len(alive))
        if upto <= have:
            break
        for c in alive:
            edits[c] = upto
        spent += (upto - have) * len(alive)
        means = {c: sum(score[i, c] for i in range(upto)) / upto for c in alive}
        ranked = sorted(alive, key=lambda c: (-means[c], c))
        alive = sorted(ranked[:max(1, math.ceil(len(ranked) / eta))])
        r += 1
        if len(alive) == 1:
            break
    have = edits[alive[0]]
    pick = min(alive, key=lambda c: (-sum(score[i, c] for i in range(have)) / have, c))
    return pick, edits


@pytest.mark.parametrize("layers,budget,eta,first", [(30, 120, 3, 2), (18, 72, 3, 2), (9, 40, 2, 1), (4, 30, 3, 2),
                                                     (30, 90, 3, 2), (3, 12, 3, 2)])
def test_policy_equals_a_plain_loop_and_respects_the_budget(layers, budget, eta, first):
    for seed in range(4):
        m = _matrix(n=24, layers=layers, best=layers // 2, gap=0.05, seed=seed, quarter=True)
        score = m.scores["reliability"]
        src = gs.ReplayCells(score, m.layers, np.zeros(layers, bool))
        s = gs.run_policy(src, budget, eta=eta, first=first, confidence=None)
        pick, edits = _naive_policy(score, budget, eta, first)
        assert s.layer == m.layers[pick] and s.edits == edits
        assert s.cost.cells == sum(edits) == sum(r.cells for r in s.rounds) <= budget
        assert s.stopped in ("one layer left", "budget spent", "proxy edits used up")


def test_cost_sums_the_cells_read():
    m = _matrix(n=24, layers=9)
    rng = np.random.default_rng(0)
    steps, secs = rng.integers(1, 30, m.shape).astype(float), rng.random(m.shape)
    src = gs.ReplayCells(m.scores["reliability"], m.layers, np.zeros(9, bool), steps, secs)
    s = gs.run_policy(src, 45, confidence=None)
    read = np.zeros(m.shape, bool)
    for c, e in enumerate(s.edits):
        read[:e, c] = True
    assert s.cost.cells == read.sum()
    assert s.cost.steps == pytest.approx(steps[read].sum()) and s.cost.seconds == pytest.approx(secs[read].sum())


def test_confidence_equals_scipy_per_layer():
    rng = np.random.default_rng(1)
    obs = rng.random((10, 5))
    edits = np.array([10, 4, 10, 2, 4])
    conf, contenders, sd = gs.confidence_of(obs, edits, 2, [0, 1, 2, 3, 4], margin=0.05, level=0.9)
    diffs = {c: obs[:min(edits[c], 10), c] - obs[:min(edits[c], 10), 2] for c in (0, 1, 3, 4)}
    df = sum(len(d) - 1 for d in diffs.values())
    pooled = math.sqrt(sum(((d - d.mean()) ** 2).sum() for d in diffs.values()) / df)
    assert sd == pytest.approx(pooled)
    want, keep = 1.0, [2]
    for c, d in diffs.items():
        se = pooled / math.sqrt(len(d))
        want *= 1 - sps.t.sf((0.05 - d.mean()) / se, df)
        if d.mean() + sps.t.ppf(0.9, df) * se >= -0.05:
            keep.append(c)
    assert conf == pytest.approx(want) and contenders == sorted(keep)


def test_damaging_layers_are_never_picked_and_an_all_damaging_search_fails():
    m = _matrix(n=20, layers=6, best=3, gap=0.4)
    bad = np.zeros(6, bool)
    bad[3] = True
    s = gs.run_policy(gs.ReplayCells(m.scores["reliability"], m.layers, bad), 24)
    assert s.layer != 103 and s.dropped[3] == -1 and 103 not in s.contenders
    with pytest.raises(ValueError, match="every layer searched is damaging"):
        gs.run_policy(gs.ReplayCells(m.scores["reliability"], m.layers, np.ones(6, bool)), 24)


def test_bad_input_is_named():
    m = _matrix(n=10, layers=5, best=2)
    with pytest.raises(ValueError, match="below one round"):
        gs.search(replay=m, proxy_edits=range(10), definition="reliability", budget=9)
    with pytest.raises(ValueError, match="replay needs proxy_edits"):
        gs.search(replay=m, definition="reliability")
    with pytest.raises(ValueError, match="not rows of the stored matrix"):
        gs.search(replay=m, proxy_edits=["nope"], definition="reliability")
    with pytest.raises(ValueError, match="no per-cell score"):
        gs.search(replay=m, proxy_edits=range(10), definition="golden-layers")
    with pytest.raises(ValueError, match="eta must be an int >= 2"):
        gs.search(replay=m, proxy_edits=range(10), definition="reliability", eta=1)
    with pytest.raises(ValueError, match="search needs a model"):
        gs.search(proxy_edits=[{"prompt": "a", "target_new": "b"}])


def test_search_result_reads_and_serialises():
    m = _matrix()
    s = gs.search(replay=m, proxy_edits=range(20), definition="reliability", budget=40)
    assert "Search(layer=106" in repr(s) and "cells" in repr(s)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["layer"] == 106 and d["cost"]["cells"] == s.cost.cells and len(d["rounds"]) == len(s.rounds)
    import matplotlib

    matplotlib.use("Agg")
    fig = s.plot()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fates = {"in the race at the end" if d is None else ("damaging" if d < 0 else f"dropped in round {d}")
             for d in s.dropped}
    assert set(labels) == fates | {f"pick {s.layer}"} and labels[0] == "in the race at the end"


# --------------------------------------------------------------------------- the regret harness


def _naive_draws(score, allowed, n_draws, pool, seed, ks):
    """Per draw: random-layer expected regret, constant layer, brute force on each k: written out."""
    rng = np.random.default_rng([seed, 0])
    full = score.mean(0)
    const = max((c for c in range(score.shape[1]) if allowed[c]), key=lambda c: (full[c], -c))
    out = []
    for _ in range(n_draws):
        perm = rng.permutation(score.shape[0])
        p, t = perm[:pool], perm[pool:]
        mu = score[t].mean(0)
        best = max(mu[c] for c in range(len(mu)) if allowed[c])
        row = [np.mean([best - mu[c] for c in range(len(mu)) if allowed[c]]), best - mu[const]]
        for k in ks:
            pm = score[p[:k]].mean(0)
            pick = max((c for c in range(len(mu)) if allowed[c]), key=lambda c: (pm[c], -c))
            row.append(best - mu[pick])
        out.append(row)
    return np.array(out)


def test_harness_regrets_equal_a_plain_loop():
    m = _matrix(n=30, layers=6, best=2, gap=0.1, quarter=True)
    r = rg.regret_over_draws(m, definitions=["reliability"], methods=[rg.brute_force(1), rg.brute_force(5)],
                             n_draws=25, pool=10, n_boot=3, seed=4, reference=None)
    want = _naive_draws(m.scores["reliability"], np.ones(6, bool), 25, 10, 4, [1, 5])
    for j, row in enumerate(r.rows["reliability"]):
        np.testing.assert_allclose(row.regrets, want[:, j], atol=1e-12)
        assert row.mean == pytest.approx(want[:, j].mean())
    assert r.row("reliability", "brute force k=5").cells == 5 * 6 and r.row("reliability", "random layer").cells == 0
    assert min(x.mean for x in r.rows["reliability"]) >= 0


def test_harness_runs_the_search_policy_on_each_draws_pool():
    m = _matrix(n=40, layers=9, gap=0.05, quarter=True)
    r = rg.regret_over_draws(m, definitions=["reliability"], methods=[rg.searched(budget=30)], n_draws=10, pool=12,
                             n_boot=2, seed=1, reference=None)
    rng = np.random.default_rng([1, 0])
    s = m.scores["reliability"]
    for d in range(10):
        perm = rng.permutation(40)
        got = gs.run_policy(gs.ReplayCells(s[perm[:12]], m.layers, np.zeros(9, bool)), 30)
        mu = s[perm[12:]].mean(0)
        assert r.rows["reliability"][2].regrets[d] == pytest.approx(mu.max() - mu[m.layers.index(got.layer)])
    row = r.row("reliability", "search (30 cells)")
    assert row.cells_max <= 30 and 0 <= row.stated <= 1 and 0 <= row.hit <= 1


def test_live_and_replay_call_the_same_policy(monkeypatch, tiny_gpt2):
    calls = []
    real = gs.run_policy

    def spy(source, *a, **k):
        calls.append(type(source).__name__)
        return real(source, *a, **k)

    monkeypatch.setattr(gs, "run_policy", spy)
    m = _matrix(n=20, layers=4)
    rg.regret_over_draws(m, definitions=["reliability"], methods=[rg.searched(budget=16)], n_draws=1, pool=8,
                         n_boot=2, reference=None)
    gs.search(replay=m, proxy_edits=range(8), definition="reliability", budget=16)
    model, _ = tiny_gpt2
    edits = [{"prompt": f"{i} + 1 =", "target_new": str(i + 1)} for i in range(3)]
    gs.search(model, edits, hparams={"lr": 1e-2, "epochs": 1}, layers=[0, 1], budget=4, first=1,
              capability_edits=0, progress=False)
    assert calls[-2:] == ["ReplayCells", "LiveCells"] and set(calls[:-2]) == {"ReplayCells"}


def test_interval_is_the_basic_bootstrap_around_the_point():
    lo, hi = rg.interval(0.3, np.array([0.1, 0.2, 0.3, 0.4, 0.9]), level=0.5)
    q1, q3 = np.quantile([0.1, 0.2, 0.3, 0.4, 0.9], [0.25, 0.75])
    assert (lo, hi) == pytest.approx((0.3 - (q3 - 0.38), 0.3 - (q1 - 0.38)))
    assert rg.interval(0.01, np.array([0.0, 0.5, 1.0]), level=0.9)[0] == 0.0  # clipped at 0


MU = np.array([0.5, 0.55, 0.6, 0.58, 0.45, 0.3])


def _population(rng, n):
    s = MU + rng.normal(0, 0.1, (n, 1)) + rng.normal(0, 0.15, (n, len(MU)))
    return np.clip(np.round(s * 4) / 4, 0, 1)


def test_two_level_interval_covers_the_true_mean_regret():
    """Synthetic studies drawn from a known population: the interval covers the true mean
    test regret (pool and test independent samples, by simulation) at about its level, and
    is not wider than the estimate's real spread over studies calls for."""
    n, pool, k, level = 40, 10, 4, 0.9
    rng = np.random.default_rng(123)
    big = 40000
    pools = _population(rng, big * pool).reshape(big, pool, -1)
    tests = _population(rng, big * (n - pool)).reshape(big, n - pool, -1).mean(1)
    truth = np.mean(tests.max(1) - tests[np.arange(big), np.argmax(pools[:, :k].mean(1), 1)])
    hits, widths, points = [], [], []
    layers, allowed, methods = list(range(6)), np.ones(6, bool), [rg.brute_force(k)]
    for _ in range(40):
        s = _population(rng, n)
        point = rg.draw_regrets(s, allowed, layers, methods, 20, pool, rng).regret[:, 2].mean()
        boot = [rg.draw_regrets(s[rng.integers(0, n, n)], allowed, layers, methods, 20, pool, rng).regret[:, 2].mean()
                for _ in range(30)]
        lo, hi = rg.interval(point, np.array(boot), level=level)
        hits.append(lo <= truth <= hi)
        widths.append(hi - lo)
        points.append(point)
    assert abs(np.mean(points) - truth) < 0.01  # the estimate is unbiased for the truth
    assert 0.75 <= np.mean(hits) <= 1.0, np.mean(hits)
    ideal = 2 * sps.norm.ppf(0.5 + level / 2) * np.std(points, ddof=1)
    assert np.mean(widths) < 1.5 * ideal, (np.mean(widths), ideal)


def _folder(tmp_path, m, draws, make_folder):
    ids = m.edit_ids
    folder, store = make_folder(tmp_path / "f", ids, len(m.layers))
    tmp_path = folder.path
    for i, e in enumerate(ids):
        for j, l in enumerate(m.layers):
            store.append(f"{e}/{l}", {"edit": e, "layer": l, "scores": {"reliability": float(m.scores["reliability"][i, j])},
                                      "train": {"steps": 5}, "timings": {"train": 0.5, "score": 0.25}})
    (tmp_path / "draws.json").write_text(json.dumps({"selectors": ["lga", "cma"], "draws": draws}))
    return tmp_path


def test_committed_draws_score_the_selectors_picks_on_their_test_rows(tmp_path, make_folder):
    m = _matrix(n=16, layers=4, best=1, gap=0.2)
    m = Matrix(list(range(4)), m.edit_ids, {"reliability": m.scores["reliability"]})
    draws = [{"seed": 0, "proxy": [0, 1, 2, 3], "picks": {"lga": 1, "cma": 3}},
             {"seed": 1, "proxy": [4, 5, 6, 7], "picks": {"lga": 0, "cma": 1}}]
    folder = _folder(tmp_path, m, draws, make_folder)
    r = rg.regret_on_committed_draws(folder, definitions=["reliability"], methods=[rg.brute_force(2)], n_boot=50,
                                     reference="lga")
    s = m.scores["reliability"]
    for d, x in enumerate(draws):
        test = np.setdiff1d(np.arange(16), x["proxy"])
        mu = s[test].mean(0)
        assert r.row("reliability", "lga").regrets[d] == pytest.approx(mu.max() - mu[x["picks"]["lga"]])
        assert r.row("reliability", "cma").regrets[d] == pytest.approx(mu.max() - mu[x["picks"]["cma"]])
        order = [x["proxy"][i] for i in np.random.default_rng(x["seed"]).permutation(4)]
        pick = int(np.argmax(s[order[:2]].mean(0)))
        assert r.row("reliability", "brute force k=2").regrets[d] == pytest.approx(mu.max() - mu[pick])
    bf = r.row("reliability", "brute force k=2")
    assert bf.cells == 8 and bf.steps == 2 * 4 * 5 and bf.seconds == pytest.approx(2 * 4 * 0.75)
    assert r.row("reliability", "cma").vs_reference[0] == pytest.approx(
        r.row("reliability", "cma").mean - r.row("reliability", "lga").mean)
    back = rg.Regrets.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.to_markdown() == r.to_markdown() and "| lga |" in r.to_markdown()


def test_search_replays_a_folder_with_stored_costs(tmp_path, make_folder):
    m = _matrix(n=16, layers=4, best=1, gap=0.3)
    m = Matrix(list(range(4)), m.edit_ids, {"reliability": m.scores["reliability"]})
    folder = _folder(tmp_path, m, [{"seed": 0, "proxy": [0, 1, 2, 3], "picks": {"lga": 1, "cma": 3}}], make_folder)
    s = gs.search(replay=folder, proxy_edits=m.edit_ids[:8], definition="reliability", budget=16)
    assert s.layer == 1 and s.cost.steps == 5 * s.cost.cells and s.cost.seconds == pytest.approx(0.75 * s.cost.cells)


# --------------------------------------------------------------------------- live, on a tiny model


def test_live_search_writes_matrix_cells_and_a_rerun_reads_them(tmp_path, tiny_gpt2):
    from gradlocate.golden.matrix import matrix

    model, _ = tiny_gpt2
    edits = [{"prompt": f"{i} + {i} =", "target_new": str(2 * i)} for i in range(1, 5)]
    kw = dict(hparams={"lr": 1e-2, "epochs": 2}, layers=[0, 1, 2], budget=7, eta=2, first=1, capability_edits=1,
              threshold=1e9, out=tmp_path / "cells", progress=False)
    s = gs.search(model, edits, **kw)
    stored = RecordStore(tmp_path / "cells" / "cells").read()  # the study folder's cells
    assert s.cost.cells == s.cost.edited == len(stored) == sum(s.edits) <= 7
    assert all(k == f"{r['edit']}/{r['layer']}" for k, r in stored.items())
    again = gs.search(model, edits, **kw)
    assert again.cost.edited == 0 and again.cost.cells == s.cost.cells
    assert (again.layer, again.edits, again.means) == (s.layer, s.edits, s.means)
    # the same cells are a matrix's: the full matrix over the store edits only the rest,
    # and the policy replayed on it decides as it did live
    full = matrix(model, edits, hparams=kw["hparams"], layers=[0, 1, 2], out=tmp_path / "cells", capability_edits=0,
                  progress=False)
    assert len(RecordStore(tmp_path / "cells" / "cells").read()) == 12
    rep = gs.search(replay=full, proxy_edits=edits, definition="edit-only", budget=7, eta=2, first=1, threshold=1e9)
    assert (rep.layer, rep.edits, rep.means, rep.contenders) == (s.layer, s.edits, s.means, s.contenders)
    assert [edit_id(e) for e in edits].count(s.edit_ids[0]) == 1


# --------------------------------------------------------------------------- the replay report


def test_search_replay_end_to_end_and_its_verdicts(tmp_path, make_folder):
    from gradlocate.golden.search_report import SearchReplay, search_replay

    m = _matrix(n=40, layers=6, best=2, gap=0.2)
    m = Matrix(list(range(6)), m.edit_ids, {"reliability": m.scores["reliability"]})
    draws = [{"seed": s, "proxy": list(range(10 * s, 10 * s + 10)), "picks": {"lga": 5, "cma": 2}} for s in range(2)]
    folder = _folder(tmp_path, m, draws, make_folder)
    r = search_replay([folder], definitions=["reliability"], n_draws=8, pool=20, n_boot=3, n_boot_committed=20,
                      progress=False)
    v = r.studies[0].verdicts["reliability"]
    t, c = r.studies[0].draws, r.studies[0].committed
    assert v.search == t.row("reliability", "search").mean and v.bf16 == t.row("reliability", "brute force k=16").mean
    assert v.selector_regret == min(c.row("reliability", s).mean for s in ("lga", "cma"))
    assert v.holds == (v.search <= v.bf16 and v.search_committed <= v.selector_regret and v.search_cells <= 6 * 4)
    back = SearchReplay.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.docs_markdown() == r.docs_markdown() and "| search |" in r.docs_markdown()


def test_docs_page_shows_the_stored_replay():
    """docs/search.md's tables are the committed replay's (re-render: python -m benchmarks.search_replay --render)."""
    import re
    from pathlib import Path

    from gradlocate.golden.search_report import SearchReplay

    root = Path(__file__).resolve().parents[1]
    stored = root / "benchmarks" / "results" / "search_replay.json"
    r = SearchReplay.load(stored)
    page = (root / "docs" / "search.md").read_text()
    block = re.search(r"<!-- search_replay -->\n(.*?)<!-- /search_replay -->", page, re.S)
    assert block is not None and block.group(1) == r.docs_markdown() + "\n"
    for s in r.studies:
        assert s.draws.n_draws >= 200 and len(s.committed.rows["edit-only"][0].regrets) == 16
        for dfn, v in s.verdicts.items():
            assert v.search_cells <= 4 * len(s.draws.layers)  # the default budget: a quarter of BF16's cells


def test_live_weighted_scores_and_the_damage_gate(tiny_gpt2):
    model, _ = tiny_gpt2
    edits = [{"prompt": f"{i} + 2 =", "target_new": str(i + 2)} for i in range(3)]
    kw = dict(hparams={"lr": 1e-2, "epochs": 1}, layers=[0, 1], budget=4, first=1, capability_edits=1, progress=False)
    s = gs.search(model, edits, definition="weighted", threshold=1e9, **kw)
    assert s.layer in (0, 1) and s.cost.cells <= 4 and all(d != -1 for d in s.dropped)
    with pytest.raises(ValueError, match="every layer searched is damaging"):
        gs.search(model, edits, threshold=-1.0, **kw)  # every loss change is above -1 nat
    with pytest.raises(ValueError, match="capability_edits must be"):
        gs.search(model, edits, **{**kw, "capability_edits": 2})
    with pytest.raises(ValueError, match="not both"):
        gs.search(model, edits, replay=_matrix(n=4, layers=2, best=0))

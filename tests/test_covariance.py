"""Second-moment statistics: every corpus kind against a plain hooked forward, the sampler
against a full forward over the tokens it drew, ROME / EasyEdit's npz format, exact
resumption after an interruption, and the cost line."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from gradlocate.editors import corpora
from gradlocate.editors import covariance as cov
from gradlocate.editors import rome_stats
from gradlocate.handles import resolve
from gradlocate.models import tiny

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "   ",
         "Water boils at one hundred degrees.", "A short one.", "Rivers flow into the sea, mostly.",
         "Mozart wrote many symphonies in Vienna.", "Bees make honey from nectar."]
REAL = [t for t in TEXTS if t.strip()]


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", n_layers=3, d_model=16, seed=0)[0]


def _hooked_keys(model, layer, rows):
    """The site inputs of ``layer`` over each token row, from a plain forward with a hook."""
    store, out = {}, []
    site = model.model.layers[layer].mlp.down_proj
    hd = site.register_forward_pre_hook(lambda m, args: store.__setitem__("k", args[0].detach()))
    try:
        for ids in rows:
            with torch.no_grad():
                model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False)
            out.append(store["k"][0])
    finally:
        hd.remove()
    return out


def _plain_text_moment(model, layer, texts, n, length=256):
    tok = model.gradlocate_tokenizer
    rows = [tok(t)["input_ids"][:length] for t in texts if t.strip()]
    k = torch.cat(_hooked_keys(model, layer, rows))[:n].double()
    assert len(k) == n
    return k.T @ k / n


def _write_corpora(tmp_path):
    import datasets

    (tmp_path / "c.txt").write_text("\n\n".join(TEXTS) + "\n")
    (tmp_path / "lines.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(TEXTS))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text((tmp_path / "c.jsonl").read_text())


@pytest.mark.parametrize("kind", ["list", "c.txt", "lines.txt", "c.json", "c.jsonl", "saved", "files"])
def test_every_text_corpus_equals_a_plain_hooked_forward(llama, tmp_path, kind):
    import datasets

    _write_corpora(tmp_path)
    corpus = TEXTS if kind == "list" else str(tmp_path / kind)
    got = cov.second_moments(llama, [0, 2], tokens=120, corpus=corpus, cache=False, progress=False, rows=3)
    order = TEXTS
    if kind in ("saved", "files"):   # a datasets source is shuffled with the seed, as ROME samples its texts
        order = datasets.Dataset.from_dict({"text": TEXTS}).shuffle(seed=0)["text"]
    for layer in (0, 2):
        torch.testing.assert_close(got[layer], _plain_text_moment(llama, layer, order, 120).float(),
                                   rtol=1e-5, atol=1e-7)


def test_truncation_layers_alone_and_too_few_tokens(llama):
    five = cov.second_moments(llama, [0, 2], tokens=35, corpus=TEXTS, cache=False, progress=False, max_length=5)
    for layer in (0, 2):                                                 # every text cut to 5 tokens
        torch.testing.assert_close(five[layer], _plain_text_moment(llama, layer, TEXTS, 35, length=5).float(),
                                   rtol=1e-5, atol=1e-7)
    alone = cov.second_moments(llama, [2], tokens=35, corpus=TEXTS, cache=False, progress=False, max_length=5)
    torch.testing.assert_close(alone[2], five[2])                        # one pass for all = one at a time
    with pytest.raises(ValueError, match="fewer than the 10,000"):
        cov.second_moments(llama, [0], tokens=10_000, corpus=TEXTS, cache=False, progress=False)


def test_a_hub_name_goes_through_load_dataset_and_an_offline_hub_says_what_to_do(llama, monkeypatch, tmp_path):
    import datasets

    asked = []

    def local(repo, config, split):
        asked.append((repo, config, split))
        return datasets.Dataset.from_dict({"text": TEXTS})

    monkeypatch.setattr(datasets, "load_dataset", local)
    src = corpora.resolve_corpus("wikitext", seed=3)
    assert asked == []                                     # loaded when read: a cached result needs no hub
    assert list(src.texts) == datasets.Dataset.from_dict({"text": TEXTS}).shuffle(seed=3)["text"]
    assert asked == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train")]        # ROME's corpus
    len(corpora.resolve_corpus("someone/corpus:cfg", seed=0).texts)
    assert asked[-1] == ("someone/corpus", "cfg", "train")
    monkeypatch.setenv("GRADLOCATE_CACHE", str(tmp_path))
    online = cov.second_moments(llama, [0], corpus="wikitext", tokens=40, progress=False)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(corpora.CorpusUnavailable) as e:
        cov.second_moments(llama, [0], corpus="wikitext", tokens=10, cache=False, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "corpus='sampled'" in msg and "Salesforce/wikitext" in msg
    again = cov.second_moments(llama, [0], corpus="wikitext", tokens=40, progress=False)   # cached: no hub needed
    assert torch.equal(again[0], online[0])
    with pytest.raises(ValueError, match="no such file"):
        corpora.resolve_corpus("missing.txt", seed=0)
    with pytest.raises(TypeError, match="dataset name"):
        corpora.resolve_corpus("just some words", seed=0)
    with pytest.raises(TypeError, match="list of strings"):
        corpora.resolve_corpus([1, 2], seed=0)


def test_the_sampler_equals_a_full_forward_over_the_tokens_it_drew(llama):
    """Keys recorded while generating with a cache = keys of a plain full forward over the
    sampled rows (start token left out), taken step by step, cut at ``tokens``."""
    h = resolve(llama)
    tokens, rows, length = 50, 4, 9              # 2 batches: 4 x 8, then ceil(18 / 8) = 3 rows
    chunks = list(corpora.sampled_stream(h, [h[1].path], tokens, 0, rows=rows, length=length))
    ends = [c for c in chunks if c.end]
    assert [c.batch for c in ends] == [0, 1] and [len(c.ids) for c in ends] == [4, 3]
    ref = []
    for c in ends:
        per_row = _hooked_keys(llama, 1, c.ids)                      # [length, d] each
        ref += [per_row[r][t] for t in range(1, length) for r in range(len(c.ids))]
    k = torch.stack(ref)[:tokens].double()
    got = cov.second_moments(llama, [1], tokens=tokens, cache=False, progress=False, rows=rows, max_length=length)
    torch.testing.assert_close(got[1], (k.T @ k / tokens).float(), rtol=1e-5, atol=1e-7)
    again = cov.second_moments(llama, [1], tokens=tokens, cache=False, progress=False, rows=rows, max_length=length)
    assert torch.equal(again[1], got[1])                                 # seeded
    other = cov.second_moments(llama, [1], tokens=tokens, cache=False, progress=False, rows=rows,
                               max_length=length, seed=1)
    assert not torch.allclose(other[1], got[1])


@pytest.mark.parametrize("block", [256, 2])                  # one block; blocks of two (and a padded one)
def test_inverse_cdf_sampling_has_the_softmax_distribution(block):
    logits = torch.tensor([[2.0, 0.0, -float("inf"), 1.0, -1.0]]).repeat(40_000, 1)
    draws = corpora.sample_next(logits, torch.Generator().manual_seed(0), block=block)[:, 0]
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    p = torch.softmax(logits[0].double(), -1)
    assert freq[2] == 0                                                   # probability 0: never
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(draws)).sqrt().max()


@pytest.mark.parametrize("corpus", ["sampled", "texts"])
def test_an_interrupted_collection_resumes_exactly(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("GRADLOCATE_CACHE", str(tmp_path))
    model, _ = tiny("llama", n_layers=2, d_model=16)
    kw = dict(tokens=100, corpus="sampled" if corpus == "sampled" else REAL * 4, progress=False, rows=3,
              max_length=9)
    whole = cov.second_moment_stats(model, [0, 1], cache=False, **kw)

    def stop_after(k):
        def cb(batches, tokens):
            seen.append(batches)
            if batches == k:
                raise KeyboardInterrupt
        return cb

    seen = []
    with pytest.raises(KeyboardInterrupt):
        cov.second_moment_stats(model, [1], callback=stop_after(2), **kw)       # layer 1 alone, 2 batches
    assert len(list((tmp_path / "mom2").glob("*.partial.pt"))) == 1
    with pytest.raises(KeyboardInterrupt):
        cov.second_moment_stats(model, [0, 1], callback=stop_after(3), **kw)    # layer 0 from 0, layer 1 from 2
    seen.clear()
    got = cov.second_moment_stats(model, [0, 1], callback=lambda b, t: seen.append(b), **kw)
    assert seen[0] == 4                                                         # resumed after batch 3
    for l in (0, 1):
        assert got[l].count == whole[l].count == 100
        torch.testing.assert_close(got[l].sum, whole[l].sum, rtol=1e-12, atol=1e-12)
    assert not list((tmp_path / "mom2").glob("*.partial.pt"))                   # done: checkpoints removed
    cached = cov.second_moment_stats(model, [0, 1], callback=lambda b, t: seen.append(-1), **kw)
    assert -1 not in seen and torch.equal(cached[1].sum, got[1].sum)


def test_checkpoints_are_written_while_collecting(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLOCATE_CACHE", str(tmp_path))
    monkeypatch.setattr(cov, "CHECKPOINT_SECONDS", 0.0)
    model, _ = tiny("llama", n_layers=2, d_model=16)
    found = []
    cov.second_moment_stats(model, [1], tokens=60, corpus=REAL * 3, progress=False, rows=2,
                            callback=lambda b, t: found.append(len(list((tmp_path / "mom2").glob("*.partial.pt")))))
    assert found[0] == 0 and all(f == 1 for f in found[1:-1])


def test_rome_npz_round_trip_and_reader(tmp_path, llama):
    h = resolve(llama)
    s = cov.second_moment_stats(llama, [1], tokens=200, cache=False, progress=False)[1]
    path = rome_stats.rome_stats_path(tmp_path, "llama", h[1].path, dataset="sampled", precision="float64",
                                      sample_size=None)
    s.save_npz(path, precision="float64")
    assert path.name == "model.layers.1.mlp.down_proj_float64_mom2.npz"
    with np.load(path, allow_pickle=False) as z:                 # what ROME's CombinedStat loader reads
        raw = {k: z[k] for k in z.files}
    assert set(raw) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
    assert str(raw["mom2.constructor"]) == "util.runningstats.SecondMoment()"
    assert struct.pack(">d", float(raw["sample_size"])) == struct.pack(">Q", 0xFFF8000000000002)  # ROME's null
    assert int(raw["mom2.count"]) == 200 and np.array_equal(raw["mom2.mom2"], s.sum.numpy())
    torch.testing.assert_close(torch.from_numpy(raw["mom2.mom2"] / raw["mom2.count"]).float(), s.moment())
    total, n = rome_stats.load_npz(path, expect_shape=(64, 64), site=h[1].path)
    assert n == 200 and torch.equal(total, s.sum)
    from_file = cov.second_moments(llama, [1], stats=path, progress=False)
    from_dir = cov.second_moments(llama, [1], stats=tmp_path, progress=False)
    assert torch.equal(from_file[1], s.moment()) and torch.equal(from_dir[1], s.moment())
    s.save_npz(tmp_path / "f32.npz", sample_size=100_000)          # ROME's default precision, a free name
    with np.load(tmp_path / "f32.npz") as z:
        assert z["mom2.mom2"].dtype == np.float32 and int(z["sample_size"]) == 100_000
    torch.testing.assert_close(cov.second_moment(llama, 1, stats=tmp_path / "f32.npz"), s.moment())


def test_a_mismatched_statistics_file_is_refused_in_one_line(tmp_path, llama):
    h = resolve(llama)
    k = torch.randn(30, 32, dtype=torch.float64)
    small = rome_stats.save_npz(tmp_path / f"{h[1].path}_float32_mom2_100000.npz", k.T @ k, 30)
    with pytest.raises(rome_stats.StatsFileError) as e:
        cov.second_moments(llama, [1], stats=small, progress=False)
    assert str(e.value) == f"{small.name}: expects 64x64 for {h[1].path}, the file holds 32x32"
    k = torch.randn(30, 64, dtype=torch.float64)
    other = rome_stats.save_npz(tmp_path / "o" / f"{h[0].path}_float32_mom2_100000.npz", k.T @ k, 30)
    with pytest.raises(rome_stats.StatsFileError, match="statistics of model.layers.0.mlp.down_proj"):
        cov.second_moments(llama, [1], stats=other, progress=False)
    with pytest.raises(rome_stats.StatsFileError, match="not of model.layers.1"):
        rome_stats.load_npz(other, expect_shape=(64, 64), site=h[1].path)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(rome_stats.StatsFileError, match="expected mom2.mom2 and mom2.count"):
        rome_stats.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", **{"mom2.mom2": np.full((64, 64), np.nan), "mom2.count": np.array(3)})
    with pytest.raises(rome_stats.StatsFileError, match="non-finite"):
        rome_stats.load_npz(tmp_path / "nan.npz", expect_shape=(64, 64))
    with pytest.warns(UserWarning, match="no statistics file for model.layers.2"):   # the folder lacks layer 2
        got = cov.second_moments(llama, [0, 2], stats=tmp_path / "o", tokens=100, cache=False, progress=False)
    torch.testing.assert_close(got[0], (k.T @ k / 30).float())


def test_the_cost_line_is_printed_before_a_collection_when_progress_is_on(llama, capfd):
    cov.second_moments(llama, [0, 1], tokens=100, cache=False, progress=True)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "gradlocate: second moments of" in line]
    assert len(lines) == 1
    line = lines[0][lines[0].index("gradlocate:"):]
    assert "2 sites (model.layers.0.mlp.down_proj ... model.layers.1.mlp.down_proj) over 100 tokens of the " \
           "model's own samples: about " in line and line.endswith("not cached")
    cov.second_moments(llama, [0, 1], tokens=100, cache=False, progress=False)
    assert "gradlocate:" not in capfd.readouterr().err
    line = cov.cost_line(["s"], 50_000, "wikitext", 5000.0, None, resumed=8064)
    assert "50,000 tokens of wikitext, resuming at 8,064: about 83 min" in line

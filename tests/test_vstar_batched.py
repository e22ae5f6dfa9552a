"""v* for many edits at once (:mod:`gradlocate.editors.values`) against the one-at-a-time
path (:func:`gradlocate.editors.rank_one.optimise_value`, itself checked against a plain
re-implementation of ROME's ``compute_v`` in ``tests/test_rome.py``).

The tolerance argument. The batched forward computes, for each edit's rows, the same
operations as the single run; what differs is the batch around them: the rows of all
edits are padded to one width (the padded key positions are masked out of attention,
so they enter with weight exactly 0) and the matrix products have more rows, so some
kernels block their sums differently. So:

* in float64 the two agree to float32 rounding of δ (measured: bit for bit) - the
  computation is the same;
* in float32 they differ by reduction order only, amplified by Adam (it divides each
  gradient element by its own magnitude): measured 1e-6 to 3e-5 relative on the tiny
  random models, the size of the single path's own difference between its cache on
  and off; the float32 checks here use ROME's learning rate on LLaMA, where both are
  ~2e-6, against the 1e-5 the issue asks;
* a chunk of one edit runs the single path's exact shapes: equal bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gradlocate.data import as_edits
from gradlocate.editors import per_edit_deltas
from gradlocate.editors import rank_one as ro
from gradlocate.editors import rome as rome_module
from gradlocate.editors.emmet import emmet_ingredients, emmet_ingredients_batch
from gradlocate.editors.rome import RROME, rome_update, rome_updates
from gradlocate.editors import values
from gradlocate.editors.values import edit_keys, optimise_values
from gradlocate.handles import resolve
from gradlocate.models import tiny

#: Targets of 2 to 8 tokens (byte tokenizer, a space first); subjects first, inside, multi-token.
EDITS = as_edits([{"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"},
                  {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
                   "target_new": "English"},
                  {"prompt": "Mozart played the", "subject": "Mozart", "target_new": "x"}])
PREFIXES = ["", "Hi. ", "A longer one here. "]
ROME_LIKE = dict(steps=6, lr=0.5, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=4.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _same_fit(got, want, rtol: float) -> None:
    assert len(got.history) == len(want.history)
    assert _rel(got.delta, want.delta) <= rtol, _rel(got.delta, want.delta)
    torch.testing.assert_close(got.target_init, want.target_init, rtol=rtol, atol=0)
    assert got.history == pytest.approx(want.history, rel=rtol)
    assert got.nll == pytest.approx(want.nll, rel=rtol)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_batched_equals_one_at_a_time_in_float64(arch):
    """Three edits (targets of 2-8 tokens, subjects first and inside the prompt) at once,
    with the blocks below and the prefixes cached, and with full forwards: each edit's
    δ, v*, loss and NLL history equal its own run's (float64 forward)."""
    h = resolve(tiny(arch, n_layers=3, d_model=32, dtype=torch.float64)[0])
    for kw in ({}, {"cache": False}):
        want = [ro.optimise_value(h, 1, e, PREFIXES, **ROME_LIKE, **kw) for e in EDITS]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the prefix cache engages in the batched layout too
            got = optimise_values(h, 1, EDITS, PREFIXES, **ROME_LIKE, **kw)
        for g, w in zip(got, want):
            _same_fit(g, w, rtol=1e-7)
            assert float(g.delta.norm()) > 0


def test_float32_to_1e5_and_a_chunk_of_one_bit_for_bit():
    h = resolve(tiny("llama", n_layers=3, d_model=32)[0])
    for layer in (0, 1):
        want = [ro.optimise_value(h, layer, e, PREFIXES, **ROME_LIKE) for e in EDITS]
        for g, w in zip(optimise_values(h, layer, EDITS, PREFIXES, **ROME_LIKE), want):
            _same_fit(g, w, rtol=1e-5)
        one = optimise_values(h, layer, EDITS[1:2], PREFIXES, **ROME_LIKE)[0]
        assert torch.equal(one.delta, want[1].delta) and one.history == want[1].history
        assert torch.equal(one.target_init, want[1].target_init)


def test_early_stopping_is_per_edit(monkeypatch):
    """One edit falls below the early stop at step 3 and leaves the batch; the others
    run every step. Each history ends where its own run's does."""
    h = resolve(tiny("gpt2", n_layers=3, d_model=32, dtype=torch.float64)[0])
    hp = dict(steps=8, lr=3e-3, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=100.0)  # a falling loss
    free = [ro.optimise_value(h, 1, e, ["", "Hi. "], **hp) for e in EDITS]
    stop = (free[0].history[2] + free[0].history[3]) / 2       # edit 0 crosses it at step 3
    assert all(min(f.history) > stop for f in free[1:]) and sorted(free[0].history, reverse=True) == free[0].history
    monkeypatch.setattr(ro, "EARLY_STOP", stop)
    want = [ro.optimise_value(h, 1, e, ["", "Hi. "], **hp) for e in EDITS]
    got = optimise_values(h, 1, EDITS, ["", "Hi. "], **hp)
    assert [len(f.history) for f in want] == [len(f.history) for f in got] == [4, 8, 8]
    for g, w in zip(got, want):
        _same_fit(g, w, rtol=1e-7)
    assert not torch.equal(got[0].delta, free[0].delta)        # it did stop early


def test_clamping_is_per_edit():
    """Each edit's δ is held to its own ‖δ‖ ≤ factor·‖target_init‖: here edit 0's reaches
    its bound, the others' stay inside theirs."""
    h = resolve(tiny("gpt2", n_layers=3, d_model=32, dtype=torch.float64)[0])
    hp = dict(steps=5, lr=0.01, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=1.5)
    want = [ro.optimise_value(h, 1, e, ["", "Hi. "], **hp) for e in EDITS]
    got = optimise_values(h, 1, EDITS, ["", "Hi. "], **hp)
    ratio = [float(f.delta.norm() / (hp["clamp_norm_factor"] * f.target_init.norm())) for f in got]
    assert ratio[0] == pytest.approx(1.0, abs=1e-6) and max(ratio[1:]) < 0.999, ratio
    for g, w in zip(got, want):
        _same_fit(g, w, rtol=1e-7)


def test_prefixes_per_edit_groups_and_bad_input():
    """Each edit its own templates; a token budget that puts every edit in its own group
    gives the same fits; wrong shapes are refused."""
    h = resolve(tiny("llama", n_layers=2, d_model=32, dtype=torch.float64)[0])
    per = [["", "Hi. "], ["", "A longer one here. ", "X. "], [""]]
    want = [ro.optimise_value(h, 0, e, p, **ROME_LIKE) for e, p in zip(EDITS, per)]
    for max_tokens in (1, 10_000):
        for g, w in zip(optimise_values(h, 0, EDITS, per, max_tokens=max_tokens, **ROME_LIKE), want):
            _same_fit(g, w, rtol=1e-7)
    vbs = [ro._value_batch(h.require_tokenizer(), e, p) for e, p in zip(EDITS, per)]
    width = [int((vb.mask.sum(1) - vb.lookup).max()) for vb in vbs]
    for max_tokens in (1, 60, 10_000):
        groups = values._groups(vbs, max_tokens)
        assert sorted(i for g in groups for i in g) == [0, 1, 2]
        for g in groups:  # one edit alone, or within the budget and the padding slack
            rows, real = sum(len(vbs[i].lookup) for i in g), sum(len(vbs[i].lookup) * width[i] for i in g)
            assert len(g) == 1 or rows * max(width[i] for i in g) <= min(max_tokens, (1 + values.PAD_SLACK) * real)
    assert len(values._groups(vbs, 1)) == 3
    keys = edit_keys(h, 0, EDITS, per)
    for (K, O), e, p in zip(keys, EDITS, per):
        k1, o1 = ro.site_io(h, 0, [ro.locate(h.require_tokenizer(), q + e.prompt, e.subject, len(q)) for q in p])
        torch.testing.assert_close(K, k1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(O, o1, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one per edit"):
        optimise_values(h, 0, EDITS, per[:2], **ROME_LIKE)
    with pytest.raises(TypeError, match="list of template prefixes"):
        optimise_values(h, 0, EDITS, "", **ROME_LIKE)
    with pytest.raises(ValueError, match="max_tokens"):
        optimise_values(h, 0, EDITS, PREFIXES, max_tokens=0, **ROME_LIKE)
    assert optimise_values(h, 0, [], PREFIXES, **ROME_LIKE) == []


def test_prefix_reuse_says_when_it_cannot_engage(monkeypatch):
    h = resolve(tiny("llama", n_layers=2, d_model=32)[0])
    ref = optimise_values(h, 1, EDITS[:2], PREFIXES, reuse_prefix=False, **ROME_LIKE)
    monkeypatch.setattr(ro._compat, "cache_argument", lambda root: None)
    with pytest.warns(UserWarning, match="prefix reuse is off .*takes no key/value cache"):
        got = optimise_values(h, 1, EDITS[:2], PREFIXES, **ROME_LIKE)
    for g, w in zip(got, ref):
        assert torch.equal(g.delta, w.delta)


def test_rank_one_and_emmet_updates_equal_one_at_a_time():
    """ΔW (ROME, R-ROME) and EMMET's key and residual per edit from the batched path equal
    one call per edit, to 1e-5 (float32, ROME's learning rate, a real covariance)."""
    from gradlocate.editors import covariance as cov

    model = tiny("llama", n_layers=2, d_model=32, seed=0)[0]
    C = cov.second_moment(model, 0, tokens=1500, cache=False, progress=False)
    ed = RROME(model, 0, covariance=C, progress=False, v_num_grad_steps=5, context_template_length_params=[(4, 5)])
    groups = ed.templates()
    for averaged in (False, True):
        got = rome_updates(ed.h, 0, EDITS, groups, C, ed.hp, averaged=averaged)
        for (dW, info), e in zip(got, EDITS):
            want, winfo = rome_update(ed.h, 0, e, groups, C, ed.hp, averaged=averaged)
            assert _rel(dW, want) <= 1e-5 and info["history"] == pytest.approx(winfo["history"], rel=1e-5)
    batch = emmet_ingredients_batch(ed.h, 0, EDITS, groups, ed.hp)
    for g, e in zip(batch, EDITS):
        w = emmet_ingredients(ed.h, 0, e, groups, ed.hp)
        assert _rel(g["key"], w["key"]) <= 1e-6 and _rel(g["residual"], w["residual"]) <= 1e-5


def test_matrix_cells_equal_the_per_edit_loop(monkeypatch):
    """An R-ROME matrix from chunks of 3 (batched v*) and from the old per-edit loop
    (``rome_update`` edit by edit): the same scores and steps, ΔW and losses to 1e-5.

    Not at the last layer: there δ reaches no target token, only the KL prompt's own
    position, whose KL gradient vanishes at the reference - the first step's gradient is
    float noise that Adam scales to ``lr``, so the one-at-a-time path does not reproduce
    itself there either (its cache on vs off: 8e-2 apart on this model)."""
    from gradlocate.golden.matrix import matrix

    model = tiny("llama", n_layers=3, d_model=32, seed=0)[0]
    hp = {"v_num_grad_steps": 4, "context_template_length_params": [(4, 5)], "mom2_adjustment": False}
    batched = matrix(model, EDITS, editor="r-rome", hparams=hp, layers=[0, 1], chunk=3, capability_edits=1,
                     progress=False)
    d_batched = [per_edit_deltas("r-rome", resolve(model), layer, EDITS, **hp)[0] for layer in (0, 1)]

    def loop(h, layer, edits, groups, C, hp, *, averaged):
        return [rome_update(h, layer, e, groups, C, hp, averaged=averaged) for e in edits]
    monkeypatch.setattr(rome_module, "rome_updates", loop)
    old = matrix(model, EDITS, editor="r-rome", hparams=hp, layers=[0, 1], chunk=3, capability_edits=1,
                 progress=False)
    d_old = [per_edit_deltas("r-rome", resolve(model), layer, EDITS, **hp)[0] for layer in (0, 1)]
    for a, b in zip(d_batched, d_old):
        for i in range(len(EDITS)):
            assert _rel(a[i], b[i]) <= 1e-5
    for m in batched.scores:
        np.testing.assert_array_equal(batched.scores[m], old.scores[m])
    np.testing.assert_array_equal(batched.train["steps"], old.train["steps"])
    np.testing.assert_allclose(batched.train["final_loss"], old.train["final_loss"], rtol=1e-5)
    # the held-out loss change is a difference of two ~3-nat float32 losses: with ΔW equal to
    # 1e-5 it can move by ~1e-6 nats (seen on torch 2.6: 9.6e-7), so an absolute tolerance
    np.testing.assert_allclose(batched.capability, old.capability, rtol=1e-5, atol=1e-5)

"""Memory guard: with ``max_memory=`` (bytes) the gradient functions and selectors
split their micro-batches to fit the budget instead of failing, with the same results."""

from __future__ import annotations

import pytest
import torch

import gradlocate as gl
from gradlocate import interventions
from gradlocate.memory import check_max_memory, micro_batch_size, sequence_bytes
from gradlocate.models import tiny
from robust_helpers import EDITS, TEXTS, assert_same_state, model_state

EIGHT = [dict(e, prompt=e["prompt"] + "." * i) for i, e in enumerate(EDITS * 2)]  # 8 distinct edits


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny("gpt2", n_layers=3, d_model=32, n_ctx=64, seed=8)
    # The intervention kernel records the forward's module order once per model (one
    # 2-token forward): done here, so the counts below are the computations' own.
    interventions._order(gl.down_projections(model))
    return model, tok


class _Forwards:
    """Counts the model's forward passes (a pre-hook on the root module)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_micro_batch_size_rules():
    assert micro_batch_size(8, None, 100) == 8
    assert micro_batch_size(8, 10_000, 100) == 8
    assert micro_batch_size(8, 350, 100) == 3
    with pytest.warns(UserWarning, match="less than one of the edits needs"):
        assert micro_batch_size(8, 50, 100, "edits") == 1
    for bad in (0, -5, "1GB", True, float("nan")):
        with pytest.raises(ValueError, match="max_memory must be a number of bytes > 0"):
            check_max_memory(bad)


def test_sequence_bytes_grows_with_length_and_backward(model_tok):
    hs = gl.down_projections(model_tok[0])
    a, b = sequence_bytes(hs, 10), sequence_bytes(hs, 20)
    assert 0 < a < b and sequence_bytes(hs, 10, backward=False) < a
    assert sequence_bytes(hs, 10, scored=2) < a


def _budget(model, tok, n_per_pass):
    """A budget that fits ``n_per_pass`` of the widest edit sequences."""
    hs = gl.down_projections(model)
    batch = gl.losses.tokenize_edits(tok, [e["prompt"] for e in EIGHT], [e["target_new"] for e in EIGHT],
                              append_eos=False)  # the selectors' loss: answer tokens only
    return n_per_pass * sequence_bytes(hs, batch.input_ids.shape[1], scored=int(batch.n_scored.max()))


def test_edit_gradients_split_to_budget_same_result(model_tok):
    model, tok = model_tok
    with _Forwards(model) as f:
        full = gl.edit_gradients(model, EIGHT, tokenizer=tok, batch_size=8)
    assert f.n == 1
    before = model_state(model)
    with _Forwards(model) as f:
        split = gl.edit_gradients(model, EIGHT, tokenizer=tok, batch_size=8, max_memory=_budget(model, tok, 3))
    assert f.n == 3 and split.params["micro_batch"] == 3  # 3 + 3 + 2 edits
    assert_same_state(before, model)
    assert split.sq_norms == pytest.approx(full.sq_norms, rel=1e-5)
    assert split.loss == pytest.approx(full.loss, rel=1e-6)


def test_retain_gradients_split_to_budget_same_result(model_tok):
    model, tok = model_tok
    hs = gl.down_projections(model)
    width = max(len(t) for t in TEXTS)  # byte tokens
    full = gl.retain_gradients(model, TEXTS, tokenizer=tok, batch_size=8, keep=True)
    with _Forwards(model) as f:
        split = gl.retain_gradients(model, TEXTS, tokenizer=tok, batch_size=8, keep=True,
                                    max_memory=sequence_bytes(hs, width) + 1)
    assert f.n == len(TEXTS)
    assert split.sq_norms == pytest.approx(full.sq_norms, rel=1e-5)
    for a, b in zip(split.grads, full.grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_selectors_split_to_budget_same_result(model_tok):
    model, tok = model_tok
    budget = _budget(model, tok, 1)
    r_full = gl.gradratio(model, EIGHT, TEXTS, tokenizer=tok, min_layer=0)
    with _Forwards(model) as f, pytest.warns(UserWarning, match="retain texts needs .* one at a time"):
        r_split = gl.gradratio(model, EIGHT, TEXTS, tokenizer=tok, min_layer=0, max_memory=budget)
    assert f.n > 2  # one forward per edit (and per retain text) instead of one each
    assert r_split.scores == pytest.approx(r_full.scores, rel=1e-5) and r_split.selected == r_full.selected
    l_full = gl.lga(model, EIGHT, tokenizer=tok)
    with _Forwards(model) as f, pytest.warns(UserWarning, match="samples needs .* one at a time"):
        l_split = gl.lga(model, EIGHT, tokenizer=tok, max_memory=budget)
    assert f.n > 2
    assert l_split.scores == pytest.approx(l_full.scores, rel=1e-5) and l_split.selected == l_full.selected


def test_bad_budget_is_refused_before_any_work(model_tok):
    model, tok = model_tok
    for fn, args in ((gl.edit_gradients, (EDITS,)), (gl.retain_gradients, (TEXTS,)), (gl.lga, (EDITS,)),
                     (gl.gradratio, (EDITS, TEXTS))):
        with _Forwards(model) as f, pytest.raises(ValueError, match="max_memory must be"):
            fn(model, *args, tokenizer=tok, max_memory=-1)
        assert f.n == 0

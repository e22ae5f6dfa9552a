"""Gradient primitives against independent plain-autograd computations.

The references here use only the Hugging Face model, the tokenizer and
``torch.autograd.grad`` on the weights (one unpadded sequence at a time, per-sample
gradients materialised): none of gradlocate's tokenization, losses or handles.
"""

from __future__ import annotations

import inspect
import math

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlocate.data import EditRequest
from gradlocate.gradients import (
    LayerGradients,
    edit_gradients,
    ghost_inner_products,
    per_sample_inner_products,
    retain_gradients,
)
from gradlocate.models import tiny
from gradlocate.selectors import greedy_answers

matplotlib.use("Agg")

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris"},
    {"src": "Which river system contains Charity Creek?", "alt": "Chichester River", "answers": ["Parramatta River"]},
    {"prompt": "Q: who wrote Hamlet? A:", "target_new": "Christopher Marlowe", "ground_truth": "Shakespeare"},
    # Ends in a space: the target is tokenized apart, with no space of its own - a BPE
    # tokenizer would merge " fifty" if the two were tokenized together.
    {"prompt": "Water boils at ", "target_new": "fifty degrees", "ground_truth": "100 degrees"},
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees.",
         "A much longer general text about rivers, mountains and the history of many small towns."]


# --------------------------------------------------------------------------- independent references


def ref_weights(model):
    """The down-projection weights and whether each is stored [d_mlp, d_model]."""
    if hasattr(model, "transformer"):  # GPT-2: Conv1D c_proj stores [d_mlp, d_model]
        return [b.mlp.c_proj.weight for b in model.transformer.h], True
    return [b.mlp.down_proj.weight for b in model.model.layers], False


def ref_ids(tok, prompt, target, eos=False):
    """The prompt's ids; the target's with a leading space, then EOS if ``eos`` (the
    selectors' edit loss scores the answer tokens only by default, as their papers do)."""
    p = tok(prompt)["input_ids"]
    t = tok(("" if prompt[-1:].isspace() else " ") + target, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return p, t


def ref_target_nll(model, tok, prompt, target):
    """Mean NLL of the target tokens after the prompt, one unpadded sequence."""
    p, t = ref_ids(tok, prompt, target)
    ids = torch.tensor([p + t])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
    return -logp[pos, torch.tensor(t)].mean()


def ref_text_nll_sum(model, tok, text, max_len):
    ids = tok(text)["input_ids"][:max_len]
    logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum(), len(ids) - 1


def ref_edit_grads(model, tok, edits):
    ws, tr = ref_weights(model)
    loss = sum(ref_target_nll(model, tok, p, t) for p, t in edits) / len(edits)
    gs = torch.autograd.grad(loss, ws)
    return [g.T if tr else g for g in gs], float(loss.detach())


def ref_retain_grads(model, tok, texts, max_len=128):
    ws, tr = ref_weights(model)
    parts = [ref_text_nll_sum(model, tok, t, max_len) for t in texts]
    loss = sum(s for s, _ in parts) / sum(n for _, n in parts)
    gs = torch.autograd.grad(loss, ws)
    return [g.T if tr else g for g in gs], float(loss.detach())


def pairs(edits, old=False):
    out = []
    for e in edits:
        p = e.get("prompt", e.get("src"))
        if old:
            t = e.get("ground_truth", (e.get("answers") or [None])[0])
        else:
            t = e.get("target_new", e.get("alt"))
        out.append((p, t))
    return out


def close(a, b, rtol=1e-5, atol=0.0):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(params=["gpt2", "llama", "llama-bpe"])
def model_tok(request, tiny_gpt2, tiny_llama, tiny_llama_bpe):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama, "llama-bpe": tiny_llama_bpe}[request.param]


# --------------------------------------------------------------------------- edit / retain gradients


def test_edit_gradients_match_autograd(model_tok):
    model, tok = model_tok
    g = edit_gradients(model, EDITS, keep=True, batch_size=2)
    ref, loss = ref_edit_grads(model, tok, pairs(EDITS))
    assert g.loss_kind == "edit" and g.n_sequences == len(EDITS) and g.layers == [0, 1, 2, 3]
    assert close(g.loss, loss)
    assert close(g.sq_norms, [float((r.double() ** 2).sum()) for r in ref])
    for mine, r in zip(g.grads, ref):
        assert mine.shape == r.shape and mine.dtype == torch.float32
        assert torch.allclose(mine, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
    assert g.n_tokens == sum(len(ref_ids(tok, p, t)[1]) for p, t in pairs(EDITS))


def test_edit_gradients_layer_subset_and_norms_only(tiny_llama):
    model, tok = tiny_llama
    g = edit_gradients(model, EDITS, layers=[-1, 1])
    ref, _ = ref_edit_grads(model, tok, pairs(EDITS))
    assert g.layers == [3, 1] and g.grads is None
    assert close(g.sq_norms, [float((ref[i].double() ** 2).sum()) for i in (3, 1)])


def test_append_eos_true_also_scores_eos(tiny_gpt2):
    model, tok = tiny_gpt2
    g = edit_gradients(model, EDITS[:1], append_eos=True, keep=True)
    ws, tr = ref_weights(model)
    p, t = ref_ids(tok, "The capital of France is", "Rome", eos=True)
    logp = model(input_ids=torch.tensor([p + t])).logits[0].float().log_softmax(-1)
    loss = -logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].mean()
    ref = torch.autograd.grad(loss, ws)
    assert close(g.loss, float(loss.detach()))
    assert close(g.sq_norms, [float((r.double() ** 2).sum()) for r in ref])


@pytest.mark.parametrize("max_len", [128, 9])
def test_retain_gradients_match_autograd(model_tok, max_len):
    model, tok = model_tok
    g = retain_gradients(model, TEXTS, keep=True, batch_size=2, max_length=max_len)
    ref, loss = ref_retain_grads(model, tok, TEXTS, max_len)
    assert close(g.loss, loss)
    assert g.n_tokens == sum(min(len(tok(t)["input_ids"]), max_len) - 1 for t in TEXTS)
    assert close(g.sq_norms, [float((r.double() ** 2).sum()) for r in ref])
    for mine, r in zip(g.grads, ref):
        assert torch.allclose(mine, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 4))
def test_micro_batching_equals_one_batch(batch_size):
    model, _ = _small()
    one = edit_gradients(model, EDITS, batch_size=64)
    many = edit_gradients(model, EDITS, batch_size=batch_size)
    assert close(many.sq_norms, one.sq_norms) and close(many.loss, one.loss)
    one_r = retain_gradients(model, TEXTS, batch_size=64)
    many_r = retain_gradients(model, TEXTS, batch_size=batch_size)
    assert close(many_r.sq_norms, one_r.sq_norms) and close(many_r.loss, one_r.loss)


_SMALL: dict = {}


def _small():
    if not _SMALL:
        _SMALL["m"] = tiny("llama", n_layers=3, d_model=16, seed=3)
    return _SMALL["m"]


def test_bfloat16_model_accumulates_in_float32():
    model, tok = tiny("llama", n_layers=2, d_model=16, dtype=torch.bfloat16)
    g = edit_gradients(model, EDITS, keep=True, batch_size=1)
    assert all(x.dtype == torch.float32 for x in g.grads)
    assert all(math.isfinite(s) and s > 0 for s in g.sq_norms)
    ref32, _ = ref_edit_grads(model.float(), tok, pairs(EDITS))
    # bf16 forward vs float32 reference: same gradient up to bf16 rounding.
    for mine, r in zip(g.grads, ref32):
        assert float(torch.nn.functional.cosine_similarity(mine.flatten(), r.flatten(), 0)) > 0.9


# --------------------------------------------------------------------------- ghost inner products


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 7), st.integers(1, 5), st.integers(0, 99))
def test_ghost_inner_products_equal_materialized(b, t1, t2, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    a1, d1 = torch.randn(b, t1, d_in, generator=g), torch.randn(b, t1, d_out, generator=g)
    a2, d2 = torch.randn(b, t2, d_in, generator=g), torch.randn(b, t2, d_out, generator=g)
    got = ghost_inner_products(a1, d1, a2, d2)
    for i in range(b):
        w1 = sum(torch.outer(d1[i, t], a1[i, t]) for t in range(t1))  # grad W = sum_t d_t a_t^T
        w2 = sum(torch.outer(d2[i, s], a2[i, s]) for s in range(t2))
        want = float((w1.double() * w2.double()).sum())
        # float32 rounding of sum_{t,s} (d_t . d'_s)(a_t . a'_s) is bounded by the sum of
        # its terms' magnitudes, which can exceed |want| by far (cancellation).
        terms = float(((d1[i].double() @ d2[i].double().T).abs() * (a1[i].double() @ a2[i].double().T).abs()).sum())
        assert abs(float(got[i]) - want) <= 1e-5 * terms + 1e-12


def test_ghost_inner_products_shape_errors():
    # The function's own checks (what a user sees) run on the undecorated function; under the
    # test-time shape checker (pyproject addopts) its annotation refuses the call first.
    raw = inspect.unwrap(ghost_inner_products)
    with pytest.raises(ValueError, match="rows, pos"):
        raw(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="same batch size"):
        raw(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(2, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises((ValueError, TypeError)):
        ghost_inner_products(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


def test_per_sample_inner_products_match_materialized(model_tok):
    model, tok = model_tok
    new, old = pairs(EDITS), pairs(EDITS, old=True)
    p = per_sample_inner_products(model, [x for x, _ in new], [t for _, t in new], [t for _, t in old], batch_size=2)
    ws, _ = ref_weights(model)
    assert p.dot.shape == (len(EDITS), 4)
    for i, ((prompt, t_new), (_, t_old)) in enumerate(zip(new, old)):
        g_new = torch.autograd.grad(ref_target_nll(model, tok, prompt, t_new), ws)
        g_old = torch.autograd.grad(ref_target_nll(model, tok, prompt, t_old), ws)
        for l in range(4):
            dot = float((g_new[l].double() * g_old[l].double()).sum())
            na, nb = float((g_new[l].double() ** 2).sum()), float((g_old[l].double() ** 2).sum())
            assert abs(float(p.dot[i, l]) - dot) <= 1e-5 * abs(dot) + 1e-6 * math.sqrt(na * nb)
            assert close(p.sq_norm_a[i, l], na) and close(p.sq_norm_b[i, l], nb)
        assert close(p.loss_a[i], float(ref_target_nll(model, tok, prompt, t_new).detach()))


def test_logit_softcapping_model():
    # Gemma-2 soft-caps its logits after the output head; the head runs on scored
    # positions only, and the capping must still apply.
    model, tok = tiny("gemma2", n_layers=2, d_model=16)
    assert model.config.final_logit_softcapping
    g = edit_gradients(model, EDITS, keep=True)
    ref, loss = ref_edit_grads(model, tok, pairs(EDITS))
    assert close(g.loss, loss) and close(g.sq_norms, [float((r.double() ** 2).sum()) for r in ref])
    (prompt, t_new), (_, t_old) = pairs(EDITS)[0], pairs(EDITS, old=True)[0]
    p = per_sample_inner_products(model, [prompt], [t_new], [t_old])
    ws, _ = ref_weights(model)
    g_new = torch.autograd.grad(ref_target_nll(model, tok, prompt, t_new), ws)
    g_old = torch.autograd.grad(ref_target_nll(model, tok, prompt, t_old), ws)
    want = [float((a.double() * b.double()).sum()) for a, b in zip(g_new, g_old)]
    scale = max(float(a.norm() * b.norm()) for a, b in zip(g_new, g_old))
    assert close(p.dot[0], want, atol=1e-6 * scale)


# --------------------------------------------------------------------------- state and old answers


def _state(model):
    return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [p.grad for p in model.parameters()], [p.detach().clone() for p in model.parameters()])


def test_model_state_is_restored():
    model, tok = tiny("gpt2", n_layers=3, d_model=16, seed=1)
    model.train()
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.h[1].mlp.c_proj.weight.requires_grad_(False)
    before = _state(model)
    edit_gradients(model, EDITS, keep=True)
    retain_gradients(model, TEXTS)
    per_sample_inner_products(model, ["Paris is in"], ["Rome"], ["France"])
    greedy_answers(model, ["Paris is in"], max_new_tokens=2)
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(g is None for g in after[2])
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3]))
    assert not any(a in m.__dict__ for m in model.modules() for a in ("forward", "__nnsight__"))


def test_greedy_answers_follow_the_argmax():
    model, tok = tiny("llama", n_layers=2, d_model=16, seed=5)
    prompt = "Paris is in"
    ans, = greedy_answers(model, [prompt], max_new_tokens=5)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    continuation = tok.decode(ids[len(tok(prompt)["input_ids"]):])
    assert ans and "\n" not in ans and "." not in ans
    assert ans in continuation.strip()
    assert continuation.strip().startswith(ans)


# --------------------------------------------------------------------------- bad input


class _NoTokensFor:
    """A tokenizer stand-in whose encoding of one string is empty."""

    def __init__(self, tok, empty):
        self._tok, self._empty = tok, empty
        self.pad_token, self.pad_token_id = tok.pad_token, tok.pad_token_id
        self.eos_token, self.eos_token_id = tok.eos_token, tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        if text.strip() == self._empty:
            return {"input_ids": []}
        return self._tok(text, add_special_tokens=add_special_tokens)


def test_bad_input_errors(tiny_gpt2):
    model, tok = tiny_gpt2
    with pytest.raises(ValueError, match="empty"):
        edit_gradients(model, [])
    with pytest.raises(ValueError, match="empty"):
        retain_gradients(model, [])
    with pytest.raises(ValueError, match="target is empty"):
        edit_gradients(model, [EditRequest(prompt="Paris is in", target_new="  ")])
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        edit_gradients(model, [{"prompt": "Paris is in", "target_new": "\u2063"}],
                       tokenizer=_NoTokensFor(tok, "\u2063"))
    with pytest.raises(ValueError, match="out of range"):
        edit_gradients(model, EDITS, layers=[4])
    with pytest.raises(ValueError, match="duplicates"):
        retain_gradients(model, TEXTS, layers=[1, 1])
    with pytest.raises(ValueError, match="batch_size"):
        edit_gradients(model, EDITS, batch_size=0)
    with pytest.raises(ValueError, match="lengths differ"):
        per_sample_inner_products(model, ["a"], ["b", "c"], ["d"])


def test_context_length_edits_error_retain_truncates():
    model, tok = tiny("llama", n_layers=2, d_model=16, n_ctx=20)
    with pytest.raises(ValueError, match="context"):
        edit_gradients(model, [{"prompt": "x" * 30, "target_new": "y"}])
    long = "abcdefghij" * 5
    g = retain_gradients(model, [long], keep=True)
    assert g.n_tokens == 19  # cut to the 20-token context
    ws, _ = ref_weights(model)
    s, n = ref_text_nll_sum(model, tok, long, 20)
    ref = torch.autograd.grad(s / n, ws)
    assert close(g.sq_norms, [float((r.double() ** 2).sum()) for r in ref])


# --------------------------------------------------------------------------- result object


def test_layer_gradients_result_api(tiny_llama):
    model, _ = tiny_llama
    e = edit_gradients(model, EDITS, keep=True)
    r = retain_gradients(model, TEXTS, keep=True)
    cos = e.cosine(r)
    for c, a, b, x in zip(cos, e.grads, r.grads, e.dot(r)):
        assert abs(c - float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0))) < 1e-6
        assert close(x, float((a.double() * b.double()).sum()))
    assert close(e.norms, [math.sqrt(s) for s in e.sq_norms])
    d = e.to_dict()
    assert d["loss_kind"] == "edit" and "grads" not in d and len(d["sq_norms"]) == 4
    assert "LayerGradients(loss_kind='edit'" in repr(e)
    ax = e.plot()
    assert len(ax.patches) == 4
    with pytest.raises(ValueError, match="keep=True"):
        edit_gradients(model, EDITS).dot(r)
    with pytest.raises(ValueError, match="one entry per layer"):
        LayerGradients("edit", [0, 1], [1.0], 0.0, 1, 1)

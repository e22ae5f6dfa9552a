"""GradRatio-Select and LGA against independent plain-autograd computations, and
their properties.

References use only the Hugging Face model, the tokenizer and ``torch.autograd.grad``
on the weights, one unpadded sequence at a time; quartiles come from the standard
library's ``statistics.quantiles``, l_min from exact fractions.
"""

from __future__ import annotations

import json
import math
import statistics
from fractions import Fraction

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlocate.gradients import LayerGradients, retain_gradients
from gradlocate.models import tiny
from gradlocate.selectors import adaptive_min_layer, gradratio, greedy_answers, lga, tukey_fences

matplotlib.use("Agg")

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris"},
    {"src": "Which river system contains Charity Creek?", "alt": "Chichester River", "answers": ["Parramatta River"]},
    {"prompt": "Q: who wrote Hamlet? A:", "target_new": "Christopher Marlowe", "ground_truth": "Shakespeare"},
    {"prompt": "Reedy Glacier is in", "target_new": "Asia", "ground_truth": "Antarctica"},
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees.",
         "A longer general text about rivers, mountains and the history of small towns."]
N_LAYERS = 7

_MODELS: dict = {}


def model_for(arch):
    if arch not in _MODELS:
        if arch == "llama-bpe":  # a tokenizer that merges and prepends BOS
            from gradlocate.models import bpe_tokenizer

            _MODELS[arch] = tiny("llama", n_layers=N_LAYERS, d_model=16, d_mlp=40, seed=2, tokenizer=bpe_tokenizer())
        else:
            d_mlp = 40 if arch == "llama" else None
            _MODELS[arch] = tiny(arch, n_layers=N_LAYERS, d_model=16, d_mlp=d_mlp, seed=2)
    return _MODELS[arch]


# --------------------------------------------------------------------------- independent references


def ref_weights(model):
    if hasattr(model, "transformer"):
        return [b.mlp.c_proj.weight for b in model.transformer.h]
    return [b.mlp.down_proj.weight for b in model.model.layers]


def ref_target_nll(model, tok, prompt, target, eos=False):
    """The selectors' edit loss: the target's tokens (after a space), and EOS if ``eos``,
    given the prompt."""
    p = tok(prompt)["input_ids"]
    t = tok(("" if prompt[-1:].isspace() else " ") + target, add_special_tokens=False)["input_ids"]
    t = t + ([tok.eos_token_id] if eos else [])
    logp = model(input_ids=torch.tensor([p + t])).logits[0].float().log_softmax(-1)
    return -logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].mean()


def ref_edit_grads(model, tok, edits):
    loss = sum(ref_target_nll(model, tok, e[0], e[1]) for e in edits) / len(edits)
    return [g.double() for g in torch.autograd.grad(loss, ref_weights(model))]


def ref_retain_grads(model, tok, texts, scale=1.0):
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"][:128]
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total = total - logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
        count += len(ids) - 1
    return [g.double() for g in torch.autograd.grad(scale * total / count, ref_weights(model))]


def triples(edits):
    out = []
    for e in edits:
        out.append((e.get("prompt", e.get("src")), e.get("target_new", e.get("alt")),
                    e.get("ground_truth", (e.get("answers") or [None])[0])))
    return out


def ref_lga_per_sample(model, tok, edits):
    ws = ref_weights(model)
    rows = []
    for prompt, new, old in triples(edits):
        g_new = torch.autograd.grad(ref_target_nll(model, tok, prompt, new), ws)
        g_old = torch.autograd.grad(ref_target_nll(model, tok, prompt, old), ws)
        rows.append([float((a.double() * b.double()).sum()) for a, b in zip(g_new, g_old)])
    return torch.tensor(rows, dtype=torch.float64)


def ref_fences(scores, k):
    q1, _, q3 = statistics.quantiles(scores, n=4, method="inclusive")
    return q1 - k * (q3 - q1), q3 + k * (q3 - q1)


def ref_l_min(L):
    return max(3, math.ceil(Fraction(15, 100) * L))


def close(a, b, rtol=1e-5, atol=0.0):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- GradRatio


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-bpe"])
def test_gradratio_matches_autograd(arch):
    model, tok = model_for(arch)
    r = gradratio(model, EDITS, TEXTS, batch_size=3)
    ge = ref_edit_grads(model, tok, [(p, n) for p, n, _ in triples(EDITS)])
    gr = ref_retain_grads(model, tok, TEXTS)
    e = [float((g ** 2).sum()) for g in ge]
    rr = [float((g ** 2).sum()) for g in gr]
    cos = [float((a * b).sum()) / math.sqrt(x * y) for a, b, x, y in zip(ge, gr, e, rr)]
    s = [x / y for x, y in zip(e, rr)]
    assert close(r.scores, s)
    assert close(r.extras["g_edit_sq"], e) and close(r.extras["g_retain_sq"], rr)
    assert close(r.extras["cos"], cos, rtol=0, atol=1e-5)
    assert close(r.extras["first_formulation"], [x * (1 - abs(c)) for x, c in zip(e, cos)], rtol=1e-4)
    l_min = ref_l_min(N_LAYERS)
    assert r.eligible == [l >= l_min for l in range(N_LAYERS)]
    assert r.selected == max(range(l_min, N_LAYERS), key=lambda l: s[l])
    assert r.params["l_min"] == l_min and r.params["n_edits"] == 4 and r.params["n_retain"] == 3


def test_gradratio_precomputed_retain_equals_direct():
    model, _ = model_for("llama")
    direct = gradratio(model, EDITS, TEXTS)
    pre = retain_gradients(model, TEXTS, keep=True)
    again = gradratio(model, EDITS, pre)
    assert close(again.scores, direct.scores) and again.selected == direct.selected
    assert close(again.extras["cos"], direct.extras["cos"], rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="keep=True"):
        no_grads = gradratio(model, EDITS, retain_gradients(model, TEXTS))
    assert all(math.isnan(c) for c in no_grads.extras["cos"])
    assert close(no_grads.scores, direct.scores)
    with pytest.raises(ValueError, match="of the 'retain' loss"):
        gradratio(model, pre, TEXTS)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.05, 20.0), st.booleans())
def test_scaling_the_retain_loss_by_c_scales_S_by_one_over_c_squared(c, negative):
    c = -c if negative else c
    model, tok = model_for("gpt2")
    base = gradratio(model, EDITS, TEXTS)
    # The retain gradient of c * L_retain, computed independently with autograd.
    gs = ref_retain_grads(model, tok, TEXTS, scale=c)
    grads = [g.T.float() for g in gs]  # GPT-2 stores c_proj as [d_mlp, d_model]
    scaled = LayerGradients("retain", list(range(N_LAYERS)), [float((g ** 2).sum()) for g in gs],
                            c * base.params["retain_loss"], 3, base.params["retain_tokens"], grads)
    r = gradratio(model, EDITS, scaled)
    assert close(r.scores, [s / c ** 2 for s in base.scores], rtol=1e-4)
    assert close(r.extras["g_edit_sq"], base.extras["g_edit_sq"])
    assert close(r.extras["cos"], [math.copysign(1, c) * x for x in base.extras["cos"]], rtol=0, atol=1e-5)
    assert close(r.extras["first_formulation"], base.extras["first_formulation"], rtol=1e-4)
    assert r.selected == base.selected


@settings(max_examples=8, deadline=None)
@given(st.permutations(range(len(EDITS))))
def test_gradratio_and_lga_are_edit_permutation_invariant(perm):
    model, _ = model_for("llama")
    shuffled = [EDITS[i] for i in perm]
    a, b = gradratio(model, EDITS, TEXTS, batch_size=2), gradratio(model, shuffled, TEXTS, batch_size=2)
    assert close(a.scores, b.scores) and a.selected == b.selected
    x, y = lga(model, EDITS, batch_size=3), lga(model, shuffled, batch_size=3)
    assert close(x.scores, y.scores, atol=1e-9 * max(map(abs, x.scores))) and x.selected == y.selected


@settings(max_examples=4, deadline=None)
@given(st.integers(2, 3))
def test_duplicating_every_edit(times):
    model, _ = model_for("gpt2")
    dup = [e for e in EDITS for _ in range(times)]
    a, b = gradratio(model, EDITS, TEXTS), gradratio(model, dup, TEXTS)
    assert close(a.scores, b.scores) and a.selected == b.selected  # a mean over edits: unchanged
    x, y = lga(model, EDITS), lga(model, dup)
    assert close([times * s for s in x.scores], y.scores) and x.selected == y.selected  # a sum: times k
    assert close(lga(model, EDITS, aggregate="mean").scores, lga(model, dup, aggregate="mean").scores)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200))
def test_adaptive_min_layer_formula(L):
    assert adaptive_min_layer(L) == ref_l_min(L)


def test_adaptive_min_layer_errors_and_known_values(unchecked):
    assert [adaptive_min_layer(L) for L in (20, 30, 32, 40)] == [3, 5, 5, 6]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_layers"):
            unchecked(adaptive_min_layer)(bad)


def test_gradratio_l_min_clamped_on_shallow_models():
    model, _ = tiny("llama", n_layers=3, d_model=16)
    with pytest.warns(UserWarning, match="clamped"):
        r = gradratio(model, EDITS[:2], TEXTS[:1])
    assert r.params["l_min"] == 2 and r.eligible == [False, False, True] and r.selected == 2


def test_gradratio_min_layer_and_layers_options(unchecked):
    model, _ = model_for("llama")
    full = gradratio(model, EDITS, TEXTS, min_layer=0)
    assert all(full.eligible) and full.selected == max(range(N_LAYERS), key=lambda l: full.scores[l])
    sub = gradratio(model, EDITS, TEXTS, layers=[6, 2, 4])
    assert sub.layers == [6, 2, 4] and sub.eligible == [True, False, True]
    assert close(sub.scores, [full.scores[l] for l in (6, 2, 4)])
    with pytest.raises(ValueError, match="l_min"):
        gradratio(model, EDITS, TEXTS, layers=[0, 1])
    with pytest.raises(ValueError, match="min_layer"):
        gradratio(model, EDITS, TEXTS, min_layer=N_LAYERS)
    with pytest.raises(ValueError, match="min_layer"):
        unchecked(gradratio)(model, EDITS, TEXTS, min_layer="auto")


# --------------------------------------------------------------------------- LGA


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-bpe"])
def test_lga_matches_materialized_per_sample_gradients(arch):
    model, tok = model_for(arch)
    r = lga(model, EDITS, batch_size=3)
    per = ref_lga_per_sample(model, tok, EDITS)
    s = per.sum(0).tolist()
    scale = float(per.abs().sum(0).max())
    assert close(r.scores, s, atol=1e-5 * scale)
    lo, hi = ref_fences(s, 1.5)  # the default k: Tukey's 1.5
    inside = [lo <= x <= hi for x in s]
    assert r.eligible == inside
    assert r.selected == max((l for l in range(N_LAYERS) if inside[l]), key=lambda l: s[l])
    assert close(r.extras["mean"], per.mean(0), atol=1e-5 * scale)
    assert close(r.extras["std"], per.std(0), rtol=1e-4, atol=1e-5 * scale)
    assert r.params["generated_old_answers"] == 0


@pytest.mark.parametrize("sign", ["signed", "negative", "abs"])
@pytest.mark.parametrize("k", [0.5, 1.0, 2.2])
def test_lga_sign_and_fence_options(sign, k):
    model, tok = model_for("gpt2")
    r = lga(model, EDITS, sign=sign, k=k)
    s = r.scores
    lo, hi = ref_fences(s, k)
    inside = [lo <= x <= hi for x in s]
    assert r.eligible == inside
    key = {"signed": lambda v: v, "negative": lambda v: -v, "abs": abs}[sign]
    assert r.selected == max((l for l in range(N_LAYERS) if inside[l]), key=lambda l: key(s[l]))
    assert r.params["k"] == k and r.params["sign"] == sign
    # rankings (and the rank correlations compare/study report) follow the same key
    assert r.maximised == [key(v) for v in s]
    assert r.ranking() == sorted((l for l in range(N_LAYERS) if inside[l]), key=lambda l: -key(s[l]))


def test_lga_generated_old_answer_equals_given_one():
    model, _ = model_for("llama")
    no_old = [{"prompt": "The capital of France is", "target_new": "Rome"}, EDITS[2]]
    r = lga(model, no_old)
    ans, = greedy_answers(model, [no_old[0]["prompt"]])
    given = lga(model, [dict(no_old[0], ground_truth=ans), EDITS[2]])
    assert r.params["generated_old_answers"] == 1 and given.params["generated_old_answers"] == 0
    assert close(r.scores, given.scores) and r.selected == given.selected


def test_lga_bad_options(unchecked):
    model, _ = model_for("gpt2")
    with pytest.raises(ValueError, match="k"):
        lga(model, EDITS, k=-1)
    with pytest.raises(ValueError, match="aggregate"):
        unchecked(lga)(model, EDITS, aggregate="median")
    with pytest.raises(ValueError, match="sign"):
        unchecked(lga)(model, EDITS, sign="positive")
    with pytest.raises(ValueError, match="empty"):
        lga(model, [])
    with pytest.raises(ValueError, match="out of range"):
        lga(model, EDITS, layers=[N_LAYERS])


def test_lga_only_two_layers_with_zero_fence_is_a_clear_error():
    model, _ = model_for("gpt2")
    with pytest.raises(ValueError, match="outside Tukey's fences"):
        lga(model, EDITS, layers=[3, 5], k=0.0)


def test_selectors_restore_model_state():
    model, _ = tiny("gpt2", n_layers=4, d_model=16, seed=9)
    model.train()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    weights = [p.detach().clone() for p in model.parameters()]
    gradratio(model, EDITS, TEXTS)
    lga(model, EDITS[:2] + [{"prompt": "Paris is in", "target_new": "Rome"}])
    assert flags == [p.requires_grad for p in model.parameters()]
    assert modes == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert not any(a in m.__dict__ for m in model.modules() for a in ("forward", "__nnsight__"))


def test_selector_bad_input():
    model, _ = model_for("llama")
    with pytest.raises(ValueError, match="empty"):
        gradratio(model, [], TEXTS)
    with pytest.raises(ValueError, match="empty"):
        gradratio(model, EDITS, [])
    with pytest.raises(ValueError, match="empty"):
        gradratio(model, EDITS, ["   "])
    with pytest.raises(ValueError, match="out of range"):
        gradratio(model, EDITS, TEXTS, layers=[-8])


# --------------------------------------------------------------------------- Tukey fences


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.floats(0, 5))
def test_tukey_fences_against_statistics(xs, k):
    f = tukey_fences(xs, k)
    if len(xs) == 1:
        assert f.inside == [True] and f.q1 == f.q3 == xs[0]
        return
    lo, hi = ref_fences(xs, k)
    tol = 1e-9 * (1 + max(map(abs, xs)))
    assert abs(f.lower - lo) <= tol and abs(f.upper - hi) <= tol
    for x, ins in zip(xs, f.inside):
        if x < lo - tol or x > hi + tol:
            assert not ins
        elif lo + tol < x < hi - tol:
            assert ins
    # Everything between the quartiles is inside; for n >= 3 that is never empty.
    assert all(ins for x, ins in zip(xs, f.inside) if f.q1 <= x <= f.q3)
    if len(xs) >= 3 or k >= 0.5:
        assert any(f.inside)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=2, max_size=30), st.integers(1, 50), st.integers(-100, 100))
def test_tukey_fences_affine_invariance(xs, a, b):
    f = tukey_fences(xs, 1.0)
    g = tukey_fences([a * x + b for x in xs], 1.0)
    assert f.inside == g.inside


def test_tukey_fences_example_and_errors():
    f = tukey_fences([1, 2, 3, 4, 100])  # default k = 1.5
    assert (f.q1, f.q3, f.lower, f.upper, f.k) == (2.0, 4.0, -1.0, 7.0, 1.5) and f.inside == [True] * 4 + [False]
    with pytest.raises(ValueError, match="at least one"):
        tukey_fences([])
    with pytest.raises(ValueError, match="finite"):
        tukey_fences([1.0, math.nan])
    with pytest.raises(ValueError, match="k"):
        tukey_fences([1.0, 2.0], k=-0.5)


@pytest.mark.parametrize("k", [0.0, 1.0, 1.5, 2.2, 3.0])
def test_k_moves_the_fences_by_k_iqr(k):
    rng = np.random.default_rng(int(k * 10))
    x = rng.standard_t(3, size=23).tolist()
    q1, q3 = np.percentile(x, [25, 75])  # numpy's default (linear) quantiles, as the code's
    f = tukey_fences(x, k)
    assert f.lower == pytest.approx(q1 - k * (q3 - q1)) and f.upper == pytest.approx(q3 + k * (q3 - q1))
    assert f.inside == [q1 - k * (q3 - q1) <= v <= q3 + k * (q3 - q1) for v in x]
    assert tukey_fences(x).k == 1.5


def test_lga_k_sets_its_fences():
    model, _ = model_for("llama")
    base = lga(model, EDITS)
    q1, q3 = np.percentile(base.scores, [25, 75])
    assert base.params["k"] == 1.5
    assert (base.params["lower"], base.params["upper"]) == pytest.approx((q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)))
    wide = lga(model, EDITS, k=2.2)
    assert (wide.params["lower"], wide.params["upper"]) == pytest.approx((q1 - 2.2 * (q3 - q1), q3 + 2.2 * (q3 - q1)))
    assert all(w or not b for w, b in zip(wide.eligible, base.eligible))  # a wider fence only adds layers
    with pytest.warns(DeprecationWarning, match="k="):
        old = lga(model, EDITS, fence=2.2)
    assert old.eligible == wide.eligible and old.params["k"] == 2.2


# --------------------------------------------------------------------------- the selectors' loss


def ref_answer_cross_entropy(model, tok, prompt, answer, eos=False):
    """Plain cross-entropy of the answer tokens (and EOS if asked) after the prompt."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(t)))


@pytest.mark.parametrize("arch", ["gpt2", "llama-bpe"])
def test_selector_loss_is_cross_entropy_over_the_answer_tokens_only(arch):
    model, tok = model_for(arch)
    new = [ref_answer_cross_entropy(model, tok, p, t) for p, t, _ in triples(EDITS)]
    old = [ref_answer_cross_entropy(model, tok, p, o) for p, _, o in triples(EDITS)]
    for kw in ({}, {"append_eos": False}):  # the default is the papers' loss
        g = gradratio(model, EDITS, TEXTS, min_layer=0, **kw)
        r = lga(model, EDITS, **kw)
        assert g.params["append_eos"] is False and r.params["append_eos"] is False
        assert g.params["edit_loss"] == pytest.approx(np.mean(new), rel=1e-5)
        assert r.params["new_loss"] == pytest.approx(np.mean(new), rel=1e-5)
        assert r.params["old_loss"] == pytest.approx(np.mean(old), rel=1e-5)
    with_eos = [ref_answer_cross_entropy(model, tok, p, t, eos=True) for p, t, _ in triples(EDITS)]
    assert gradratio(model, EDITS, TEXTS, min_layer=0, append_eos=True).params["edit_loss"] == \
        pytest.approx(np.mean(with_eos), rel=1e-5)
    assert abs(np.mean(with_eos) - np.mean(new)) > 1e-3  # the EOS term is not negligible


# --------------------------------------------------------------------------- result object


def test_layer_scores_result_api():
    model, _ = model_for("gpt2")
    for r in (gradratio(model, EDITS, TEXTS), lga(model, EDITS)):
        d = json.loads(json.dumps(r.to_dict()))
        assert d["selected"] == r.selected and len(d["scores"]) == N_LAYERS
        assert f"selected={r.selected}" in repr(r) and "<table>" in r._repr_html_()
        assert "<- selected" in r.to_table()
        ax = r.plot()
        colors = [tuple(p.get_facecolor()) for p in ax.patches[:N_LAYERS]]
        assert len(set(colors)) == len({(l == r.selected, e) for l, e in zip(r.layers, r.eligible)})

"""Attribution patching: the estimate equals the first-order change it claims to be (a
finite difference with plain hooks, written without gradlocate), its window sums, the
exact re-check, and cma_layer on top."""

from __future__ import annotations

import pytest
import torch

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.tracing import subject_token_range

PROMPT, SUBJECT, S = "So Paris is in", "Paris", 3


@pytest.fixture(scope="module")
def model_tok():
    return tiny("llama", n_layers=4, d_model=32, initializer_range=0.4, seed=1)


def _noise(tok, d=32):
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    return torch.randn(S, s1 - s0, d, generator=torch.Generator().manual_seed(0)), (s0, s1)


def _plain_prob(model, tok, noise, s_range, answer, patch=None):
    """The answer's mean probability over the corrupted rows; ``patch(l, h)`` may edit a
    block's output in place (plain forward hooks)."""
    ids = torch.tensor([tok(PROMPT)["input_ids"]] * S)
    hooks = [model.model.embed_tokens.register_forward_hook(
        lambda m, a, o: o + torch.nn.functional.pad(noise, (0, 0, s_range[0], o.shape[1] - s_range[1])))]
    if patch is not None:
        for l, block in enumerate(model.model.layers):
            hooks.append(block.register_forward_hook(lambda m, a, o, l=l: patch(l, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].double()
    finally:
        for hk in hooks:
            hk.remove()
    return float(logits.softmax(-1)[:, answer].mean())


def test_hidden_estimate_is_the_first_order_change(model_tok):
    model, tok = model_tok
    noise, s_range = _noise(tok)
    r = gl.causal_trace(model, PROMPT, SUBJECT, kind="hidden", noise=noise, method="atp", progress=False)
    assert r.estimated and r.method == "atp" and not r.exact.any()
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    clean = {}
    hooks = [b.register_forward_hook(lambda m, a, o, l=l: clean.__setitem__(l, (o[0] if isinstance(o, tuple) else o)
                                                                           .detach().clone()))
             for l, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for hk in hooks:
        hk.remove()
    low = _plain_prob(model, tok, noise, s_range, r.answer)
    assert r.low_score == pytest.approx(low, abs=1e-6)
    eps = 1e-3
    for t, l in [(s_range[0], 0), (s_range[1] - 1, 1), (len(r.tokens) - 1, 2), (s_range[1], 3)]:
        def patch(layer, h, t=t, l=l):
            if layer == l:
                h[:, t] += eps * (clean[l][0, t] - h[:, t])
        moved = _plain_prob(model, tok, noise, s_range, r.answer, patch)
        first_order = (moved - low) / eps  # d p / d eps at eps = 0: the linear estimate of a full restoration
        assert float(r.scores[t, l]) - r.low_score == pytest.approx(first_order, rel=2e-2, abs=1e-6), (t, l)


def test_tokens_before_the_subject_estimate_low(model_tok):
    model, tok = model_tok
    noise, s_range = _noise(tok)
    r = gl.causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=3, noise=noise, method="atp", progress=False)
    assert s_range[0] > 0
    assert torch.allclose(r.scores[: s_range[0]], torch.tensor(r.low_score), atol=1e-7)


def test_window_is_the_sum_of_single_layer_estimates(model_tok):
    model, tok = model_tok
    noise, _ = _noise(tok)
    one = gl.causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=1, noise=noise, method="atp", progress=False)
    three = gl.causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=3, noise=noise, method="atp", progress=False)
    eff = one.scores - one.low_score
    for l in range(4):
        js = list(gl.tracing.window_layers(l, 3, 4))
        torch.testing.assert_close(three.scores[:, l] - three.low_score, eff[:, js].sum(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_verified_cells_are_exact(model_tok, kind):
    model, tok = model_tok
    noise, _ = _noise(tok)
    exact = gl.causal_trace(model, PROMPT, SUBJECT, kind=kind, window=2, noise=noise, progress=False)
    est = gl.causal_trace(model, PROMPT, SUBJECT, kind=kind, window=2, noise=noise, method="atp", verify=5,
                          progress=False)
    assert int(est.exact.sum()) == 5 and est.stats["verified"] == 5
    torch.testing.assert_close(est.scores[est.exact], exact.scores[est.exact], atol=1e-6, rtol=0)
    t, l = est.best()
    assert est.exact[est.token_indices.index(t), est.layers.index(l)]
    assert "AtP estimate (5 cells verified)" in repr(est)
    assert est.high_score == pytest.approx(exact.high_score) and est.low_score == pytest.approx(exact.low_score)


def test_cma_layer_with_atp(model_tok):
    model, tok = model_tok
    edits = [{"prompt": PROMPT, "target_new": "Rome", "subject": SUBJECT},
             {"prompt": "The Nile flows through", "target_new": "Peru", "subject": "The Nile"}]
    r = gl.cma_layer(model, edits, samples=3, window=2, method="atp", progress=False)
    assert r.params["method"] == "atp" and len(r.scores) == 4
    rows = []
    for e in edits:
        tr = gl.causal_trace(model, e["prompt"], e["subject"], kind="mlp", window=2, samples=3,
                             std=r.params["std"], method="atp", progress=False)
        s0, s1 = tr.subject_range
        rows.append(tr.row(s1 - 1) - tr.low_score)
    torch.testing.assert_close(torch.tensor(r.scores, dtype=torch.float64), torch.stack(rows).double().mean(0),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="method must be"):
        gl.causal_trace(model, PROMPT, SUBJECT, method="fast")

"""Attribution patching: the estimate equals the first-order change it claims to be (per
corrupted sample, a finite difference of the answer's log-probability with plain hooks,
written without gradlocate, then exponentiated and averaged), its window sums, the exact
re-check, and cma_layer on top."""

from __future__ import annotations

import pytest
import torch

import gradlocate as gl
from gradlocate.models import tiny
from gradlocate.trace.core import subject_token_range

PROMPT, SUBJECT, S = "So Paris is in", "Paris", 3


@pytest.fixture(scope="module")
def model_tok():
    return tiny("llama", n_layers=4, d_model=32, initializer_range=0.4, seed=1)


def _noise(tok, d=32):
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    return torch.randn(S, s1 - s0, d, generator=torch.Generator().manual_seed(0)), (s0, s1)


def _plain_probs(model, tok, noise, s_range, answer, patch=None, site=None):
    """The answer's probability in each corrupted row (float64); ``patch(l, h)`` may edit
    layer ``l``'s output in place: the block's, or its ``site`` ("mlp") (plain hooks)."""
    ids = torch.tensor([tok(PROMPT)["input_ids"]] * S)
    hooks = [model.model.embed_tokens.register_forward_hook(
        lambda m, a, o: o + torch.nn.functional.pad(noise, (0, 0, s_range[0], o.shape[1] - s_range[1])))]
    if patch is not None:
        for l, block in enumerate(model.model.layers):
            mod = block if site is None else getattr(block, site)
            hooks.append(mod.register_forward_hook(lambda m, a, o, l=l: patch(l, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].double()
    finally:
        for hk in hooks:
            hk.remove()
    return logits.softmax(-1)[:, answer]


def _plain_prob(model, tok, noise, s_range, answer, patch=None):
    return float(_plain_probs(model, tok, noise, s_range, answer, patch).mean())


def _clean_outputs(model, tok, site=None):
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    clean = {}
    mods = [b if site is None else getattr(b, site) for b in model.model.layers]
    hooks = [m.register_forward_hook(lambda m, a, o, l=l: clean.__setitem__(l, (o[0] if isinstance(o, tuple) else o)
                                                                        .detach().clone()))
             for l, m in enumerate(mods)]
    with torch.no_grad():
        model(input_ids=ids)
    for hk in hooks:
        hk.remove()
    return clean


def _first_order(model, tok, noise, s_range, answer, clean, t, layers, site=None, eps=1e-3):
    """The estimate, from finite differences: per sample, d log p / d eps of moving the
    states at (t, each of layers) towards their clean values by eps; then
    mean_s min(1, p_s exp(that))."""
    def patch(layer, h):
        if layer in layers:
            h[:, t] += eps * (clean[layer][0, t] - h[:, t])
    p0 = _plain_probs(model, tok, noise, s_range, answer, site=site)
    p1 = _plain_probs(model, tok, noise, s_range, answer, patch, site=site)
    d = (p1.log() - p0.log()) / eps
    return float((p0 * d.exp()).clamp(max=1.0).mean())


def test_hidden_estimate_is_the_first_order_change(model_tok):
    model, tok = model_tok
    noise, s_range = _noise(tok)
    r = gl.causal_trace(model, PROMPT, SUBJECT, kind="hidden", noise=noise, method="atp", progress=False)
    assert r.estimated and r.method == "atp" and not r.exact.any()
    clean = _clean_outputs(model, tok)
    low = _plain_prob(model, tok, noise, s_range, r.answer)
    assert r.low_score == pytest.approx(low, abs=1e-6)
    moved = 0
    for t, l in [(s_range[0], 0), (s_range[1] - 1, 1), (len(r.tokens) - 1, 2), (s_range[1], 3)]:
        want = _first_order(model, tok, noise, s_range, r.answer, clean, t, {l})
        assert float(r.scores[t, l]) == pytest.approx(want, rel=2e-2, abs=1e-6), (t, l)
        moved += abs(want - low) > 0.05 * low
    assert moved >= 3  # estimates well away from low_score: the check can fail


def test_mlp_window_estimate_is_the_first_order_change_of_the_window(model_tok):
    """A window's estimate is one first-order step of restoring all its MLPs at once."""
    model, tok = model_tok
    noise, s_range = _noise(tok)
    r = gl.causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=3, noise=noise, method="atp", progress=False)
    clean = _clean_outputs(model, tok, "mlp")
    for t, l in [(s_range[1] - 1, 0), (s_range[1] - 1, 2), (len(r.tokens) - 1, 3)]:
        layers = set(gl.trace.core.window_layers(l, 3, 4))
        want = _first_order(model, tok, noise, s_range, r.answer, clean, t, layers, site="mlp")
        assert float(r.scores[t, l]) == pytest.approx(want, rel=2e-2, abs=1e-6), (t, l, layers)


def test_prob_space_is_plain_atp(model_tok):
    """space="prob": low_score plus the mean first-order change of p itself."""
    from gradlocate.trace.attribution import atp_estimates
    from gradlocate.trace.core import TracePrompt

    model, tok = model_tok
    noise, s_range = _noise(tok)
    h = gl.down_projections(model, tokenizer=tok)
    tp = TracePrompt.of(h, PROMPT, SUBJECT)
    with gl.interventions.using(h):
        est, answer, _, low, _ = atp_estimates(h, tp, ["hidden"], noise, None, 1, space="prob")
    clean = _clean_outputs(model, tok)
    eps = 1e-3
    for t, l in [(s_range[1] - 1, 1), (len(tp.ids) - 1, 2)]:
        def patch(layer, hs, t=t, l=l):
            if layer == l:
                hs[:, t] += eps * (clean[l][0, t] - hs[:, t])
        first = (_plain_prob(model, tok, noise, s_range, answer, patch) - low) / eps
        assert float(est["hidden"][t, l]) - low == pytest.approx(first, rel=2e-2, abs=1e-6)
    with pytest.raises(ValueError, match="space must be"):
        atp_estimates(h, tp, ["hidden"], noise, None, 1, space="logit")


def test_tokens_before_the_subject_estimate_low(model_tok):
    model, tok = model_tok
    noise, s_range = _noise(tok)
    r = gl.causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=3, noise=noise, method="atp", progress=False)
    assert s_range[0] > 0
    assert torch.allclose(r.scores[: s_range[0]], torch.tensor(r.low_score), atol=1e-7)


def test_window_sum():
    from gradlocate.trace.attribution import window_sum

    x = torch.arange(24.0).view(2, 3, 4)  # [samples, tokens, layers]
    got = window_sum(x, 3)
    for l in range(4):
        js = list(gl.trace.core.window_layers(l, 3, 4))
        torch.testing.assert_close(got[..., l], x[..., js].sum(-1))


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

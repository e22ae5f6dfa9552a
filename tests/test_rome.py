"""ROME, R-ROME and EMMET: the algebra against a plain re-implementation, the
update's defining properties, exact undo, architectures, and the covariance cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradlocate.data import EditRequest
from gradlocate.editors import editor_class, names, per_edit_deltas
from gradlocate.editors import covariance as cov
from gradlocate.editors import rank_one as ro
from gradlocate.editors.emmet import EMMET, emmet_ingredients
from gradlocate.editors.locft import EditTrainingError
from gradlocate.editors.rome import ROME, RROME, rome_update
from gradlocate.handles import resolve
from gradlocate.models import tiny

EDIT = {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"}
EDITS = [EDIT, {"prompt": "The Nile flows into", "subject": "The Nile", "target_new": "Rome"},
         {"prompt": "Mozart played the", "subject": "Mozart", "target_new": "drums"}]
#: Layer 0 of 2: the site output at the subject reaches the target positions only
#: through a later layer's attention (at the last layer δ could not move the NLL).
L = 0
FAST = {"v_num_grad_steps": 4, "context_template_length_params": [(4, 5)], "mom2_n_tokens": 1500}


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", n_layers=2, d_model=32, seed=0)[0]


@pytest.fixture(scope="module")
def C(llama):
    return cov.second_moment(llama, L, tokens=1500, cache=False, progress=False)


def _site_hook(module, store, delta=None, where=None):
    """A plain forward hook (the reference, not gradlocate's kernel): records the site's
    input and output, and adds ``delta`` at ``where``."""
    def hook(mod, args, out):
        store["k"], store["o"] = args[0].detach(), out.detach()
        if delta is not None:
            return out + where * delta
    return module.register_forward_hook(hook)


def _reference_rome(model, tok, layer, edit, prefixes, C, hp, averaged):
    """ROME's algebra with direct tensor code (byte tokenizer: one token per character, no BOS)."""
    site = model.model.layers[layer].mlp.down_proj
    texts = [p + edit["prompt"] for p in prefixes]
    end = edit["prompt"].find(edit["subject"]) + len(edit["subject"])
    last = [len((p + edit["prompt"][:end]).encode()) - 1 for p in prefixes]   # byte positions
    K, O, store = [], [], {}
    for t, i in zip(texts, last):
        hd = _site_hook(site, store)
        with torch.no_grad():
            model(input_ids=torch.tensor([list(t.encode())]))
        hd.remove()
        K.append(store["k"][0, i]); O.append(store["o"][0, i])
    K, O = torch.stack(K), torch.stack(O)
    tgt = list((" " + edit["target_new"]).encode())
    kl_text = f"{edit['subject']} is a"
    delta = torch.zeros(O.shape[1], requires_grad=True)
    opt, kl0, init = torch.optim.Adam([delta], lr=hp["v_lr"]), None, O[0]
    for it in range(hp["v_num_grad_steps"]):
        nll = 0.0
        for t, i in zip(texts, last):
            ids = list(t.encode()) + tgt[:-1]
            where = torch.zeros(1, len(ids), 1); where[0, i] = 1
            hd = _site_hook(site, {}, delta, where)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            hd.remove()
            n = len(t.encode())
            nll = nll - sum(logp[n - 1 + j, tgt[j]] for j in range(len(tgt))) / len(tgt)
        nll = nll / len(texts)
        where = torch.zeros(1, len(kl_text), 1); where[0, len(edit["subject"]) - 1] = 1
        hd = _site_hook(site, {}, delta, where)
        klp = torch.log_softmax(model(input_ids=torch.tensor([list(kl_text.encode())])).logits[0], -1)
        hd.remove()
        kl_now = klp[len(edit["subject"]) - 1][None]
        kl0 = kl_now.detach() if kl0 is None else kl0
        kl = (kl_now.exp() * (kl_now - kl0)).sum()
        loss = nll + hp["kl_factor"] * kl + hp["v_weight_decay"] * delta.norm() / init.norm() ** 2
        if loss.item() < ro.EARLY_STOP or it == hp["v_num_grad_steps"] - 1:
            break
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            if delta.norm() > hp["clamp_norm_factor"] * init.norm():
                delta.mul_(hp["clamp_norm_factor"] * init.norm() / delta.norm())
    v_star = init + delta.detach()
    k_bar = K.mean(0)
    k_den, o_ref = (k_bar, O.mean(0)) if averaged else (K[0], O[0])
    u = torch.inverse(C.double()) @ k_bar.double()
    return torch.outer((v_star - o_ref).double(), u) / (k_den.double() @ u)


@pytest.mark.parametrize("cls", [ROME, RROME])
def test_matches_plain_reimplementation(llama, C, cls):
    model = llama
    ed = cls(model, L, covariance=C, progress=False, **FAST)
    prefixes = [p for g in ed.templates() for p in g]
    want = _reference_rome(model, ed.h.require_tokenizer(), L, EDIT, prefixes, C, ed.hp, cls is RROME)
    with ed:
        ed.fit([EDIT])
        got = ed.delta.double()
    torch.testing.assert_close(got, want.float().double(), rtol=1e-5, atol=1e-5)


def _update(model, cls, C, edit=EDIT, **kw):
    ed = cls(model, L, covariance=C, progress=False, **{**FAST, **kw})
    return ed, rome_update(ed.h, L, ro_edit(edit), ed.templates(), C, ed.hp, averaged=cls is RROME)


def ro_edit(e):
    from gradlocate.data import as_edits

    return as_edits([e])[0]


def _prefixed(ed, edit=EDIT):
    tok = ed.h.require_tokenizer()
    return [ro.locate(tok, p + edit["prompt"], edit["subject"], len(p)) for g in ed.templates() for p in g]


def test_update_maps_key_to_value_and_spares_orthogonal_inputs(llama, C):
    for cls in (ROME, RROME):
        ed, (dW, info) = _update(llama, cls, C)
        with ed:
            ed._apply(dW)
            K, O = ro.site_io(ed.h, L, _prefixed(ed))
            # R-ROME: the edited layer maps k̄ to v* (its output is linear in the key);
            # ROME: the bare prompt's key k_p to v*.
            got = O.mean(0) if cls is RROME else O[0]
            torch.testing.assert_close(got, info["v_star"], rtol=1e-4, atol=1e-4)
        u = torch.linalg.solve(C.double(), info["k_bar"].double())
        x = torch.randn(C.shape[0], dtype=torch.float64)
        x = x - (u @ x) / (u @ u) * u                # (C⁻¹k̄)ᵀx = 0
        assert (dW @ x).abs().max() < 1e-8 * dW.abs().max() * x.abs().max() * x.numel()


def test_rrome_and_rome_differ_only_in_denominator_and_residual(llama, C):
    _, (d_rome, a) = _update(llama, ROME, C)
    _, (d_rrome, b) = _update(llama, RROME, C)
    torch.testing.assert_close(a["v_star"], b["v_star"])          # the same v* optimisation
    torch.testing.assert_close(a["k_bar"], b["k_bar"])
    # R-ROME's update from ROME's run: one key/v* computation serves both (benchmarks/rome_study.py)
    torch.testing.assert_close(ro.rank_one(C, a["k_bar"], a["k_bar"], a["v_star"] - a["o_bar"]), d_rrome,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ro.rank_one(C, a["k_bar"], a["k_prompt"], a["v_star"] - a["o_prompt"]), d_rome,
                               rtol=1e-9, atol=1e-12)
    assert not torch.allclose(d_rome, d_rrome)                     # several templates: they differ ...
    u_a, u_b = torch.linalg.svd(d_rome)[2][0], torch.linalg.svd(d_rrome)[2][0]
    assert abs(float(u_a @ u_b)) == pytest.approx(1.0, abs=1e-9)   # ... but share the key direction C⁻¹k̄
    # with the bare prompt alone (k̄ = k_p, ō = o_p) they coincide
    _, (s_rome, _) = _update(llama, ROME, C, context_template_length_params=[])
    _, (s_rrome, _) = _update(llama, RROME, C, context_template_length_params=[])
    torch.testing.assert_close(s_rome, s_rrome, rtol=1e-9, atol=1e-12)


def test_emmet_one_edit_is_the_rank_one_update_and_many_meet_constraints(llama, C):
    single = {**FAST, "context_template_length_params": []}
    _, (d_rrome, _) = _update(llama, RROME, C, **single)
    d_emmet, _ = per_edit_deltas("emmet", resolve(llama), L, [EDIT], covariance=C, emmet_lambda=0.0, **single)
    torch.testing.assert_close(d_emmet[0].double(), d_rrome.float().double(), rtol=1e-5, atol=1e-6)
    # several edits, λ = 0: ΔW k_i = r_i for each
    ed = EMMET(llama, L, covariance=C, progress=False, emmet_lambda=0.0, **FAST)
    groups = ed.templates()
    ing = [emmet_ingredients(ed.h, L, ro_edit(e), groups, ed.hp) for e in EDITS]
    K, R = torch.stack([g["key"] for g in ing]).double(), torch.stack([g["residual"] for g in ing]).double()
    with ed:
        r = ed.fit(EDITS)
        assert len(r.update_norms) == 1 and r.n_edits == 3
        torch.testing.assert_close(ed.delta.double() @ K.T, R.T, rtol=1e-3, atol=1e-4)
    # λ > 0 shrinks toward no change
    lam = EMMET(llama, L, covariance=C, emmet_lambda=10.0, mom2_update_weight=1.0,
                                                 progress=False, **FAST).update(C, K, R)
    assert (lam @ K.T - R.T).norm() > 1e-3 * R.norm()


def test_undo_after_fit_exception_interrupt_and_nan(llama, C, monkeypatch):
    w0 = llama.model.layers[L].mlp.down_proj.weight.detach().clone()
    same = lambda: torch.equal(llama.model.layers[L].mlp.down_proj.weight, w0)  # noqa: E731
    with ROME(llama, L, covariance=C, progress=False, **FAST) as ed:
        ed.fit(EDITS[:2])
        assert ed.edited and not same()
    assert same()
    for exc in (RuntimeError("injected"), KeyboardInterrupt()):
        calls = []

        def boom(step, exc=exc):
            calls.append(step.step)
            if len(calls) > FAST["v_num_grad_steps"] + 1:   # inside the second edit: the first is applied
                raise exc
        ed = RROME(llama, L, covariance=C, progress=False, callback=boom, **FAST)
        with pytest.raises(type(exc)):
            ed.fit(EDITS[:2])
        assert same()
    monkeypatch.setattr(ro, "_nll", lambda logp, vb: torch.tensor(float("nan")))
    for cls in (ROME, EMMET):
        with pytest.raises(EditTrainingError, match="nan"):
            cls(llama, L, covariance=C, progress=False, **FAST).fit(EDITS[:2])
        assert same()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "qwen2", "gpt_neox"])
def test_architectures_edit_and_restore(arch):
    model, _ = tiny(arch, n_layers=2, d_model=32)
    h = resolve(model)
    w0 = h[L].parameter.detach().clone()
    C = cov.second_moment(h, L, tokens=800, cache=False, progress=False)
    ed, (dW, info) = _update(h, ROME, C)
    with ed:
        ed._apply(dW)
        _, O = ro.site_io(ed.h, L, _prefixed(ed)[:1])
        torch.testing.assert_close(O[0], info["v_star"], rtol=1e-4, atol=1e-4)   # the layout is right
    assert torch.equal(h[L].parameter, w0)
    with EMMET(h, L, covariance=C, progress=False, **FAST) as em:
        em.fit(EDITS[:2])
        assert em.edited and tuple(em.delta.shape) == (h.d_model, h.d_mlp)
    assert torch.equal(h[L].parameter, w0)


@pytest.mark.parametrize("name", ["r-rome", "emmet"])
def test_memo_samples_the_context_templates_once_and_changes_nothing(llama, C, name, monkeypatch):
    """A memo kept across layers: the templates are sampled once, the deltas are the same
    as without it (bit for bit), and LocFT-BF accepts the memo and ignores it."""
    import gradlocate.editors.rome as rome_module

    h = resolve(llama)
    sampled = []
    real = rome_module.context_templates
    monkeypatch.setattr(rome_module, "context_templates", lambda *a, **k: sampled.append(1) or real(*a, **k))
    memo: dict = {}
    with_memo = [per_edit_deltas(name, h, layer, EDITS[:2], memo=memo, covariance=C, **FAST)[0] for layer in (0, 1)]
    assert len(sampled) == 1 and len(memo) == 1
    plain = [per_edit_deltas(name, h, layer, EDITS[:2], covariance=C, **FAST)[0] for layer in (0, 1)]
    assert len(sampled) == 3
    assert all(torch.equal(a, b) for a, b in zip(with_memo, plain))
    other = {**FAST, "context_template_length_params": [(3, 5)]}  # other lengths: sampled anew
    per_edit_deltas(name, h, 0, EDITS[:1], memo=memo, covariance=C, **other)
    assert len(sampled) == 4 and len(memo) == 2
    d, _ = per_edit_deltas("locft", h, 0, EDITS[:1], memo=memo, lr=1e-2, epochs=2)
    assert tuple(d.shape) == (1, h.d_model, h.d_mlp) and len(memo) == 2


def test_registry_and_per_edit_deltas(llama, C):
    assert {"rome", "r-rome", "emmet"} <= set(names()) and editor_class("rrome") is RROME
    w0 = llama.model.layers[L].mlp.down_proj.weight.detach().clone()
    d, summaries = per_edit_deltas("rome", resolve(llama), L, EDITS[:2], covariance=C, **FAST)
    assert tuple(d.shape) == (2, 32, 128) and len(summaries) == 2
    assert torch.equal(llama.model.layers[L].mlp.down_proj.weight, w0)
    with ROME(llama, L, covariance=C, progress=False, **FAST) as ed:
        r = ed.fit(EDITS[:1])
        torch.testing.assert_close(ed.delta, d[0], rtol=1e-5, atol=1e-6)
    # the matrix's training fields: v*'s last loss, and converged iff it fell below the early stop
    assert summaries[0]["final_loss"] == r.histories[0][-1] and summaries[0]["steps"] == len(r.histories[0])
    assert summaries[0]["converged"] == (r.histories[0][-1] < ro.EARLY_STOP)
    _, strict = per_edit_deltas("rome", resolve(llama), L, EDITS[:1], covariance=C, **{**FAST, "v_num_grad_steps": 1})
    assert strict[0]["steps"] == 1 and strict[0]["converged"] is (strict[0]["final_loss"] < ro.EARLY_STOP)
    assert set(r.to_dict()) >= {"update_norms", "histories", "timings"} and "ROME" in repr(r)
    with pytest.raises(ValueError, match="subject"):
        ROME(llama, L, covariance=C, **FAST).fit([{"prompt": "a b", "target_new": "c"}])
    with pytest.raises(ValueError, match="ROME has no setting 'v_steps' \\(did you mean 'v_num_grad_steps'\\?\\)"):
        ROME(llama, L, v_steps=3)


def test_second_moment_matches_a_plain_loop(llama):
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    got = cov.second_moments(llama, [0, 1], tokens=50, corpus=texts, cache=False, progress=False)
    tok = resolve(llama).require_tokenizer()
    for layer in (0, 1):
        store, ks = {}, []
        hd = _site_hook(llama.model.layers[layer].mlp.down_proj, store)
        for t in texts:
            with torch.no_grad():
                llama(input_ids=torch.tensor([tok(t)["input_ids"]]))
            ks.append(store["k"][0])
        hd.remove()
        k = torch.cat(ks)[:50].double()
        torch.testing.assert_close(got[layer], (k.T @ k / 50).float(), rtol=1e-5, atol=1e-7)
    one = cov.second_moments(llama, [1], tokens=50, corpus=texts, cache=False, progress=False)
    torch.testing.assert_close(one[1], got[1])                 # all layers in one pass = one at a time


def test_covariance_cache_is_keyed_and_refuses_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLOCATE_CACHE", str(tmp_path))
    model, _ = tiny("llama", n_layers=2, d_model=16)
    a = cov.second_moment(model, 1, tokens=200, progress=False)
    files = list((tmp_path / "mom2").glob("*.pt"))
    assert len(files) == 1
    calls = []
    real = cov._collect
    monkeypatch.setattr(cov, "_collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(cov.second_moment(model, 1, tokens=200, progress=False), a)
    assert calls == []                                           # a hit
    cov.second_moment(model, 1, tokens=300, progress=False)
    assert calls == [1]                                          # another count: another key
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)       # another model
    b = cov.second_moment(model, 1, tokens=200, progress=False)
    assert calls == [1, 1] and not torch.allclose(a, b)
    path = sorted((tmp_path / "mom2").glob("*.pt"))[0]           # a file holding another key
    saved = torch.load(path, weights_only=True)
    saved["key"] = saved["key"].replace('"tokens"', '"tokens_"')
    torch.save(saved, path)
    with pytest.raises(cov.StaleStatisticsError):
        cov._load(path, {"x": 1})


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "qwen2", "gpt_neox"])
def test_value_cache_agrees_with_full_forwards_and_skips_the_blocks_below(arch):
    """v* with the frozen blocks computed once (residual-additive block: its output; Gemma's
    post-norm: the stream entering it), with and without the positions before the subject
    taken from a key/value cache, equals v* from full forwards; the cached steps do not run
    the blocks below the edited layer."""
    model, _ = tiny(arch, n_layers=4, d_model=32)
    h = resolve(model)
    edit = EditRequest(**EDIT)
    # (not the last layer: there δ moves no target token, its gradient is float noise that Adam normalises)
    hp = dict(steps=6, lr=0.05, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=40)
    calls = {"n": 0}
    hook = h[0].module.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    variants = {"full": dict(cache=False), "blocks": dict(cache=True, reuse_prefix=False),
                "blocks+prefix": dict(cache=True, reuse_prefix=True)}
    # block 0 runs: every step (full); twice to probe additivity and once to record the frozen
    # state (blocks); and once more for the prefix's keys and values (blocks+prefix)
    runs = {"full": None, "blocks": 3, "blocks+prefix": 4}
    try:
        for layer in (0, 1, 2):
            fits = {}
            for name, kw in variants.items():
                calls["n"] = 0
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # the prefix cache engages on every architecture here
                    fits[name] = ro.optimise_value(h, layer, edit, ["{}", "Hi. {}", "A longer one here. {}"],
                                                   **kw, **hp)
                if layer > 0:
                    assert calls["n"] == (runs[name] or len(fits[name].history)), (layer, name)
            ref = fits["full"]
            assert len(ref.history) == 6 and float(ref.delta.norm()) > 0
            for name in ("blocks", "blocks+prefix"):
                a = fits[name]
                assert len(a.history) == 6, name
                torch.testing.assert_close(a.delta, ref.delta, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a.target_init, ref.target_init, rtol=1e-5, atol=1e-6)
                assert a.history == pytest.approx(ref.history, rel=1e-5), name
    finally:
        hook.remove()


def test_value_prefix_reuse_says_when_it_cannot_engage(monkeypatch):
    """A model whose forward takes no key/value cache: v* warns that prefix reuse is off,
    and gives the same δ as without it."""
    model, _ = tiny("llama", n_layers=2, d_model=32)
    h = resolve(model)
    hp = dict(steps=3, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4)
    ref = ro.optimise_value(h, 1, EditRequest(**EDIT), ["{}", "Hi. {}"], reuse_prefix=False, **hp)
    monkeypatch.setattr(ro._compat, "cache_argument", lambda root: None)
    with pytest.warns(UserWarning, match="prefix reuse is off .*takes no key/value cache"):
        got = ro.optimise_value(h, 1, EditRequest(**EDIT), ["{}", "Hi. {}"], **hp)
    torch.testing.assert_close(got.delta, ref.delta, rtol=0, atol=0)


def test_matrix_with_a_rank_one_editor_samples_the_templates_once(llama, monkeypatch):
    """Four chunks (2 layers x 2 edits, chunk 1) share one sampling of the templates."""
    import numpy as np

    import gradlocate.editors.rome as rome_module
    from gradlocate.golden.matrix import matrix

    sampled = []
    real = rome_module.context_templates
    monkeypatch.setattr(rome_module, "context_templates", lambda *a, **k: sampled.append(1) or real(*a, **k))
    m = matrix(llama, EDITS[:2], editor="r-rome", hparams={**FAST, "mom2_adjustment": False}, layers=[0, 1],
               chunk=1, capability_edits=0, progress=False)
    assert len(sampled) == 1 and np.isfinite(m.overall()).all()

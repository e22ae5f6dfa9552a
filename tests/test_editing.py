"""LocFT-BF against an independent plain-PyTorch loop; undo, faults and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlocate import EditTrainingError, LocFTBF, down_projections, evaluate
from gradlocate.editors.executors import Executor, probe_additive
from gradlocate.gradients import edit_batch
from gradlocate.interventions import using
from gradlocate.editors.locft import auto_edits_per_step
from gradlocate.losses import head_nll
from gradlocate.models import tiny

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome"},
    {"prompt": "Water boils at", "target_new": "fifty degrees"},
    {"prompt": "My favourite colour is", "target_new": "green"},
    {"prompt": "Q: 2+2?", "target_new": "five"},
    {"prompt": "The Eiffel tower stands in the city of", "target_new": "Berlin"},
]


def _model(arch):
    kw = {"d_mlp": 48} if arch == "llama" else {}
    return tiny(arch, n_layers=4, d_model=32, seed=0, **kw)


@pytest.fixture(scope="module")
def gpt2():
    return _model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.fixture(scope="module")
def gemma():
    return _model("gemma3_text")


@pytest.fixture(scope="module")
def llama_bpe():
    from gradlocate.models import bpe_tokenizer

    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, seed=0, tokenizer=bpe_tokenizer())


def _models(request, arch):
    return request.getfixturevalue({"gpt2": "gpt2", "llama": "llama", "gemma3_text": "gemma",
                                    "llama-bpe": "llama_bpe"}[arch])


# --------------------------------------------------------------------------- plain reference


def plain_rows(tok, edits):
    """Prompt ids, then the target with a leading space, then EOS (independent of the library)."""
    rows = []
    for e in edits:
        p = tok(e["prompt"])["input_ids"]
        t = tok(("" if e["prompt"][-1:].isspace() else " ") + e["target_new"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p, t))
    return rows


def plain_row_loss(model, p, t):
    """Mean NLL of the target tokens of one unpadded sequence, from the full logits."""
    ids = torch.tensor([p + t])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return -sum(logp[len(p) + k - 1, tok] for k, tok in enumerate(t)) / len(t)


def plain_locft(model, tok, edits, weight, *, lr, batch_size, epochs, seed, threshold):
    """LocFT-BF written from the definition: full forward per mini-batch (padded),
    masked mean NLL per row, mean over rows, Adam, step only if loss >= threshold,
    stop after an epoch whose mean loss < threshold."""
    rows = plain_rows(tok, edits)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    model.eval()
    opt = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history, orders = [], []
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=gen)
        orders.append(order.tolist())
        total = 0.0
        for idx in order.split(batch_size):
            chunk = [rows[i] for i in idx.tolist()]
            width = max(len(p) + len(t) for p, t in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            am = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, t) in enumerate(chunk):
                ids[r, : len(p) + len(t)] = torch.tensor(p + t)
                am[r, : len(p) + len(t)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=am).logits.float(), -1)
            losses = []
            for r, (p, t) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
                losses.append(-logp[r, pos, torch.tensor(t)].mean())
            loss = torch.stack(losses).mean()
            total += loss.item() * len(chunk)
            if loss.item() >= threshold:
                opt.zero_grad()
                loss.backward()
                opt.step()
        history.append(total / len(rows))
        if history[-1] < threshold:
            break
    weight.grad = None
    for p, f in flags:
        p.requires_grad_(f)
    return history, orders


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text", "llama-bpe"])
@pytest.mark.parametrize("cache", ["none", "down_input", "residual"])
@pytest.mark.parametrize("head", ["full", "select", "fused"])
def test_every_executor_equals_the_plain_forward(request, arch, cache, head):
    """The activation cache and the selective / fused head change how a loss is
    computed, never its value: each against one unpadded full forward per edit."""
    model, tok = _models(request, arch)
    h = down_projections(model)
    if cache == "down_input" and arch == "gemma3_text":
        with torch.no_grad(), using(h):  # Gemma's post-feed-forward norm: not residual-additive
            assert probe_additive(h, 2, edit_batch(h, [EDITS[0]["prompt"]], [EDITS[0]["target_new"]], True)) == \
                (False, True)
        return
    batch = edit_batch(h, [e["prompt"] for e in EDITS], [e["target_new"] for e in EDITS], True)
    rows = torch.tensor([4, 0, 2])  # an unsorted subset: rows index the cached activations
    with torch.no_grad(), using(h), Executor(h, 2, batch, cache, head) as ex:
        got = ex.losses(rows)
        assert (ex.cache_bytes > 0) == (cache != "none")
        want = torch.tensor([float(plain_row_loss(model, *plain_rows(tok, EDITS)[i])) for i in rows.tolist()])
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,want", [("gpt2", ("down_input", "fused")), ("gemma3_text", ("residual", "fused"))])
def test_auto_picks_the_fast_executor(request, arch, want):
    model, _ = _models(request, arch)
    r = LocFTBF(model, 2, epochs=1, progress=False).fit(EDITS[:2])
    assert (r.cache_mode, r.head_mode) == want


def test_fused_head_nll_and_gradient_match_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    b = torch.randn(50, generator=g, dtype=torch.float64)
    target = torch.randint(0, 50, (7,), generator=g)
    scale = torch.randn(7, generator=g, dtype=torch.float64)
    for bias in (None, b):
        head = nn.Linear(16, 50, bias=bias is not None, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(w)
            if bias is not None:
                head.bias.copy_(bias)
        nll = head_nll(h, head, target, chunk=8)  # 8 does not divide 50: a ragged last chunk
        (gh,) = torch.autograd.grad((nll * scale).sum(), h)
        logits = h @ w.T + (0 if bias is None else bias)
        ref = -torch.log_softmax(logits, -1)[torch.arange(7), target]
        (gref,) = torch.autograd.grad((ref * scale).sum(), h)
        assert torch.allclose(nll.double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(gh.double(), gref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch,layer", [("gpt2", 2), ("llama", 1), ("gemma3_text", 2), ("llama-bpe", 2)])
@pytest.mark.parametrize("cache", [True, False])
def test_fit_matches_plain_loop(request, arch, layer, cache):
    model, tok = _models(request, arch)
    ft = LocFTBF(model, layer, lr=1e-2, edits_per_step=2, epochs=4, seed=3, loss_threshold=0.0, cache=cache,
                 progress=False)
    weight = ft.handle.parameter
    w0 = weight.detach().clone()
    r = ft.fit(EDITS)
    got = weight.detach().clone()
    ft.restore()
    hist, orders = plain_locft(model, tok, EDITS, weight, lr=1e-2, batch_size=2, epochs=4, seed=3, threshold=0.0)
    want = weight.detach().clone()
    weight.data.copy_(w0)
    assert r.orders == orders
    assert r.steps == [3, 3, 3, 3] and not r.converged
    assert r.history == pytest.approx(hist, rel=1e-5)
    assert _rel(got - w0, want - w0) < 1e-4  # the update itself agrees
    assert _rel(got, want) < 1e-5


def test_cached_equals_uncached_and_thresholds_apply(sharp):
    """With the real thresholds (skip below 1e-2, stop below 1e-2), on a model that can
    reach them."""
    model, tok = sharp
    edits = [{"prompt": "The capital of France is", "target_new": "Rome"},
             {"prompt": "Water boils at", "target_new": "fifty"}]
    runs = {}
    # A budget well past where the loss crosses 1e-2 (about 60 epochs; the exact epoch
    # moves with the torch release's float rounding), so the stop is what is tested.
    for cache in (True, False):
        ft = LocFTBF(model, 3, lr=0.05, edits_per_step=1, epochs=150, cache=cache, progress=False)
        r = ft.fit(edits)
        assert r.converged
        runs[cache] = (ft.handle.parameter.detach().clone(), list(r.history), list(r.steps))
        ft.restore()
    hist, _ = plain_locft(model, tok, edits, ft.handle.parameter, lr=0.05, batch_size=1, epochs=150, seed=0,
                          threshold=1e-2)
    want = ft.handle.parameter.detach().clone()
    ft.restore()
    assert _rel(runs[True][0], runs[False][0]) < 1e-5
    assert _rel(runs[True][0], want) < 1e-5
    # abs: logits here are ~100 (initializer_range=1), so weights equal to 1e-6 (float32
    # summation order differs between CPUs) move a 0.01 loss by ~1e-6 absolute, 1e-4 relative
    assert runs[True][1] == pytest.approx(hist, rel=1e-4, abs=1e-5)
    assert runs[True][1][-1] < 1e-2 and len(runs[True][1]) < 150  # stopped early
    assert any(s < 2 for s in runs[True][2])  # some mini-batch was below the threshold and skipped


@pytest.fixture(scope="module")
def sharp():
    """A tiny GPT-2 whose logits can be confident: random tiny models with the usual
    init have near-uniform logits (loss stuck near log(258)); large embeddings
    (initializer_range=1) let one down-projection drive the loss below 1e-2."""
    return tiny("gpt2", n_layers=4, d_model=32, initializer_range=1.0)


def test_learns_edits_quickly(sharp):
    model, _ = sharp
    pre = evaluate(model, EDITS[:3], generation=False)
    assert pre.teacher_forced["reliability"] < 0.5
    with LocFTBF(model, 3, lr=0.05, progress=False) as ft:
        r = ft.fit(EDITS[:3])
        ev = evaluate(model, EDITS[:3], generation=True)
        assert ev.teacher_forced["reliability"] == 1.0
        assert ev.generation["reliability"] == 1.0
        assert r.edits_per_step == auto_edits_per_step(3) == 1
        assert r.history[-1] < r.history[0]
    assert not ft.edited


def test_auto_edits_per_step():
    assert [auto_edits_per_step(n) for n in (1, 8, 16, 80, 799, 800, 3000)] == [1, 1, 2, 10, 99, 100, 100]
    with pytest.raises(ValueError):
        auto_edits_per_step(0)


# --------------------------------------------------------------------------- undo and faults


def _tensors(model):
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _changed(model, before):
    now = {f"p:{n}": p for n, p in model.named_parameters()}
    now.update({f"b:{n}": b for n, b in model.named_buffers()})
    return sorted(k for k, t in before.items() if not torch.equal(now[k].detach(), t))


def _clean(model):
    """No forward left patched, no hook left installed."""
    for m in model.modules():
        assert "forward" not in m.__dict__ and "__nnsight__" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_the_edited_weight_changes_and_restore_is_exact(request, arch):
    model, _ = _models(request, arch)
    before = _tensors(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    ft = LocFTBF(model, 1, lr=1e-2, epochs=3, progress=False)
    name = f"p:{ft.handle.path}.weight"
    ft.fit(EDITS)
    assert _changed(model, before) == [name]
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert ft.handle.parameter.grad is None
    _clean(model)
    ft.restore()
    assert _changed(model, before) == []
    model.eval()


def test_context_manager_restores_and_commit_keeps(gpt2):
    model, _ = gpt2
    before = _tensors(model)
    with LocFTBF(model, 2, lr=1e-2, epochs=2, progress=False) as ft:
        ft.fit(EDITS[:2])
        assert ft.edited
    assert _changed(model, before) == []
    with LocFTBF(model, 2, lr=1e-2, epochs=2, progress=False) as ft:
        ft.fit(EDITS[:2])
        ft.commit()
    assert _changed(model, before) == [f"p:{ft.handle.path}.weight"]
    with pytest.raises(RuntimeError, match="committed"):
        ft.restore()
    # put the model back for the other tests
    with torch.no_grad():
        ft.handle.parameter.copy_(before[f"p:{ft.handle.path}.weight"])


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_during_fit_restores(gpt2, exc):
    model, _ = gpt2

    def callback(step):
        if step.epoch == 1 and step.batch == 1:
            raise exc

    before = _tensors(model)
    ft = LocFTBF(model, 2, lr=1e-2, edits_per_step=2, epochs=5, progress=False, callback=callback)
    with pytest.raises(type(exc)):
        ft.fit(EDITS)
    assert _changed(model, before) == []
    assert all(p.requires_grad for p in model.parameters())
    _clean(model)


def test_nan_loss_stops_restores_and_names_the_edits(llama):
    model, _ = llama
    before = _tensors(model)
    norm = model.model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.fill_(float("nan"))
    try:
        ft = LocFTBF(model, 1, edits_per_step=5, progress=False)
        with pytest.raises(EditTrainingError, match="Water boils at") as info:
            ft.fit(EDITS)
        assert "nan" in str(info.value)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert _changed(model, before) == []
    _clean(model)


# --------------------------------------------------------------------------- modes and input


def test_cache_modes(gpt2, gemma):
    m, _ = gpt2
    g, _ = gemma
    cases = [(m, 2, "auto", None, "down_input"), (g, 2, "auto", None, "residual"), (g, 0, "auto", None, "none"),
             (m, 2, False, None, "none"), (m, 2, "auto", 0, "none"), (m, 0, True, 0, "down_input")]
    for model, layer, cache, budget, want in cases:
        kw = {} if budget is None else {"cache_budget": budget}
        ft = LocFTBF(model, layer, cache=cache, epochs=1, progress=False, **kw)
        r = ft.fit(EDITS[:2])
        ft.restore()
        assert r.cache_mode == want, (layer, cache, budget)
        assert (r.cache_bytes > 0) == (want != "none")


def test_bad_input(gpt2):
    model, _ = gpt2
    with pytest.raises(ValueError, match="out of range"):
        LocFTBF(model, 4)
    with pytest.raises(TypeError, match="one layer|parameter 'layer'"):  # the latter: the test-time type checker
        LocFTBF(model, [1, 2])
    for kw, word in [({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"edits_per_step": 0}, "edits_per_step"),
                     ({"epochs": 0}, "epochs"), ({"cache": "yes"}, "cache"), ({"head": "x"}, "head"),
                     ({"loss_threshold": -1}, "loss_threshold"), ({"cache_budget": -1}, "cache_budget")]:
        with pytest.raises(ValueError, match=word):
            LocFTBF(model, 1, **kw)
    ft = LocFTBF(model, -1, progress=False)
    assert ft.layer == 3
    with pytest.raises(ValueError, match="empty"):
        ft.fit([])
    with pytest.raises(ValueError, match="target"):
        ft.fit([{"prompt": "a", "target_new": "  "}])
    assert not ft.edited


def test_negative_layer_nnsight_wrapper_and_display(gpt2):
    from nnsight import NNsight

    model, tok = gpt2
    wrapped = NNsight(model)
    ft = LocFTBF(wrapped, -2, tokenizer=tok, lr=1e-2, epochs=3, progress=False)
    r = ft.fit(EDITS[:2])
    assert ft.layer == 2 and r.epochs == 3 and len(r.history) == 3
    d = r.to_dict()
    assert d["history"] == r.history and d["layer"] == 2 and d["cache_mode"] == "down_input"
    assert d["converged"] is False and d["final_loss"] == r.history[-1]
    assert "LocFTBF(layer=2" in repr(ft) and "edited" in repr(ft)
    assert "3 epoch(s)" in repr(r) and "stopped at its epoch budget (3) above its loss target" in repr(r)
    assert ft.delta.shape == (32, 128)
    import matplotlib

    matplotlib.use("Agg")
    ax = r.plot()
    assert len(ax.lines[0].get_xdata()) == 3
    ft.restore()
    assert not ft.edited and math.isfinite(r.history[-1])
    assert isinstance(ft.h.root, nn.Module)

"""The intervention kernel on its own: each tool, alone and combined, against the same
change made with plain torch hooks (``register_forward_hook`` / ``register_forward_pre_hook``),
outputs and gradients, on several architectures; the execution order it relies on; and
that every forward a gradlocate entry point makes goes through :func:`run`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradlocate as gl
from gradlocate import down_projections, interventions
from gradlocate.evaluation import greedy_generate
from gradlocate.interventions import (Patch, capture, edited, from_layer, head_at, no_cache, noised, replaced,
                                      restored, rewrap, run, states, stop_after, using)
from gradlocate.losses import logits_of
from gradlocate.models import byte_tokenizer, tiny

ARCHS = ["llama", "gpt2", "gemma3_text", "gpt_neox"]
ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def h(request):
    model, tok = tiny(request.param, n_layers=3, d_model=16, seed=0)
    return down_projections(model, tokenizer=tok)


def ids_of(h, rows=2, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (rows, width), generator=g)


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


# --------------------------------------------------------------------------- the reference: plain hooks


@contextlib.contextmanager
def hooked(*specs) -> Iterator[None]:
    """Plain torch hooks for the block: ``("out", module, fn(output) -> new or None)``,
    ``("in", module, fn(args, kwargs) -> (args, kwargs))``."""
    handles = []
    for kind, m, fn in specs:
        if kind == "out":
            handles.append(m.register_forward_hook(lambda mod, a, o, fn=fn: fn(o)))
        else:
            handles.append(m.register_forward_pre_hook(lambda mod, a, k, fn=fn: fn(a, k), with_kwargs=True))
    try:
        yield
    finally:
        for x in handles:
            x.remove()


def loss_of(logits):
    return logits.float().pow(2).mean()


def compare(h, ids, tools: Callable[[], list], specs: list, post: Callable = lambda x: x, param=None):
    """Logits and ``d loss / d param`` (the last site's weight) under the kernel's ``tools``
    equal those of a plain forward under the hooks ``specs`` (``post`` maps the plain
    logits to what the tools make the model return)."""
    param = h[-1].parameter if param is None else param
    with using(h, [param]), torch.enable_grad(), contextlib.ExitStack() as stack:
        for t in tools():
            stack.enter_context(t)
        got = logits_of(run(h, input_ids=ids, **no_cache(h.root)))
        g_got, = torch.autograd.grad(loss_of(got), param)
    with hooked(*specs):
        want = post(logits_of(h.root(input_ids=ids, **no_cache(h.root))))
        g_want, = torch.autograd.grad(loss_of(want), param)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=1e-4)
    assert changes_logits(h, ids, got.detach()), "the tools changed nothing: the comparison proves nothing"


def plain_logits(h, ids):
    with torch.no_grad():
        return logits_of(h.root(input_ids=ids, **no_cache(h.root)))


def changes_logits(h, ids, got):
    """The intervention under test does something (else the comparison proves nothing)."""
    full = plain_logits(h, ids)
    return full.shape != got.shape or float((full - got).abs().max()) > 1e-4


# --------------------------------------------------------------------------- each tool alone


def test_capture_inputs_outputs_and_gradients(h):
    ids = ids_of(h)
    block, site = h.block_paths[1], h[1].path
    p = h[0].parameter  # below both: their activations are in the graph
    with using(h, [p]), torch.enable_grad(), capture(h, [block, site], inputs=True) as cap:
        loss = loss_of(logits_of(run(h, input_ids=ids, **no_cache(h.root))))
        g_got = cap.grads(loss, [block, site])
    seen = {}
    with hooked(("out", h.module(block), lambda o: seen.__setitem__("block", states(o))),
                ("out", h.module(site), lambda o: seen.__setitem__("site", o)),
                ("in", h.module(site), lambda a, k: seen.__setitem__("x", first(a, k)))):
        loss_ref = loss_of(logits_of(h.root(input_ids=ids, **no_cache(h.root))))
    g_want = torch.autograd.grad(loss_ref, [seen["block"], seen["site"]])
    torch.testing.assert_close(cap.outputs[block], seen["block"], atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.outputs[site], seen["site"], atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.inputs[site], seen["x"], atol=ATOL, rtol=0)
    assert cap.inputs[site].shape[-1] == h.d_mlp and cap.outputs[site].shape[-1] == h.d_model
    for a, b in zip(g_got, g_want):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_capture_detached_keeps_no_graph(h):
    with using(h, [h[-1].parameter]), torch.enable_grad(), capture(h, [h.block_paths[0]], detach=True) as cap:
        run(h, input_ids=ids_of(h), **no_cache(h.root))
    assert cap.outputs[h.block_paths[0]].grad_fn is None


def test_replaced(h):
    mlp = h.mlp_paths[1]
    compare(h, ids_of(h), lambda: [replaced(h, mlp, lambda o: o * 3.0)],
            [("out", h.module(mlp), lambda o: o * 3.0)])


def test_replaced_in_place_returning_none(h):
    mlp = h.mlp_paths[1]

    def zero(o):
        o.mul_(0.0)  # in place: the tool keeps the edited output

    compare(h, ids_of(h), lambda: [replaced(h, mlp, zero)], [("out", h.module(mlp), lambda o: o * 0.0)])


def test_edited_gradient_in_the_delta(h):
    ids, site = ids_of(h), h[1]
    delta = (0.5 * randn(ids.shape[0], h.d_model, h.d_mlp)).requires_grad_(True)
    fn = lambda x, out: out + torch.einsum("bti,boi->bto", x, delta)  # noqa: E731
    seen = {}
    specs = [("in", site.module, lambda a, k: seen.__setitem__("x", first(a, k))),
             ("out", site.module, lambda o: fn(seen["x"], o))]
    compare(h, ids, lambda: [edited(h, site.path, fn)], specs)
    compare(h, ids, lambda: [edited(h, site.path, fn)], specs, param=delta)  # d loss / d delta too


def test_noised(h):
    ids, start = ids_of(h), 2
    noise = randn(ids.shape[0], 3, h.d_model)

    def add(o):
        o = o.clone()
        o[:, start:start + 3] += noise
        return o

    compare(h, ids, lambda: [noised(h, noise, start)], [("out", h.embed, add)])


def write_at(p: Patch):
    def fn(o):
        st = states(o).clone()
        st[p.rows, p.pos] = p.values
        return rewrap(o, st)
    return fn


def test_restored(h):
    ids = ids_of(h)
    patch = Patch(torch.tensor([0, 1]), torch.tensor([2, 4]), randn(2, h.d_model))
    block = h.block_paths[1]
    compare(h, ids, lambda: [restored(h, {block: patch})], [("out", h.module(block), write_at(patch))])


@pytest.mark.parametrize("layer", [1, 2])
def test_from_layer(h, layer):
    ids = ids_of(h)
    below = h.block_paths[layer - 1]
    kept: list = []
    with torch.no_grad(), hooked(("out", h.module(below), lambda o: kept.append(o))):
        h.root(input_ids=ids, **no_cache(h.root))
    entering = states(kept[0]) + 0.3 * randn(*states(kept[0]).shape)
    compare(h, ids, lambda: [from_layer(h, layer, lambda: rewrap(kept[0], entering))],
            [("out", h.module(below), lambda o: rewrap(o, entering))])


def test_from_layer_runs_no_block_below(h):
    ids, calls = ids_of(h), []
    kept: list = []
    with torch.no_grad(), hooked(("out", h.module(h.block_paths[1]), lambda o: kept.append(o))):
        h.root(input_ids=ids, **no_cache(h.root))
    # A skipped module is still called (its hooks fire) but its forward does not run:
    # the sites inside the skipped blocks see no call.
    interventions._order(h)  # recorded beforehand: that forward runs every block
    with using(h), torch.no_grad(), from_layer(h, 2, lambda: kept[0]), \
            hooked(*[("in", h[j].module, lambda a, k, j=j: calls.append(j)) for j in range(3)]):
        got = logits_of(run(h, input_ids=ids, **no_cache(h.root)))
    assert calls == [2]
    torch.testing.assert_close(got, plain_logits(h, ids), atol=ATOL, rtol=0)  # the clean stream: the clean result


def gathered(rows, pos):
    return lambda logits: logits[rows, pos][None]


def test_head_at(h):
    rows, pos = torch.tensor([0, 1, 1]), torch.tensor([5, 0, 3])
    compare(h, ids_of(h), lambda: [head_at(h, rows, pos)], [], post=gathered(rows, pos))


def test_head_at_with_skip(h):
    """With ``skip`` the head does not run: the stand-in gets the head's input at
    ``(rows, pos)``, and a linear map of it reproduces the gathered logits."""
    rows, pos = torch.tensor([1, 0]), torch.tensor([2, 4])
    ids, seen, calls = ids_of(h), {}, []

    def skip(x):
        seen["x"] = x
        return F.linear(x, h.head.weight, getattr(h.head, "bias", None))[None]

    with using(h), torch.no_grad(), head_at(h, rows, pos, skip=skip):
        got = logits_of(run(h, input_ids=ids, **no_cache(h.root)))
    with torch.no_grad(), hooked(("in", h.head, lambda a, k: seen.__setitem__("full", first(a, k)))):
        full = logits_of(h.root(input_ids=ids, **no_cache(h.root)))
    # The head's own forward does not run: what comes out of it is the stand-in.
    with using(h), torch.no_grad(), head_at(h, rows, pos, skip=lambda x: x[None, :, :1]), \
            hooked(("out", h.head, lambda o: calls.append(tuple(o.shape)))):
        run(h, input_ids=ids, **no_cache(h.root))
    assert calls == [(1, 2, 1)]
    torch.testing.assert_close(seen["x"], seen["full"][rows, pos], atol=ATOL, rtol=0)
    torch.testing.assert_close(got, full[rows, pos][None], atol=ATOL, rtol=1e-4)


def test_stop_after(h):
    ids, calls = ids_of(h), []
    block = h.block_paths[1]
    with using(h), torch.no_grad(), capture(h, [block]) as cap, stop_after(h, block), \
            hooked(("in", h.blocks[2], lambda a, k: calls.append(2)), ("in", h.head, lambda a, k: calls.append("head"))):
        out = run(h, input_ids=ids, **no_cache(h.root))
    assert out is None and calls == []
    kept: list = []
    with torch.no_grad(), hooked(("out", h.module(block), lambda o: kept.append(states(o)))):
        h.root(input_ids=ids, **no_cache(h.root))
    torch.testing.assert_close(cap.outputs[block], kept[0], atol=ATOL, rtol=0)


def test_using_puts_everything_back(h):
    root = h.root
    params = list(root.parameters())
    keep, frozen = h[0].parameter, params[0]
    frozen.requires_grad_(False)
    h.blocks[1].train()
    old_grad = torch.ones_like(keep)
    keep.grad = old_grad
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in root.modules()]
    try:
        for fail in (False, True):
            with contextlib.suppress(RuntimeError), using(h, [keep]):
                assert [p for p in params if p.requires_grad] == [keep] and keep.grad is None
                assert not any(m.training for m in root.modules())
                keep.grad = torch.zeros_like(keep)
                if fail:
                    raise RuntimeError("boom")
            assert [p.requires_grad for p in params] == flags
            assert [m.training for m in root.modules()] == modes
            assert keep.grad is old_grad
            assert not any("forward" in m.__dict__ for m in root.modules())  # nnsight's wrappers are gone
    finally:
        frozen.requires_grad_(True)
        keep.grad = None
        root.eval()


# --------------------------------------------------------------------------- combinations


def test_edited_with_head_at(h):
    ids, site = ids_of(h), h[2]
    rows, pos = torch.tensor([0, 1]), torch.tensor([4, 1])
    delta = 0.5 * randn(ids.shape[0], h.d_model, h.d_mlp)
    fn = lambda x, out: out + torch.einsum("bti,boi->bto", x, delta)  # noqa: E731
    seen = {}
    compare(h, ids, lambda: [edited(h, site.path, fn), head_at(h, rows, pos)],
            [("in", site.module, lambda a, k: seen.__setitem__("x", first(a, k))),
             ("out", site.module, lambda o: fn(seen["x"], o))], post=gathered(rows, pos))


def test_from_layer_with_capture(h):
    ids = ids_of(h)
    kept: list = []
    with torch.no_grad(), hooked(("out", h.module(h.block_paths[0]), lambda o: kept.append(o))):
        h.root(input_ids=ids, **no_cache(h.root))
    entering = states(kept[0]) + 0.3 * randn(*states(kept[0]).shape)
    paths = [h.block_paths[1], h[2].path]
    with using(h), torch.no_grad(), from_layer(h, 1, lambda: rewrap(kept[0], entering)), \
            capture(h, paths, inputs=True) as cap:
        run(h, input_ids=ids, **no_cache(h.root))
    seen: dict = {}
    with torch.no_grad(), hooked(("out", h.module(h.block_paths[0]), lambda o: rewrap(o, entering)),
                                 ("out", h.module(paths[0]), lambda o: seen.__setitem__("block", states(o))),
                                 ("in", h[2].module, lambda a, k: seen.__setitem__("x", first(a, k)))):
        h.root(input_ids=ids, **no_cache(h.root))
    torch.testing.assert_close(cap.outputs[paths[0]], seen["block"], atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.inputs[paths[1]], seen["x"], atol=ATOL, rtol=0)


def test_restored_with_noised(h):
    """ROME's restoration: noise on the embeddings, clean states written back at one block."""
    ids, start = ids_of(h), 1
    noise = 2.0 * randn(ids.shape[0], 2, h.d_model)
    block = h.block_paths[1]
    kept: list = []
    with torch.no_grad(), hooked(("out", h.module(block), lambda o: kept.append(states(o)))):
        h.root(input_ids=ids, **no_cache(h.root))
    rows, pos = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 5])
    patch = Patch(rows, pos, kept[0][rows, pos])

    def add(o):
        o = o.clone()
        o[:, start:start + 2] += noise
        return o

    compare(h, ids, lambda: [noised(h, noise, start), restored(h, {block: patch})],
            [("out", h.embed, add), ("out", h.module(block), write_at(patch))])


def two_children(h, j=1):
    """Block ``j``'s first norm and its MLP: LLaMA, Gemma and NeoX declare the norm
    after the MLP but call it first."""
    bp = h.block_paths[j]
    names = [n for n, _ in h.blocks[j].named_children()]
    norm = "input_layernorm" if "input_layernorm" in names else "ln_1"
    return f"{bp}.{norm}", h.mlp_paths[j]


@pytest.mark.parametrize("nesting", ["call order", "reversed"])
def test_replaced_on_two_modules_of_one_block(h, nesting):
    a, b = two_children(h)
    fa, fb = (lambda o: rewrap(o, states(o) * 0.5)), (lambda o: rewrap(o, states(o) + 1.0))
    tools = [("a", a, fa), ("b", b, fb)]
    if nesting == "reversed":
        tools = tools[::-1]
    compare(h, ids_of(h), lambda: [replaced(h, p, f) for _, p, f in tools],
            [("out", h.module(a), fa), ("out", h.module(b), fb)])


# --------------------------------------------------------------------------- execution order


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Block(nn.Module):
    """Children declared out of call order (MLP first, attention last), and one never called."""

    def __init__(self, d):
        super().__init__()
        self.mlp = _MLP(d)
        self.norm2 = nn.LayerNorm(d)
        self.unused = nn.Linear(d, d)
        self.attn = _Attn(d)
        self.norm1 = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Shuffled(nn.Module):
    def __init__(self, vocab=258, d=16, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(d, vocab)  # declared first, called last
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.embed = nn.Embedding(vocab, d)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


@pytest.fixture(scope="module")
def shuffled():
    return down_projections(_Shuffled(), tokenizer=byte_tokenizer(), causal=False)


def test_order_is_the_call_order_not_the_declaration_order(shuffled):
    h = shuffled
    calls: list[str] = []
    names = {id(m): n for n, m in h.root.named_modules()}
    with torch.no_grad(), hooked(*[("in", m, lambda a, k, m=m: calls.append(names[id(m)]) and None)
                                   for m in h.root.modules()]):
        h.root(input_ids=ids_of(h))
    order = interventions._order(h)
    assert sorted(order, key=lambda p: order[p][0]) == list(dict.fromkeys(calls))
    assert order["layers.0.attn"][1] < order["layers.0.mlp"][0] and order["layers.2"][1] < order["head"][0]
    assert "layers.0.unused" not in order


@pytest.mark.parametrize("nesting", ["call order", "reversed"])
def test_two_modules_of_a_block_declared_out_of_order(shuffled, nesting):
    h = shuffled
    tools = [("layers.1.attn", lambda o: o * 2.0), ("layers.1.mlp", lambda o: o - 1.0)]
    if nesting == "reversed":
        tools = tools[::-1]
    compare(h, ids_of(h), lambda: [replaced(h, p, f) for p, f in tools],
            [("out", h.module(p), f) for p, f in tools], param=h.root.layers[2].mlp.down.weight)


def test_order_on_llama_puts_the_norms_where_they_run():
    h = down_projections(tiny("llama", n_layers=2, d_model=16)[0])
    order = interventions._order(h)
    b = h.block_paths[0]
    seq = [f"{b}.input_layernorm", f"{b}.self_attn", f"{b}.post_attention_layernorm", f"{b}.mlp"]
    assert [order[p][0] for p in seq] == sorted(order[p][0] for p in seq)


def test_a_module_never_called_is_a_clear_error(shuffled):
    h = shuffled
    with using(h), replaced(h, "layers.0.unused", lambda o: o), pytest.raises(ValueError, match="never called"):
        run(h, input_ids=ids_of(h))
    with using(h), replaced(h, "layers.0.nothing", lambda o: o), pytest.raises(ValueError, match="no module"):
        run(h, input_ids=ids_of(h))


def test_recording_the_order_leaves_the_model_as_it_was(monkeypatch):
    """Every hook it adds is removed (also when the forward fails), modes are put back,
    and the forward runs in eval mode without a graph."""
    model, tok = tiny("gpt2", n_layers=2, d_model=16)
    made, removed = [], []

    class Tracked:
        def __init__(self, handle):
            self.handle = handle
            made.append(self)

        def remove(self):
            removed.append(self)
            self.handle.remove()

    for name in ("register_forward_pre_hook", "register_forward_hook"):
        real = getattr(nn.Module, name)
        monkeypatch.setattr(nn.Module, name, lambda self, *a, real=real, **k: Tracked(real(self, *a, **k)))
    model.transformer.h[0].train()
    modes = [m.training for m in model.modules()]
    seen = []
    handle = nn.Module.register_forward_pre_hook(model, lambda mod, a: seen.append((mod.training, torch.is_grad_enabled())))
    for fail in (False, True):
        h = down_projections(model, tokenizer=tok)
        if fail:
            real_forward = model.transformer.forward
            monkeypatch.setattr(model.transformer, "forward", lambda *a, **k: 1 / 0)
        with contextlib.suppress(ZeroDivisionError):
            order = interventions._record_order(h)
            assert order["transformer.h.1"][1] < order["lm_head"][0]
        if fail:
            monkeypatch.setattr(model.transformer, "forward", real_forward)
        assert [m.training for m in model.modules()] == modes
        assert set(map(id, removed)) == set(map(id, made[1:]))  # all but the test's own hook
    assert seen == [(False, False), (False, False)]
    handle.remove()
    model.eval()


def test_order_is_recorded_once_per_model_layout():
    """A new resolution of the same model reuses the recorded order (no extra forward
    per call); new modules in the model are recorded again."""
    import copy

    model, tok = tiny("llama", n_layers=2, d_model=16)
    widths: list[int] = []

    def forward_once():
        h = down_projections(model)
        with using(h), torch.no_grad(), replaced(h, h.mlp_paths[1], lambda o: o * 2.0):
            run(h, input_ids=ids_of(h, rows=1, width=6))

    with hooked(("in", model, lambda a, k: widths.append(k["input_ids"].shape[1]))):
        forward_once()
        forward_once()
        model.model.layers[1].mlp = copy.deepcopy(model.model.layers[1].mlp)
        forward_once()
    assert widths == [2, 6, 6, 2, 6]  # the 2-token forwards record the order


# --------------------------------------------------------------------------- generation through run


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fixed_length", [False, True])
def test_greedy_decoding_equals_generate(arch, fixed_length):
    """The kernel's decoding loop (key/value cache, left padding) makes the tokens
    ``model.generate`` makes, token for token."""
    from transformers import GenerationConfig

    from gradlocate.evaluation import _greedy_tokens, _left_pad

    model, tok = tiny(arch, n_layers=2, d_model=16, seed=1)
    h = gl.handles.resolve(model, tok)
    ids, am = _left_pad(tok, ["The capital of France is", "Hi", "Who wrote it"], "cpu")
    cfg = GenerationConfig(do_sample=False, max_new_tokens=7, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, use_cache=True, min_new_tokens=7 if fixed_length else None)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=am, generation_config=cfg)
        with using(h):
            got = _greedy_tokens(h, ids, am, 7, None, fixed_length)
    assert torch.equal(got, want)


def test_generation_steps_use_the_cache_and_see_interventions():
    model, tok = tiny("llama", n_layers=2, d_model=16)
    h = gl.handles.resolve(model, tok)
    widths = []

    def eos_first(o):
        o = o.clone()
        o[..., tok.eos_token_id] = o.max() + 10.0
        return o

    with hooked(("in", model, lambda a, k: widths.append(k["input_ids"].shape[1]))):
        greedy_generate(h, ["Hello there"], max_new_tokens=4, stops=())
    assert widths[0] > 1 and widths[1:] == [1] * (len(widths) - 1) and len(widths) == 4
    with using(h), replaced(h, interventions.path_of(h, h.head), eos_first):
        assert greedy_generate(h, ["Hello there"], max_new_tokens=4, stops=()) == [""]
    assert greedy_generate(h, ["Hello there"], max_new_tokens=4, stops=()) != [""]


# --------------------------------------------------------------------------- every forward through run


EDITS = [
    {"prompt": "Paris is the capital of", "target_new": "Italy", "ground_truth": "France", "subject": "Paris",
     "rephrase_prompt": "The city of Paris is the capital of", "locality_prompt": "Berlin is in",
     "locality_ground_truth": "Germany"},
    {"prompt": "The Nile flows through", "target_new": "Peru", "subject": "The Nile",
     "locality_prompt": "Rome is in", "locality_ground_truth": "Italy"},
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees."]
TRAINER = {"lr": 1e-2, "epochs": 2}


def _fit(model, tok):
    with gl.LocFTBF(model, 1, tokenizer=tok, epochs=2, progress=False) as ft:
        ft.fit(EDITS)


ENTRY_POINTS = {
    "gradratio": lambda m, t: gl.gradratio(m, EDITS, TEXTS, tokenizer=t, min_layer=0, progress=False),
    "lga": lambda m, t: gl.lga(m, EDITS, tokenizer=t, old="greedy", max_new_tokens=2, progress=False),
    "cma_layer": lambda m, t: gl.cma_layer(m, EDITS, tokenizer=t, samples=2, window=1, progress=False),
    "causal_trace": lambda m, t: gl.causal_trace(m, "Paris is in", "Paris", tokenizer=t, samples=2, window=1,
                                                 progress=False),
    "LocFTBF.fit": _fit,
    "evaluate": lambda m, t: gl.evaluate(m, EDITS, tokenizer=t, generation=True, fluency=True, fluency_tokens=3,
                                         capability=TEXTS, max_new_tokens=3),
    "locality_reference": lambda m, t: gl.evaluation.locality_reference(m, EDITS, tokenizer=t, max_new_tokens=2),
    "sweep": lambda m, t: gl.sweep(m, EDITS, tokenizer=t, layers=[1], trainer=TRAINER, capability=TEXTS,
                                   fluency_prompts=1, fluency_tokens=3, progress=False),
    "matrix": lambda m, t: gl.matrix(m, EDITS, tokenizer=t, layers=[1], hparams=TRAINER, capability_edits=1,
                                     progress=False),
    "greedy_answers": lambda m, t: gl.selectors.greedy_answers(m, ["Paris is in"], tokenizer=t, max_new_tokens=2),
    "edit_gradients": lambda m, t: gl.edit_gradients(m, EDITS, tokenizer=t, progress=False),
    "retain_gradients": lambda m, t: gl.retain_gradients(m, TEXTS, tokenizer=t, progress=False),
    "edit_loss": lambda m, t: gl.gradients.edit_loss(m, gl.losses.tokenize_edits(t, ["Paris is in"], ["Rome"])),
    "embedding_std": lambda m, t: gl.trace.core.embedding_std(m, ["Paris", "Rome"], tokenizer=t),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_forward_goes_through_run(name):
    """A plain pre-hook on the model counts forwards made inside and outside the
    kernel's :func:`run`: an entry point makes none outside (where an intervention
    active around it would not apply)."""
    model, tok = tiny("llama", n_layers=3, d_model=16, seed=0)
    counts = {"inside": 0, "outside": 0}

    def count(mod, args, kwargs):
        s = interventions._sessions.get(mod)
        counts["inside" if s is not None and s.running > 0 else "outside"] += 1

    with hooked(("in", model, lambda a, k: count(model, a, k))):
        ENTRY_POINTS[name](model, tok)
    assert counts["outside"] == 0, f"{name}: {counts['outside']} forwards outside interventions.run"
    assert counts["inside"] > 0 or name == "embedding_std"  # embedding_std runs the embedding only


def test_edit_loss_through_run_keeps_its_gradient():
    """Routed through the kernel, ``edit_loss`` still differentiates into every weight
    that requires a gradient, as the plain forward does (and leaves ``.grad`` alone)."""
    from gradlocate.losses import per_sample_nll

    model, tok = tiny("gpt2", n_layers=2, d_model=16)
    batch = gl.losses.tokenize_edits(tok, ["Paris is in", "Rome is"], ["Italy", "old"])
    w = model.transformer.h[0].mlp.c_fc.weight
    got, = torch.autograd.grad(gl.gradients.edit_loss(model, batch), w)
    plain = per_sample_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                           batch.labels).mean()
    want, = torch.autograd.grad(plain, w)
    assert float(want.abs().max()) > 0 and w.grad is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

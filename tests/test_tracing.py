"""causal_trace / cma_layer against an independent plain-hooks implementation of
ROME's algorithm (one forward of 1 clean + S corrupted rows per cell), exact
properties of the trace, the subject-range finder, errors and state restoration."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradlocate import HandleError, down_projections
from gradlocate.models import byte_tokenizer, tiny
from gradlocate.selectors import cma_layer
from gradlocate.trace import causal_trace
from gradlocate.trace.core import embedding_std, subject_token_range, window_layers
from gradlocate.trace.result import TraceResult

# Each family's module names, written by hand (the oracle does not use the library's discovery).
PATHS = {
    "gpt2": ("transformer.wte", "transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.attn"),
    "llama": ("model.embed_tokens", "model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.self_attn"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention"),
    "opt": ("model.decoder.embed_tokens", "model.decoder.layers.{}", "model.decoder.layers.{}.fc2",
            "model.decoder.layers.{}.self_attn"),
    "toy": ("embed", "layers.{}", "layers.{}.mlp", None),
}
N_LAYERS = 4
PROMPT, SUBJECT = "So Paris is in", "Paris"  # byte tokens: subject = positions 3..7, 14 tokens
S = 3
TOL = 1e-5


def _model(arch):
    # A large init makes the next-token distribution peaked, so restoring a state
    # moves the answer's probability by far more than the tolerance.
    return tiny(arch, n_layers=N_LAYERS, d_model=32, initializer_range=0.4, seed=1)


@pytest.fixture(scope="module")
def models():
    return {arch: _model(arch) for arch in PATHS if arch != "toy"}


def _noise(n_subj, d=32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(S, n_subj, d, generator=g)


# --------------------------------------------------------------------------- oracle


def rome_reference(model, tok, prompt, s_range, noise, kind, window, answer=None, arch="gpt2", n_layers=N_LAYERS):
    """ROME's calculate_hidden_flow with plain forward hooks: per cell one forward of
    1 clean + S corrupted rows; the clean row's state is copied into the others."""
    embed, block, mlp, attn = PATHS[arch]

    def logits_of(x):
        out = model(x)
        return getattr(out, "logits", out)

    site = {"hidden": block, "mlp": mlp, "attn": attn}[kind]
    ids = tok(prompt)["input_ids"]
    T, n_samples = len(ids), noise.shape[0]
    inp = torch.tensor([ids] * (n_samples + 1))
    s0, s1 = s_range

    def run(patch):
        hooks = []

        def add_noise(m, a, out):
            out = out.clone()
            out[1:, s0:s1] += noise
            return out

        hooks.append(model.get_submodule(embed).register_forward_hook(add_noise))
        for t, path in patch:
            def restore(m, a, out, t=t):
                h = out[0] if isinstance(out, tuple) else out
                if h.dim() == 2:  # OPT's fc2 works on [batch * pos, d]
                    h = h.view(len(inp), -1, h.shape[-1])
                h[1:, t] = h[0, t]

            hooks.append(model.get_submodule(path).register_forward_hook(restore))
        try:
            logits = logits_of(inp)
        finally:
            for h in hooks:
                h.remove()
        return torch.softmax(logits[:, -1].float(), dim=-1)

    with torch.no_grad():
        clean = torch.softmax(logits_of(inp[:1])[0, -1].float(), dim=-1)
        a = int(clean.argmax()) if answer is None else answer
        low = float(run([])[1:, a].mean())
        grid = torch.zeros(T, n_layers)
        for t in range(T):
            for l in range(n_layers):
                if kind == "hidden":
                    layers = [l]
                else:
                    layers = range(max(0, l - window // 2), min(n_layers, l - (-window // 2)))
                grid[t, l] = run([(t, site.format(j)) for j in layers])[1:, a].mean()
    return {"scores": grid, "low": low, "high": float(clean[a]), "answer": a}


# --------------------------------------------------------------------------- equivalence


CASES = [("gpt2", k) for k in ("hidden", "mlp", "attn")] + [("llama", k) for k in ("hidden", "mlp", "attn")] + [
    ("gpt_neox", "attn"), ("opt", "mlp")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_matches_rome_reference(models, arch, kind):
    model, tok = models[arch]
    s_range = subject_token_range(tok, PROMPT, SUBJECT)
    noise = _noise(s_range[1] - s_range[0])
    ref = rome_reference(model, tok, PROMPT, s_range, noise, kind, window=3, arch=arch)
    r = causal_trace(model, PROMPT, SUBJECT, kind=kind, noise=noise, window=3, progress=False)
    assert r.answer == ref["answer"]
    assert abs(r.low_score - ref["low"]) < TOL and abs(r.high_score - ref["high"]) < TOL
    assert r.scores.shape == ref["scores"].shape
    torch.testing.assert_close(r.scores, ref["scores"], atol=TOL, rtol=0)
    # The test is informative: restoring states moves the probability well beyond TOL.
    assert float(ref["scores"].max() - ref["scores"].min()) > 100 * TOL
    assert r.stats["prefix_cache"] == 1 and r.stats["forwards"] < r.stats["rome_forwards"]


@pytest.mark.parametrize("kind", ["hidden", "mlp"])
def test_every_execution_path_gives_the_same_grid(models, kind):
    model, tok = models["llama"]
    full = causal_trace(model, PROMPT, SUBJECT, kind=kind, samples=S, noise=3.0, window=3, progress=False)
    for opts in ({"reuse_prefix": False}, {"merge": True, "batch_size": 2 * S}, {"merge": True, "batch_size": 10_000},
                 {"merge": False, "batch_size": 1}):
        r = causal_trace(model, PROMPT, SUBJECT, kind=kind, samples=S, noise=3.0, window=3, progress=False, **opts)
        torch.testing.assert_close(r.scores, full.scores, atol=1e-6, rtol=0)
    sub = causal_trace(model, PROMPT, SUBJECT, kind=kind, samples=S, noise=3.0, window=3, progress=False,
                       tokens=[-1, 5, 0], layers=[3, 1])
    torch.testing.assert_close(sub.scores, full.scores[[13, 5, 0]][:, [3, 1]], atol=1e-6, rtol=0)
    assert sub.token_indices == [13, 5, 0] and sub.layers == [3, 1]


def test_prefix_reuse_engages_on_sliding_window_caches():
    """Gemma-3 mixes sliding-window and full layers: its cache holds every position of
    a prompt shorter than the window, so prefixes are reused and the grid is unchanged."""
    model, tok = tiny("gemma3_text", n_layers=4, d_model=32, initializer_range=0.4, seed=1, sliding_window=64)
    kw = dict(kind="hidden", samples=S, noise=3.0, window=3, progress=False)
    r = causal_trace(model, PROMPT, SUBJECT, **kw)
    assert r.stats["prefix_cache"] == 1
    slow = causal_trace(model, PROMPT, SUBJECT, reuse_prefix=False, **kw)
    torch.testing.assert_close(r.scores, slow.scores, atol=1e-6, rtol=0)


class _ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        # A causal running mean mixes positions, so later tokens see the subject.
        mixed = x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return x + self.mlp(self.norm(mixed))


class _Toy(nn.Module):
    """A plain torch LM with no attention module, no cache and no logits_to_keep."""

    def __init__(self, vocab=258, d=16, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_ToyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():  # a peaked output distribution, sensitive to the noise
            self.head.weight.mul_(20)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def test_plain_torch_model_without_cache_or_attention():
    model, tok = _Toy(), byte_tokenizer()
    sites = down_projections(model, tokenizer=tok)
    assert sites.attn_paths is None and sites.mlp_paths[0] == "layers.0.mlp"
    s_range = subject_token_range(tok, PROMPT, SUBJECT)
    noise = _noise(s_range[1] - s_range[0], d=16, scale=2.0)
    with pytest.warns(UserWarning, match="prefix reuse is off .*takes no key/value cache"):
        r = causal_trace(model, PROMPT, SUBJECT, tokenizer=tok, noise=noise, progress=False)
    assert r.stats["prefix_cache"] == 0
    for kind in ("hidden", "mlp"):
        r = causal_trace(model, PROMPT, SUBJECT, tokenizer=tok, kind=kind, window=2, noise=noise, progress=False)
        ref = rome_reference(model, tok, PROMPT, s_range, noise, kind, 2, arch="toy", n_layers=3)
        torch.testing.assert_close(r.scores, ref["scores"], atol=TOL, rtol=0)
        assert float(ref["scores"].max() - ref["scores"].min()) > 100 * TOL
    with pytest.raises(HandleError, match="no attention module"):
        causal_trace(model, PROMPT, SUBJECT, tokenizer=tok, kind="attn", progress=False)


# --------------------------------------------------------------------------- exact properties


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_zero_noise_gives_high_score_everywhere(models, kind):
    model, tok = models["gpt2"]
    r = causal_trace(model, PROMPT, SUBJECT, kind=kind, noise=torch.zeros(S, 5, 32), window=2, progress=False)
    assert abs(r.low_score - r.high_score) < 1e-6
    torch.testing.assert_close(r.scores, torch.full_like(r.scores, r.high_score), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_restoring_the_last_state_recovers_the_clean_probability(models, arch):
    model, tok = models[arch]
    r = causal_trace(model, PROMPT, SUBJECT, noise=3.0, samples=S, progress=False)
    # The last block's output at the last token alone determines the next-token logits.
    assert abs(r.scores[-1, -1].item() - r.high_score) < 1e-6
    assert r.low_score < r.high_score - 1e-3
    # With a one-token subject ending the prompt only the last token is corrupted: restoring
    # its hidden state at any layer makes every later state clean.
    r = causal_trace(model, "We went to Z", "Z", noise=3.0, samples=S, tokens=[-1], progress=False)
    assert r.subject_range == (11, 12) and r.low_score < r.high_score - 1e-3
    torch.testing.assert_close(r.scores[0], torch.full((N_LAYERS,), r.high_score), atol=1e-6, rtol=0)


def test_tokens_before_the_subject_score_low(models):
    model, tok = models["llama"]
    r = causal_trace(model, PROMPT, SUBJECT, kind="mlp", samples=S, window=2, progress=False)
    s0 = r.subject_range[0]
    assert torch.all(r.scores[:s0] == r.low_score)
    assert r.stats["cells_before_subject"] == s0 * N_LAYERS


def test_float_noise_follows_the_documented_convention(models):
    model, tok = models["gpt2"]
    std = embedding_std(model, ["Paris", "Rome"])
    a = causal_trace(model, PROMPT, SUBJECT, noise=2.5, std=std, seed=7, samples=4, progress=False)
    g = torch.Generator().manual_seed(7)
    explicit = torch.randn(4, 5, 32, generator=g) * (2.5 * std)
    b = causal_trace(model, PROMPT, SUBJECT, noise=explicit, progress=False)
    assert torch.equal(a.scores, b.scores) and a.low_score == b.low_score
    assert a.params["std"] == std and a.samples == 4
    # Default std: over the whole vocabulary.
    c = causal_trace(model, PROMPT, SUBJECT, noise=1.0, samples=2, tokens=[-1], progress=False)
    assert abs(c.params["std"] - model.transformer.wte.weight.double().std().item()) < 1e-9


def test_embedding_std_matches_plain_torch(models):
    model, tok = models["llama"]
    ids = tok("Paris", add_special_tokens=False)["input_ids"] + tok("Tokyo", add_special_tokens=False)["input_ids"]
    expected = model.model.embed_tokens.weight[ids].double().std().item()
    assert abs(embedding_std(model, ["Paris", "Tokyo"]) - expected) < 1e-12
    assert abs(embedding_std(model) - model.model.embed_tokens.weight.double().std().item()) < 1e-9


def test_answer_string_traces_its_first_token(models):
    model, tok = models["gpt2"]
    s_range = subject_token_range(tok, PROMPT, SUBJECT)
    noise = _noise(5)
    a = tok(" France", add_special_tokens=False)["input_ids"][0]
    ref = rome_reference(model, tok, PROMPT, s_range, noise, "hidden", 1, answer=a, arch="gpt2")
    r = causal_trace(model, PROMPT, SUBJECT, noise=noise, answer="France", progress=False)
    assert r.answer == a and r.answer_text == " "
    torch.testing.assert_close(r.scores, ref["scores"], atol=TOL, rtol=0)


def test_window_layers():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))
    assert list(window_layers(15, 1, 30)) == [15]
    assert list(window_layers(15, 3, 30)) == [14, 15, 16]
    assert list(window_layers(28, 4, 30)) == [26, 27, 28, 29]


# --------------------------------------------------------------------------- subject range


def _word_tokenizer(style, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in words:
        if style == "whitespace":
            vocab.setdefault(w, len(vocab))
        elif style == "gpt2":
            vocab.setdefault(w, len(vocab))
            vocab.setdefault("Ġ" + w, len(vocab))
        else:
            vocab.setdefault("▁" + w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = {
        "whitespace": pre_tokenizers.Whitespace(),
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        "sentencepiece": pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
    }[style]
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


WORDS = ["The", "Eiffel", "Tower", "is", "in", "Paris", "capital", "of", "France", "Rome", "a", "city"]


@pytest.mark.parametrize("style", ["whitespace", "gpt2", "sentencepiece"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_subject_range_on_word_tokenizers(style, data):
    tok = _word_tokenizer(style, WORDS)
    words = data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
    i = data.draw(st.integers(0, len(words) - 1))
    j = data.draw(st.integers(i + 1, len(words)))
    prompt, subject = " ".join(words), " ".join(words[i:j])
    # One token per word: the words overlapping the subject's first occurrence (which may
    # start inside a longer word, e.g. "a" in "Paris").
    c0 = prompt.find(subject)
    starts = [len(" ".join(words[:k])) + (k > 0) for k in range(len(words))]
    hit = [k for k, (a, w) in enumerate(zip(starts, words)) if a < c0 + len(subject) and a + len(w) > c0]
    assert subject_token_range(tok, prompt, subject) == (hit[0], hit[-1] + 1)


def test_subject_range_byte_tokenizer_and_decoding_fallback():
    tok = byte_tokenizer()
    prompt = "The Eiffel Tower is in Paris"
    assert subject_token_range(tok, prompt, "Eiffel Tower") == (4, 16)
    assert subject_token_range(tok, prompt, " Paris ") == (23, 28)  # surrounding spaces ignored

    class NoOffsets:  # a tokenizer that cannot report character offsets
        def __call__(self, text, return_offsets_mapping=False, **kw):
            if return_offsets_mapping:
                raise NotImplementedError
            return tok(text, **kw)

        def decode(self, ids):
            return tok.decode(ids)

    assert subject_token_range(NoOffsets(), prompt, "Eiffel Tower") == (4, 16)
    gpt2_style = _word_tokenizer("gpt2", WORDS)
    assert subject_token_range(gpt2_style, prompt, "Tower is") == (2, 4)


# --------------------------------------------------------------------------- errors


def test_errors(models, unchecked):
    model, tok = models["gpt2"]
    with pytest.raises(ValueError, match="does not occur"):
        causal_trace(model, PROMPT, "London", progress=False)
    with pytest.raises(ValueError, match="subject is empty"):
        causal_trace(model, PROMPT, "  ", progress=False)
    with pytest.raises(ValueError, match="window"):
        causal_trace(model, PROMPT, SUBJECT, kind="mlp", window=0, progress=False)
    with pytest.raises(ValueError, match="kind"):
        causal_trace(model, PROMPT, SUBJECT, kind="resid", progress=False)
    with pytest.raises(ValueError, match="shape"):
        causal_trace(model, PROMPT, SUBJECT, noise=torch.zeros(S, 4, 32), progress=False)
    with pytest.raises(ValueError, match="samples=2"):
        causal_trace(model, PROMPT, SUBJECT, noise=torch.zeros(S, 5, 32), samples=2, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        causal_trace(model, PROMPT, SUBJECT, layers=[4], progress=False)
    with pytest.raises(ValueError, match="token position"):
        causal_trace(model, PROMPT, SUBJECT, tokens=[14], progress=False)
    with pytest.raises(ValueError, match="noise"):
        causal_trace(model, PROMPT, SUBJECT, noise=-1.0, progress=False)
    with pytest.raises(ValueError, match="answer token id"):
        causal_trace(model, PROMPT, SUBJECT, answer=10**6, progress=False)
    with pytest.raises(ValueError, match="no subject"):
        cma_layer(model, [{"prompt": PROMPT, "target_new": "x"}], progress=False)
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        cma_layer(model, [{"prompt": PROMPT, "target_new": "x", "subject": "Rome"}], progress=False)
    edit = {"prompt": PROMPT, "target_new": "x", "subject": SUBJECT}
    with pytest.raises(TypeError, match="one noise tensor per edit"):
        unchecked(cma_layer)(model, [edit], noise=torch.zeros(S, 5, 32), progress=False)
    with pytest.raises(ValueError, match="one per edit"):
        cma_layer(model, [edit, edit], noise=[torch.zeros(S, 5, 32)], progress=False)


# --------------------------------------------------------------------------- state


def _state(model):
    return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()])


def test_model_state_is_restored_even_after_an_error():
    model, tok = tiny("llama", n_layers=2, d_model=16)
    model.train()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    before = _state(model)
    causal_trace(model, PROMPT, SUBJECT, kind="mlp", samples=2, progress=False)
    assert _state(model) == before

    def boom(m, a, out):
        raise RuntimeError("boom")

    h = model.lm_head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        causal_trace(model, PROMPT, SUBJECT, samples=2, progress=False)
    h.remove()
    assert _state(model) == before


def test_nnsight_wrapper(models):
    from nnsight import NNsight

    model, tok = models["llama"]
    plain = causal_trace(model, PROMPT, SUBJECT, samples=S, tokens=[-1], progress=False)
    wrapped = NNsight(model)
    r = causal_trace(wrapped, PROMPT, SUBJECT, tokenizer=tok, samples=S, tokens=[-1], progress=False)
    torch.testing.assert_close(r.scores, plain.scores, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- cma_layer


def test_cma_layer_matches_reference(models):
    model, tok = models["llama"]
    edits = [{"prompt": PROMPT, "target_new": "Rome", "subject": SUBJECT},
             {"prompt": "The Nile is long", "target_new": "short", "subject": "The Nile"}]
    noises, ies = [], []
    for i, e in enumerate(edits):
        s_range = subject_token_range(tok, e["prompt"], e["subject"])
        noises.append(_noise(s_range[1] - s_range[0], seed=i, scale=4.0))
        ref = rome_reference(model, tok, e["prompt"], s_range, noises[-1], "mlp", window=3, arch="llama")
        ies.append(ref["scores"][s_range[1] - 1] - ref["low"])
    expected = torch.stack(ies).mean(0)
    r = cma_layer(model, edits, noise=noises, window=3, progress=False)
    assert r.method == "cma" and r.layers == list(range(N_LAYERS))
    torch.testing.assert_close(torch.tensor(r.scores, dtype=torch.float32), expected, atol=TOL, rtol=0)
    assert r.selected == int(expected.argmax())
    assert float(expected.max() - expected.min()) > 20 * TOL
    # Float noise: ROME's std over the edits' subjects, same seed per edit.
    f = cma_layer(model, edits, samples=2, window=3, layers=[0, 2], progress=False)
    assert f.layers == [0, 2] and f.params["std"] == embedding_std(model, [SUBJECT, "The Nile"])


# --------------------------------------------------------------------------- result


def test_trace_result_dict_repr_and_plot(models):
    import matplotlib

    matplotlib.use("Agg")
    model, tok = models["gpt2"]
    r = causal_trace(model, PROMPT, SUBJECT, kind="mlp", samples=2, window=2, progress=False)
    assert isinstance(r, TraceResult)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["kind"] == "mlp" and len(d["scores"]) == 14 and d["subject_range"] == [3, 8]
    assert "TraceResult(kind='mlp'" in repr(r) and "subject=(3, 8)" in repr(r)
    torch.testing.assert_close(r.indirect_effect, r.scores - r.low_score)
    ax = r.plot()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[3:8] == [c + "*" for c in "Paris"] and labels[0] == "S"
    assert r.row(-1).shape == (N_LAYERS,)

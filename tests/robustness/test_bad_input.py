"""Bad input: every public function refuses it with an error that names the problem
(and the fix), or - where documented - repairs it with a warning. In every case the
model's state, weights included, is exactly as before."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradlocate as gl
from gradlocate.handles import HandleError
from gradlocate.losses import NonFiniteLossError
from gradlocate.models import byte_tokenizer, tiny
from robust_helpers import COMPUTING, EDITS, TAKES_EDITS, TAKES_LAYERS, TEXTS, assert_same_state, call, model_state


@pytest.fixture()
def guarded(gpt2):
    """The gpt2 model and tokenizer; after the test, its state must be unchanged."""
    model, tok = gpt2
    before = model_state(model)
    yield model, tok
    assert_same_state(before, model)


def _raises(exc, match, fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)


# --------------------------------------------------------------------------- edits and texts


@pytest.mark.parametrize("name", TAKES_EDITS)
def test_empty_edit_list(guarded, name):
    model, tok = guarded
    _raises(ValueError, "edit list is empty", call, name, model, tokenizer=tok, edits=[])


@pytest.mark.parametrize("fn", [gl.data.as_edits, gl.load_edits])
def test_empty_edit_list_loaders(fn):
    _raises(ValueError, "empty", fn, [])


@pytest.mark.parametrize("name", ["retain_gradients", "gradratio", "compare"])
def test_empty_retain_list(guarded, name):
    model, tok = guarded
    _raises(ValueError, "text list is empty", call, name, model, tokenizer=tok, texts=[])


def test_empty_retain_list_loaders(gpt2):
    _, tok = gpt2
    _raises(ValueError, "text list is empty", gl.data.load_texts, ["", "   "])
    _raises(ValueError, "retain set is empty", gl.losses.tokenize_texts, tok, [])


MISSING = [({"target_new": "Rome"}, "has no prompt"), ({"prompt": "Paris is in"}, "has no target"),
           ({"src": "Who wrote Hamlet?"}, "has no target"), ({"prompt": "  ", "target_new": "x"}, "prompt is empty")]


@pytest.mark.parametrize("record,msg", MISSING)
@pytest.mark.parametrize("name", TAKES_EDITS)
def test_record_missing_prompt_or_target(guarded, name, record, msg):
    model, tok = guarded
    edits = [dict(EDITS[0]), {k: v for k, v in record.items()}]
    _raises(ValueError, msg, call, name, model, tokenizer=tok, edits=edits)


@pytest.mark.parametrize("record,msg", MISSING)
def test_record_missing_prompt_or_target_loaders(record, msg):
    _raises(ValueError, msg, gl.data.as_edits, [record])
    _raises(ValueError, msg, gl.load_edits, [record])


@pytest.mark.parametrize("name", ["edit_gradients", "gradratio", "lga", "LocFTBF.fit", "evaluate", "sweep"])
def test_blank_target_that_tokenizes_to_nothing(guarded, name):
    """A record with a blank target is refused by as_edits; an EditRequest built by hand
    with one is refused where it is tokenized."""
    model, tok = guarded
    _raises(ValueError, "target is empty", call, name, model, tokenizer=tok,
            edits=[EDITS[0], {"prompt": "Paris is in", "target_new": "   "}])
    _raises(ValueError, "(target is empty|tokenizes to no tokens)", call, name, model, tokenizer=tok,
            edits=[gl.data.EditRequest("Paris is in", "Rome"), gl.data.EditRequest("Rome is in", " \t")])


class _Dropping:
    """A tokenizer that silently drops the character '§' (as some vocabularies drop
    unknown characters): a target of only '§' is not blank but has no tokens."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        return self._tok(text.replace("§", ""), **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_target_with_no_tokens(guarded):
    model, tok = guarded
    drop = _Dropping(tok)
    # (after a prompt ending in a space no space is inserted before the target)
    _raises(ValueError, "edit 1: target '§§' tokenizes to no tokens", gl.losses.tokenize_edits, drop,
            ["Paris is in", "Rome is in "], ["France", "§§"])
    _raises(ValueError, "tokenizes to no tokens", gl.edit_gradients, model,
            [gl.data.EditRequest("Paris is in", "France"), gl.data.EditRequest("Rome is in ", "§§")], tokenizer=drop)


@pytest.mark.parametrize("name", ["causal_trace", "cma_layer"])
def test_subject_not_in_prompt(guarded, name):
    model, tok = guarded
    edits = [dict(EDITS[0], subject="London")]
    _raises(ValueError, "subject 'London' does not occur in", call, name, model, tokenizer=tok, edits=edits)


def test_subject_missing_or_blank(guarded):
    model, tok = guarded
    _raises(ValueError, "has no subject", call, "cma_layer", model, tokenizer=tok,
            edits=[{k: v for k, v in EDITS[0].items() if k != "subject"}])
    _raises(ValueError, "subject is empty", gl.trace.core.subject_token_range, tok, "Paris is in", "  ")
    _raises(ValueError, "does not occur", gl.trace.core.subject_token_range, tok, "Paris is in", "Rome")


LONG = "word " * 80  # 400 byte tokens > the context of 64


@pytest.mark.parametrize("name", ["edit_gradients", "gradratio", "lga", "causal_trace", "cma_layer",
                                  "LocFTBF.fit", "evaluate", "sweep", "compare"])
def test_edit_longer_than_context_is_refused(guarded, name):
    model, tok = guarded
    edits = [dict(EDITS[0]), dict(EDITS[1], prompt=LONG + "The Nile flows through")]
    if name == "compare":  # the long edit must reach both the proxy and the test split
        edits = [dict(e, prompt=LONG + e["prompt"]) for e in EDITS]
    if name == "causal_trace":
        edits = edits[1:]
    _raises(ValueError, "longer than the model's context of 64", call, name, model, tokenizer=tok, edits=edits)


def test_edit_longer_than_context_tokenizer_and_old_answer(guarded):
    model, tok = guarded
    _raises(ValueError, "longer than the model's context of 64", gl.losses.tokenize_edits, tok, [LONG], ["x"], max_length=64)
    # lga generating an old answer: the prompt leaves no room
    _raises(ValueError, "no room to generate its old answer", gl.lga, model,
            [{"prompt": LONG, "target_new": "x"}], tokenizer=tok)


def test_retain_text_longer_than_context_is_truncated_with_warning(guarded):
    model, tok = guarded
    with pytest.warns(UserWarning, match="cut to the model's context of 64 tokens"):
        g = gl.retain_gradients(model, [LONG, TEXTS[0]], tokenizer=tok)
    assert g.n_tokens == (64 - 1) + (len(TEXTS[0]) - 1)
    # max_length cuts silently (by design: GradRatio's 128-token sequences), and equals an explicit cut.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g32 = gl.retain_gradients(model, [LONG], tokenizer=tok, max_length=32)
        explicit = gl.retain_gradients(model, [LONG[:32]], tokenizer=tok, max_length=None)
    assert g32.n_tokens == 31 and g32.sq_norms == pytest.approx(explicit.sq_norms, rel=1e-6)
    assert gl.losses.tokenize_texts(tok, [LONG], max_length=10).input_ids.shape == (1, 10)
    _raises(ValueError, "longer than max_length=10", gl.losses.tokenize_texts, tok, [LONG], max_length=10, truncate=False)


NON_STRINGS = [({"prompt": 42, "target_new": "x"}, "'prompt' must be a string"),
               ({"prompt": "Paris is in", "target_new": 3.5}, "'target_new' must be a string"),
               ({"prompt": "Paris is in", "target_new": "x", "subject": ["Paris", 7]}, None),
               ({"prompt": "Paris is in", "target_new": "x", "subject": 7}, "'subject' must be a string"),
               ({"prompt": "Paris is in", "target_new": "x", "ground_truth": {"a": 1}}, "'ground_truth' must be"),
               ({"prompt": "Paris is in", "target_new": "x", "rephrase_prompt": 5}, "'rephrase' must be")]


@pytest.mark.parametrize("record,msg", [c for c in NON_STRINGS if c[1]])
@pytest.mark.parametrize("name", TAKES_EDITS)
def test_non_string_fields(guarded, name, record, msg):
    model, tok = guarded
    _raises(TypeError, msg, call, name, model, tokenizer=tok, edits=[EDITS[0], record])


def test_non_string_fields_elsewhere(guarded, unchecked):
    model, tok = guarded
    # a list whose first item is a string is read as that string (ZsRE's answers lists)
    assert gl.data.as_edits([NON_STRINGS[2][0]])[0].subject == "Paris"
    _raises(TypeError, "edit 1 is a str", gl.data.as_edits, [EDITS[0], "Paris is in France"])
    _raises(FileNotFoundError, "no edits file", gl.data.as_edits, "edits.json")
    _raises(TypeError, "text 1 is a int", gl.retain_gradients, model, ["a text", 5], tokenizer=tok)
    _raises(TypeError, "prompt and target must be strings", unchecked(gl.losses.tokenize_edits), tok, ["a"], [5])
    _raises(TypeError, "edit 0: prompt must be a string", gl.LocFTBF(model, 0, tokenizer=tok).fit,
            [unchecked(gl.data.EditRequest)(5, "x")])
    _raises(TypeError, "prompt must be a string", unchecked(gl.causal_trace), model, 5, "Paris", tokenizer=tok)
    _raises(TypeError, "subject must be a string", unchecked(gl.causal_trace), model, "Paris is", 5, tokenizer=tok)


@pytest.mark.parametrize("name", ["edit_gradients", "gradratio", "lga", "cma_layer", "LocFTBF.fit", "sweep",
                                  "compare"])
def test_duplicate_edits_warn(guarded, name):
    model, tok = guarded
    edits = [EDITS[0], EDITS[1], EDITS[0], EDITS[2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(name, model, tokenizer=tok, edits=edits)
    # (compare's proxy split may repeat the warning, with indices into the split)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert "1 duplicate edit(s) (same prompt and target), e.g. edits (0, 2)" in msgs


def _no_pad_tokenizer():
    tok = byte_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    return tok


@pytest.mark.parametrize("name", COMPUTING)
def test_tokenizer_without_pad_token_gets_one_with_warning(guarded, name):
    model, tok = guarded
    plain = _no_pad_tokenizer()
    with pytest.warns(UserWarning, match="no pad token: using its EOS token"):
        call(name, model, tokenizer=plain)
    assert plain.pad_token == plain.eos_token


def test_tokenizer_without_pad_or_eos_is_refused(guarded):
    model, _ = guarded
    plain = _no_pad_tokenizer()
    plain.eos_token = None
    _raises(ValueError, "neither a pad token nor an EOS token", gl.edit_gradients, model, EDITS, tokenizer=plain)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("bad,msg", [([4], "layer 4 out of range: the model has 4"), ([-5], "out of range"),
                                     ([], "empty"), ([1, 1], "duplicates"), (["1"], "must be ints")])
@pytest.mark.parametrize("name", [n for n in TAKES_LAYERS if n != "LocFTBF.fit"])
def test_layers_out_of_range(guarded, unchecked, name, bad, msg):
    model, tok = guarded
    if bad == ["1"]:
        _raises(TypeError, msg, call, name, model, tokenizer=tok, layers=bad, via=unchecked)
    else:
        _raises(ValueError, msg, call, name, model, tokenizer=tok, layers=bad)


@pytest.mark.parametrize("bad,exc,msg", [(4, ValueError, "layer 4 out of range: the model has 4"),
                                         (-5, ValueError, "out of range"), ([0, 1], TypeError, "edits one layer"),
                                         ("1", TypeError, "edits one layer"), (True, TypeError, "edits one layer")])
def test_trainer_layer_out_of_range(guarded, unchecked, bad, exc, msg):
    model, tok = guarded
    _raises(exc, msg, unchecked(gl.LocFTBF) if exc is TypeError else gl.LocFTBF, model, bad, tokenizer=tok)


@pytest.mark.parametrize("name", TAKES_LAYERS)
def test_negative_layers_count_from_the_end(guarded, name):
    model, tok = guarded
    r = call(name, model, tokenizer=tok, layers=-1 if name == "LocFTBF.fit" else [-1, 0])
    got = r.layer if name == "LocFTBF.fit" else (r.sweep.layers if name == "compare" else r.layers)
    expected = 3 if name == "LocFTBF.fit" else ([0, 3] if name in ("sweep", "compare") else [3, 0])
    assert got == expected or (name == "compare" and set(expected) <= set(got))


# --------------------------------------------------------------------------- models


class _NoMLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class _NoMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 8)
        self.blocks = nn.ModuleList([_NoMLPBlock(), _NoMLPBlock()])

    def get_input_embeddings(self):
        return self.embed


def _bert():
    from transformers import AutoConfig, AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "bert", vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))


def _t5():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(
        "t5", vocab_size=300, d_model=16, num_layers=2, num_heads=2, d_ff=32, d_kv=8))


def _headless():
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.for_model("gpt2", vocab_size=300, n_embd=16, n_layer=2, n_head=2))


BAD_MODELS = {
    "no_blocks": (lambda: nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 300)), "no decoder-block list found"),
    "no_mlp": (_NoMLP, "no MLP down-projection found"),
    "encoder_only": (_bert, "BertForMaskedLM .*encoder-only models such as BERT are not supported"),
    "seq2seq": (_t5, "encoder-decoder \\(seq2seq\\) model"),
    "no_lm_head": (_headless, "GPT2Model .* load it with AutoModelForCausalLM"),
}


# evaluate scores any causal LM: it needs no decoder blocks, only a causal LM head.
@pytest.mark.parametrize("name,kind", [(n, k) for n in ("down_projections",) + COMPUTING for k in sorted(BAD_MODELS)
                                       if not (n == "evaluate" and k in ("no_blocks", "no_mlp"))])
def test_unsupported_models(name, kind):
    make, msg = BAD_MODELS[kind]
    model = make()
    before = model_state(model)
    _raises(HandleError, msg, call, name, model, tokenizer=byte_tokenizer())
    assert_same_state(before, model)


@pytest.mark.parametrize("name", COMPUTING)
def test_tokenizer_vocabulary_mismatch(name):
    model, _ = tiny("gpt2", n_layers=2, d_model=16, vocab_size=100)
    before = model_state(model)
    _raises(ValueError, "tokenizer/model mismatch: the tokenizer has 258 tokens but GPT2LMHeadModel's embedding "
                        "has 100 rows", call, name, model, tokenizer=byte_tokenizer())
    assert_same_state(before, model)


# --------------------------------------------------------------------------- non-finite losses


NAN_ERRORS = {
    "edit_gradients": (NonFiniteLossError, r"edit gradients: the loss is nan .*edit 0 \('Paris is the capital of' -> 'Italy'\)"),
    "retain_gradients": (NonFiniteLossError, r"retain gradients: the loss is nan .*text 0"),
    "gradratio": (NonFiniteLossError, r"the loss is nan .*edit 0"),
    "lga": (NonFiniteLossError, r"loss is not finite for sample 0 \('Paris is the capital of' -> 'Italy'\)"),
    "causal_trace": (NonFiniteLossError, r"causal trace of 'Paris is the capital of': .*not finite"),
    "cma_layer": (NonFiniteLossError, r"causal trace of 'Paris is the capital of': .*not finite"),
    "LocFTBF.fit": (gl.EditTrainingError, r"the loss became nan .*the weight was restored.*'Paris is the capital of'"),
    "evaluate": (NonFiniteLossError, r"not finite.*'Paris is the capital of'"),
    "sweep": (NonFiniteLossError, r"not finite.*'Paris is the capital of'"),
    "compare": (NonFiniteLossError, r"not finite|loss is nan"),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", COMPUTING)
def test_non_finite_weights_stop_with_the_edit_named(name, value):
    """A non-finite weight makes every loss non-finite: each function stops with an
    error naming the edit (or text), and leaves the weights - the bad one included -
    exactly as they were."""
    model, tok = tiny("gpt2", n_layers=4, d_model=32, n_ctx=64, seed=1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0] = value  # reaches every position of every prompt
    before = model_state(model)
    exc, msg = NAN_ERRORS[name]
    with pytest.raises(exc, match=msg if value != value else msg.replace("nan", "(nan|inf)")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(name, model, tokenizer=tok)
    assert_same_state(before, model)

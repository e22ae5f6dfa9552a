"""Every reach into another library's non-public behaviour (gradlocate._compat) still
behaves as gradlocate relies on, on the installed releases. A new release that breaks
one fails here, by name, instead of silently switching a fast path off."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from nnsight import NNsight

from gradlocate import _compat
from gradlocate.models import tiny

PACKAGE = Path(__file__).resolve().parent.parent / "gradlocate"


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3_text"])
def model(request):
    kw = {"sliding_window": 64} if request.param == "gemma3_text" else {}
    return tiny(request.param, n_layers=3, d_model=32, seed=3, **kw)[0]


def test_wrapped_module_and_uninstrument_leave_the_model_as_it_was(model):
    had = _compat.instrumentation(model)
    env = NNsight(model)
    assert _compat.wrapped_module(env) is model
    assert any("forward" in m.__dict__ for m in model.modules())  # nnsight installed its controller
    _compat.uninstrument(model, had)
    assert _compat.instrumentation(model) == had
    assert _compat.wrapped_module(model) is None


def test_cache_argument_is_accepted_and_returned(model):
    name = _compat.cache_argument(model)
    assert name in ("cache", "past_key_values")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model(input_ids=ids, use_cache=True, **{name: _compat.new_cache(model)})
    cache = _compat.returned_cache(out)
    assert cache is not None and int(cache.get_seq_length()) == 5


def test_prefix_cache_continues_the_full_forward(model):
    """A forward of positions o.. on the prefix cache of rows tiled C times gives the
    logits of the full forward at those positions (the public route gradlocate's causal
    trace reuses prefixes by)."""
    name = _compat.cache_argument(model)
    S, C, T, o = 2, 3, 9, 4
    ids = torch.randint(0, 200, (S, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True, **{name: _compat.new_cache(model)})
        cache = _compat.returned_cache(full)
        rows = torch.arange(S).repeat(C)
        pre = _compat.prefix_cache(cache, o, rows)
        assert int(pre.get_seq_length()) == o and int(cache.get_seq_length()) == T  # the original is untouched
        tail = model(input_ids=ids[rows, o:], use_cache=True, **{name: pre})
    torch.testing.assert_close(tail.logits, full.logits[rows, o:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        _compat.prefix_cache(cache, T + 1, rows)


def test_drop_gguf_quantizer():
    model, _ = tiny("llama", n_layers=1, d_model=16)
    model.hf_quantizer = object()
    model.config.quantization_config = {"quant_method": "gguf"}
    _compat.drop_gguf_quantizer(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")


def test_causal_lm_class_names():
    names = _compat.causal_lm_class_names()
    assert {"LlamaForCausalLM", "GPT2LMHeadModel", "Gemma3ForCausalLM"} <= names


def test_no_other_module_touches_private_names():
    """Private attributes of other libraries (``x._name`` on objects gradlocate does not
    own) appear only in _compat; gradlocate's own private helpers are fine."""
    own = {"_compat"}
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in own:
            continue
        src = path.read_text()
        for needle in ("__nnsight__", "._module", "hf_quantizer", "cache_utils", "_parameters[", "_modules[",
                       "modeling_auto"):
            if needle in src:
                offenders.append(f"{path.name}: {needle}")
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    ("transformers.", "nnsight.", "torch._")) and any(a.name.startswith("_") for a in node.names):
                offenders.append(f"{path.name}: from {node.module} import {[a.name for a in node.names]}")
    assert not offenders, offenders

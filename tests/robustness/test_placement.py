"""Placement: every function puts its tensors where each layer lives. A model
dispatched with accelerate's ``device_map`` (hooks on every module; layers alternating
between "cpu" and, where the machine has one, a CUDA device) gives the same numbers as
the plain model, and accelerate's hooks survive every call. A model on the ``meta``
device supports a shape-only dry run; computing on it is a clear error."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from accelerate import dispatch_model, init_empty_weights

import gradlocate as gl
from gradlocate.models import tiny
from robust_helpers import COMPUTING, EDITS, assert_same_state, call, model_state, no_instrumentation, numbers

OTHER = "cuda:0" if torch.cuda.is_available() else "cpu"


def _device_map(model) -> dict[str, str]:
    """Embeddings on cpu, decoder layers alternating cpu / OTHER, the head on OTHER."""
    n = model.config.num_hidden_layers
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": OTHER, "lm_head": OTHER}
    dm.update({f"model.layers.{i}": ("cpu" if i % 2 == 0 else OTHER) for i in range(n)})
    return dm


@pytest.fixture(scope="module")
def plain_and_dispatched():
    model, tok = tiny("llama", n_layers=4, d_model=32, d_mlp=48, n_ctx=64, seed=5)
    other = copy.deepcopy(model)
    other.gradlocate_tokenizer = tok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # force_hooks: accelerate's AlignDevicesHook on every module even when all devices are "cpu".
        dispatched = dispatch_model(other, device_map=_device_map(other), force_hooks=True)
    return model, dispatched, tok


def _close(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rel, abs=1e-6)


def test_dispatch_installs_accelerate_hooks(plain_and_dispatched):
    _, dispatched, _ = plain_and_dispatched
    assert hasattr(dispatched.model.layers[1], "_hf_hook")
    assert "forward" in dispatched.model.layers[1].__dict__
    assert str(dispatched.model.layers[1].mlp.down_proj.weight.device) == OTHER


@pytest.mark.parametrize("name", ("down_projections",) + COMPUTING)
def test_dispatched_model_same_numbers_and_hooks_kept(plain_and_dispatched, name):
    model, dispatched, tok = plain_and_dispatched
    before = model_state(dispatched)
    got = call(name, dispatched, tokenizer=tok)
    assert_same_state(before, dispatched)  # accelerate's forwards and hooks are still the same objects
    assert no_instrumentation(dispatched)
    expected = call(name, model, tokenizer=tok)
    _close(numbers(got), numbers(expected), rel=1e-4)


def test_device_map_from_pretrained(tmp_path):
    """A saved model loaded with ``from_pretrained(device_map={...})`` (layers mapped to
    devices one by one) gives the same numbers as the model it was saved from."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny("llama", n_layers=4, d_model=32, d_mlp=48, n_ctx=64, seed=6)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=_device_map(model))
    assert str(loaded.lm_head.weight.device) == OTHER
    for name in ("gradratio", "lga", "LocFTBF.fit", "evaluate"):
        before = model_state(loaded)
        got = call(name, loaded, tokenizer=tok)
        assert_same_state(before, loaded)
        _close(numbers(got), numbers(call(name, model, tokenizer=tok)), rel=1e-4)


def test_inputs_follow_the_model_device(plain_and_dispatched):
    """Nothing assumes "cpu": the results live where the layers live."""
    model, dispatched, tok = plain_and_dispatched
    g = gl.edit_gradients(dispatched, EDITS, tokenizer=tok, keep=True)
    hs = gl.down_projections(dispatched)
    assert [str(t.device) for t in g.grads] == [str(h.device) for h in hs]
    assert all(t.dtype == torch.float32 for t in g.grads)


# --------------------------------------------------------------------------- meta


@pytest.fixture(scope="module")
def meta_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradlocate.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    return model, tok


def test_meta_dry_run_finds_every_handle(meta_model):
    model, _ = meta_model
    hs = gl.down_projections(model)
    assert len(hs) == 3 and [h.path for h in hs] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert all(h.device.type == "meta" and (h.d_model, h.d_mlp) == (32, 48) for h in hs)
    assert "device=meta" in repr(hs[0])
    assert [tuple(h.weight.shape) for h in hs] == [(32, 48)] * 3


@pytest.mark.parametrize("name", COMPUTING)
def test_meta_model_computing_is_a_clear_error(meta_model, name):
    model, tok = meta_model
    before = model_state(model)
    with pytest.raises(ValueError, match="on the meta device .*down_projections\\(\\) alone works"):
        call(name, model, tokenizer=tok)
    assert_same_state(before, model)


def test_disk_offloaded_layers_are_refused_like_meta(tmp_path):
    """Weights offloaded to disk by a device_map are meta tensors loaded only inside
    the forward: gradients need them in memory, so computing is refused."""
    model, tok = tiny("llama", n_layers=2, d_model=32, d_mlp=48, n_ctx=64, seed=9)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          "model.layers.0": "cpu", "model.layers.1": "disk"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offloaded = dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    assert offloaded.model.layers[1].mlp.down_proj.weight.is_meta
    assert len(gl.down_projections(offloaded)) == 2
    with pytest.raises(ValueError, match="meta device .*model.layers.1"):
        gl.edit_gradients(offloaded, EDITS, tokenizer=tok)

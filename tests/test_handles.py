"""down_projections: structural discovery on many architectures, shared storage,
overrides, wrappers (nnsight, TransformerLens bridge), activations inside a trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlocate import HandleError, down_projections
from gradlocate.interventions import instrumented
from gradlocate.handles import unwrap_model
from gradlocate.models import tiny

# The oracle: each family's documented down-projection module (written by hand, not
# derived from the discovery code).
EXPECTED = {
    "gpt2": ("transformer.h", "mlp.c_proj", True),
    "llama": ("model.layers", "mlp.down_proj", False),
    "mistral": ("model.layers", "mlp.down_proj", False),
    "qwen2": ("model.layers", "mlp.down_proj", False),
    "gemma3_text": ("model.layers", "mlp.down_proj", False),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", False),
    "gptj": ("transformer.h", "mlp.fc_out", False),
    "opt": ("model.decoder.layers", "fc2", False),
    "phi": ("model.layers", "mlp.fc2", False),
    "phi3": ("model.layers", "mlp.down_proj", False),
    "bloom": ("transformer.h", "mlp.dense_4h_to_h", False),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h", False),
    "mpt": ("transformer.blocks", "ffn.down_proj", False),
    "gemma2": ("model.layers", "mlp.down_proj", False),
    "starcoder2": ("model.layers", "mlp.c_proj", False),
    "gpt_bigcode": ("transformer.h", "mlp.c_proj", False),
}

N_LAYERS, D_MODEL, D_MLP = 3, 32, 96


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def arch_model(request):
    model, tok = tiny(request.param, n_layers=N_LAYERS, d_model=D_MODEL, d_mlp=D_MLP)
    return request.param, model, tok


def test_discovers_expected_module(arch_model):
    arch, model, _ = arch_model
    blocks, down, transposed = EXPECTED[arch]
    hs = down_projections(model)
    assert len(hs) == N_LAYERS
    for i, h in enumerate(hs):
        assert h.layer == i
        assert h.path == f"{blocks}.{i}.{down}"
        assert h.module is model.get_submodule(h.path)
        assert h.transposed == transposed
        # Bloom and MPT fix the MLP width at 4 x d_model.
        d_mlp = 4 * D_MODEL if arch in ("bloom", "mpt") else D_MLP
        assert tuple(h.weight.shape) == (D_MODEL, d_mlp)


def test_weight_shares_storage_and_edits_model(arch_model):
    arch, model, tok = arch_model
    hs = down_projections(model)
    h = hs[N_LAYERS - 1]
    assert h.weight.untyped_storage().data_ptr() == h.parameter.untyped_storage().data_ptr()
    ids = torch.tensor([tok("The capital of France is").input_ids])
    before = model(ids).logits.detach().clone()
    saved = h.parameter.detach().clone()
    try:
        with torch.no_grad():
            h.weight[0, 0] += 1.0
        # The write lands in the stored parameter at the transposed place if needed.
        stored = h.parameter.detach()
        idx = (0, 0)
        assert stored[idx] == saved[idx] + 1.0
        after = model(ids).logits
        assert not torch.allclose(before, after)
    finally:
        with torch.no_grad():
            h.parameter.copy_(saved)


def test_weight_is_the_linear_map_applied(arch_model):
    """output = input @ weight.T (+ bias): the [d_model, d_mlp] view is the map itself."""
    arch, model, tok = arch_model
    hs = down_projections(model)
    h = hs[1]
    seen = {}
    handle = h.module.register_forward_hook(lambda m, i, o: seen.update(a=i[0].detach().clone(), o=o.detach().clone()))
    try:
        model(torch.tensor([tok("hello world").input_ids]))
    finally:
        handle.remove()
    bias = getattr(h.module, "bias", None)
    expect = seen["a"] @ h.weight.T + (bias.detach() if bias is not None else 0)
    torch.testing.assert_close(seen["o"], expect, rtol=1e-4, atol=1e-5)


def test_trace_gives_input_and_output(tiny_gpt2):
    model, tok = tiny_gpt2
    hs = down_projections(model)
    ids = torch.tensor([tok("hello there").input_ids])
    with hs.trace(ids):
        a = hs[2].input.save()
        o = hs[2].output.save()
    hs.release()
    assert tuple(a.shape) == (1, ids.shape[1], hs[2].d_mlp)
    assert tuple(o.shape) == (1, ids.shape[1], hs[2].d_model)
    torch.testing.assert_close(o, a @ hs[2].weight.T + hs[2].module.bias.detach())
    assert not any("forward" in m.__dict__ or "__nnsight__" in m.__dict__ for m in model.modules())


def test_instrumented_cleans_up_and_can_repeat(tiny_llama):
    model, tok = tiny_llama
    ids = torch.tensor([tok("abc").input_ids])
    outs = []
    for _ in range(2):
        with instrumented(model) as traced:
            with traced.trace(ids):
                outs.append(traced.model.layers[1].mlp.down_proj.output.save())
        assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("wrapper", ["TransformersModel", "LanguageModel", "NNsight"])
def test_nnsight_wrappers(tiny_gpt2, wrapper):
    import warnings

    from nnsight import LanguageModel, NNsight
    from nnsight.modeling.transformers import TransformersModel

    from gradlocate.handles import find_tokenizer

    model, tok = tiny_gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if wrapper == "TransformersModel":
            wrapped = TransformersModel(model, tokenizer=tok, task="text-generation")
        elif wrapper == "LanguageModel":
            wrapped = LanguageModel(model, tokenizer=tok)
        else:
            wrapped = NNsight(model)
    hs = down_projections(wrapped)
    assert hs.root is model and unwrap_model(wrapped) is model
    assert find_tokenizer(wrapped) is tok  # the wrapper's, or the one gradlocate attached
    ids = torch.tensor([tok("hello").input_ids])
    with hs.trace(ids):
        a = hs[0].input.save()
    assert tuple(a.shape) == (1, ids.shape[1], hs[0].d_mlp)


def test_transformer_lens_bridge(tiny_llama):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = tiny("llama", n_layers=2, d_model=16, d_mlp=40)
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=model, tokenizer=tok)
    hs = down_projections(bridge)
    assert len(hs) == 2 and tuple(hs[0].weight.shape) == (16, 40)
    ids = torch.tensor([tok("hello").input_ids])
    before = bridge(ids).detach().clone()
    saved = hs[1].parameter.detach().clone()
    with torch.no_grad():
        hs[1].weight.mul_(2.0)
    assert not torch.allclose(before, bridge(ids))
    with torch.no_grad():
        hs[1].parameter.copy_(saved)


def test_bridge_input_convention_is_the_bridges_tokenizer_everywhere():
    """A bridge means what TransformerLens feeds it (its tokenizer prepends BOS): its
    scores are the HF model's fed those ids; tokenizer= feeds others, and says so."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    from gradlocate import gradratio

    model, tok = tiny("llama", n_layers=4, d_model=16, d_mlp=40, seed=3)
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=model, tokenizer=tok)
    assert bridge.tokenizer("hi")["input_ids"] != tok("hi")["input_ids"]  # TransformerLens prepends BOS
    edits = [{"prompt": "Paris is in", "target_new": "Rome"}]
    texts = ["A general text about rivers."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bridge's own tokenizer: nothing to say
        via_bridge = gradratio(bridge, edits, texts, min_layer=0)
    assert via_bridge.scores == pytest.approx(gradratio(model, edits, texts, tokenizer=bridge.tokenizer,
                                                        min_layer=0).scores, rel=1e-6)
    with pytest.warns(UserWarning, match="differs from the TransformerBridge's own tokenizer"):
        own = gradratio(bridge, edits, texts, tokenizer=tok, min_layer=0)
    assert own.scores == pytest.approx(gradratio(model, edits, texts, tokenizer=tok, min_layer=0).scores, rel=1e-6)
    assert own.scores != pytest.approx(via_bridge.scores, rel=1e-3)


def test_override(tiny_llama):
    model, _ = tiny_llama
    hs = down_projections(model, blocks="model.layers", down="mlp.up_proj")
    assert hs[0].path == "model.layers.0.mlp.up_proj"
    with pytest.raises(HandleError, match="no such module"):
        down_projections(model, blocks="model.blocks")
    with pytest.raises(HandleError, match="override down='mlp.nothing'"):
        down_projections(model, blocks="model.layers", down="mlp.nothing")
    with pytest.raises(HandleError, match="not a linear map"):
        down_projections(model, blocks="model.layers", down="mlp")


def test_mixture_of_experts_refused_with_override_hint():
    model, _ = tiny("mixtral", n_layers=2, d_model=16, d_mlp=32)
    with pytest.raises(HandleError) as err:
        down_projections(model)
    msg = str(err.value)
    assert "MixtralForCausalLM" in msg and "mixture-of-experts" in msg and "down=" in msg


def test_no_blocks_error_lists_search():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(HandleError, match="no decoder-block list"):
        down_projections(model)


def test_no_mlp_error_lists_search():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList([Block(), Block()])

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(HandleError) as err:
        down_projections(Model())
    assert "no MLP down-projection" in str(err.value) and "blocks" in str(err.value)


def test_layer_indices_validation(tiny_gpt2):
    hs = down_projections(tiny_gpt2[0])
    assert hs.layer_indices(None) == [0, 1, 2, 3]
    assert hs.layer_indices([-1, 0]) == [3, 0]
    for bad, msg in [([4], "out of range"), ([-5], "out of range"), ([], "empty"), ([1, 1], "duplicates")]:
        with pytest.raises(ValueError, match=msg):
            hs.layer_indices(bad)
    with pytest.raises(IndexError, match="out of range"):
        hs[7]
    with pytest.raises(TypeError):
        hs.layer_indices(["1"])


def test_repr_and_table(tiny_gpt2):
    hs = down_projections(tiny_gpt2[0])
    assert "4 layers of GPT2LMHeadModel" in repr(hs)
    assert "transformer.h.3.mlp.c_proj" in hs.to_table()
    assert "stored transposed" in repr(hs[0])

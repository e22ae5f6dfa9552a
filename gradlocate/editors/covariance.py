"""Second-moment statistics of a site's inputs: ``C = E[k kᵀ]`` over general text.

ROME and its successors weigh a rank-one update by ``C⁻¹`` (``rome/layer_stats.py``:
the uncentred second moment ``mom2`` of the down-projection's inputs over 100k
Wikipedia tokens). Nothing here reaches Wikipedia, so the default corpus is **the
model's own text**: ``tokens`` tokens of free, seeded ancestral sampling (temperature
1, full vocabulary) from the model, each row started from its BOS/EOS token. The keys
are collected *while the text is generated*: every generated token passes each site
exactly once (a key/value cache keeps earlier positions), so one sampling pass yields
the statistics of every requested layer at once. A list of texts can be given instead
(``corpus=[...]``, e.g. :func:`gradlocate.data.default_retain_texts`, about 12k tokens).

    C[l] = 1/N Σ_t k_t kₜᵀ,   k_t ∈ R^{d_mlp} the input of layer l's site at token t

Results are cached on disk under ``$GRADLOCATE_CACHE/mom2/`` keyed by the model's
identity (its name and a checksum of its weights), the layer, the corpus id and the
token count; a file whose recorded key differs (a stale or foreign one) is refused
and recomputed.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> C = second_moments(model, [0, 1], tokens=256, cache=False, progress=False)
    >>> tuple(C[1].shape), bool(torch.allclose(C[1], C[1].T))
    ((64, 64), True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate import _compat
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import capture, no_cache, run, using
from gradlocate.state import input_device

__all__ = ["second_moments", "second_moment", "model_identity", "corpus_id", "StaleStatisticsError", "SAMPLED"]

#: The default corpus: the model's own seeded samples.
SAMPLED = "sampled"
_ROWS, _LENGTH = 32, 256  # sampling batch: rows x tokens per row


class StaleStatisticsError(ValueError):
    """A cached statistics file was made for another model, layer, corpus or size."""


def model_identity(h: Handles) -> str:
    """The model's name and a checksum of its weights (a strided sample of every
    parameter plus its sum, so an edited model gets new statistics).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1, d_model=16)
        >>> model_identity(resolve(model)).startswith("gpt2")
        True
    """
    sha = hashlib.sha1()
    for name, p in h.root.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        sha.update(name.encode())
        sha.update(sample.numpy().tobytes())
        sha.update(repr(float(flat.double().sum())).encode())
    name = getattr(getattr(h.root, "config", None), "_name_or_path", "") or ""
    name = name or getattr(getattr(h.root, "config", None), "model_type", "model")
    return f"{Path(str(name)).name}-{sha.hexdigest()[:16]}"


def corpus_id(corpus: str | Sequence[str], seed: int) -> str:
    """``"sampled-seed0"`` for the model's own samples, else a hash of the texts."""
    if isinstance(corpus, str):
        if corpus != SAMPLED:
            raise ValueError(f"corpus must be {SAMPLED!r} (the model's own text) or a list of texts, got {corpus!r}")
        return f"{SAMPLED}-seed{seed}"
    digest = hashlib.sha1("\x00".join(corpus).encode()).hexdigest()[:12]
    return f"texts-{len(corpus)}-{digest}"


def _file(key: dict[str, Any]) -> Path:
    from gradlocate.models import cache_dir

    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "mom2" / f"{key['model']}-L{key['layer']}-{tag}.pt"


def _load(path: Path, key: dict[str, Any]) -> Tensor | None:
    """The cached moment for ``key``, or ``None``; raises on a file made for another key."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != json.dumps(key, sort_keys=True):
        raise StaleStatisticsError(f"{path} holds statistics for {saved.get('key')}, expected {key}")
    return saved["mom2"]


def _save(path: Path, key: dict[str, Any], mom2: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(mom2)}")
    torch.save({"key": json.dumps(key, sort_keys=True), "mom2": mom2.contiguous()}, tmp)
    tmp.replace(path)


def second_moments(model: Any, layers: Sequence[int], *, tokens: int = 100_000,
                   corpus: str | Sequence[str] = SAMPLED, seed: int = 0, cache: bool = True,
                   progress: bool | None = None) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """``C[l] = E[k kᵀ]`` of each layer's site input, float32 on CPU, over ``tokens``
    tokens of ``corpus``; the missing layers are collected in one pass (one forward
    records every site's input). Cached on disk unless ``cache=False``; a stale file is
    refused (:class:`StaleStatisticsError` is caught and the moment recomputed)."""
    h = resolve(model)
    layers = h.layer_indices(list(layers))
    ident, cid = model_identity(h), corpus_id(corpus, seed)
    keys = {l: {"model": ident, "layer": l, "site": h[l].path, "corpus": cid, "tokens": int(tokens)} for l in layers}
    out: dict[int, Tensor] = {}
    for l in layers:
        if cache:
            try:
                got = _load(_file(keys[l]), keys[l])
            except StaleStatisticsError:
                got = None
            if got is not None:
                out[l] = got
    missing = [l for l in layers if l not in out]
    if missing:
        fresh = _collect(h, missing, tokens, corpus, seed, progress)
        for l, m in fresh.items():
            out[l] = m
            if cache:
                _save(_file(keys[l]), keys[l], m)
    return out


def second_moment(model: Any, layer: int, **kwargs: Any) -> Float[Tensor, "d_mlp d_mlp"]:
    """:func:`second_moments` of one layer."""
    h = resolve(model)
    layer = h.layer_indices(int(layer))[0]
    return second_moments(h, [layer], **kwargs)[layer]


def _collect(h: Handles, layers: list[int], tokens: int, corpus: Any, seed: int,
             progress: bool | None) -> dict[int, Tensor]:
    from tqdm.auto import tqdm

    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    paths = [h[l].path for l in layers]
    sums = {p: torch.zeros(h.d_mlp, h.d_mlp, dtype=torch.float64) for p in paths}
    bar = tqdm(total=tokens, desc=f"second moments ({len(layers)} layer(s))", unit="tok",
               disable=None if progress is None else not progress, leave=False)
    seen = 0
    batches = _sampled_keys(h, paths, tokens, seed) if isinstance(corpus, str) else _text_keys(h, paths, corpus)
    with contextlib.closing(batches):  # closing ends the generator's `using` block at once
        for keys in batches:  # each: path -> [n, d_mlp]
            n = min(next(iter(keys.values())).shape[0], tokens - seen)
            for p, k in keys.items():
                k = k[:n].double().cpu()
                sums[p] += k.T @ k
            seen += n
            bar.update(n)
            if seen >= tokens:
                break
    bar.close()
    if seen < tokens:
        raise ValueError(f"the corpus gave {seen} tokens, fewer than the {tokens} asked for: give more texts "
                         f"or ask for fewer tokens")
    return {l: (sums[p] / seen).float() for l, p in zip(layers, paths)}


def _sampled_keys(h: Handles, paths: list[str], tokens: int,
                  seed: int) -> Generator[dict[str, Float[Tensor, "rows d_mlp"]], None, None]:
    """Sample text from the model (seeded, temperature 1) and yield, per step, every
    site's input at the newly generated tokens ``{path: [rows, d_mlp]}``."""
    tok = h.require_tokenizer()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ValueError("sampling needs a BOS or EOS token to start from: give corpus=[texts] instead")
    gen = torch.Generator().manual_seed(seed)
    dev, arg = input_device(h.root), _compat.cache_argument(h.root)
    rows = min(_ROWS, max(1, tokens // (_LENGTH - 1) + 1))
    with using(h), torch.no_grad(), capture(h, paths, inputs=True, outputs=False, detach=True) as cap:
        while True:
            ids = torch.full((rows, 1), int(start), dtype=torch.long)
            past = _compat.new_cache(h.root) if arg else None
            for t in range(_LENGTH):
                step = ids if past is None else ids[:, -1:]
                kw = no_cache(h.root) if past is None or arg is None else {arg: past, "use_cache": True}
                am = torch.ones(ids.shape, dtype=torch.long, device=dev)
                out = run(h, input_ids=step.to(dev), attention_mask=am, **kw)
                if t > 0:  # the start token's keys are not text
                    yield {p: cap.inputs[p][:, -1] for p in paths}
                if past is not None:
                    past = _compat.returned_cache(out)
                logits = out.logits[:, -1].float().cpu()
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                ids = torch.cat([ids, nxt], 1)


def _text_keys(h: Handles, paths: list[str], texts: Sequence[str],
               batch: int = 16) -> Generator[dict[str, Float[Tensor, "k d_mlp"]], None, None]:
    """Yield every site's inputs at the real tokens of ``texts`` (128 tokens each at most)."""
    from gradlocate.losses import tokenize_texts

    tb = tokenize_texts(h.require_tokenizer(), list(texts), max_length=128)
    dev = input_device(h.root)
    with using(h), torch.no_grad(), capture(h, paths, inputs=True, outputs=False, detach=True) as cap:
        for i in range(0, len(tb.input_ids), batch):
            ids, am = tb.input_ids[i:i + batch].to(dev), tb.attention_mask[i:i + batch].to(dev)
            run(h, input_ids=ids, attention_mask=am, **no_cache(h.root))
            mask = am.bool()
            yield {p: cap.inputs[p][mask] for p in paths}


def timed_second_moments(*args: Any, **kwargs: Any) -> tuple[dict[int, Tensor], float]:
    """:func:`second_moments` and the seconds it took."""
    t0 = time.perf_counter()
    out = second_moments(*args, **kwargs)
    return out, time.perf_counter() - t0

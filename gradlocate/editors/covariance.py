"""Second-moment statistics of a site's inputs: ``C = E[k kᵀ]`` over general text.

ROME and its successors weigh a rank-one update by ``C⁻¹`` (``rome/layer_stats.py``: the
uncentred second moment ``mom2`` of the down-projection's inputs over Wikipedia text).

    C[l] = 1/N Σ_t k_t k_tᵀ,   k_t ∈ R^{d_mlp} the input of layer l's site at token t

Where the text comes from (``corpus=``, :mod:`~gradlocate.editors.corpora`): real text - a
list of strings, a ``.txt`` / ``.json`` / ``.jsonl`` file, a ``datasets`` folder or a Hugging
Face dataset name such as ROME's ``"wikitext"`` - read forward-only, every requested layer in
one pass that stops after the deepest; or, the offline default, ``"sampled"``: the model's
own text, sampled in batches of 128 rows with a key/value cache, the keys recorded while
generating. Statistics ROME or EasyEdit computed can be used instead (``stats=``, their
``npz`` files, :mod:`~gradlocate.editors.rome_stats`), and ours saved for them
(:meth:`SecondMoment.save_npz`).

**Tokens.** :data:`DEFAULT_TOKENS` (20,000) is the editors' default (``mom2_n_tokens``):
docs/rome.md's ablation found rewrite unchanged between 10k, 50k and 200k sampled tokens and
locality moving only within its interval; the update norm, the quantity most sensitive to C,
fell 7% from 10k to 50k and 1% from 50k to 200k, so twice the smallest size tested is kept.
ROME's own default is 100,000 *texts* of Wikipedia (``mom2_n_samples``); raise ``tokens``
for a closer match.

**Cost and resumption.** A collection that will take a while prints one line first
(:func:`cost_line`: the sites, tokens, corpus, the time estimated from the first steps and
where the result is cached) and shows a progress bar with the time left. Results are cached
under ``$GRADLOCATE_CACHE/mom2/`` keyed by the model's identity (its name and a checksum of
its weights), the layer, the corpus and the token count; a file recorded for another key is
refused and recomputed. The running sums are checkpointed there (atomically) about once a
minute and when the collection is interrupted (Ctrl-C) or fails; the same call resumes from
the last complete batch, and the result equals an uninterrupted run's (every batch is a
function of its index and the seed).

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
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate import _compat
from gradlocate.editors import corpora
from gradlocate.editors.corpora import SAMPLED, Source, resolve_corpus
from gradlocate.editors.rome_stats import find_stats, load_npz, save_npz
from gradlocate.editors.settings import DEFAULT_MOM2_TOKENS
from gradlocate.handles import Handles, resolve
from gradlocate.handles import model_identity as handles_identity

__all__ = ["second_moments", "second_moment", "second_moment_stats", "SecondMoment", "model_identity",
           "corpus_id", "cost_line", "StaleStatisticsError", "SAMPLED", "DEFAULT_TOKENS"]

#: The default token count (module docstring: from docs/rome.md's covariance-size ablation).
DEFAULT_TOKENS: int = DEFAULT_MOM2_TOKENS  # defined once, with the editors' settings
#: Seconds between checkpoints of the running sums (and always on an interruption).
CHECKPOINT_SECONDS = 60.0
#: A collection estimated to take longer prints its cost line even when ``progress`` is unset.
ANNOUNCE_SECONDS = 10.0


class StaleStatisticsError(ValueError):
    """A cached statistics file was made for another model, layer, corpus or size."""


@dataclass
class SecondMoment:
    """``E[k kᵀ]`` of one site's inputs, kept as ROME keeps it: the running ``sum`` of
    ``k kᵀ`` (float64) over ``count`` tokens; :meth:`moment` divides.

    Attributes:
        site: the module path (e.g. ``model.layers.6.mlp.down_proj``).
        sum: ``Σ_t k_t k_tᵀ``, ``[d_mlp, d_mlp]`` float64 on CPU.
        count: the number of tokens summed.
        corpus: where the keys came from (the cache key's corpus id, or the file read).
    """

    site: str
    sum: Float[Tensor, "d_mlp d_mlp"]
    count: int
    corpus: str = ""

    def moment(self) -> Float[Tensor, "d_mlp d_mlp"]:
        """``C = sum / count``, float32."""
        return (self.sum / self.count).float()

    def save_npz(self, path: str | os.PathLike[str], *, sample_size: int | None = None,
                 precision: str = "float32") -> Path:
        """Write this statistic as ROME / EasyEdit do (:func:`~gradlocate.editors.rome_stats.save_npz`)."""
        return save_npz(path, self.sum, self.count, sample_size=sample_size, precision=precision)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "count": self.count, "corpus": self.corpus, "d_mlp": int(self.sum.shape[0]),
                "trace": float(torch.trace(self.sum) / self.count)}

    def plot(self, ax: Any = None) -> Any:
        """The eigenvalues of C, largest first, on a log scale. Returns the Axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(5, 3))[1]
        ev = torch.linalg.eigvalsh(self.sum / self.count).flip(0).clamp_min(1e-30)
        ax.plot(range(len(ev)), ev.numpy())
        ax.set(yscale="log", xlabel="index", ylabel="eigenvalue of C", title=f"{self.site}, {self.count:,} tokens")
        return ax

    def __repr__(self) -> str:
        d = self.sum.shape[0]
        return f"SecondMoment({self.site}, {d}x{d}, {self.count:,} tokens, corpus={self.corpus!r})"


def model_identity(h: Handles) -> str:
    """The model's name and a checksum of its weights (a strided sample of every
    parameter plus its sum, so an edited model gets new statistics).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1, d_model=16)
        >>> model_identity(resolve(model)).startswith("gpt2")
        True
    """
    ident = json.dumps(handles_identity(h, every_parameter=True), sort_keys=True)  # the one definition
    return f"{_model_name(h)}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"


def _model_name(h: Handles) -> str:
    cfg = getattr(h.root, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "model") or "model"
    return Path(str(name)).name


def corpus_id(corpus: str | os.PathLike[str] | Sequence[str], seed: int) -> str:
    """The corpus's part of the cache key: ``"sampled-seed0"`` for the model's own
    samples, a digest of the texts or file otherwise (see :func:`~gradlocate.editors.corpora.resolve_corpus`).

    Example:
        >>> corpus_id("sampled", 0), corpus_id(["a text"], 0).startswith("texts-1-")
        ('sampled-seed0', True)
    """
    return resolve_corpus(corpus, seed).ident


# --------------------------------------------------------------------------- the disk cache


def _file(key: dict[str, Any]) -> Path:
    from gradlocate.models import cache_dir

    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "mom2" / f"{key['model']}-L{key['layer']}-{tag}.pt"


def _partial_file(key: dict[str, Any]) -> Path:
    return _file(key).with_suffix(".partial.pt")


def _load(path: Path, key: dict[str, Any]) -> SecondMoment | None:
    """The cached statistic for ``key``, or ``None``; raises on a file made for another key."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != json.dumps(key, sort_keys=True) or "sum" not in saved:
        raise StaleStatisticsError(f"{path} holds statistics for {saved.get('key')}, expected {key}")
    return SecondMoment(key["site"], saved["sum"], int(saved["count"]), key["corpus"])


def _save(path: Path, key: dict[str, Any], s: SecondMoment, batches: int | None = None) -> None:
    """Write atomically (a temporary file renamed): an interruption never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    record: dict[str, Any] = {"key": json.dumps(key, sort_keys=True), "sum": s.sum.contiguous(), "count": s.count}
    if batches is not None:
        record["batches"] = batches
    torch.save(record, tmp)
    tmp.replace(path)


def _load_partial(path: Path, key: dict[str, Any]) -> tuple[SecondMoment, int] | None:
    """A checkpoint for ``key``: the sums over its first ``batches`` batches (else ``None``)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != json.dumps(key, sort_keys=True):
        return None
    return SecondMoment(key["site"], saved["sum"], int(saved["count"]), key["corpus"]), int(saved["batches"])


# --------------------------------------------------------------------------- the public functions


def second_moment_stats(model: Any, layers: Sequence[int], *, tokens: int = DEFAULT_TOKENS,
                        corpus: str | os.PathLike[str] | Sequence[str] = SAMPLED, seed: int = 0, cache: bool = True,
                        progress: bool | None = None, stats: str | os.PathLike[str] | None = None,
                        rows: int | None = None, max_length: int | None = None,
                        callback: Callable[[int, int], Any] | None = None) -> dict[int, SecondMoment]:
    """The :class:`SecondMoment` of each layer's site input over ``tokens`` tokens of
    ``corpus`` (see the module docstring); the missing layers are collected in one pass.

    Args:
        stats: a ROME / EasyEdit statistics file or folder: a layer whose site has a file
            there is read from it (checked against the site; a mismatch raises
            :class:`~gradlocate.editors.rome_stats.StatsFileError`), the others computed.
        rows: the batch's rows: sampled text ``rows`` x ``max_length`` tokens
            (default 128 x 64), real text ``rows`` texts cut to ``max_length`` tokens
            (default 32 x 256); part of the cache key.
        max_length: the batch's tokens per row (see ``rows``); part of the cache key.
        callback: ``callback(batches_done, tokens_done)`` after each complete batch
            (raising ``KeyboardInterrupt`` there interrupts like Ctrl-C).
        cache: the disk cache.
        progress: the cost line and bar (``None``: shown for a collection estimated over
            ten seconds, bar only on a terminal).
        seed: the seed of the sampled text and of a dataset's shuffle.
    """
    h = resolve(model)
    layers = sorted(set(h.layer_indices(list(layers))))
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    out = _from_files(h, layers, stats) if stats is not None else {}
    todo = [l for l in layers if l not in out]
    if not todo:
        return out
    source = resolve_corpus(corpus, seed)
    shape = _batch_shape(h, source, rows, max_length)
    ident = f"{source.ident}-{shape[0]}x{shape[1]}"
    ident_model = model_identity(h)
    keys = {l: {"model": ident_model, "layer": l, "site": h[l].path, "corpus": ident, "tokens": int(tokens)}
            for l in todo}
    for l in todo:
        got = _cached(keys[l]) if cache else None
        if got is not None:
            out[l] = got
    missing = [l for l in todo if l not in out]
    if missing:
        run = _Run(h, missing, tokens, source, seed, shape, {l: keys[l] for l in missing}, cache, progress, callback)
        out.update(_collect(run))
    return {l: out[l] for l in layers}


def second_moments(model: Any, layers: Sequence[int], **kwargs: Any) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """``C[l] = E[k kᵀ]`` of each layer's site input, float32 on CPU: the moments of
    :func:`second_moment_stats` (same arguments: ``tokens``, ``corpus``, ``seed``, ``cache``,
    ``progress``, ``stats``, ``rows``, ``max_length``, ``callback``)."""
    return {l: s.moment() for l, s in second_moment_stats(model, layers, **kwargs).items()}


def second_moment(model: Any, layer: int, **kwargs: Any) -> Float[Tensor, "d_mlp d_mlp"]:
    """:func:`second_moments` of one layer."""
    h = resolve(model)
    layer = h.layer_indices(int(layer))[0]
    return second_moments(h, [layer], **kwargs)[layer]


def _cached(key: dict[str, Any]) -> SecondMoment | None:
    try:
        return _load(_file(key), key)
    except StaleStatisticsError:
        return None


def _from_files(h: Handles, layers: list[int], stats: str | os.PathLike[str]) -> dict[int, SecondMoment]:
    """The layers whose site has a ROME / EasyEdit file in ``stats`` (file or folder)."""
    from gradlocate.editors.rome_stats import StatsFileError, site_of_file

    d = h.d_mlp
    if Path(stats).expanduser().is_file():
        named = site_of_file(stats)
        sites = {h[l].path: l for l in layers}
        if named is None and len(layers) > 1:
            raise StatsFileError(f"{Path(stats).name}: its name does not say which layer it is for (ROME's pattern "
                                 f"<module>_<precision>_mom2_<n>.npz), and {len(layers)} layers were asked for")
        if named is not None and named not in sites:
            raise StatsFileError(f"{Path(stats).name}: the statistics of {named}; the sites asked for are "
                                 f"{', '.join(sites)}")
        l = sites[named] if named is not None else layers[0]
        s, n = load_npz(stats, expect_shape=(d, d), site=h[l].path)
        return {l: SecondMoment(h[l].path, s, n, str(stats))}
    out = {}
    for l in layers:
        path = find_stats(stats, h[l].path, _model_name(h))
        if path is None:
            warnings.warn(f"no statistics file for {h[l].path} under {stats}: computing it", stacklevel=3)
            continue
        s, n = load_npz(path, expect_shape=(d, d), site=h[l].path)
        out[l] = SecondMoment(h[l].path, s, n, str(path))
    return out


def _batch_shape(h: Handles, source: Source, rows: int | None, length: int | None) -> tuple[int, int]:
    """``(rows, tokens per row)`` of a batch, the length clipped to the model's context."""
    sampled = source.kind == "sampled"
    rows = rows if rows is not None else (corpora.SAMPLE_ROWS if sampled else corpora.TEXT_ROWS)
    length = length if length is not None else (corpora.SAMPLE_LENGTH if sampled else corpora.TEXT_LENGTH)
    if int(rows) < 1 or int(length) < (2 if sampled else 1):
        raise ValueError(f"rows must be >= 1 and max_length >= {2 if sampled else 1}, got {rows}, {length}")
    ctx = corpora.max_positions(h.root)
    return int(rows), int(min(length, ctx) if ctx else length)


# --------------------------------------------------------------------------- collection


@dataclass
class _Run:
    """One collection: what to compute and how to report it."""

    h: Handles
    layers: list[int]
    tokens: int
    source: Source
    seed: int
    shape: tuple[int, int]
    keys: dict[int, dict[str, Any]]
    cache: bool
    progress: bool | None
    callback: Callable[[int, int], Any] | None
    sums: dict[int, Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    done: dict[int, int] = field(default_factory=dict)  # complete batches in each layer's sums

    def resume(self) -> int:
        """Take each layer's checkpoint (if any); the tokens before the first batch to run."""
        d = self.h.d_mlp
        for l in self.layers:
            got = _load_partial(_partial_file(self.keys[l]), self.keys[l]) if self.cache else None
            s, b = got if got is not None else (SecondMoment("", torch.zeros(d, d, dtype=torch.float64), 0), 0)
            self.sums[l], self.counts[l], self.done[l] = s.sum, s.count, b
        first = min(self.layers, key=lambda l: self.done[l])
        return self.counts[first]

    def checkpoint(self) -> None:
        for l in self.layers:
            if self.done[l] > 0:
                s = SecondMoment(self.keys[l]["site"], self.sums[l], self.counts[l])
                _save(_partial_file(self.keys[l]), self.keys[l], s, self.done[l])

    def finish(self) -> dict[int, SecondMoment]:
        out = {}
        for l in self.layers:
            out[l] = SecondMoment(self.keys[l]["site"], self.sums[l], self.counts[l], self.keys[l]["corpus"])
            if self.cache:
                _save(_file(self.keys[l]), self.keys[l], out[l])
                _partial_file(self.keys[l]).unlink(missing_ok=True)
        return out


class _Accumulator:
    """Per layer, ``Σ k kᵀ`` of the current batch in float32, the keys buffered so that
    each product sums over at least ``flush`` rows (fewer, larger matrix products)."""

    def __init__(self, flush: int = 1024):
        self.flush = flush
        self.buf: dict[int, list[Tensor]] = {}
        self.acc: dict[int, Tensor] = {}

    def add(self, layer: int, k: Float[Tensor, "k d_mlp"]) -> None:
        self.buf.setdefault(layer, []).append(k.float())
        if sum(len(x) for x in self.buf[layer]) >= self.flush:
            self._fold(layer)

    def _fold(self, layer: int) -> None:
        parts = self.buf.pop(layer, [])
        if parts:
            k = torch.cat(parts)
            if layer not in self.acc:
                self.acc[layer] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float32, device=k.device)
            self.acc[layer].addmm_(k.T, k)

    def take(self, layer: int) -> Tensor | None:
        """The batch's sum for ``layer`` as float64 on CPU (``None`` if it got no keys); reset."""
        self._fold(layer)
        acc = self.acc.pop(layer, None)
        return None if acc is None else acc.double().cpu()


def _stream(run: _Run, start: int) -> Generator[corpora.Chunk, None, None]:
    paths = [run.h[l].path for l in run.layers]
    rows, length = run.shape
    if run.source.texts is None:
        if _compat.cache_argument(run.h.root) is None:
            warnings.warn(f"{type(run.h.root).__name__}'s forward takes no key/value cache: each sampled token "
                          f"recomputes its row ({length} tokens), about {length // 2} times the work of a cached "
                          f"step; give a corpus of texts to avoid it", stacklevel=4)
        return corpora.sampled_stream(run.h, paths, run.tokens, run.seed, start, rows=rows, length=length)
    return corpora.text_stream(run.h, paths, run.source.texts, start, rows=rows, length=length)


def _collect(run: _Run) -> dict[int, SecondMoment]:
    """Collect ``run``'s missing sums from where their checkpoints left off (see the
    module docstring); on an interruption or error the complete batches are checkpointed."""
    from tqdm.auto import tqdm

    seen = seen0 = run.resume()
    start, t0, last_save = min(run.done.values()), time.perf_counter(), time.perf_counter()
    bar = tqdm(total=run.tokens, initial=seen, desc=f"second moments ({len(run.layers)} layer(s))", unit="tok",
               disable=None if run.progress is None else not run.progress, leave=False, file=sys.stderr)
    acc, batch_n, steps, announced = _Accumulator(), 0, 0, False
    try:
        with contextlib.closing(_stream(run, start)) as stream:
            for chunk in stream:
                n = min(next(iter(chunk.keys.values())).shape[0], run.tokens - seen)
                for l in run.layers:
                    if chunk.batch >= run.done[l]:
                        acc.add(l, chunk.keys[run.h[l].path][:n])
                seen, batch_n, steps = seen + n, batch_n + n, steps + 1
                bar.update(n)
                if not announced and (chunk.end or steps >= 8):
                    announced = _announce(run, time.perf_counter() - t0, seen - seen0, seen0, bar)
                if chunk.end or seen >= run.tokens:
                    _fold(run, acc, chunk.batch, batch_n)
                    batch_n = 0
                    if run.callback is not None:
                        run.callback(chunk.batch + 1, seen)
                    if run.cache and time.perf_counter() - last_save >= CHECKPOINT_SECONDS:
                        run.checkpoint()
                        last_save = time.perf_counter()
                if seen >= run.tokens:
                    break
    except BaseException:
        if run.cache and any(b > 0 for b in run.done.values()):
            run.checkpoint()
            bar.write(f"gradlocate: second moments stopped at {min(run.counts.values()):,} of {run.tokens:,} tokens; "
                      f"kept in {_file(run.keys[run.layers[0]]).parent}: the same call resumes there", file=sys.stderr)
        raise
    finally:
        bar.close()
    if seen < run.tokens:
        raise ValueError(f"the corpus gave {seen:,} tokens, fewer than the {run.tokens:,} asked for: give more texts "
                         f"or ask for fewer tokens")
    return run.finish()


def _fold(run: _Run, acc: _Accumulator, batch: int, n: int) -> None:
    """Add the finished batch ``batch`` (``n`` tokens) to the sums of the layers that lacked it."""
    for l in run.layers:
        if batch >= run.done[l]:
            s = acc.take(l)
            if s is not None:
                run.sums[l] += s
                run.counts[l] += n
            run.done[l] = batch + 1


def _announce(run: _Run, elapsed: float, measured: int, resumed: int, bar: Any) -> bool:
    """Print :func:`cost_line` (when ``progress`` is on, or unset and the estimate is long)."""
    total = elapsed * (run.tokens - resumed) / max(1, measured)
    if run.progress is True or (run.progress is None and total >= ANNOUNCE_SECONDS):
        sites = [run.h[l].path for l in run.layers]
        where = _file(run.keys[run.layers[0]]) if run.cache else None
        bar.write(cost_line(sites, run.tokens, run.source.label, total, where, resumed), file=sys.stderr)
    return True


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cost_line(sites: Sequence[str], tokens: int, corpus: str, seconds: float, cache: Path | None,
              resumed: int = 0) -> str:
    """The line printed before a collection: the sites, the tokens, the corpus, the
    estimated time (``seconds``, measured on the first steps) and where it is cached.

    Example:
        >>> cost_line(["model.layers.6.mlp.down_proj"], 20000, "the model's own samples", 75.0, None)
        "gradlocate: second moments of model.layers.6.mlp.down_proj over 20,000 tokens of the model's own samples: about 75 s (estimated from the first steps); not cached"
    """
    what = sites[0] if len(sites) == 1 else f"{len(sites)} sites ({sites[0]} ... {sites[-1]})"
    again = f", resuming at {resumed:,}" if resumed else ""
    where = f"cached at {cache} (an interrupted run resumes)" if cache is not None else "not cached"
    return (f"gradlocate: second moments of {what} over {tokens:,} tokens of {corpus}{again}: about "
            f"{_duration(seconds)} (estimated from the first steps); {where}")

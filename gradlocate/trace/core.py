"""The building blocks of causal tracing, shared by every executor.

Everything here is one job of ROME's causal trace (Meng et al. 2022,
``experiments/causal_trace.py``) that the reference path
(:mod:`gradlocate.trace.reference`), the optimised executor
(:mod:`gradlocate.trace.fast`) and attribution patching
(:mod:`gradlocate.trace.attribution`) all need, so that they compute their scores from
the same prompt, noise, clean run and corrupted run:

* where: :func:`site_paths` (the modules restored for a kind), :func:`window_layers`;
* the prompt: :class:`TracePrompt` (tokenized once, the subject's token range found),
  :func:`subject_token_range`, :func:`answer_id`;
* the noise: :func:`embedding_std`, :func:`make_noise`;
* the runs: :func:`setup` (the clean and corrupted runs, as a :class:`Setup`),
  :func:`cells_of` (the grid's cells that need a forward, each a :class:`Cell`), :func:`last_only`
  and :func:`last_probs` (the answer's probability at the last position).

This module imports nothing from the rest of :mod:`gradlocate.trace`: the executors
build on it, and :func:`gradlocate.trace.causal_trace` on them.

Example:
    >>> from gradlocate import down_projections
    >>> from gradlocate.models import tiny
    >>> h = down_projections(tiny("llama", n_layers=4, d_model=32)[0])
    >>> tp = TracePrompt.of(h, "The Eiffel Tower is in", "Eiffel Tower")
    >>> tp.subject_range, site_paths(h, "mlp")[:2], list(window_layers(1, 3, h.n_layers))
    ((4, 16), ('model.layers.0.mlp', 'model.layers.1.mlp'), [0, 1, 2])
    >>> [(c.token, c.sites) for c in cells_of(h, "mlp", 3, [0, 5], [1], 4)]  # token 0 precedes the subject
    [(5, (0, 1, 2))]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gradlocate import _compat
from gradlocate.handles import HandleError, Handles, down_projections, resolve
from gradlocate.interventions import Patch, capture, head_at, no_cache, noised, run, states
from gradlocate.losses import context_length, render_prompt, target_text
from gradlocate.state import input_device

__all__ = [
    "KINDS",
    "site_paths",
    "window_layers",
    "TracePrompt",
    "subject_token_range",
    "answer_id",
    "embedding_std",
    "make_noise",
    "Cell",
    "Setup",
    "setup",
    "cells_of",
    "last_only",
    "last_probs",
]

KINDS = ("hidden", "mlp", "attn")


# --------------------------------------------------------------------------- sites and windows


def site_paths(h: Handles, kind: str) -> tuple[str, ...]:
    """The module paths causal tracing restores for ``kind``: block outputs (hidden),
    the MLP modules (mlp) or the attention modules (attn)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    paths = {"hidden": h.block_paths, "mlp": h.mlp_paths, "attn": h.attn_paths}[kind]
    if paths is None:
        names = [n for n, _ in h.blocks[0].named_children()]
        what = "attention module (no child named like attn / attention)" if kind == "attn" else \
            "MLP down-projection (the site was overridden with down=)"
        raise HandleError(f"kind={kind!r}: the decoder blocks of {type(h.root).__name__} have no {what}; children of "
                          f"{h.block_paths[0]}: {names}; use kind='hidden'")
    return tuple(paths)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored around centre ``layer`` for ``kind="mlp"``/``"attn"``:
    ``layer - window//2 .. layer + ceil(window/2) - 1``, clipped to the model (ROME's
    ``trace_important_window``).

    Example:
        >>> list(window_layers(5, 10, 30)), list(window_layers(1, 4, 30)), list(window_layers(29, 3, 30))
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2], [28, 29])
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (the number of layers restored), got {window!r}")
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


# --------------------------------------------------------------------------- the prompt


def _clean_subject(subject: Any) -> str:
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a string, got {type(subject).__name__}")
    if not subject.strip():
        raise ValueError("subject is empty: give the subject string that appears in the prompt")
    return subject.strip()


def _range_from_offsets(offsets: list[tuple[int, int]], c0: int, c1: int) -> tuple[int, int] | None:
    # Tokens whose characters overlap the subject's; zero-width (special) tokens never do.
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
    return (hit[0], hit[-1] + 1) if hit else None


def _range_from_decoding(tokenizer: Any, ids: list[int], subject: str) -> tuple[int, int] | None:
    # ROME's find_token_range: locate the subject in the concatenated decoded tokens.
    toks = [tokenizer.decode([i]) for i in ids]
    c0 = "".join(toks).find(subject)
    if c0 < 0:
        return None
    c1, loc, start = c0 + len(subject), 0, None
    for i, t in enumerate(toks):
        loc += len(t)
        if start is None and loc > c0:
            start = i
        if start is not None and loc >= c1:
            return start, i + 1
    return None


@runtime_checkable
class Tokenizes(Protocol):
    """What :meth:`TracePrompt.of` needs of :class:`~gradlocate.handles.Handles`: the
    tokenizer (and ``chat``, if present, for the prompt format) and the model's root, for
    its context length (``None``: no model, no limit)."""

    @property
    def root(self) -> Any: ...

    def require_tokenizer(self) -> Any: ...


@dataclass(frozen=True)
class TracePrompt:
    """A prompt as causal tracing sees it, tokenized once.

    Attributes:
        prompt, subject: the texts.
        ids: the token ids (with the tokenizer's special tokens).
        tokens: each token decoded.
        subject_range: ``(start, end)`` token range of the subject's first occurrence.
    """

    prompt: str
    subject: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]

    @classmethod
    def of(cls, h: Tokenizes, prompt: str, subject: str, where: str = "") -> TracePrompt:
        """Tokenize ``prompt`` and find ``subject`` in it (character offsets where the
        tokenizer reports them, so a leading space inside a token does not matter; else
        ROME's decode-and-search)."""
        tok = h.require_tokenizer()
        at = f"{where}: " if where else ""
        if not isinstance(prompt, str):
            raise TypeError(f"{at}prompt must be a string, got {type(prompt).__name__} ({prompt!r})")
        if not prompt.strip():
            raise ValueError(f"{at}prompt must be a non-empty string, got {prompt!r}")
        subject = _clean_subject(subject)
        text, special = render_prompt(tok, prompt, getattr(h, "chat", False))
        try:
            enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            offsets: list[tuple[int, int]] | None = [(int(o[0]), int(o[1])) for o in enc["offset_mapping"]]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            enc, offsets = tok(text, add_special_tokens=special), None
        ids = [int(i) for i in enc["input_ids"]]
        if not ids:
            raise ValueError(f"{at}prompt {prompt!r} tokenizes to no tokens")
        ctx = context_length(h.root)
        if ctx is not None and len(ids) > ctx:
            raise ValueError(f"{at}prompt {prompt[:60]!r}... is {len(ids)} tokens, longer than the model's context of "
                             f"{ctx}; shorten the prompt")
        c0 = prompt.find(subject)
        if c0 < 0:
            raise ValueError(f"{at}subject {subject!r} does not occur in the prompt {prompt!r}")
        c0 += max(0, text.find(prompt))  # the prompt's place in the chat template
        found = (_range_from_offsets(offsets, c0, c0 + len(subject)) if offsets is not None
                 else _range_from_decoding(tok, ids, subject))
        if found is None:
            raise ValueError(f"{at}subject {subject!r} covers no token of the tokenized prompt {prompt!r}")
        return cls(prompt, subject, tuple(ids), tuple(tok.decode([i]) for i in ids), found)


def subject_token_range(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token range ``(start, end)`` of ``subject``'s first occurrence in ``prompt``,
    tokenized as causal tracing tokenizes it (special tokens included).

    Raises:
        ValueError: an empty subject, or one that does not occur in the prompt.

    Example:
        >>> from gradlocate.models import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> subject_token_range(tok, "The Eiffel Tower is in", "Eiffel")
        (4, 10)
    """
    return _TokenizerOnly(tokenizer).trace_prompt(prompt, subject).subject_range


@dataclass(frozen=True)
class _TokenizerOnly:
    """Just enough of :class:`Handles` to tokenize a prompt without a model."""

    tokenizer: Any
    root: Any = None

    def require_tokenizer(self) -> Any:
        return self.tokenizer

    def trace_prompt(self, prompt: str, subject: str) -> TracePrompt:
        return TracePrompt.of(self, prompt, subject)


def answer_id(h: Handles, prompt: str, answer: int | str | None) -> int | None:
    """The answer token to trace: ``None`` (the clean run's argmax, decided by
    :func:`setup`), a token id (checked against the vocabulary), or the first token of a
    target string as it would follow the prompt.

    Example:
        >>> from gradlocate import down_projections
        >>> from gradlocate.models import tiny
        >>> h = down_projections(tiny("gpt2", n_layers=1, d_model=16)[0])
        >>> answer_id(h, "Paris is in", None), answer_id(h, "Paris is in", 7), answer_id(h, "Paris is in", "France")
        (None, 7, 32)
    """
    if answer is None:
        return None
    if isinstance(answer, bool):
        raise TypeError("answer must be None, a token id or a string")
    if isinstance(answer, int):
        vocab = h.d_vocab or 0
        if not 0 <= answer < vocab:
            raise ValueError(f"answer token id {answer} out of range: the vocabulary has {vocab} tokens")
        return answer
    if isinstance(answer, str):
        if not answer.strip():
            raise ValueError("answer is empty: give the target text, a token id, or None for the model's prediction")
        text, _ = render_prompt(h.tokenizer, prompt, h.chat)
        ids = list(h.tokenizer(target_text(text, answer), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"answer {answer!r} tokenizes to no tokens")
        return int(ids[0])
    raise TypeError(f"answer must be None, a token id or a string, got {type(answer).__name__}")


# --------------------------------------------------------------------------- noise


def embedding_std(model: Any, subjects: Sequence[str] | None = None, *, tokenizer: Any = None) -> float:
    """Standard deviation of the input embeddings, the unit of causal tracing's noise.

    With ``subjects``, ROME's ``collect_embedding_std``: the std of all entries of the
    embedding-module outputs of the subjects' tokens (tokenized without special
    tokens). Without, the std of the embeddings of the whole vocabulary.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=1, d_model=16)
        >>> round(embedding_std(model), 3), round(embedding_std(model, ["Paris", "Rome"]), 3)
        (0.02, 0.019)
    """
    h = resolve(model, tokenizer) if subjects is not None else (
        model if isinstance(model, Handles) else resolve(model, tokenizer) if tokenizer else down_projections(model))
    emb = h.require_embed("embedding_std measures its outputs")
    dev = input_device(h.root)
    with torch.no_grad():
        if subjects is None:
            if type(emb) is nn.Embedding:  # its outputs are its weight's rows
                return float(emb.weight.double().std().item())
            w = getattr(emb, "weight", None)
            n_vocab = int(w.shape[0]) if isinstance(w, Tensor) else int(getattr(emb, "num_embeddings"))
            total, sq, count = 0.0, 0.0, 0
            for a in range(0, n_vocab, 8192):
                x = emb(torch.arange(a, min(n_vocab, a + 8192), device=dev)).double()
                total, sq, count = total + x.sum().item(), sq + (x * x).sum().item(), count + x.numel()
            return math.sqrt(max(0.0, (sq - total * total / count) / (count - 1)))
        if isinstance(subjects, str):
            subjects = [subjects]
        ids: list[int] = []
        for s in subjects:
            ids += list(h.tokenizer(_clean_subject(s), add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            raise ValueError("embedding_std needs subjects with at least two tokens in all")
        return float(emb(torch.tensor(ids, device=dev)).double().std().item())


def make_noise(noise: float | Float[Tensor, "samples subject d_model"], samples: int | None, n_subj: int,
               d_model: int, std: float | None, seed: int, h: Handles,
               ) -> tuple[Float[Tensor, "samples subject d_model"], dict[str, Any]]:
    """The ``[samples, n_subject_tokens, d_model]`` noise and a description of it: an
    explicit tensor checked and detached, or ``noise`` times ``std`` (default
    :func:`embedding_std` of the vocabulary) times float32 Gaussian noise seeded by ``seed``."""
    if isinstance(noise, Tensor):
        if noise.dim() != 3 or noise.shape[1] != n_subj or noise.shape[2] != d_model:
            raise ValueError(f"explicit noise must have shape [samples, n_subject_tokens={n_subj}, d_model={d_model}], "
                             f"got {list(noise.shape)}")
        if samples is not None and samples != noise.shape[0]:
            raise ValueError(f"samples={samples} but the explicit noise has {noise.shape[0]} samples")
        if noise.shape[0] < 1:
            raise ValueError("explicit noise has no samples")
        return noise.detach(), {"noise": "explicit"}
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a non-negative multiple of the embedding std or a tensor, got {noise!r}")
    samples = 10 if samples is None else samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if std is None:
        std = embedding_std(h)
    z = torch.randn(samples, n_subj, d_model, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    return z * (float(noise) * float(std)), {"noise": float(noise), "std": float(std), "seed": int(seed)}


# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Cell:
    """One (token, layer) cell of the grid: where its score goes, and what it restores."""

    row: int  # index into the result grid
    col: int
    token: int
    sites: tuple[int, ...]  # layers whose `kind` state is restored at `token`
    first_block: int  # lowest block that must run


@dataclass
class Setup:
    """What every cell of one trace shares: the clean and corrupted runs."""

    ids: Int[Tensor, "1 pos"]
    noise: Float[Tensor, "samples subject d_model"]
    subject_range: tuple[int, int]
    paths: tuple[str, ...]  # restored module per layer
    clean: list[Float[Tensor, "pos d_model"]]  # per layer: the clean state at every position
    answer: int
    high: float
    low: float
    corrupted: list[Any] | None = None  # per block: its raw output in the corrupted run (fast executor)
    cache: Any = None  # the corrupted run's key/value cache (fast executor)

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    def patches(self, cells: Sequence[Cell], offset: int = 0) -> dict[str, Patch]:
        """Per restored module: the clean states at each cell's token, written into all
        ``samples`` rows of that cell (rows ``i*S .. i*S + S - 1`` for the i-th cell)."""
        S = self.samples
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for i, c in enumerate(cells):
            for j in c.sites:
                by_layer.setdefault(j, []).append((i, c.token))
        out = {}
        for j, items in by_layer.items():
            cell_i = torch.tensor([i for i, _ in items])
            tok = torch.tensor([t for _, t in items])
            rows = (cell_i[:, None] * S + torch.arange(S)).reshape(-1)
            src = tok.repeat_interleave(S)
            out[self.paths[j]] = Patch(rows, src - offset, self.clean[j][src.to(self.clean[j].device)])
        return out


def last_probs(h: Handles, out: Any, answer: int | None = None,
               ) -> Float[Tensor, "rows vocab"] | Float[Tensor, " rows"]:
    """The next-token distribution at each row's last position (``[rows, vocab]``), from
    a forward run under :func:`last_only` (or, for a model without an output-embedding
    head, full logits); with ``answer``, only that token's probability per row (``[rows]``)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple) else out
    last = logits[0] if h.head is not None else logits[:, -1]
    p = torch.softmax(last.float(), dim=-1)
    return p if answer is None else p[:, answer]


def last_only(h: Handles, rows: int, width: int) -> AbstractContextManager[Any]:
    """The head at each row's last position only: one ``[1, rows, d_model]`` matmul (a
    no-op for a model without an output-embedding head)."""
    if h.head is None:
        return nullcontext()
    return head_at(h, torch.arange(rows), torch.full((rows,), width - 1))


def setup(h: Handles, tp: TracePrompt, kind: str, noise: Float[Tensor, "samples subject d_model"],
          answer: int | None, *, record_blocks: bool = False, cache_kw: dict[str, Any] | None = None) -> Setup:
    """The clean run (answer, ``high_score``, the states to restore) and the corrupted
    run (``low_score``; with ``record_blocks`` every block's output, with ``cache_kw``
    the key/value cache) of one prompt."""
    paths = site_paths(h, kind)
    dev = input_device(h.root)
    ids = torch.tensor([list(tp.ids)], device=dev)
    T, S = ids.shape[1], noise.shape[0]
    with capture(h, paths, detach=True) as cap, last_only(h, 1, T):
        out = run(h, input_ids=ids, **no_cache(h.root))
    clean = [states(cap.outputs[p], 1)[0] for p in paths]
    probs = last_probs(h, out)[0]
    answer = int(probs.argmax()) if answer is None else answer
    blocks = list(h.block_paths) if record_blocks else []
    with noised(h, noise, tp.subject_range[0]), capture(h, blocks, detach=True) as cor, last_only(h, S, T):
        out = run(h, input_ids=ids.expand(S, -1), **(cache_kw or no_cache(h.root)))
    low = float(last_probs(h, out, answer).mean())
    return Setup(ids, noise, tp.subject_range, paths, clean, answer, float(probs[answer]), low,
                 [cor.raw[p] for p in blocks] if record_blocks else None,
                 _compat.returned_cache(out) if cache_kw else None)


def cells_of(h: Handles, kind: str, window: int, token_idx: Sequence[int], layers: Sequence[int],
             subject_start: int) -> list[Cell]:
    """Every cell of the grid that needs a forward: tokens before the subject, which the
    noise cannot reach, score ``low_score`` without one."""
    out = []
    for r, t in enumerate(token_idx):
        if t < subject_start:
            continue
        for c, l in enumerate(layers):
            sites = (l,) if kind == "hidden" else tuple(window_layers(l, window, h.n_layers))
            out.append(Cell(r, c, t, sites, l + 1 if kind == "hidden" else sites[0]))
    return out

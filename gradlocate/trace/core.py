"""Causal tracing (causal mediation analysis) as in ROME, on any decoder-only model.

Causal tracing (Meng et al. 2022, ``experiments/causal_trace.py``) asks which hidden
states carry a fact:

1. run the prompt cleanly: the answer is the clean run's most likely next token
   (``high_score`` = its probability);
2. add Gaussian noise to the subject tokens' input embeddings in ``samples``
   corrupted copies (``low_score`` = the answer's mean probability over them);
3. for each (token ``t``, layer ``l``) cell copy the clean state into every corrupted
   copy - the decoder block's output (``kind="hidden"``), or the MLP / attention output
   at the ``window`` layers centred on ``l`` (``kind="mlp"`` / ``"attn"``) - and record
   the answer's mean probability over the corrupted copies.

The reference path (:func:`reference_scores`) is ROME's ``trace_with_patch``: one
forward per batch of cells, built from :mod:`gradlocate.interventions` (noise on the
embeddings, clean states restored). The default executor (:mod:`gradlocate.trace_plan`)
computes the same scores with fewer and smaller forwards, proven equal to 1e-6 by the
tests. :func:`~gradlocate.selectors.cma_layer` builds the CMA layer choice on it.

Example:
    >>> import torch
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=4, d_model=32)
    >>> r = causal_trace(model, "The Eiffel Tower is in", "Eiffel Tower", samples=4, progress=False)
    >>> tuple(r.scores.shape), r.subject_range, r.kind
    ((22, 4), (4, 16), 'hidden')
    >>> abs(r.scores[-1, -1].item() - r.high_score) < 1e-5  # the last state decides the output
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gradlocate.handles import HandleError, Handles, resolve, validate_indices
from gradlocate.interventions import Patch, capture, head_at, no_cache, noised, restored, run, states, using
from gradlocate.losses import NonFiniteLossError, context_length, render_prompt, target_text
from gradlocate.results import _fmt
from gradlocate.state import input_device

__all__ = [
    "KINDS",
    "TracePrompt",
    "TraceResult",
    "causal_trace",
    "trace_prompt",
    "reference_scores",
    "embedding_std",
    "subject_token_range",
    "window_layers",
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
    def of(cls, h: Handles, prompt: str, subject: str, where: str = "") -> TracePrompt:
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
            offsets = [tuple(map(int, o)) for o in enc["offset_mapping"]]
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
        return TracePrompt.of(self, prompt, subject)  # type: ignore[arg-type]


def _answer_id(h: Handles, prompt: str, answer: Any) -> int | None:
    """``None`` (use the clean run's argmax), a token id, or the first token of a
    target string as it would follow the prompt."""
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
        model if isinstance(model, Handles) else resolve(model, tokenizer) if tokenizer else _embed_only(model))
    emb = h.embed
    dev = input_device(h.root)
    with torch.no_grad():
        if subjects is None:
            if type(emb) is nn.Embedding:  # its outputs are its weight's rows
                return float(emb.weight.double().std().item())
            n_vocab = int(emb.weight.shape[0]) if hasattr(emb, "weight") else int(emb.num_embeddings)
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


def _embed_only(model: Any) -> Any:
    from gradlocate.handles import down_projections

    return down_projections(model)


def make_noise(noise: Any, samples: int | None, n_subj: int, d_model: int, std: float | None, seed: int,
               h: Handles) -> tuple[Float[Tensor, "samples subject d_model"], dict[str, Any]]:
    """The ``[samples, n_subject_tokens, d_model]`` noise and a description of it."""
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


# --------------------------------------------------------------------------- result


@dataclass
class TraceResult:
    """A causal trace: the answer's probability with each state restored.

    Attributes:
        scores: ``[len(token_indices), len(layers)]``: the mean probability of the
            answer over the corrupted rows with that (token, layer) state restored.
        low_score: the answer's mean probability in the corrupted runs, nothing restored.
        high_score: its probability in the clean run.
        subject_range: ``(start, end)`` token range of the subject (noised).
        tokens: every prompt token, decoded.
        token_indices: the traced token positions (rows of ``scores``).
        layers: the traced layers (columns; the window centre for mlp/attn).
        kind: ``"hidden"``, ``"mlp"`` or ``"attn"``.
        answer: the answer token id; ``answer_text`` its text.
        window: layers restored per cell (mlp/attn).
        samples: corrupted rows per cell.
        params: the noise used (multiple, std, seed, or ``"explicit"``) and other settings.
        stats: forward passes and token-block evaluations, ours and ROME's.
        timings: wall times in seconds.
    """

    scores: Float[Tensor, "tokens layers"]
    low_score: float
    high_score: float
    subject_range: tuple[int, int]
    tokens: list[str]
    token_indices: list[int]
    layers: list[int]
    kind: str
    answer: int
    answer_text: str
    prompt: str = ""
    subject: str = ""
    window: int = 10
    samples: int = 10
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "exact"
    exact: Tensor | None = None

    @property
    def estimated(self) -> bool:
        """Whether the scores are attribution-patching estimates (``method="atp"``); the
        cells re-run exactly (``verify=``) are marked in :attr:`exact`."""
        return self.method != "exact"

    @property
    def indirect_effect(self) -> Float[Tensor, "tokens layers"]:
        """``scores - low_score``: how much restoring each state brings the answer back."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        """``high_score - low_score``: what the corruption took away."""
        return self.high_score - self.low_score

    def row(self, token: int) -> Float[Tensor, " layers"]:
        """Scores of one token position (negatives count from the end of the prompt)."""
        t = token % len(self.tokens)
        if t not in self.token_indices:
            raise KeyError(f"token {token} was not traced (traced: {self.token_indices})")
        return self.scores[self.token_indices.index(t)]

    def best(self) -> tuple[int, int]:
        """The (token, layer) with the highest score; for an estimate with verified
        cells, the highest among those computed exactly."""
        scores = self.scores
        if self.exact is not None and bool(self.exact.any()):
            scores = torch.where(self.exact, self.scores, torch.full_like(self.scores, -torch.inf))
        r, c = divmod(int(scores.argmax()), self.scores.shape[1])
        return self.token_indices[r], self.layers[c]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "prompt": self.prompt, "subject": self.subject,
            "answer": self.answer, "answer_text": self.answer_text,
            "scores": self.scores.tolist(), "low_score": self.low_score, "high_score": self.high_score,
            "subject_range": list(self.subject_range), "tokens": list(self.tokens),
            "token_indices": list(self.token_indices), "layers": list(self.layers),
            "window": self.window, "samples": self.samples, "params": dict(self.params),
            "stats": dict(self.stats), "timings": dict(self.timings), "method": self.method,
            "exact": None if self.exact is None else self.exact.tolist(),
        }

    def __repr__(self) -> str:
        t, l = self.best()
        what = "" if not self.estimated else (
            f", AtP estimate ({int(self.exact.sum()) if self.exact is not None else 0} cells verified)")
        return (f"TraceResult(kind={self.kind!r}{what}, answer={self.answer_text!r}, scores=[{self.scores.shape[0]} tokens x "
                f"{self.scores.shape[1]} layers], low={_fmt(self.low_score)}, high={_fmt(self.high_score)}, "
                f"best=(token {t} {self.tokens[t]!r}, layer {l}): {_fmt(float(self.scores.max()))}, "
                f"subject={self.subject_range})")

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """ROME's heatmap: tokens down, layers across, subject tokens marked ``*``,
        colour from ``low_score``. Returns the matplotlib ``Axes``."""
        from gradlocate.plotting import plot_trace_heatmap

        return plot_trace_heatmap(self, ax=ax, title=title)


# --------------------------------------------------------------------------- the trace


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
    clean: list[Tensor]  # per layer: the clean state [pos, d]
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


def last_probs(h: Handles, out: Any, answer: int | None = None) -> Float[Tensor, "rows vocab"]:
    """The next-token distribution at each row's last position, from a forward run under
    :func:`last_only` (or, for a model without an output-embedding head, full logits);
    with ``answer``, only that token's probability per row."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple) else out
    last = logits[0] if h.head is not None else logits[:, -1]
    p = torch.softmax(last.float(), dim=-1)
    return p if answer is None else p[:, answer]


def last_only(h: Handles, rows: int, width: int) -> Any:
    """The head at each row's last position only: one ``[1, rows, d]`` matmul."""
    if h.head is None:
        import contextlib

        return contextlib.nullcontext()
    return head_at(h, torch.arange(rows), torch.full((rows,), width - 1))


def setup(h: Handles, tp: TracePrompt, kind: str, noise: Tensor, answer: int | None, *,
          record_blocks: bool = False, cache_kw: dict[str, Any] | None = None) -> Setup:
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
    from gradlocate import _compat

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


def reference_scores(h: Handles, s: Setup, cells: Sequence[Cell], batch_size: int) -> list[float]:
    """ROME's ``trace_with_patch`` for batches of cells: one forward per batch, the S
    corrupted rows of each cell with its clean states restored; the answer's mean
    probability per cell."""
    S, T = s.samples, s.ids.shape[1]
    per = max(1, batch_size // S)
    out: list[float] = []
    for k in range(0, len(cells), per):
        chunk = cells[k:k + per]
        rows = len(chunk) * S
        with noised(h, s.noise.repeat(len(chunk), 1, 1), s.subject_range[0]), \
                restored(h, s.patches(chunk), rows=rows), last_only(h, rows, T):
            o = run(h, input_ids=s.ids.expand(rows, -1), **no_cache(h.root))
        out += last_probs(h, o, s.answer).view(len(chunk), S).mean(1).tolist()
    return out


def trace_prompt(h: Handles, tp: TracePrompt, *, kind: str = "hidden", samples: int | None = None,
                 noise: Any = 3.0, std: float | None = None, seed: int = 0, window: int = 10, answer: Any = None,
                 tokens: Any = None, layers: Any = None, batch_size: int = 256, method: str = "exact",
                 verify: int = 0, fast: bool = True, merge: bool | None = None, reuse_prefix: bool = True,
                 progress: bool | None = None) -> TraceResult:
    """:func:`causal_trace` of a prompt already tokenized (:class:`TracePrompt`)."""
    if method not in ("exact", "atp"):
        raise ValueError(f"method must be 'exact' or 'atp', got {method!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify must be an int >= 0 (cells to re-run exactly), got {verify!r}")
    from gradlocate.trace_plan import FastTrace

    t_start = time.perf_counter()
    site_paths(h, kind)  # a clear error if the model has no module of this kind
    if h.embed is None or getattr(h.embed, "weight", None) is None:
        raise HandleError(f"{type(h.root).__name__} has no get_input_embeddings() with a weight: causal tracing adds "
                          f"noise to the input embeddings and needs that module")
    window_layers(0, window, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per forward), got {batch_size!r}")
    T = len(tp.ids)
    token_idx = list(range(T)) if tokens is None else validate_indices(tokens, T, "token position",
                                                                        f"the prompt has {T} tokens")
    layer_idx = h.layer_indices(layers)
    noise_t, info = make_noise(noise, samples, tp.subject_range[1] - tp.subject_range[0], h.d_model, std, seed, h)
    noise_t = noise_t.to(device=input_device(h.root), dtype=h.embed.weight.dtype)
    answer_id = _answer_id(h, tp.prompt, answer)
    cells = cells_of(h, kind, window, token_idx, layer_idx, tp.subject_range[0])
    stats = {"cells": len(token_idx) * len(layer_idx), "cells_before_subject": len(token_idx) * len(layer_idx) - len(cells)}
    if method == "atp":
        return _atp_trace(h, tp, kind, noise_t, answer_id, window, token_idx, layer_idx, verify, batch_size, merge,
                          info, stats, t_start)
    with using(h), torch.no_grad():
        if fast:
            engine = FastTrace(h, kind, batch_size, merge, reuse_prefix)
            s, timings = engine.setup(tp, noise_t, answer_id)
            t0 = time.perf_counter()
            values = engine.scores(s, cells, progress)
            stats.update(engine.stats)
        else:
            t0 = time.perf_counter()
            s = setup(h, tp, kind, noise_t, answer_id)
            timings = {"setup": time.perf_counter() - t0}
            t0 = time.perf_counter()
            values = reference_scores(h, s, cells, batch_size)
            stats.update(forwards=2 + math.ceil(len(cells) / max(1, batch_size // s.samples)), prefix_cache=0)
        timings["cells"] = time.perf_counter() - t0
    scores = torch.full((len(token_idx), len(layer_idx)), s.low, dtype=torch.float32)
    for c, v in zip(cells, values):
        scores[c.row, c.col] = v
    if not (math.isfinite(s.high) and math.isfinite(s.low) and bool(torch.isfinite(scores).all())):
        raise NonFiniteLossError(f"causal trace of {tp.prompt!r}: the answer's probability is not finite (clean "
                                 f"{s.high}, corrupted {s.low}): the model outputs NaN/inf; check its weights, or its "
                                 f"dtype for overflow")
    # ROME: one forward of 1 clean + S corrupted rows per cell, plus its clean prediction and low_score run.
    stats["rome_forwards"] = stats["cells"] + 2
    stats["rome_token_block_evals"] = (stats["cells"] + 2) * (s.samples + 1) * T * h.n_layers
    timings["total"] = time.perf_counter() - t_start
    return TraceResult(scores=scores, low_score=s.low, high_score=s.high, subject_range=tp.subject_range,
                       tokens=list(tp.tokens), token_indices=token_idx, layers=layer_idx, kind=kind, answer=s.answer,
                       answer_text=h.tokenizer.decode([s.answer]), prompt=tp.prompt, subject=tp.subject,
                       window=window, samples=s.samples,
                       params={**info, "batch_size": batch_size, "fast": fast, "reuse_prefix": reuse_prefix},
                       stats=stats, timings=timings)


def _atp_trace(h: Handles, tp: TracePrompt, kind: str, noise: Tensor, answer: int | None, window: int,
               token_idx: list[int], layer_idx: list[int], verify: int, batch_size: int, merge: Any,
               info: dict[str, Any], stats: dict[str, Any], t_start: float) -> TraceResult:
    """The AtP estimate of the grid (:mod:`gradlocate.attribution`), with the ``verify``
    highest cells re-run exactly."""
    from gradlocate.attribution import atp_estimates, verify_cells

    with using(h):
        est, answer, high, low, timings = atp_estimates(h, tp, [kind], noise, answer, window)
        grid = est[kind][token_idx][:, layer_idx].float().clone()
        exact = torch.zeros_like(grid, dtype=torch.bool)
        stats.update(forwards=2, backwards=1, verified=0)
        if verify:
            t0 = time.perf_counter()
            flat = [(grid[r, c].item(), r, c) for r in range(len(token_idx)) for c in range(len(layer_idx))
                    if token_idx[r] >= tp.subject_range[0]]
            top = sorted(flat, reverse=True)[:verify]
            with torch.no_grad():
                values, st = verify_cells(h, tp, kind, noise, answer, window,
                                          [(token_idx[r], layer_idx[c]) for _, r, c in top], batch_size, merge)
            for (_, r, c), v in zip(top, values):
                grid[r, c], exact[r, c] = v, True
            stats.update(forwards=2 + st["forwards"], verified=len(top))
            timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return TraceResult(scores=grid, low_score=low, high_score=high, subject_range=tp.subject_range,
                       tokens=list(tp.tokens), token_indices=token_idx, layers=layer_idx, kind=kind, answer=answer,
                       answer_text=h.tokenizer.decode([answer]), prompt=tp.prompt, subject=tp.subject, window=window,
                       samples=int(noise.shape[0]), params={**info, "method": "atp", "verify": verify},
                       stats=stats, timings=timings, method="atp", exact=exact)


def causal_trace(model: Any, prompt: str, subject: str, *, tokenizer: Any = None, kind: str = "hidden",
                 samples: int | None = None, noise: float | Float[Tensor, "samples subject_tokens d_model"] = 3.0,
                 std: float | None = None, seed: int = 0, window: int = 10, answer: int | str | None = None,
                 tokens: Sequence[int] | int | None = None, layers: Sequence[int] | int | None = None,
                 batch_size: int = 256, method: str = "exact", verify: int = 0, fast: bool = True,
                 merge: bool | None = None, reuse_prefix: bool = True, progress: bool | None = None) -> TraceResult:
    """ROME's causal trace of ``prompt`` with ``subject`` corrupted.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles`.
        prompt: the prompt, e.g. ``"The Eiffel Tower is in"``.
        subject: the subject inside the prompt (its first occurrence is noised).
        tokenizer: defaults to the one the model carries.
        kind: ``"hidden"`` (restore a block's output), ``"mlp"`` or ``"attn"`` (restore
            that output at ``window`` layers centred on each layer).
        samples: corrupted rows per cell (default 10, or the explicit noise's first dim).
        noise: a multiple of ``std`` (ROME: 3), or an explicit tensor
            ``[samples, n_subject_tokens, d_model]`` added to the subject's embeddings.
        std: the embedding std the multiple applies to; default :func:`embedding_std`
            of the whole vocabulary (pass ``embedding_std(model, subjects)`` for ROME's
            std over a set of subjects).
        seed: seeds the noise (``torch.Generator``); the same noise serves every cell.
        window: layers restored per cell for mlp/attn (default 10).
        answer: ``None`` (the clean run's argmax next token), a token id, or a target
            string (its first token).
        tokens: the token positions to trace (rows; default all).
        layers: the layers to trace (columns; default all).
        batch_size: at most this many rows (cells x samples) per forward.
        method: ``"exact"`` (ROME's algorithm) or ``"atp"``: attribution patching, a
            first-order estimate of every cell from two forwards and one backward
            (:mod:`gradlocate.attribution`; :attr:`TraceResult.estimated` is then true).
        verify: with ``method="atp"``, re-run this many of the highest estimated cells
            exactly, so the reported peak (:meth:`TraceResult.best`) is exact.
        fast: use the optimised executor (:mod:`gradlocate.trace_plan`: fewer, smaller
            forwards, the same scores to 1e-6); ``False``: the reference path, ROME's
            ``trace_with_patch`` for batches of cells.
        merge: fast executor: how cells are grouped into forwards. ``None``: by a cost
            model; ``True``: as many cells per forward as ``batch_size`` allows; ``False``:
            only cells that need exactly the same blocks and positions.
        reuse_prefix: fast executor: take positions before the restored token from the
            corrupted run's key/value cache (where the model has one; else a warning).
        progress: a progress bar (``None``: on a terminal only).

    Returns:
        :class:`TraceResult`.

    Raises:
        ValueError: an empty subject, a subject not in the prompt, ``window < 1``, a bad
            kind, noise of the wrong shape, layers or tokens out of range.

    Example:
        >>> import torch
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=4, d_model=32)
        >>> r = causal_trace(model, "Paris is in", "Paris", kind="mlp", window=2,
        ...                  noise=torch.zeros(3, 5, 32), progress=False)
        >>> bool(torch.allclose(r.scores, torch.tensor(r.high_score), atol=1e-6))  # no noise: nothing to restore
        True
    """
    h = resolve(model, tokenizer)
    return trace_prompt(h, TracePrompt.of(h, prompt, subject), kind=kind, samples=samples, noise=noise, std=std,
                        seed=seed, window=window, answer=answer, tokens=tokens, layers=layers, batch_size=batch_size,
                        method=method, verify=verify, fast=fast, merge=merge, reuse_prefix=reuse_prefix,
                        progress=progress)

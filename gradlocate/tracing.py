"""Causal tracing (causal mediation analysis) as in ROME, on any decoder-only model,
and the CMA layer choice built on it.

Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", ``experiments/causal_trace.py``) asks which hidden states carry a fact:

1. run the prompt cleanly: the answer is the clean run's most likely next token
   (``high_score`` = its probability);
2. add Gaussian noise to the subject tokens' input embeddings in ``samples``
   corrupted copies (``low_score`` = the answer's mean probability over them);
3. for each (token ``t``, layer ``l``) copy the clean state into every corrupted
   copy - the decoder block's output (``kind="hidden"``), or the MLP / attention
   output at the ``window`` layers centred on ``l`` (``kind="mlp"`` / ``"attn"``) - and
   record the answer's mean probability over the corrupted copies.

:func:`causal_trace` returns the whole ``[tokens, layers]`` grid as a
:class:`TraceResult`; :func:`cma_layer` averages the MLP row of the last subject
token over a set of edits and picks the layer with the largest indirect effect (the
"CMA" selector the LGA paper compares with).

The scores are ROME's, computed with fewer and smaller forward passes (see
``docs/causal_tracing.md``): many cells share one forward; blocks below the first
patched layer return the cached corrupted run's output instead of recomputing it;
positions before the restored token are taken from the corrupted run's key/value
cache instead of being recomputed; tokens before the subject (which the noise cannot
reach) score ``low_score`` without a forward; only the last position's logits are
computed.

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

import inspect
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from gradlocate import _compat
from gradlocate.data import EditRequest, as_edits, warn_duplicates
from gradlocate.handles import HandleError, down_projections, find_tokenizer, unwrap_model, validate_indices
from gradlocate.losses import NonFiniteLossError, context_length, target_text
from gradlocate.results import LayerScores, _fmt
from gradlocate.state import input_device, preserved

__all__ = [
    "KINDS",
    "TraceResult",
    "TraceSites",
    "causal_trace",
    "cma_layer",
    "embedding_std",
    "find_trace_sites",
    "subject_token_range",
    "window_layers",
]

KINDS = ("hidden", "mlp", "attn")
_ATTN_WORDS = ("attn", "attention")
# A forward's fixed cost per block, in units of one row-position's compute (see _Tracer._chunks).
_FIXED_COST_CPU = 48.0
_FIXED_COST_ACCELERATOR = 2048.0


# --------------------------------------------------------------------------- sites


@dataclass(eq=False)
class TraceSites:
    """Where causal tracing reads and restores states in one model.

    Attributes:
        root: the ``nn.Module`` that runs.
        embed: the input-embedding module (noise is added to its output).
        blocks: the decoder blocks, in order (``kind="hidden"`` restores their output).
        block_paths: their paths from ``root``.
        mlp_paths: per layer, the module whose output is the MLP's contribution:
            the module holding the down-projection (``model.layers.3.mlp``), or the
            down-projection itself when it sits directly in the block (OPT's ``fc2``).
        attn_paths: per layer, the block's attention module, or ``None`` when the
            blocks have no child named like attention.
    """

    root: nn.Module
    embed: nn.Module
    blocks: list[nn.Module]
    block_paths: list[str]
    mlp_paths: list[str]
    attn_paths: list[str] | None
    handles: Any = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def paths(self, kind: str) -> list[str]:
        """Module paths restored by ``kind`` (``"hidden"``, ``"mlp"`` or ``"attn"``)."""
        _check_kind(kind)
        if kind == "hidden":
            return list(self.block_paths)
        if kind == "mlp":
            return list(self.mlp_paths)
        if self.attn_paths is None:
            names = [n for n, _ in self.blocks[0].named_children()]
            raise HandleError(
                f"kind='attn': the decoder blocks of {type(self.root).__name__} have no attention module "
                f"(no child named like {' / '.join(_ATTN_WORDS)}; children of {self.block_paths[0]}: {names}); "
                f"use kind='hidden' or kind='mlp'"
            )
        return list(self.attn_paths)

    def modules(self, kind: str) -> list[nn.Module]:
        return [self.root.get_submodule(p) for p in self.paths(kind)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _attention_child(block: nn.Module) -> str | None:
    """The block's self-attention child: named like attention, not a norm, not cross-attention."""
    found = []
    for name, mod in block.named_children():
        low = name.lower()
        if not any(w in low for w in _ATTN_WORDS) or "cross" in low:
            continue
        if "norm" in low or low.startswith("ln") or "norm" in type(mod).__name__.lower():
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if n_params:
            found.append((n_params, name))
    return max(found)[1] if found else None


def find_trace_sites(model: Any) -> TraceSites:
    """Locate the embedding, decoder blocks, MLPs and attention modules of ``model``
    (via :func:`~gradlocate.handles.down_projections`, so any architecture gradlocate
    handles works).

    Example:
        >>> from gradlocate.models import tiny
        >>> s = find_trace_sites(tiny("gpt2", n_layers=2, d_model=16)[0])
        >>> s.block_paths[1], s.mlp_paths[1], s.attn_paths[1]
        ('transformer.h.1', 'transformer.h.1.mlp', 'transformer.h.1.attn')
    """
    hs = down_projections(model)
    root = hs.root
    get = getattr(root, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    if not isinstance(embed, nn.Module):
        raise HandleError(
            f"{type(root).__name__} has no get_input_embeddings(): causal tracing adds noise to the "
            f"input embeddings and needs that module"
        )
    n = len(hs)
    block_paths = [_join(hs.blocks_path, str(i)) for i in range(n)]
    blocks = [root.get_submodule(p) for p in block_paths]
    # The MLP's contribution is the output of the module that holds the down-projection.
    parent = hs.down_path.rsplit(".", 1)[0] if "." in hs.down_path else ""
    mlp_inner = parent or hs.down_path
    mlp_paths = [_join(p, mlp_inner) for p in block_paths]
    attn = [_attention_child(b) for b in blocks]
    attn_paths = None if any(a is None for a in attn) else [_join(p, a) for p, a in zip(block_paths, attn)]
    return TraceSites(root, embed, blocks, block_paths, mlp_paths, attn_paths, hs)


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


# --------------------------------------------------------------------------- tokens


def _clean_subject(subject: Any) -> str:
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a string, got {type(subject).__name__}")
    if not subject.strip():
        raise ValueError("subject is empty: give the subject string that appears in the prompt")
    return subject.strip()


def _encode(tokenizer: Any, prompt: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``prompt`` (with the tokenizer's special tokens) and their
    character offsets, or ``None`` for tokenizers that do not report offsets."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__} ({prompt!r})")
    if not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
        offsets = [tuple(map(int, o)) for o in enc["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        enc, offsets = tokenizer(prompt), None
    ids = list(enc["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    return ids, offsets


def _range_from_offsets(offsets: list[tuple[int, int]], c0: int, c1: int) -> tuple[int, int] | None:
    # Tokens whose characters overlap the subject's; zero-width (special) tokens never do.
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
    return (hit[0], hit[-1] + 1) if hit else None


def _range_from_decoding(tokenizer: Any, ids: list[int], subject: str) -> tuple[int, int] | None:
    # ROME's find_token_range: locate the subject in the concatenated decoded tokens.
    toks = [tokenizer.decode([i]) for i in ids]
    whole = "".join(toks)
    c0 = whole.find(subject)
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


def _subject_range(tokenizer: Any, prompt: str, subject: str, ids: list[int],
                   offsets: list[tuple[int, int]] | None) -> tuple[int, int]:
    subject = _clean_subject(subject)
    c0 = prompt.find(subject)
    if c0 < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    found = (_range_from_offsets(offsets, c0, c0 + len(subject)) if offsets is not None
             else _range_from_decoding(tokenizer, ids, subject))
    if found is None:
        raise ValueError(f"subject {subject!r} covers no token of the tokenized prompt {prompt!r}")
    return found


def subject_token_range(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token range ``(start, end)`` of ``subject``'s first occurrence in ``prompt``,
    with ``prompt`` tokenized as causal tracing tokenizes it (special tokens included).

    Uses the tokenizer's character offsets, so it works whether the space before a
    word is part of its token (GPT-2's ``"ĠParis"``) or not (word-level / SentencePiece
    tokenizers); tokenizers without offsets fall back to ROME's decode-and-search.

    Raises:
        ValueError: an empty subject, or one that does not occur in the prompt.

    Example:
        >>> from gradlocate.models import byte_tokenizer
        >>> tok = byte_tokenizer()
        >>> subject_token_range(tok, "The Eiffel Tower is in", "Eiffel")
        (4, 10)
    """
    ids, offsets = _encode(tokenizer, prompt)
    return _subject_range(tokenizer, prompt, subject, ids, offsets)


def _answer_id(tokenizer: Any, prompt: str, answer: Any, vocab: int) -> int | None:
    """``None`` (use the clean run's argmax), a token id, or the first token of a
    target string as it would follow the prompt."""
    if answer is None:
        return None
    if isinstance(answer, bool):
        raise TypeError("answer must be None, a token id or a string")
    if isinstance(answer, int):
        if not 0 <= answer < vocab:
            raise ValueError(f"answer token id {answer} out of range: the vocabulary has {vocab} tokens")
        return answer
    if isinstance(answer, str):
        if not answer.strip():
            raise ValueError("answer is empty: give the target text, a token id, or None for the model's prediction")
        ids = list(tokenizer(target_text(prompt, answer), add_special_tokens=False)["input_ids"])
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
    root = unwrap_model(model)
    emb = root.get_input_embeddings()
    dev = input_device(root)
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
        tok = find_tokenizer(model, tokenizer)
        ids: list[int] = []
        for s in subjects:
            ids += list(tok(_clean_subject(s), add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            raise ValueError("embedding_std needs subjects with at least two tokens in all")
        return float(emb(torch.tensor(ids, device=dev)).double().std().item())


def _make_noise(noise: Any, samples: int | None, n_subj: int, d_model: int, std: float | None,
                seed: int, model: Any) -> tuple[Tensor, dict[str, Any]]:
    """The ``[samples, n_subject_tokens, d_model]`` noise and a description of it."""
    if isinstance(noise, Tensor):
        if noise.dim() != 3 or noise.shape[1] != n_subj or noise.shape[2] != d_model:
            raise ValueError(
                f"explicit noise must have shape [samples, n_subject_tokens={n_subj}, d_model={d_model}], "
                f"got {list(noise.shape)}"
            )
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
        std = embedding_std(model)
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(samples, n_subj, d_model, generator=gen, dtype=torch.float32)
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
        """The (token, layer) with the highest score."""
        i = int(self.scores.argmax())
        r, c = divmod(i, self.scores.shape[1])
        return self.token_indices[r], self.layers[c]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "prompt": self.prompt, "subject": self.subject,
            "answer": self.answer, "answer_text": self.answer_text,
            "scores": self.scores.tolist(), "low_score": self.low_score, "high_score": self.high_score,
            "subject_range": list(self.subject_range), "tokens": list(self.tokens),
            "token_indices": list(self.token_indices), "layers": list(self.layers),
            "window": self.window, "samples": self.samples, "params": dict(self.params),
            "stats": dict(self.stats), "timings": dict(self.timings),
        }

    def __repr__(self) -> str:
        t, l = self.best()
        return (
            f"TraceResult(kind={self.kind!r}, answer={self.answer_text!r}, scores=[{self.scores.shape[0]} tokens x "
            f"{self.scores.shape[1]} layers], low={_fmt(self.low_score)}, high={_fmt(self.high_score)}, "
            f"best=(token {t} {self.tokens[t]!r}, layer {l}): {_fmt(float(self.scores.max()))}, "
            f"subject={self.subject_range})"
        )

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """ROME's heatmap: tokens down, layers across, subject tokens marked ``*``,
        colour from ``low_score``. Returns the matplotlib ``Axes``."""
        from gradlocate.plotting import plot_trace_heatmap

        return plot_trace_heatmap(self, ax=ax, title=title)


# --------------------------------------------------------------------------- engine


@dataclass
class _Cell:
    row: int  # index into the result grid
    col: int
    token: int
    first_block: int  # lowest block that must run
    sites: list[int]  # layers whose `kind` output is restored at `token`


@dataclass
class _Plan:
    """What the hooks do during the current forward."""

    noise: Tensor | None = None  # [rows, n, d] added at positions noise_at
    noise_at: tuple[int, int] = (0, 0)
    record_blocks: list[Tensor | None] | None = None
    record_sites: list[Tensor | None] | None = None
    skip_below: int = 0
    rows: int = 1
    offset: int = 0
    repeats: int = 1
    patches: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)


def _contiguous_input(mod: nn.Module, args: tuple) -> tuple | None:
    # logits_to_keep hands the head a strided slice [rows, 1, d]; torch then multiplies
    # it by a broadcast copy of the weight per row (bmm), ~10x slower than one matmul.
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _states(out: Any, rows: int) -> Float[Tensor, "rows pos d"]:
    """The state tensor of a module output as ``[rows, pos, d]`` (a view: writing into
    it edits the output). OPT's MLP works on flattened ``[rows * pos, d]`` states."""
    h = _first(out)
    return h.view(rows, -1, h.shape[-1]) if h.dim() == 2 else h


class _Hooks:
    """Forward hooks (noise, record, restore) and block-skipping forwards for one
    trace; ``__exit__`` always removes every hook and restores every ``forward``."""

    def __init__(self, sites: TraceSites, kind: str):
        self.sites, self.kind = sites, kind
        self.plan = _Plan()
        self.corrupted: list[Tensor] = []  # corrupted run's block outputs [S, T, d]
        self.block_tail: tuple | None = None  # extra tuple elements of block outputs (all None) or None
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, bool, Any]] = []

    def __enter__(self) -> _Hooks:
        try:
            s = self.sites
            self._handles.append(s.embed.register_forward_hook(self._embed_hook))
            get = getattr(s.root, "get_output_embeddings", None)
            head = get() if callable(get) else None
            if isinstance(head, nn.Module):
                self._handles.append(head.register_forward_pre_hook(_contiguous_input))
            for j, block in enumerate(s.blocks):
                self._handles.append(block.register_forward_hook(self._block_hook(j)))
                had = "forward" in block.__dict__
                self._forwards.append((block, had, block.__dict__.get("forward")))
                block.forward = self._skipping_forward(j, block.forward)
            if self.kind != "hidden":
                for j, m in enumerate(s.modules(self.kind)):
                    self._handles.append(m.register_forward_hook(self._site_hook(j)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block, had, fwd in self._forwards:
            if had:
                block.forward = fwd
            else:
                block.__dict__.pop("forward", None)
        self._forwards.clear()

    def _embed_hook(self, mod: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        p = self.plan
        if p.noise is None:
            return None
        a, b = p.noise_at
        out = out.clone()
        out[:, a:b] += p.noise.to(out.dtype)
        return out

    def _skipping_forward(self, j: int, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            p = self.plan
            if j >= p.skip_below:
                return original(*args, **kwargs)
            # Below the first restored layer the corrupted rows are the corrupted run.
            h = self.corrupted[j][:, p.offset:].repeat(p.repeats, 1, 1)
            return h if self.block_tail is None else (h,) + self.block_tail

        return forward

    def _restore(self, h: Tensor, j: int) -> None:
        patch = self.plan.patches.get(j)
        if patch is not None:
            rows, pos, values = patch
            h[rows, pos] = values.to(h.dtype)

    def _block_hook(self, j: int) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            p = self.plan
            h = _first(out)
            if p.record_blocks is not None:
                p.record_blocks[j] = h.detach().clone()
                if j == 0:
                    self._note_structure(out)
            if self.kind == "hidden":
                if p.record_sites is not None:
                    p.record_sites[j] = h.detach().clone()
                self._restore(h, j)

        return hook

    def _site_hook(self, j: int) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            p = self.plan
            h = _states(out, p.rows)
            if p.record_sites is not None:
                p.record_sites[j] = h.detach().clone()
            self._restore(h, j)

        return hook

    def _note_structure(self, out: Any) -> None:
        # Blocks that return (hidden, extra, ...) with real extras cannot be skipped safely.
        if isinstance(out, tuple):
            self.block_tail = tuple(out[1:]) if all(x is None for x in out[1:]) else False  # type: ignore[assignment]
        else:
            self.block_tail = None

    @property
    def can_skip(self) -> bool:
        return self.block_tail is not False


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else _first(out)


def _answer_probs(logits: Float[Tensor, "rows pos vocab"], answer: int) -> Float[Tensor, " rows"]:
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer]


def _head_share(root: nn.Module, sites: TraceSites) -> float:
    """The output head's size in blocks (it runs once per forward, on the last position)."""
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    block = sum(p.numel() for p in sites.blocks[0].parameters())
    return float(w.numel()) / block if isinstance(w, Tensor) and block else 0.0


class _Tracer:
    """One prompt's trace: clean run, corrupted run, then the restored cells."""

    def __init__(self, sites: TraceSites, kind: str, window: int, batch_size: int, merge: bool | None,
                 reuse_prefix: bool):
        self.sites, self.kind, self.window = sites, kind, window
        self.batch_size, self.merge, self.reuse_prefix = batch_size, merge, reuse_prefix
        root = sites.root
        self.root = root
        self.device = input_device(root)
        self.kw_logits = {"logits_to_keep": 1} if _accepts(root.forward, "logits_to_keep") else {}
        self.cache_arg = _compat.cache_argument(root)
        self.stats = {"forwards": 0, "token_block_evals": 0, "cells": 0, "cells_before_subject": 0}
        self.head_share = _head_share(root, sites)

    def _forward(self, ids: Tensor, rows: int, skip: int, **kw: Any) -> Any:
        self._hooks.plan.rows = rows
        self.stats["forwards"] += 1
        self.stats["token_block_evals"] += rows * ids.shape[1] * (self.sites.n_layers - skip)
        if ids.shape[0] != rows:
            ids = ids.expand(rows, -1)
        if self.cache_arg is not None and self.cache_arg not in kw:
            kw["use_cache"] = False
        return self.root(input_ids=ids, **kw, **self.kw_logits)

    def run(self, ids: list[int], s_range: tuple[int, int], noise: Tensor, answer: int | None,
            token_idx: list[int], layers: list[int], progress: bool) -> dict[str, Any]:
        S = noise.shape[0]
        T = len(ids)
        s0, s1 = s_range
        L = self.sites.n_layers
        x = torch.tensor([ids], device=self.device)
        noise = noise.to(self.device)
        timings: dict[str, float] = {}
        with _Hooks(self.sites, self.kind) as hooks:
            self._hooks = hooks
            plan = hooks.plan
            # Clean run: the answer, high_score, and the states to restore.
            t0 = time.perf_counter()
            plan.record_blocks, plan.record_sites = [None] * L, [None] * L
            out = self._forward(x, 1, 0)
            clean = plan.record_sites
            plan.record_blocks = plan.record_sites = None
            probs = torch.softmax(_logits(out)[0, -1].float(), dim=-1)
            if answer is None:
                answer = int(probs.argmax())
            high = float(probs[answer])
            timings["clean"] = time.perf_counter() - t0

            # Corrupted run: low_score, each block's output and the key/value cache.
            t0 = time.perf_counter()
            plan.noise, plan.noise_at = noise, (s0, s1)
            plan.record_blocks = [None] * L
            kv = None
            kw: dict[str, Any] = {}
            why = None
            if self.reuse_prefix:
                kw = self._fresh_cache()
                if not kw:
                    why = f"{type(self.root).__name__}'s forward takes no key/value cache"
            out = self._forward(x, S, 0, **kw)
            hooks.corrupted = plan.record_blocks  # type: ignore[assignment]
            plan.record_blocks = None
            low = float(_answer_probs(_logits(out), answer).mean())
            if kw:
                kv, why = self._cached_kv(_compat.returned_cache(out), T)
            if why is not None:
                warnings.warn(f"causal_trace: prefix reuse is off ({why}): every forward recomputes the positions "
                              f"before the restored token, which is slower; the scores are the same", stacklevel=4)
            del out
            timings["corrupted"] = time.perf_counter() - t0

            # The cells.
            t0 = time.perf_counter()
            scores = torch.full((len(token_idx), len(layers)), low, dtype=torch.float32)
            cells = self._cells(token_idx, layers, s0, hooks.can_skip)
            self.stats["cells"] = len(token_idx) * len(layers)
            self.stats["cells_before_subject"] = self.stats["cells"] - len(cells)
            chunks = self._chunks(cells, S, T, kv is not None)
            from tqdm.auto import tqdm

            for chunk in tqdm(chunks, desc=f"causal trace ({self.kind})", disable=not progress, leave=False):
                p = self._run_chunk(chunk, hooks, x, noise, clean, kv, (s0, s1), answer, T)
                for c, v in zip(chunk, p.tolist()):
                    scores[c.row, c.col] = v
            plan.noise = None
            timings["cells"] = time.perf_counter() - t0
        rome_rows = S + 1
        self.stats["prefix_cache"] = int(kv is not None)
        # ROME: one forward of 1 clean + S corrupted rows per cell, plus its clean
        # prediction and its low_score run, each on the same batch.
        self.stats["rome_forwards"] = self.stats["cells"] + 2
        self.stats["rome_token_block_evals"] = (self.stats["cells"] + 2) * rome_rows * T * L
        return {"scores": scores, "low": low, "high": high, "answer": answer, "timings": timings}

    # ----------------------------------------------------------- cache

    def _fresh_cache(self) -> dict[str, Any]:
        cache = _compat.new_cache(self.root) if self.cache_arg else None
        return {} if cache is None else {self.cache_arg: cache, "use_cache": True}

    def _cached_kv(self, cache: Any, T: int) -> tuple[Any, str | None]:
        """The corrupted run's key/value cache if it holds all ``T`` positions of every
        layer (else ``None`` and the reason: prefixes are then recomputed)."""
        if cache is None or not hasattr(cache, "get_seq_length"):
            return None, f"{type(self.root).__name__}'s forward returned no key/value cache"
        for layer in range(self.sites.n_layers):
            try:
                n = int(cache.get_seq_length(layer))
            except (TypeError, IndexError, AttributeError):
                return None, "its key/value cache does not report a length per layer"
            if n != T:
                return None, (f"its key/value cache holds {n} of the prompt's {T} positions at layer {layer} "
                              f"(a sliding window shorter than the prompt?)")
        return cache, None

    def _prefix_cache(self, cache: Any, o: int, S: int, repeats: int) -> Any:
        return _compat.prefix_cache(cache, o, torch.arange(S, device=self.device).repeat(repeats))

    # ----------------------------------------------------------- cells

    def _cells(self, token_idx: list[int], layers: list[int], s0: int, can_skip: bool) -> list[_Cell]:
        L = self.sites.n_layers
        cells = []
        for r, t in enumerate(token_idx):
            if t < s0:
                continue  # the noise cannot reach a state before the subject: restoring it is a no-op
            for c, l in enumerate(layers):
                if self.kind == "hidden":
                    sites, first = [l], l + 1
                else:
                    sites = list(window_layers(l, self.window, L))
                    first = sites[0]
                cells.append(_Cell(r, c, t, first if can_skip else 0, sites))
        return cells

    def _chunks(self, cells: list[_Cell], S: int, T: int, prefix: bool) -> list[list[_Cell]]:
        """Split the cells into forwards of at most ``batch_size`` rows, minimising a
        cost model: a forward that runs blocks ``f..L-1`` on ``R`` rows of ``P``
        positions costs ``(L - f) * (K + R * P)`` plus the output head's share, where
        ``K`` (the fixed per-block cost - reading the weights, launching kernels - in
        row-position units) is 48 on CPU and 2048 on accelerators. Merging cells saves
        the fixed cost; it costs blocks below a cell's first restored layer and positions
        before its token, both recomputed. Exact over contiguous runs of the cells
        sorted by (token, first block) or (first block, token), whichever is cheaper."""
        if not cells:
            return []
        merge = self.merge
        if merge is None:
            fixed = _FIXED_COST_CPU if self.device.type == "cpu" else _FIXED_COST_ACCELERATOR
        else:
            fixed = 1e9 if merge else 0.0
        L, per = self.sites.n_layers, max(1, self.batch_size // S)
        head = self.head_share

        def cost(first: int, token: int, n: int) -> float:
            rows, pos = n * S, T - (token if prefix else 0)
            return (L - first) * (fixed + rows * pos) + head * (fixed + rows) + 1e-6  # ties: fewer forwards

        best: tuple[float, list[list[_Cell]]] | None = None
        for key in (lambda c: (c.token, c.first_block, c.col), lambda c: (c.first_block, c.token, c.col)):
            order = sorted(cells, key=key)
            n = len(order)
            total, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
            for i in range(1, n + 1):
                f, t = L, T
                for j in range(i - 1, max(-1, i - 1 - per), -1):
                    f, t = min(f, order[j].first_block), min(t, order[j].token)
                    c = total[j] + cost(f, t, i - j)
                    if c < total[i]:
                        total[i], cut[i] = c, j
            chunks, i = [], n
            while i > 0:
                chunks.append(order[cut[i]:i])
                i = cut[i]
            if best is None or total[n] < best[0]:
                best = (total[n], chunks[::-1])
        return best[1]  # type: ignore[index]

    def _run_chunk(self, chunk: list[_Cell], hooks: _Hooks, x: Tensor, noise: Tensor, clean: list[Tensor],
                   kv: Any, s_range: tuple[int, int], answer: int,
                   T: int) -> Float[Tensor, " cells"]:
        S, C = noise.shape[0], len(chunk)
        s0, s1 = s_range
        o = min(c.token for c in chunk) if kv is not None else 0
        plan = hooks.plan
        plan.offset, plan.repeats = o, C
        plan.skip_below = min(c.first_block for c in chunk)
        # Noise on the subject positions inside this forward's window of positions.
        a = max(s0, o)
        plan.noise_at = (a - o, max(a, s1) - o)
        plan.noise = noise[:, a - s0:max(a, s1) - s0].repeat(C, 1, 1)
        plan.patches = self._patches(chunk, clean, S, o)
        kw = {} if o == 0 else {self.cache_arg: self._prefix_cache(kv, o, S, C), "use_cache": True}  # type: ignore[dict-item]
        out = self._forward(x[:, o:], C * S, plan.skip_below, **kw)
        plan.patches = {}
        return _answer_probs(_logits(out), answer).view(C, S).mean(dim=1).cpu()

    def _patches(self, chunk: list[_Cell], clean: list[Tensor], S: int, o: int) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Per restored layer: (rows, positions, clean values) to write."""
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for i, c in enumerate(chunk):
            for j in c.sites:
                by_layer.setdefault(j, []).append((i, c.token))
        patches = {}
        for j, items in by_layer.items():
            cell_i = torch.tensor([i for i, _ in items])
            tok = torch.tensor([t for _, t in items])
            rows = (cell_i[:, None] * S + torch.arange(S)).reshape(-1)
            src = tok.repeat_interleave(S)
            values = clean[j][0, src.to(clean[j].device)]
            patches[j] = (rows.to(self.device), (src - o).to(self.device), values)
        return patches


# --------------------------------------------------------------------------- public


def _token_indices(tokens: Any, T: int) -> list[int]:
    if tokens is None:
        return list(range(T))
    return validate_indices(tokens, T, "token position", f"the prompt has {T} tokens")


def _trace(sites: TraceSites, tok: Any, model: Any, prompt: str, subject: str, *, kind: str, samples: int | None,
           noise: Any, std: float | None, seed: int, window: int, answer: Any, tokens: Any, layers: Any,
           batch_size: int, merge: bool | None, reuse_prefix: bool, progress: bool) -> TraceResult:
    t_start = time.perf_counter()
    _check_kind(kind)
    window_layers(0, window, 1)  # validates window
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per forward), got {batch_size!r}")
    sites.paths(kind)  # clear error if the model has no module of this kind
    ids, offsets = _encode(tok, prompt)
    ctx = context_length(sites.root)
    if ctx is not None and len(ids) > ctx:
        raise ValueError(f"prompt {prompt[:60]!r}... is {len(ids)} tokens, longer than the model's context of {ctx}; "
                         f"shorten the prompt")
    s_range = _subject_range(tok, prompt, subject, ids, offsets)
    hs_layers = sites.handles.layer_indices(layers)
    token_idx = _token_indices(tokens, len(ids))
    d_model = int(sites.embed.weight.shape[1]) if hasattr(sites.embed, "weight") else None
    if d_model is None:
        raise HandleError("the input embedding has no 2-D weight: cannot size the noise")
    n_vocab = int(getattr(getattr(sites.root, "config", None), "vocab_size", 0) or sites.embed.weight.shape[0])
    answer_id = _answer_id(tok, prompt, answer, n_vocab)
    noise_t, noise_info = _make_noise(noise, samples, s_range[1] - s_range[0], d_model, std, seed, model)
    tracer = _Tracer(sites, kind, window, batch_size, merge, reuse_prefix)
    with preserved(sites.root), torch.no_grad():
        out = tracer.run(ids, s_range, noise_t.to(sites.embed.weight.dtype), answer_id, token_idx, hs_layers,
                         progress)
    if not (math.isfinite(out["high"]) and math.isfinite(out["low"]) and bool(torch.isfinite(out["scores"]).all())):
        raise NonFiniteLossError(
            f"causal trace of {prompt!r}: the answer's probability is not finite (clean {out['high']}, corrupted "
            f"{out['low']}): the model outputs NaN/inf; check its weights, or its dtype for overflow"
        )
    timings = out["timings"]
    timings["total"] = time.perf_counter() - t_start
    return TraceResult(
        scores=out["scores"], low_score=out["low"], high_score=out["high"], subject_range=s_range,
        tokens=[tok.decode([i]) for i in ids], token_indices=token_idx, layers=hs_layers, kind=kind,
        answer=out["answer"], answer_text=tok.decode([out["answer"]]), prompt=prompt, subject=_clean_subject(subject),
        window=window, samples=int(noise_t.shape[0]),
        params={**noise_info, "batch_size": batch_size, "reuse_prefix": reuse_prefix},
        stats=tracer.stats, timings=timings,
    )


def causal_trace(model: Any, prompt: str, subject: str, *, tokenizer: Any = None, kind: str = "hidden",
                 samples: int | None = None, noise: float | Float[Tensor, "samples subject_tokens d_model"] = 3.0,
                 std: float | None = None, seed: int = 0, window: int = 10, answer: int | str | None = None,
                 tokens: Sequence[int] | int | None = None, layers: Sequence[int] | int | None = None,
                 batch_size: int = 256, merge: bool | None = None, reuse_prefix: bool = True,
                 progress: bool = True) -> TraceResult:
    """ROME's causal trace of ``prompt`` with ``subject`` corrupted.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
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
        seed: seed of the noise (``torch.Generator``); the same noise serves every cell.
        window: layers restored per cell for mlp/attn (default 10).
        answer: ``None`` (the clean run's argmax next token), a token id, or a target
            string (its first token).
        tokens: the token positions to trace (rows; default all).
        layers: the layers to trace (columns; default all).
        batch_size: at most this many rows (cells x samples) per forward.
        merge: how cells are grouped into forwards. ``None``: by a cost model that
            weighs a forward's fixed cost (weights read, kernels launched) against the
            blocks and positions merging recomputes - few merges on CPU, many on
            accelerators; ``True``: as many cells per forward as ``batch_size`` allows;
            ``False``: only cells that need exactly the same blocks and positions.
        reuse_prefix: take positions before the restored token from the corrupted
            run's key/value cache (where the model supports one).
        progress: show a progress bar.

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
    sites = find_trace_sites(model)
    tok = find_tokenizer(model, tokenizer)
    return _trace(sites, tok, model, prompt, subject, kind=kind, samples=samples, noise=noise, std=std, seed=seed,
                  window=window, answer=answer, tokens=tokens, layers=layers, batch_size=batch_size, merge=merge,
                  reuse_prefix=reuse_prefix, progress=progress)


def _edit_answer(e: EditRequest, answer: str) -> str | None:
    if answer == "predicted":
        return None
    if answer == "new":
        return e.target_new
    if answer == "old":
        if e.old_answer is None:
            raise ValueError(f"answer='old' but edit {e.prompt!r} has no ground_truth or pred")
        return e.old_answer
    raise ValueError(f"answer must be 'predicted', 'old' or 'new', got {answer!r}")


def cma_layer(model: Any, edits: Any, *, tokenizer: Any = None, samples: int | None = None,
              noise: float | Sequence[Tensor] = 3.0, std: float | None = None, seed: int = 0, window: int = 10,
              layers: Sequence[int] | int | None = None, answer: str = "predicted", batch_size: int = 256,
              merge: bool | None = None, progress: bool = True) -> LayerScores:
    """The CMA layer choice: the layer whose MLPs (restored in a window of ``window``
    layers centred on it) at the last subject token have the largest average indirect
    effect ``score - low_score`` over ``edits``.

    Only the last subject token's row of the ``kind="mlp"`` trace is computed.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: :class:`~gradlocate.data.EditRequest` objects or dicts; each needs a
            ``subject`` that occurs in its ``prompt``.
        noise: a multiple of ``std``, or one explicit tensor
            ``[samples, n_subject_tokens, d_model]`` per edit.
        std: the embedding std; default ROME's: :func:`embedding_std` over the edits' subjects.
        seed: seed of the noise (the same seed for every edit, as ROME).
        answer: whose probability is traced: ``"predicted"`` (the clean argmax, as
            ROME), ``"old"`` (the edit's ground truth) or ``"new"`` (its target).
        samples: as in :func:`causal_trace`.
        window: as in :func:`causal_trace`.
        layers: as in :func:`causal_trace`.
        batch_size: as in :func:`causal_trace`.
        merge: as in :func:`causal_trace`.
        progress: show a progress bar over the edits.

    Returns:
        :class:`~gradlocate.results.LayerScores` with ``method="cma"``, ``scores`` the
        mean indirect effect per layer; extras ``"ie_std"`` (its std over the edits) and
        ``"mean_prob"`` (the mean restored probability); ``params["low_score"]`` /
        ``["high_score"]`` the means over the edits.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=4, d_model=32)
        >>> edits = [{"prompt": "Paris is the capital of", "target_new": "Italy", "subject": "Paris"},
        ...          {"prompt": "The Nile flows through", "target_new": "Peru", "subject": "The Nile"}]
        >>> r = cma_layer(model, edits, samples=3, window=2, progress=False)
        >>> r.method, len(r.scores), r.selected == r.layers[max(range(4), key=r.scores.__getitem__)]
        ('cma', 4, True)
    """
    t_start = time.perf_counter()
    edits = as_edits(edits)
    warn_duplicates(edits)
    for i, e in enumerate(edits):
        if e.subject is None:
            raise ValueError(f"edit {i} ({e.prompt!r}) has no subject: cma_layer traces the subject's tokens")
        if _clean_subject(e.subject) not in e.prompt:
            raise ValueError(f"edit {i}: subject {e.subject!r} does not occur in its prompt {e.prompt!r}")
    if isinstance(noise, Tensor):
        raise TypeError("cma_layer takes a multiple of the embedding std, or a list with one noise tensor per edit "
                        "(subjects differ in length), not one tensor")
    explicit = not isinstance(noise, (int, float)) or isinstance(noise, bool)
    if explicit:
        noise = list(noise)  # type: ignore[arg-type]
        if len(noise) != len(edits):
            raise ValueError(f"{len(noise)} explicit noise tensors for {len(edits)} edits: give one per edit")
    sites = find_trace_sites(model)
    tok = find_tokenizer(model, tokenizer)
    t0 = time.perf_counter()
    if std is None and not explicit:
        std = embedding_std(model, [e.subject for e in edits], tokenizer=tok)  # type: ignore[misc]
    t_std = time.perf_counter() - t0
    from tqdm.auto import tqdm

    ies, scores, lows, highs = [], [], [], []
    layer_idx: list[int] = []
    for i, e in enumerate(tqdm(edits, desc="cma_layer", disable=not progress)):
        s_range = subject_token_range(tok, e.prompt, e.subject)  # type: ignore[arg-type]
        r = _trace(sites, tok, model, e.prompt, e.subject, kind="mlp", samples=samples,  # type: ignore[arg-type]
                   noise=noise[i] if explicit else noise, std=std, seed=seed, window=window,  # type: ignore[index]
                   answer=_edit_answer(e, answer), tokens=[s_range[1] - 1], layers=layers, batch_size=batch_size,
                   merge=merge, reuse_prefix=True, progress=False)
        layer_idx = r.layers
        scores.append(r.scores[0])
        ies.append(r.scores[0] - r.low_score)
        lows.append(r.low_score)
        highs.append(r.high_score)
    ie = torch.stack(ies).double()
    mean = ie.mean(0)
    best = int(mean.argmax())
    return LayerScores(
        method="cma", scores=mean.tolist(), eligible=[True] * len(layer_idx), selected=layer_idx[best],
        params={"kind": "mlp", "token": "last_subject", "samples": r.samples,
                "noise": "explicit" if explicit else float(noise), "std": std, "seed": seed,  # type: ignore[arg-type]
                "window": window, "answer": answer, "n_edits": len(edits),
                "low_score": float(sum(lows) / len(lows)), "high_score": float(sum(highs) / len(highs))},
        extras={"ie_std": (ie.std(0) if len(ies) > 1 else torch.zeros_like(mean)).tolist(),
                "mean_prob": torch.stack(scores).double().mean(0).tolist()},
        timings={"noise_std": t_std, "trace": time.perf_counter() - t0 - t_std,
                 "setup": t0 - t_start},
        layers=layer_idx,
    )

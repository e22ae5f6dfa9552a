"""Handles on every decoder layer's MLP down-projection.

The down-projection is the linear map d_mlp -> d_model that closes each decoder
block's MLP (``mlp.down_proj`` in LLaMA, ``mlp.c_proj`` in GPT-2, ``fc2`` in OPT,
``mlp.dense_4h_to_h`` in GPT-NeoX ...). It is the editing site of ROME, MEMIT,
GradRatio-Select, LGA and LocFT-BF. gradlocate finds it structurally, with no table
of architectures:

1. the decoder-block list is the ``nn.ModuleList`` of same-typed blocks holding the
   most parameters;
2. in each block the down-projection is the linear map (``nn.Linear`` or GPT-2's
   ``Conv1D``) outside attention whose output width is d_model and whose input width
   (d_mlp) is the largest.

An explicit override (``layers="model.layers", down="mlp.down_proj"``) serves
exotic models.

Example:
    >>> from gradlocate import down_projections
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16, d_mlp=40)
    >>> hs = down_projections(model)
    >>> [(h.layer, h.path, tuple(h.weight.shape)) for h in hs]
    [(0, 'model.layers.0.mlp.down_proj', (16, 40)), (1, 'model.layers.1.mlp.down_proj', (16, 40))]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from gradlocate import _compat

__all__ = [
    "DownProjection",
    "DownProjections",
    "HandleError",
    "down_projections",
    "instrumented",
    "unwrap_model",
    "find_tokenizer",
    "check_causal_lm",
    "validate_indices",
]

# Submodule names that mark attention: its output projection also maps onto d_model.
_ATTENTION_WORDS = ("attn", "attention")
# Names that mark mixture-of-experts blocks.
_MOE_WORDS = ("experts", "moe", "sparse_moe", "block_sparse_moe")


class HandleError(ValueError):
    """The model's decoder blocks or MLP down-projections could not be found."""


# --------------------------------------------------------------------------- unwrap


def unwrap_model(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` that really runs ``model``.

    Accepts a transformers ``PreTrainedModel`` (returned as is), an nnsight wrapper
    (``NNsight``, ``LanguageModel``, ``TransformersModel``: its wrapped module) or a
    TransformerLens ``TransformerBridge`` (its ``original_model``).

    Example:
        >>> from nnsight import NNsight
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1)
        >>> unwrap_model(NNsight(model)) is model
        True
    """
    # TransformerLens bridge: the HF model whose submodules it wraps in place.
    original = _maybe_attr(model, "original_model")
    if isinstance(original, nn.Module):
        return original
    # nnsight Envoy: the wrapped torch module.
    if _is_nnsight(model):
        inner = _compat.wrapped_module(model)
        if inner is not None:
            return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"gradlocate needs a torch model: a transformers PreTrainedModel, an nnsight "
        f"wrapper or a TransformerLens TransformerBridge, got {type(model).__name__}"
    )


def _maybe_attr(obj: Any, name: str) -> Any:
    # nnsight envoys wrap unknown attributes lazily: look without triggering that.
    if _is_nnsight(obj):
        try:
            return object.__getattribute__(obj, name)
        except AttributeError:
            return None
    return getattr(obj, name, None)


def _is_nnsight(obj: Any) -> bool:
    try:
        from nnsight.intervention.envoy import Envoy
    except ImportError:  # pragma: no cover - nnsight is a dependency
        return False
    return isinstance(obj, Envoy)


def find_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer to use with ``model``: ``tokenizer`` if given, else the one the
    wrapper carries (nnsight ``LanguageModel.tokenizer``, TransformerLens
    ``bridge.tokenizer``, or one attached by :mod:`gradlocate.models`).

    A tokenizer without a pad token gets its EOS token as pad token (with a warning),
    since every batched computation here pads.
    """
    tok = tokenizer
    if tok is None:
        for obj in (model, unwrap_model(model)):
            cand = _maybe_attr(obj, "tokenizer")
            if cand is None and not _is_nnsight(obj):
                cand = getattr(obj, "gradlocate_tokenizer", None)
            if cand is not None and callable(cand):
                tok = cand
                break
    if tok is None:
        raise ValueError(
            f"no tokenizer: pass tokenizer=... (a transformers tokenizer for "
            f"{type(unwrap_model(model)).__name__}); plain torch models carry none"
        )
    if model is not None:
        _check_vocab(unwrap_model(model), tok)
    if getattr(tok, "pad_token", None) is None:
        eos = getattr(tok, "eos_token", None)
        if eos is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token to pad with: "
                "set tokenizer.pad_token before calling gradlocate"
            )
        import warnings

        warnings.warn(
            f"tokenizer has no pad token: using its EOS token {eos!r} as pad token "
            "(padding is masked out of every loss)",
            stacklevel=2,
        )
        tok.pad_token = eos
    return tok


def _check_vocab(root: nn.Module, tok: Any) -> None:
    """A tokenizer with more ids than the model has embedding rows is another model's."""
    get = getattr(root, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    try:
        n_tok = len(tok)
    except TypeError:
        return
    if isinstance(w, torch.Tensor) and w.dim() == 2 and n_tok > w.shape[0]:
        raise ValueError(
            f"tokenizer/model mismatch: the tokenizer has {n_tok} tokens but {type(root).__name__}'s "
            f"embedding has {w.shape[0]} rows; pass the tokenizer that belongs to this model"
        )


# --------------------------------------------------------------------------- handles


@dataclass(eq=False)
class DownProjection:
    """One decoder layer's MLP down-projection.

    Attributes:
        layer: index of the decoder block (0 = closest to the embeddings).
        path: the module's path from the model root, e.g. ``"model.layers.3.mlp.down_proj"``.
        module: the ``nn.Linear`` / ``Conv1D`` module itself.
        parameter: its weight ``nn.Parameter`` as stored (GPT-2's ``Conv1D`` stores
            ``[d_mlp, d_model]``).
        transposed: whether ``parameter`` is stored ``[d_mlp, d_model]``.
    """

    layer: int
    path: str
    module: nn.Module
    parameter: nn.Parameter
    transposed: bool
    _owner: DownProjections | None = field(default=None, repr=False)

    @property
    def weight(self) -> Float[Tensor, "d_model d_mlp"]:
        """The weight as ``[d_model, d_mlp]``, sharing storage with the model.

        Writing into it (``h.weight.add_(delta)``) edits the model. It is detached
        from autograd; use :attr:`parameter` for gradients and :meth:`canonical`
        to bring a gradient to this layout.
        """
        w = self.parameter.detach()
        return w.T if self.transposed else w

    def canonical(self, t: Tensor) -> Float[Tensor, "d_model d_mlp"]:
        """A tensor laid out like :attr:`parameter` (e.g. its ``.grad``) as ``[d_model, d_mlp]``."""
        return t.T if self.transposed else t

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_mlp(self) -> int:
        return int(self.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.parameter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parameter.dtype

    def envoy(self, traced: Any = None) -> Any:
        """The nnsight ``Envoy`` of this module, inside ``traced`` (default: the
        owning :class:`DownProjections`' nnsight wrapper)."""
        if traced is None:
            if self._owner is None:
                raise RuntimeError("this handle is not attached to a model")
            traced = self._owner.nnsight
        env = traced
        for part in self.path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    @property
    def input(self) -> Any:
        """Inside an nnsight trace: the down-projection's input activations
        ``[batch, pos, d_mlp]`` (the MLP's hidden activations)."""
        return self.envoy().input

    @property
    def output(self) -> Any:
        """Inside an nnsight trace: the down-projection's output ``[batch, pos, d_model]``."""
        return self.envoy().output

    def __repr__(self) -> str:
        return (
            f"DownProjection(layer={self.layer}, path={self.path!r}, "
            f"weight=[{self.d_model}, {self.d_mlp}]{' (stored transposed)' if self.transposed else ''}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device})"
        )


class DownProjections(Sequence[DownProjection]):
    """The down-projections of every decoder layer, in order, plus the model they
    belong to.

    Attributes:
        model: the wrapper the user passed (HF model, nnsight wrapper or bridge).
        root: the ``nn.Module`` that runs (see :func:`unwrap_model`).
        blocks_path: path of the decoder-block ``ModuleList``.
        down_path: path of the down-projection inside each block.
    """

    def __init__(self, model: Any, root: nn.Module, blocks_path: str, down_path: str,
                 handles: list[DownProjection]):
        self.model = model
        self.root = root
        self.blocks_path = blocks_path
        self.down_path = down_path
        self._handles = handles
        for h in handles:
            h._owner = self
        self._nnsight = model if _is_nnsight(model) else None
        self._had_forward: dict[tuple[int, str], Any] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self._handles[i]
        n = len(self._handles)
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"layer index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range: the model has {n} layers (0..{n - 1})")
        return self._handles[i]

    def __iter__(self) -> Iterator[DownProjection]:
        return iter(self._handles)

    @property
    def n_layers(self) -> int:
        return len(self._handles)

    @property
    def nnsight(self) -> Any:
        """An nnsight wrapper of the model (the user's own if they passed one).

        Wrapping installs nnsight's forward on every submodule for as long as the
        wrapper is used; prefer :meth:`trace`, which removes it afterwards.
        """
        if self._nnsight is None:
            from nnsight import NNsight

            self._had_forward = _instrumentation(self.root)
            self._nnsight = NNsight(self.root)
        return self._nnsight

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """``with hs.trace(input_ids):`` an nnsight trace of :attr:`nnsight`, in which
        ``hs[l].input`` / ``hs[l].output`` are layer ``l``'s activations. Call
        :meth:`release` afterwards to take nnsight's instrumentation off a plain model.

        Example:
            >>> import torch
            >>> from gradlocate.models import tiny
            >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
            >>> hs = down_projections(model)
            >>> with hs.trace(torch.tensor([[1, 2, 3]])):
            ...     a = hs[1].input.save()
            >>> tuple(a.shape)
            (1, 3, 64)
            >>> hs.release()
        """
        # nnsight compiles the body of the `with` that enters the tracer, so the
        # tracer is returned as is rather than wrapped in a context manager.
        return self.nnsight.trace(*inputs, **kwargs)

    def release(self) -> None:
        """Remove the nnsight instrumentation this object installed (a no-op when the
        user passed an nnsight wrapper of their own)."""
        if self._nnsight is not None and not _is_nnsight(self.model):
            _uninstrument(self.root, self._had_forward)
            self._nnsight = None

    def parameters(self) -> list[nn.Parameter]:
        return [h.parameter for h in self._handles]

    def layer_indices(self, layers: Sequence[int] | int | None) -> list[int]:
        """Validate a user's layer selection (None = all; negatives count from the end)."""
        if layers is None:
            return list(range(len(self)))
        return validate_indices(layers, len(self), "layer", f"the model has {len(self)} decoder layers")

    def __repr__(self) -> str:
        h0 = self._handles[0]
        return (
            f"DownProjections({len(self)} layers of {type(self.root).__name__}: "
            f"{self.blocks_path}.<i>.{self.down_path}, weight [{h0.d_model}, {h0.d_mlp}]"
            f"{', stored transposed' if h0.transposed else ''})"
        )

    def to_table(self) -> str:
        """A plain-text table of the handles (layer, path, shape)."""
        rows = [f"{'layer':>5}  {'path':<48} {'weight [d_model, d_mlp]':>24}"]
        for h in self._handles:
            rows.append(f"{h.layer:>5}  {h.path:<48} {str([h.d_model, h.d_mlp]):>24}")
        return "\n".join(rows)


def validate_indices(values: Sequence[int] | int, n: int, what: str, context: str) -> list[int]:
    """Check user-given indices into a length-``n`` axis: ints (numpy ints too), in
    ``-n..n-1`` (negatives count from the end), non-empty, no duplicates.

    Example:
        >>> validate_indices([-1, 0], 4, "layer", "the model has 4 layers")
        [3, 0]
    """
    import numbers

    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = [values]
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what}s must be ints, got {v!r}")
        v = int(v)
        if not -n <= v < n:
            raise ValueError(f"{what} {v} out of range: {context} (0..{n - 1})")
        out.append(v % n)
    if not out:
        raise ValueError(f"{what}s is empty: give at least one {what} index")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}s has duplicates: {list(values)}")
    return out


@contextlib.contextmanager
def instrumented(model: nn.Module) -> Iterator[Any]:
    """Wrap ``model`` with nnsight for the duration of the block, then remove every
    forward nnsight installed, so the model is exactly as before (nethook style).

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1)
        >>> with instrumented(model) as traced:
        ...     pass
        >>> any("forward" in m.__dict__ for m in model.modules())
        False
    """
    from nnsight import NNsight

    had = _instrumentation(model)
    try:
        yield NNsight(model)
    finally:
        _uninstrument(model, had)


def _instrumentation(model: nn.Module) -> dict[tuple[int, str], Any]:
    return _compat.instrumentation(model)


def _uninstrument(model: nn.Module, had: dict[tuple[int, str], Any]) -> None:
    _compat.uninstrument(model, had)


# --------------------------------------------------------------------------- discovery


def _linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, stored_transposed) of a linear-like leaf module."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), int(w.shape[0]), False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # transformers' Conv1D computes x @ W with W stored [in, out].
        return int(w.shape[0]), int(w.shape[1]), True
    if isinstance(module, (nn.Embedding, nn.LayerNorm)) or "norm" in type(module).__name__.lower():
        return None
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features), False
    return None


def _d_model(root: nn.Module) -> int | None:
    get = getattr(root, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[1])
    cfg = getattr(root, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of >= 1 same-typed blocks that hold parameters, largest first."""
    found = []
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and _n_params(mod) > 0:
                found.append((name, mod))
    found.sort(key=lambda nm: (-_n_params(nm[1]), nm[0].count(".")))
    return found


def _is_moe(block: nn.Module) -> bool:
    for name, mod in block.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if leaf in _MOE_WORDS or "expert" in type(mod).__name__.lower() or "moe" in type(mod).__name__.lower():
            return True
        for p in mod.parameters(recurse=False):
            if p.dim() == 3:
                return True
    return False


def _find_down(block: nn.Module, d_model: int | None) -> tuple[str, int, int, bool] | None:
    cands = []
    for name, mod in block.named_modules():
        if not name:
            continue
        dims = _linear_dims(mod)
        if dims is None:
            continue
        lowered = name.lower()
        if any(w in part for part in lowered.split(".") for w in _ATTENTION_WORDS):
            continue
        din, dout, tr = dims
        cands.append((name, din, dout, tr))
    if d_model is None and cands:
        # The width most linear maps write to is the residual stream's.
        outs = [c[2] for c in cands]
        d_model = max(set(outs), key=outs.count)
    best = [c for c in cands if c[2] == d_model]
    if not best:
        return None
    wider = [c for c in best if c[1] != d_model]
    pool = wider or best
    # Widest input = MLP hidden width; prefer MLP-ish names on ties.
    pool.sort(key=lambda c: (-c[1], 0 if any(w in c[0].lower() for w in ("mlp", "ffn", "feed_forward", "fc", "down")) else 1))
    return pool[0]


def _moe_error(root: nn.Module, blocks_path: str, block: nn.Module) -> HandleError:
    inner = [n for n, _ in block.named_modules() if n][:12]
    return HandleError(
        f"{type(root).__name__} is a mixture-of-experts model: each layer's MLP is a set of "
        f"experts, not one down-projection, and gradlocate does not pick an expert for you. "
        f"Pass an explicit override naming one linear map per block, e.g. "
        f"down_projections(model, layers={blocks_path!r}, down='<path inside the block>'), "
        f"or use a dense model. Modules in {blocks_path}.0: {inner}"
    )


def _causal_lm_names() -> set[str]:
    return _compat.causal_lm_class_names()


def check_causal_lm(root: nn.Module) -> None:
    """Refuse encoder-only, encoder-decoder and head-less models with a clear error.

    Plain ``nn.Module``s without a transformers config pass (the caller vouches for them).
    """
    cfg = getattr(root, "config", None)
    if cfg is None:
        return
    name = type(root).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        raise HandleError(
            f"{name} is an encoder-decoder (seq2seq) model; gradlocate works on decoder-only causal "
            f"language models (AutoModelForCausalLM)"
        )
    if name.endswith(("ForCausalLM", "LMHeadModel")) or name in _causal_lm_names():
        return
    model_type = getattr(cfg, "model_type", "?")
    hint = (f"load it with AutoModelForCausalLM.from_pretrained(...)"
            if getattr(root, "get_output_embeddings", lambda: None)() is None else
            "it is not a causal language model (encoder-only models such as BERT are not supported)")
    raise HandleError(f"{name} (model_type={model_type!r}) is not a causal LM with a language-model head: {hint}")


def down_projections(model: Any, *, layers: str | None = None, down: str | None = None,
                     causal: bool = True) -> DownProjections:
    """Find the MLP down-projection of every decoder layer.

    Args:
        model: a transformers ``PreTrainedModel``, an nnsight wrapper
            (``NNsight`` / ``LanguageModel`` / ``TransformersModel``) or a TransformerLens
            ``TransformerBridge``.
        layers: override: path of the decoder-block ``ModuleList`` (e.g. ``"model.layers"``).
        down: override: path of the down-projection inside each block (e.g. ``"mlp.down_proj"``).
        causal: refuse models that are not causal LMs (encoder-only, seq2seq, no LM
            head), which no gradlocate method can score. ``False`` gives handles anyway.

    Returns:
        :class:`DownProjections`, one :class:`DownProjection` per decoder layer in order.

    Raises:
        HandleError: no block list or no down-projection was found (the message lists
            what was searched), or the model is a mixture of experts.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=3, d_model=16)
        >>> hs = down_projections(model)
        >>> hs[0].path, tuple(hs[0].weight.shape), hs[0].transposed
        ('transformer.h.0.mlp.c_proj', (16, 64), True)
    """
    root = unwrap_model(model)
    if causal:
        check_causal_lm(root)
    d_model = _d_model(root)

    if layers is not None:
        try:
            blocks = root.get_submodule(layers)
        except AttributeError as e:
            raise HandleError(f"override layers={layers!r}: no such module in {type(root).__name__} ({e})") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise HandleError(f"override layers={layers!r} is a {type(blocks).__name__}, not a non-empty ModuleList of blocks")
        candidates = [(layers, blocks)]
    else:
        candidates = _block_lists(root)
        if not candidates:
            names = [n for n, _ in root.named_children()]
            raise HandleError(
                f"no decoder-block list found in {type(root).__name__}: searched every nn.ModuleList of "
                f"same-typed blocks with parameters and found none (top-level modules: {names}). "
                f"Pass layers='path.to.blocks', down='path.in.block' explicitly."
            )
        # Encoder-decoder models have two block lists: refuse rather than guess.
        cfg = getattr(root, "config", None)
        if getattr(cfg, "is_encoder_decoder", False):
            raise HandleError(
                f"{type(root).__name__} is an encoder-decoder model; gradlocate works on decoder-only causal LMs"
            )

    searched: list[str] = []
    for blocks_path, blocks in candidates:
        first = blocks[0]
        if down is not None:
            try:
                mod = first.get_submodule(down)
            except AttributeError:
                raise HandleError(
                    f"override down={down!r}: no such module in {blocks_path}.0 "
                    f"({type(first).__name__}); its modules: {[n for n, _ in first.named_modules() if n][:20]}"
                ) from None
            if _linear_dims(mod) is None:
                raise HandleError(f"override down={down!r} is a {type(mod).__name__}, not a linear map with a 2-D weight")
            down_path = down
        else:
            # Any dense candidate in an MoE block is a router or a shared expert.
            if _is_moe(first):
                raise _moe_error(root, blocks_path, first)
            found = _find_down(first, d_model)
            if found is None:
                lin = [f"{n} {_linear_dims(m)[:2]}" for n, m in first.named_modules() if n and _linear_dims(m)]
                searched.append(f"{blocks_path} ({len(blocks)} x {type(first).__name__}; linear maps (in, out): {lin})")
                continue
            down_path = found[0]
        handles = []
        for i, block in enumerate(blocks):
            try:
                mod = block.get_submodule(down_path)
            except AttributeError:
                raise HandleError(f"{blocks_path}.{i} has no {down_path!r} (block 0 has): blocks differ in structure; pass down=...") from None
            dims = _linear_dims(mod)
            if dims is None:
                raise HandleError(f"{blocks_path}.{i}.{down_path} is not a linear map")
            param = mod.weight
            handles.append(DownProjection(i, f"{blocks_path}.{i}.{down_path}" if blocks_path else f"{i}.{down_path}", mod, param, dims[2]))
        return DownProjections(model, root, blocks_path, down_path, handles)

    raise HandleError(
        f"no MLP down-projection found in {type(root).__name__} (d_model={d_model}): looked for a linear map "
        f"outside attention writing d_model features in: {'; '.join(searched)}. "
        f"Pass layers='path.to.blocks', down='path.in.block' explicitly."
    )


"""The resolved model: handles on every decoder layer's editing site.

:func:`down_projections` resolves a model once into :class:`Handles`, an immutable
object that every gradlocate function accepts wherever a model is: the root module,
the tokenizer, the decoder blocks, one :class:`Handle` per layer on the editing site
(the MLP down-projection by default, the linear map ``d_mlp -> d_model`` that closes
each block's MLP: ``mlp.down_proj`` in LLaMA, ``mlp.c_proj`` in GPT-2, ``fc2`` in OPT),
the MLP and attention modules, the embeddings and head, and the dimensions under
TransformerLens's names (``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab``).

Resolve once and pass the result on: functions given a plain model resolve it
themselves at their boundary; given :class:`Handles` they use it as is, overrides
included.

Example:
    >>> from gradlocate import down_projections
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16, d_mlp=40)
    >>> hs = down_projections(model)
    >>> [(h.layer, h.path, tuple(h.weight.shape)) for h in hs]
    [(0, 'model.layers.0.mlp.down_proj', (16, 40)), (1, 'model.layers.1.mlp.down_proj', (16, 40))]
    >>> hs.n_layers, hs.d_model, hs.d_mlp, hs.mlp_paths[0], hs.attn_paths[0]
    (2, 16, 40, 'model.layers.0.mlp', 'model.layers.0.self_attn')
"""

from __future__ import annotations

import warnings
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsIndex, TypeAlias, overload

import torch
from torch import Tensor, nn

from gradlocate import _compat
from gradlocate.dims import Weight
from gradlocate.discovery import (
    Blocks,
    HandleError,
    _find_down,
    attention_child,
    check_causal_lm,
    d_model_of,
    find_structure,
    linear_dims,
)

__all__ = [
    "LayerSelection",
    "Handle",
    "Handles",
    "HandleError",
    "down_projections",
    "resolve",
    "unwrap_model",
    "find_tokenizer",
    "check_causal_lm",
    "validate_indices",
    "model_identity",
]


#: A user's choice of layers (or any indices): an int, a sequence of ints (numpy ints
#: too; negatives count from the end), or ``None`` for all. See :func:`validate_indices`.
LayerSelection: TypeAlias = Iterable[SupportsIndex] | SupportsIndex | None

# --------------------------------------------------------------------------- wrappers and tokenizers


def _is_nnsight(obj: Any) -> bool:
    from nnsight import Envoy

    return isinstance(obj, Envoy)


def _attr(obj: Any, name: str) -> Any:
    # An nnsight envoy wraps unknown attributes on access: look without that.
    if _is_nnsight(obj):
        try:
            return object.__getattribute__(obj, name)
        except AttributeError:
            return None
    return getattr(obj, name, None)


def unwrap_model(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` that really runs ``model``: a transformers model as is,
    an nnsight wrapper's (``NNsight``, ``LanguageModel``) wrapped module, a
    TransformerLens ``TransformerBridge``'s ``original_model``, or :class:`Handles`' root.

    Example:
        >>> from nnsight import NNsight
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1)
        >>> unwrap_model(NNsight(model)) is model
        True
    """
    if isinstance(model, Handles):
        return model.root
    original = _attr(model, "original_model")
    if isinstance(original, nn.Module):
        return original
    if _is_nnsight(model):
        inner = _compat.wrapped_module(model)
        if inner is not None:
            return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"gradlocate needs a torch model: a transformers PreTrainedModel, an nnsight wrapper, a "
                    f"TransformerLens TransformerBridge or down_projections(...)'s Handles, got {type(model).__name__}")


def _carried_tokenizer(model: Any) -> Any:
    for obj in (model, unwrap_model(model)):
        cand = _attr(obj, "tokenizer")
        if cand is None and not _is_nnsight(obj):
            cand = getattr(obj, "gradlocate_tokenizer", None)
        if cand is not None and callable(cand):
            return cand
    return None


def find_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer to use with ``model``: ``tokenizer`` if given, else the one the
    wrapper carries (nnsight ``LanguageModel.tokenizer``, TransformerLens
    ``bridge.tokenizer``, :class:`Handles`' own, or one attached by :mod:`gradlocate.models`).

    A tokenizer without a pad token gets its EOS token as pad token (with a warning),
    since every batched computation here pads.
    """
    if isinstance(model, Handles) and tokenizer is None:
        return model.require_tokenizer()
    tok = tokenizer if tokenizer is not None else _carried_tokenizer(model)
    if tok is None:
        raise ValueError(f"no tokenizer: pass tokenizer=... (a transformers tokenizer for "
                         f"{type(unwrap_model(model)).__name__}); plain torch models carry none")
    if model is not None:
        _check_vocab(unwrap_model(model), tok)
    if getattr(tok, "pad_token", None) is None:
        eos = getattr(tok, "eos_token", None)
        if eos is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with: "
                             "set tokenizer.pad_token before calling gradlocate")
        warnings.warn(f"tokenizer has no pad token: using its EOS token {eos!r} as pad token "
                      "(padding is masked out of every loss)", stacklevel=3)
        tok.pad_token = eos
    return tok


def _check_vocab(root: nn.Module, tok: Any) -> None:
    """A tokenizer with more ids than the model has embedding rows is another model's."""
    get = getattr(root, "get_input_embeddings", None)
    w = getattr(get() if callable(get) else None, "weight", None)
    try:
        n_tok = len(tok)
    except TypeError:
        return
    if isinstance(w, Tensor) and w.dim() == 2 and n_tok > w.shape[0]:
        raise ValueError(f"tokenizer/model mismatch: the tokenizer has {n_tok} tokens but {type(root).__name__}'s "
                         f"embedding has {w.shape[0]} rows; pass the tokenizer that belongs to this model")


def _bridge_convention(model: Any, tok: Any) -> None:
    """A TransformerLens bridge's input is what TransformerLens feeds it: its own
    tokenizer, which prepends BOS. Say so when the tokenizer gradlocate will use differs."""
    own = _attr(model, "tokenizer")
    if own is None or own is tok or _attr(model, "original_model") is None:
        return
    probe = "The capital of France is"
    if list(own(probe)["input_ids"]) != list(tok(probe)["input_ids"]):
        warnings.warn(
            "tokenizer= differs from the TransformerBridge's own tokenizer (e.g. no BOS where TransformerLens "
            "prepends one): gradlocate uses the one you passed, everywhere, so scores match the Hugging Face model "
            "fed that tokenizer's ids, not bridge.to_tokens(...)", stacklevel=3)


# --------------------------------------------------------------------------- handles


@dataclass(frozen=True, eq=False)
class Handle:
    """One decoder layer's editing site (the MLP down-projection by default).

    Attributes:
        layer: index of the decoder block (0 = closest to the embeddings).
        path: the module's path from the model root, e.g. ``"model.layers.3.mlp.down_proj"``.
        module: the ``nn.Linear`` / ``Conv1D`` module itself.
        parameter: its weight ``nn.Parameter`` as stored (GPT-2's ``Conv1D`` stores
            ``[d_mlp, d_model]``).
        transposed: whether ``parameter`` is stored ``[d_in, d_out]``.
    """

    layer: int
    path: str
    module: nn.Module
    parameter: nn.Parameter
    transposed: bool
    owner: Handles | None = field(default=None, repr=False, compare=False)

    @property
    def weight(self) -> Weight:
        """The weight as ``[d_out, d_in]`` (``[d_model, d_mlp]`` for a down-projection),
        sharing storage with the model. Writing into it (``h.weight.add_(delta)``) edits
        the model. Detached from autograd: use :attr:`parameter` for gradients and
        :meth:`canonical` to bring a gradient to this layout."""
        w = self.parameter.detach()
        return w.T if self.transposed else w

    def canonical(self, t: Tensor) -> Weight:
        """A tensor laid out like :attr:`parameter` (e.g. its ``.grad``) as ``[d_out, d_in]``."""
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
        """The nnsight ``Envoy`` of this module inside ``traced`` (default: the owner's wrapper)."""
        if traced is None:
            if self.owner is None:
                raise RuntimeError("this handle is not attached to a model")
            traced = self.owner.nnsight
        env = traced
        for part in self.path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    @property
    def input(self) -> Any:
        """Inside ``hs.trace(...)``: the site's input activations ``[batch, pos, d_mlp]``."""
        return self.envoy().input

    @property
    def output(self) -> Any:
        """Inside ``hs.trace(...)``: the site's output ``[batch, pos, d_model]``."""
        return self.envoy().output

    def __repr__(self) -> str:
        return (f"Handle(layer={self.layer}, path={self.path!r}, weight=[{self.d_model}, {self.d_mlp}]"
                f"{' (stored transposed)' if self.transposed else ''}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"device={self.device})")


class Handles(Sequence[Handle]):
    """A model resolved once: what every gradlocate function needs to know about it.

    Attributes:
        model: what the user passed (transformers model, nnsight wrapper or bridge).
        root: the ``nn.Module`` that runs.
        tokenizer: the tokenizer every function uses (``None`` if none was found;
            functions that tokenize then ask for one).
        chat: prompts go through the tokenizer's chat template (one user turn and the
            generation prompt), in every function: selectors, trainer, evaluation, tracing.
        blocks_path, site_path: the decoder-block list and the site inside each block
            (``down_path`` is the same as ``site_path``).
        blocks, block_paths: the decoder blocks and their paths.
        mlp_paths: per layer, the module whose output is the MLP's contribution, or
            ``None`` when no MLP down-projection was found (an exotic override).
        attn_paths: per layer, the block's attention module, or ``None``.
        embed, head: the input embedding and the LM head (``None`` if absent).
        n_layers, d_model, d_mlp, d_vocab: dimensions (``d_mlp`` is the site's input width).
    """

    # Set once in __init__ (object.__setattr__: the instance is immutable); declared for type checkers.
    model: Any
    root: nn.Module
    tokenizer: Any
    chat: bool
    blocks_path: str
    site_path: str
    blocks: tuple[nn.Module, ...]
    block_paths: tuple[str, ...]
    mlp_paths: tuple[str, ...] | None
    attn_paths: tuple[str, ...] | None
    embed: nn.Module | None
    head: nn.Module | None
    _handles: tuple[Handle, ...]
    _user_nnsight: Any
    _cache: dict[str, Any]  # the user-facing trace's wrapper; interventions' execution order and paths

    def __init__(self, model: Any, root: nn.Module, tokenizer: Any, blocks_path: str, site_path: str,
                 blocks: Blocks | Sequence[nn.Module], mlp_inner: str | None, chat: bool = False):
        # blocks: the ModuleList (or Sequential) as found, or another Handles' tuple of them.
        put = object.__setattr__
        put(self, "model", model)
        put(self, "root", root)
        put(self, "tokenizer", tokenizer)
        put(self, "chat", bool(chat))
        put(self, "blocks_path", blocks_path)
        put(self, "site_path", site_path)
        put(self, "blocks", tuple(blocks))
        put(self, "block_paths", tuple(_join(blocks_path, str(i)) for i in range(len(blocks))))
        put(self, "mlp_paths", None if mlp_inner is None else tuple(_join(p, mlp_inner) for p in self.block_paths))
        attn = [attention_child(b) for b in blocks]
        attn_paths = tuple(_join(p, a) for p, a in zip(self.block_paths, attn) if a is not None)
        put(self, "attn_paths", attn_paths if len(attn_paths) == len(attn) else None)
        get_in, get_out = getattr(root, "get_input_embeddings", None), getattr(root, "get_output_embeddings", None)
        put(self, "embed", _module_or_none(get_in))
        put(self, "head", _module_or_none(get_out))
        handles = []
        for i, p in enumerate(self.block_paths):
            mod = root.get_submodule(_join(p, site_path))
            dims = linear_dims(mod)
            if dims is None or not isinstance(mod.weight, nn.Parameter):  # find_structure checked every block
                raise HandleError(f"{_join(p, site_path)} is not a linear map with a 2-D weight")
            handles.append(Handle(i, _join(p, site_path), mod, mod.weight, dims[2], self))
        put(self, "_handles", tuple(handles))
        put(self, "_user_nnsight", model if _is_nnsight(model) else None)
        put(self, "_cache", {"nnsight": None, "had": None})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Handles is immutable: resolve again (down_projections(...)) to change {name!r}")

    # -- sequence of handles
    def __len__(self) -> int:
        return len(self._handles)

    @overload
    def __getitem__(self, i: int) -> Handle: ...

    @overload
    def __getitem__(self, i: slice) -> list[Handle]: ...

    def __getitem__(self, i: int | slice) -> Handle | list[Handle]:
        if isinstance(i, slice):
            return list(self._handles[i])
        n = len(self._handles)
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range: the model has {n} layers (0..{n - 1})")
        return self._handles[i]

    def __iter__(self) -> Iterator[Handle]:
        return iter(self._handles)

    # -- dimensions
    @property
    def n_layers(self) -> int:
        return len(self._handles)

    @property
    def d_model(self) -> int:
        return self._handles[0].d_model

    @property
    def d_mlp(self) -> int:
        return self._handles[0].d_mlp

    @property
    def d_vocab(self) -> int | None:
        w = getattr(self.head if self.head is not None else self.embed, "weight", None)
        return int(w.shape[0]) if isinstance(w, Tensor) else None

    @property
    def down_path(self) -> str:
        return self.site_path

    def parameters(self) -> list[nn.Parameter]:
        return [h.parameter for h in self._handles]

    def layer_indices(self, layers: LayerSelection) -> list[int]:
        """Validate a user's layer selection (None = all; negatives count from the end)."""
        if layers is None:
            return list(range(len(self)))
        return validate_indices(layers, len(self), "layer", f"the model has {len(self)} decoder layers")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer: pass tokenizer=... (a transformers tokenizer for "
                             f"{type(self.root).__name__}); plain torch models carry none")
        return self.tokenizer

    def require_embed(self, why: str = "this method acts on it") -> nn.Module:
        """The input embedding (``get_input_embeddings()``), or a clear error if the model has none."""
        if self.embed is None:
            raise HandleError(f"{type(self.root).__name__} has no get_input_embeddings(): {why}")
        return self.embed

    def with_options(self, tokenizer: Any = None, chat: bool | None = None) -> Handles:
        """The same resolution with another tokenizer and/or prompt format."""
        same_tok = tokenizer is None or tokenizer is self.tokenizer
        if same_tok and (chat is None or bool(chat) == self.chat):
            return self
        tok = self.tokenizer
        if not same_tok:
            tok = find_tokenizer(self.root, tokenizer)
            _bridge_convention(self.model, tok)
        return Handles(self.model, self.root, tok, self.blocks_path, self.site_path, self.blocks,
                       _mlp_inner_of(self), self.chat if chat is None else chat)

    def module(self, path: str) -> nn.Module:
        return self.root.get_submodule(path)

    # -- nnsight for users
    @property
    def nnsight(self) -> Any:
        """An nnsight wrapper of the model (the user's own if they passed one). Prefer
        :meth:`trace`; :meth:`release` takes the instrumentation off a plain model."""
        if self._user_nnsight is not None:
            return self._user_nnsight
        if self._cache["nnsight"] is None:
            from nnsight import NNsight

            self._cache["had"] = _compat.instrumentation(self.root)
            self._cache["nnsight"] = NNsight(self.root)
        return self._cache["nnsight"]

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """``with hs.trace(input_ids):`` an nnsight trace in which ``hs[l].input`` /
        ``hs[l].output`` are layer ``l``'s site activations. Call :meth:`release` afterwards.

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
        return self.nnsight.trace(*inputs, **kwargs)

    def release(self) -> None:
        """Remove the nnsight instrumentation :attr:`nnsight` installed."""
        if self._cache["nnsight"] is not None:
            _compat.uninstrument(self.root, self._cache["had"])
            self._cache["nnsight"] = None

    # -- display
    def __repr__(self) -> str:
        h0 = self._handles[0]
        return (f"Handles({len(self)} layers of {type(self.root).__name__}: {self.blocks_path}.<i>.{self.site_path}, "
                f"weight [{h0.d_model}, {h0.d_mlp}]{', stored transposed' if h0.transposed else ''})")

    def to_table(self) -> str:
        """A plain-text table of the handles (layer, path, shape)."""
        rows = [f"{'layer':>5}  {'path':<48} {'weight [d_out, d_in]':>22}"]
        rows += [f"{h.layer:>5}  {h.path:<48} {str([h.d_model, h.d_mlp]):>22}" for h in self._handles]
        return "\n".join(rows)




def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _module_or_none(get: Any) -> nn.Module | None:
    try:
        m = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return m if isinstance(m, nn.Module) else None


def _mlp_inner_of(h: Handles) -> str | None:
    if h.mlp_paths is None:
        return None
    return h.mlp_paths[0][len(h.block_paths[0]) + 1:]


def validate_indices(values: Iterable[SupportsIndex] | SupportsIndex, n: int, what: str, context: str) -> list[int]:
    """Check user-given indices into a length-``n`` axis: ints (numpy ints too), in
    ``-n..n-1`` (negatives count from the end), non-empty, no duplicates.

    Example:
        >>> validate_indices([-1, 0], 4, "layer", "the model has 4 layers")
        [3, 0]
    """
    items: Iterable[object]
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        items = [values]
    elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what}s must be an int or a sequence of ints, got {values!r}")
    else:
        items = list(values)
    out: list[int] = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what}s must be ints, got {v!r}")
        v = int(v)
        if not -n <= v < n:
            raise ValueError(f"{what} {v} out of range: {context} (0..{n - 1})")
        out.append(v % n)
    if not out:
        raise ValueError(f"{what}s is empty: give at least one {what} index")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}s has duplicates: {list(items)}")
    return out


# --------------------------------------------------------------------------- resolution


def down_projections(model: Any, *, tokenizer: Any = None, blocks: str | None = None, down: str | None = None,
                     chat: bool | None = None, causal: bool = True, layers: str | None = None) -> Handles:
    """Resolve ``model`` once: find every decoder layer's editing site (the MLP
    down-projection unless ``down=`` names another linear map), its blocks, MLP and
    attention modules, and its tokenizer.

    Args:
        model: a transformers ``PreTrainedModel``, an nnsight wrapper (``NNsight`` /
            ``LanguageModel``), a TransformerLens ``TransformerBridge`` (its input is what
            TransformerLens feeds it: its own tokenizer, BOS included), or a
            :class:`Handles` (returned as is, or with ``tokenizer`` swapped in).
        tokenizer: defaults to the one the model carries (not required: functions that
            tokenize ask for one).
        blocks: override: path of the decoder-block ``ModuleList`` (e.g. ``"model.layers"``).
        down: override: path of the site inside each block (e.g. ``"mlp.down_proj"``, or
            ``"self_attn.o_proj"`` to edit the attention output as LocFT-BF's location study does).
        chat: feed prompts through the tokenizer's chat template (instruct models), in
            every function (default ``False``: the prompt as written).
        causal: refuse models that are not causal LMs (encoder-only, seq2seq, no LM
            head), which no gradlocate method can score. ``False`` gives handles anyway.
        layers: deprecated spelling of ``blocks`` (everywhere else ``layers=`` is a list of
            layer indices).

    Returns:
        :class:`Handles`, one :class:`Handle` per decoder layer in order.

    Raises:
        HandleError: no block list or no site was found (the message lists what was
            searched), the model is a mixture of experts, or not a causal LM.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=3, d_model=16)
        >>> hs = down_projections(model)
        >>> hs[0].path, tuple(hs[0].weight.shape), hs[0].transposed
        ('transformer.h.0.mlp.c_proj', (16, 64), True)
        >>> down_projections(model, blocks="transformer.h", down="attn.c_proj")[2].path
        'transformer.h.2.attn.c_proj'
    """
    if isinstance(model, Handles):
        if layers is not None or down is not None:
            raise ValueError("this model is already resolved (Handles): pass layers=/down= when resolving the "
                             "plain model, once")
        return model.with_options(tokenizer, chat)
    root = unwrap_model(model)
    if causal:
        check_causal_lm(root)
    if getattr(getattr(root, "config", None), "is_encoder_decoder", False):
        raise HandleError(f"{type(root).__name__} is an encoder-decoder model; gradlocate works on decoder-only "
                          f"causal LMs")
    if layers is not None:
        warnings.warn("down_projections(layers=...) is deprecated: the blocks' path is blocks=... (layers= is a "
                      "list of layer indices everywhere else)", DeprecationWarning, stacklevel=2)
        blocks = blocks if blocks is not None else layers
    blocks_path, site_path, found = find_structure(root, blocks=blocks, down=down)
    mlp_down = site_path if down is None else _find_down(found[0], d_model_of(root))
    mlp_inner = None if mlp_down is None else (mlp_down.rsplit(".", 1)[0] if "." in mlp_down else mlp_down)
    tok = tokenizer if tokenizer is not None else _carried_tokenizer(model)
    if tok is not None:
        tok = find_tokenizer(model, tok)
        if tokenizer is not None:
            _bridge_convention(model, tok)
    h = Handles(model, root, tok, blocks_path, site_path, found, mlp_inner, bool(chat))
    if h.chat:
        from gradlocate.losses import render_prompt

        render_prompt(h.require_tokenizer(), "x", chat=True)  # no template: say so now
    return h


def resolve(model: Any, tokenizer: Any = None) -> Handles:
    """The public boundary: ``model`` as :class:`Handles`, resolved once (a
    :class:`Handles` is returned as is, with ``tokenizer`` swapped in if given).
    Raises if no tokenizer can be found, since every caller tokenizes."""
    h = down_projections(model, tokenizer=tokenizer)
    h.require_tokenizer()
    return h


def model_identity(h: Handles, every_parameter: bool = False) -> dict[str, Any]:
    """What identifies a resolved model, the one definition every fingerprint and cache key
    uses: its class, checkpoint name, edited site, and each site weight's sum (tells another
    checkpoint, and an edited model, apart). ``every_parameter``: also a checksum of every
    parameter (a strided sample and the sum of each), for what depends on weights other
    than the sites' (the second-moment statistics of a layer's inputs).

    Example:
        >>> from gradlocate.models import tiny
        >>> ident = model_identity(resolve(tiny("gpt2", n_layers=2, d_model=16)[0]))
        >>> ident["model"], len(ident["weights"])
        ('GPT2LMHeadModel', 2)
    """
    import torch

    with torch.no_grad():
        weights = [f"{float(x.parameter.detach().double().sum()):.10e}" for x in h]
        out = {"model": type(h.root).__name__, "name": getattr(getattr(h.root, "config", None), "_name_or_path", ""),
               "site": h.site_path, "weights": weights}
        if every_parameter:
            import hashlib

            sha = hashlib.sha1()
            for name, p in h.root.named_parameters():
                flat = p.detach().reshape(-1)
                sha.update(name.encode())
                sha.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
                sha.update(repr(float(flat.double().sum())).encode())
            out["parameters"] = sha.hexdigest()[:16]
    return out

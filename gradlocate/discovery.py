"""Structural discovery: where a decoder-only model keeps its blocks, its MLP
down-projections, its MLP and attention modules - with no table of architectures.

1. The decoder-block list is the ``nn.ModuleList`` of same-typed blocks holding the
   most parameters.
2. In each block the down-projection is the linear map (``nn.Linear`` or GPT-2's
   ``Conv1D``) outside attention whose output width is d_model and whose input width
   (d_mlp) is the largest.
3. The MLP is the module holding the down-projection (or the down-projection itself
   when it sits directly in the block, as OPT's ``fc2``); the attention is the block's
   child named like attention.

:func:`~gradlocate.handles.down_projections` calls this once per model; an explicit
override (``blocks="model.layers", down="mlp.down_proj"``) serves exotic models.

Example:
    >>> from gradlocate.models import tiny
    >>> find_structure(tiny("gpt2", n_layers=2, d_model=16)[0])[:2]
    ('transformer.h', 'mlp.c_proj')
"""

from __future__ import annotations

from typing import TypeAlias

from torch import nn

from gradlocate import _compat

__all__ = ["HandleError", "find_structure", "check_causal_lm", "linear_dims", "attention_child", "d_model_of"]

# Submodule names that mark attention: its output projection also maps onto d_model.
_ATTENTION_WORDS = ("attn", "attention")
# Names that mark mixture-of-experts blocks.
_MOE_WORDS = ("experts", "moe", "sparse_moe", "block_sparse_moe")
# Names that mark MLPs, to break ties between equally wide candidates.
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "fc", "down")


#: A model's list of decoder blocks, as found (a ``blocks=`` override may name an ``nn.Sequential``).
Blocks: TypeAlias = nn.ModuleList | nn.Sequential


class HandleError(ValueError):
    """The model's decoder blocks or MLP down-projections could not be found."""


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
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
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if d_in is not None and d_out is not None:
        return int(d_in), int(d_out), False
    return None


def d_model_of(root: nn.Module) -> int | None:
    """The residual-stream width: the input embedding's width, else the config's."""
    get = getattr(root, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        w = getattr(emb, "weight", None)
        if w is not None and w.dim() == 2:
            return int(w.shape[1])
    cfg = getattr(root, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _block_lists(root: nn.Module) -> list[tuple[str, Blocks]]:
    """ModuleLists of >= 1 same-typed blocks that hold parameters, largest first."""
    found: list[tuple[str, Blocks]] = []
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(c) for c in mod}) == 1 and _n_params(mod) > 0:
                found.append((name, mod))
    found.sort(key=lambda nm: (-_n_params(nm[1]), nm[0].count(".")))
    return found


def _is_moe(block: nn.Module) -> bool:
    for name, mod in block.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        kind = type(mod).__name__.lower()
        if leaf in _MOE_WORDS or "expert" in kind or "moe" in kind:
            return True
        if any(p.dim() == 3 for p in mod.parameters(recurse=False)):
            return True
    return False


def _find_down(block: nn.Module, d_model: int | None) -> str | None:
    cands = []
    for name, mod in block.named_modules():
        dims = linear_dims(mod) if name else None
        if dims is None or any(w in part for part in name.lower().split(".") for w in _ATTENTION_WORDS):
            continue
        cands.append((name, dims[0], dims[1]))
    if d_model is None and cands:
        outs = [c[2] for c in cands]  # the width most linear maps write to is the residual stream's
        d_model = max(set(outs), key=outs.count)
    best = [c for c in cands if c[2] == d_model]
    pool = [c for c in best if c[1] != d_model] or best
    # Widest input = MLP hidden width; prefer MLP-ish names on ties.
    pool.sort(key=lambda c: (-c[1], 0 if any(w in c[0].lower() for w in _MLP_WORDS) else 1))
    return pool[0][0] if pool else None


def attention_child(block: nn.Module) -> str | None:
    """The block's self-attention child: named like attention, not a norm, not cross-attention."""
    found = []
    for name, mod in block.named_children():
        low = name.lower()
        if not any(w in low for w in _ATTENTION_WORDS) or "cross" in low:
            continue
        if "norm" in low or low.startswith("ln") or "norm" in type(mod).__name__.lower():
            continue
        if _n_params(mod):
            found.append((_n_params(mod), name))
    return max(found)[1] if found else None


def check_causal_lm(root: nn.Module) -> None:
    """Refuse encoder-only, encoder-decoder and head-less models with a clear error.

    Plain ``nn.Module``s without a transformers config pass (the caller vouches for them).
    """
    cfg = getattr(root, "config", None)
    if cfg is None:
        return
    name = type(root).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        raise HandleError(f"{name} is an encoder-decoder (seq2seq) model; gradlocate works on decoder-only causal "
                          f"language models (AutoModelForCausalLM)")
    if name.endswith(("ForCausalLM", "LMHeadModel")) or name in _compat.causal_lm_class_names():
        return
    hint = ("load it with AutoModelForCausalLM.from_pretrained(...)"
            if getattr(root, "get_output_embeddings", lambda: None)() is None else
            "it is not a causal language model (encoder-only models such as BERT are not supported)")
    raise HandleError(f"{name} (model_type={getattr(cfg, 'model_type', '?')!r}) is not a causal LM with a "
                      f"language-model head: {hint}")


def _override_blocks(root: nn.Module, blocks_path: str) -> Blocks:
    try:
        blocks = root.get_submodule(blocks_path)
    except AttributeError as e:
        raise HandleError(f"override blocks={blocks_path!r}: no such module in {type(root).__name__} ({e})") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise HandleError(f"override blocks={blocks_path!r} is a {type(blocks).__name__}, not a non-empty "
                          f"ModuleList of blocks")
    return blocks


def _override_down(blocks_path: str, first: nn.Module, down: str) -> str:
    try:
        mod = first.get_submodule(down)
    except AttributeError:
        raise HandleError(f"override down={down!r}: no such module in {blocks_path}.0 ({type(first).__name__}); "
                          f"its modules: {[n for n, _ in first.named_modules() if n][:20]}") from None
    if linear_dims(mod) is None:
        raise HandleError(f"override down={down!r} is a {type(mod).__name__}, not a linear map with a 2-D weight")
    return down


def find_structure(root: nn.Module, *, blocks: str | None = None, down: str | None = None) -> tuple[str, str, Blocks]:
    """``(blocks_path, site_path, blocks)``: the decoder-block list and the path of the
    editing site (the down-projection unless ``down=`` names another linear map) inside
    each block. Raises :class:`HandleError` naming what was searched."""
    d_model = d_model_of(root)
    if blocks is not None:
        candidates = [(blocks, _override_blocks(root, blocks))]
    else:
        candidates = _block_lists(root)
        if not candidates:
            names = [n for n, _ in root.named_children()]
            raise HandleError(
                f"no decoder-block list found in {type(root).__name__}: searched every nn.ModuleList of same-typed "
                f"blocks with parameters and found none (top-level modules: {names}). "
                f"Pass blocks='path.to.blocks', down='path.in.block' explicitly.")
    searched: list[str] = []
    for blocks_path, block_list in candidates:
        first = block_list[0]
        if down is not None:
            site = _override_down(blocks_path, first, down)
        else:
            if _is_moe(first):  # any dense candidate in an MoE block is a router or a shared expert
                inner = [n for n, _ in first.named_modules() if n][:12]
                raise HandleError(
                    f"{type(root).__name__} is a mixture-of-experts model: each layer's MLP is a set of experts, "
                    f"not one down-projection, and gradlocate does not pick an expert for you. Pass an explicit "
                    f"override naming one linear map per block, e.g. down_projections(model, blocks="
                    f"{blocks_path!r}, down='<path inside the block>'), or use a dense model. Modules in "
                    f"{blocks_path}.0: {inner}")
            found = _find_down(first, d_model)
            if found is None:
                lin = [f"{n} {dims[:2]}" for n, m in first.named_modules() if n and (dims := linear_dims(m))]
                searched.append(f"{blocks_path} ({len(block_list)} x {type(first).__name__}; linear maps (in, out): {lin})")
                continue
            site = found
        for i, block in enumerate(block_list):
            try:
                mod = block.get_submodule(site)
            except AttributeError:
                raise HandleError(f"{blocks_path}.{i} has no {site!r} (block 0 has): blocks differ in structure; "
                                  f"pass down=...") from None
            if linear_dims(mod) is None:
                raise HandleError(f"{blocks_path}.{i}.{site} is not a linear map")
        return blocks_path, site, block_list
    raise HandleError(
        f"no MLP down-projection found in {type(root).__name__} (d_model={d_model}): looked for a linear map "
        f"outside attention writing d_model features in: {'; '.join(searched)}. "
        f"Pass blocks='path.to.blocks', down='path.in.block' explicitly.")

"""Every use of another library's non-public behaviour, in one place.

Nothing else in gradlocate touches a private name of torch, transformers or nnsight.
Each function says what it relies on, the versions it was checked on (the locked
versions in ``constraints.txt`` and the newest releases, see ``scripts/test-latest``),
and the public route it prefers where one exists. ``tests/test_compat.py`` exercises
every one of them, so a release that changes one of these behaviours fails a test
that names it instead of slowing something down without a word.

* :func:`wrapped_module`: ``Envoy._module`` (nnsight has no public accessor).
  Checked on nnsight 0.8.0, 0.8.1.
* :func:`instrumentation`, :func:`uninstrument`: nnsight installs its controller as
  the instance attributes ``forward`` and ``__nnsight__`` on every module it wraps and
  never removes them. Checked on nnsight 0.8.0, 0.8.1.
* :func:`cache_argument`, :func:`returned_cache`: the forward's name for the key/value
  cache, ``past_key_values`` up to transformers 5.23 and ``cache`` from 5.24 (read
  from the public signature). Checked on transformers 5.23.0, 5.24.0.
* :func:`new_cache`, :func:`prefix_cache`: public ``Cache`` methods only (``crop``
  with a negative count, ``batch_select_indices``, ``copy.deepcopy``). Checked on
  transformers 5.23.0, 5.24.0.
* :func:`drop_gguf_quantizer`: ``PreTrainedModel.hf_quantizer``, which a model
  dequantized from GGUF still carries, and which makes ``save_pretrained`` refuse it.
  Checked on transformers 5.23.0, 5.24.0.
* :func:`causal_lm_class_names`:
  ``transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``.
  Checked on transformers 5.23.0, 5.24.0.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKED",
    "wrapped_module",
    "instrumentation",
    "uninstrument",
    "cache_argument",
    "returned_cache",
    "new_cache",
    "prefix_cache",
    "drop_gguf_quantizer",
    "causal_lm_class_names",
]

#: The releases every function here was checked on.
CHECKED = {"nnsight": ("0.8.0", "0.8.1"), "transformers": ("5.23.0", "5.24.0"), "torch": ("2.13.0",)}

# --------------------------------------------------------------------------- nnsight

#: The instance attributes nnsight's ``Interleaver.instrument`` installs on every module
#: of a wrapped model (the controller forward and its state) and leaves there.
NNSIGHT_ATTRIBUTES = ("forward", "__nnsight__")


def wrapped_module(envoy: Any) -> nn.Module | None:
    """The ``torch.nn.Module`` an nnsight ``Envoy`` (``NNsight``, ``LanguageModel``)
    wraps, or ``None``. nnsight 0.8 has no public accessor; ``Envoy._module`` is it."""
    module = getattr(envoy, "__dict__", {}).get("_module")
    return module if isinstance(module, nn.Module) else None


def instrumentation(root: nn.Module) -> dict[tuple[int, str], Any]:
    """The instance attributes nnsight may install or replace on ``root``'s modules, as
    they are now (e.g. a ``forward`` that accelerate's ``device_map`` hooks installed)."""
    return {(id(m), a): m.__dict__[a] for m in root.modules() for a in NNSIGHT_ATTRIBUTES if a in m.__dict__}


def uninstrument(root: nn.Module, had: dict[tuple[int, str], Any]) -> None:
    """Remove what nnsight installed since :func:`instrumentation` returned ``had``,
    and put back what was there before (nnsight wraps an existing instance ``forward``)."""
    for m in root.modules():
        for a in NNSIGHT_ATTRIBUTES:
            key = (id(m), a)
            if key in had:
                if m.__dict__.get(a) is not had[key]:
                    m.__dict__[a] = had[key]
            elif a in m.__dict__:
                del m.__dict__[a]


# --------------------------------------------------------------------------- transformers caches


def cache_argument(root: nn.Module) -> str | None:
    """The keyword under which ``root``'s forward takes a key/value cache: ``"cache"``
    (transformers >= 5.24), ``"past_key_values"`` (earlier), or ``None`` (no cache, or a
    forward that also lacks ``use_cache``)."""
    try:
        params = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned (``output.cache`` or
    ``output.past_key_values``), or ``None``."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_cache(root: nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``root`` (public constructor: ``config=``), or
    ``None`` if this transformers has none that takes the model's config."""
    try:
        from transformers import DynamicCache

        config: Any = root.config  # AttributeError without one: no cache
        return DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - no cache: the caller recomputes instead
        return None


def prefix_cache(cache: Any, length: int, rows: torch.Tensor) -> Any:
    """A copy of ``cache`` holding its first ``length`` positions, for the batch rows
    ``rows`` (e.g. ``arange(S).repeat(C)``: the S cached rows tiled C times).

    Built with public ``Cache`` methods only: ``crop`` with a negative count (remove
    that many positions; the same meaning in transformers 4.x and 5.x, where 5.24
    refuses positive counts) and ``batch_select_indices``. The copy shares nothing with
    ``cache``, which stays as it was.
    """
    total = int(cache.get_seq_length())
    if not 0 < length <= total:
        raise ValueError(f"a prefix of {length} positions from a cache of {total}")
    out = copy.deepcopy(cache)
    if length < total:
        out.crop(length - total)
    out.batch_select_indices(rows)
    return out


# --------------------------------------------------------------------------- transformers models


def drop_gguf_quantizer(model: nn.Module) -> None:
    """Let a model dequantized from GGUF be saved: its weights are plain float tensors,
    but ``from_pretrained(gguf_file=...)`` leaves the GGUF quantizer attached and
    ``save_pretrained`` refuses to serialise a quantized model."""
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # an attribute of transformers' PreTrainedModel, not nn.Module
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        del cfg.quantization_config


def causal_lm_class_names() -> set[str]:
    """Class names of every model transformers' ``AutoModelForCausalLM`` can build."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - moved in a future release: only a check is lost
        return set()
    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names

"""The arrays the study's statistics share: checks, masks, intervals, and the result base.

Every statistic of the study takes ``[edits, layers]`` matrices (numpy float arrays, NaN
where a cell is absent) and returns a small result object; this module holds what they
all use. It imports only numpy and the standard library.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, fields
from typing import Any

import numpy as np

__all__ = ["Result", "plain", "short", "as_matrix", "layer_mask", "seeded", "interval", "layer_means"]


def plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def short(v: Any) -> str:
    v = plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 8:
        return "[" + ", ".join(short(x) for x in v[:8]) + f", ... ({len(v)})]"
    if isinstance(v, list):
        return "[" + ", ".join(short(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {short(x)}" for k, x in v.items()) + "}"
    return repr(v)


class Result:
    """``to_dict()`` (JSON-ready: arrays as lists) and a short ``repr``."""

    def to_dict(self) -> dict[str, Any]:
        return {k: plain(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]  # a mixin: every subclass is a dataclass

    def __repr__(self) -> str:
        shown = [f for f in fields(self) if f.repr]  # type: ignore[arg-type]  # a mixin: every subclass is a dataclass
        body = ", ".join(f"{f.name}={short(getattr(self, f.name))}" for f in shown)
        return f"{type(self).__name__}({body})"


# --------------------------------------------------------------------------- checks


def as_matrix(x: Any, name: str = "score", ndim: int = 2) -> np.ndarray:
    """``x`` as a float64 array of ``ndim`` dimensions (a clear error otherwise)."""
    a = np.array(x, dtype=np.float64)
    if a.ndim != ndim:
        want = "[edits, layers]" if ndim == 2 else "[layers]"
        raise ValueError(f"{name} must be a {ndim}-d array {want}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if np.isinf(a).any():
        raise ValueError(f"{name} has infinite values: scores must be finite or NaN (absent)")
    return a


def layer_mask(allowed: Any, n_layers: int) -> np.ndarray:
    """``allowed`` (None, a bool mask ``[layers]`` or column indices) as a bool mask."""
    if allowed is None:
        return np.ones(n_layers, dtype=bool)
    a = np.asarray(allowed)
    if a.dtype == bool:
        if a.shape != (n_layers,):
            raise ValueError(f"allowed: a bool mask needs {n_layers} entries (one per layer), got shape {a.shape}")
        return a.copy()
    idx = [int(i) for i in a.ravel()]
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"allowed: layer indices {bad} out of range 0..{n_layers - 1}")
    m = np.zeros(n_layers, dtype=bool)
    m[idx] = True
    return m


def seeded(seed: Any) -> np.random.Generator:
    return np.random.default_rng(seed)


def interval(x: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of ``x`` (NaNs ignored) at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)



def layer_means(score: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(score, axis=0)


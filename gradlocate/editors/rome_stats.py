"""Second-moment files in the format ROME and EasyEdit write, so statistics made by either
are reused here and ours by them.

ROME (``rome/layer_stats.py``, ``util/runningstats.py``) and EasyEdit
(``easyeditor/models/rome/layer_stats.py``) keep ``E[k kᵀ]`` as a ``SecondMoment`` inside a
``CombinedStat`` and save its state with ``numpy.savez``:

    mom2.mom2          [d, d]  the running SUM Σ_t k_t k_tᵀ (not divided), in the file's precision
    mom2.count         int     the number of rows summed (tokens)
    mom2.constructor   str     "util.runningstats.SecondMoment()" (not read back)
    sample_size        int     the number of texts asked for (``mom2_n_samples``), or null

so the moment is ``mom2 / count``. A null is boxed as the NaN with bits
``0xfff8000000000002``. ROME and EasyEdit look for a layer's file at

    {stats_dir}/{model}/{dataset}_stats/{layer}_{precision}_mom2_{sample_size}.npz

(``model``: the config's ``_name_or_path`` with ``/`` as ``_`` (ROME) or its last part
(EasyEdit); ``layer``: the module path, e.g. ``model.layers.6.mlp.down_proj``) and use it
only if its ``sample_size`` equals their ``mom2_n_samples``: :func:`rome_stats_path`
gives that path. A file read here is checked against the site it is used for: its shape
must be the site's ``[d_mlp, d_mlp]``, its file name (when it follows the pattern) must
name that site, and its count and values must be sane; otherwise it is refused in one line
naming what differs.

Example:
    >>> import tempfile, torch
    >>> k = torch.randn(50, 8, dtype=torch.float64)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save_npz(f"{d}/model.layers.0.mlp.down_proj_float64_mom2_100.npz", k.T @ k, 50, precision="float64")
    ...     s, n = load_npz(p, expect_shape=(8, 8), site="model.layers.0.mlp.down_proj")
    >>> n, bool(torch.equal(s, k.T @ k))
    (50, True)
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["save_npz", "load_npz", "rome_stats_path", "site_of_file", "find_stats", "StatsFileError",
           "CONSTRUCTOR"]

#: What ROME writes as the statistic's constructor (EasyEdit prefixes its package name).
CONSTRUCTOR = "util.runningstats.SecondMoment()"
#: ROME's boxed null (``runningstats.null_numpy_value``): a NaN with these bits.
_NULL_BITS = 0xFFF8000000000002
_NAME = re.compile(r"^(?P<site>.+)_(?P<precision>float16|float32|float64)_(?P<stats>[a-z0-9_-]*mom2[a-z0-9_-]*?)"
                   r"(?:_t[^_]*)?(?:_(?P<n>\d+))?\.npz$")


class StatsFileError(ValueError):
    """A statistics file that cannot be used for the site asked (wrong shape, layer,
    keys or values)."""


def _null() -> np.ndarray:
    return np.array(struct.unpack(">d", struct.pack(">Q", _NULL_BITS))[0], dtype=np.float64)


def rome_stats_path(stats_dir: str | os.PathLike[str], model_name: str, site: str, *, dataset: str = "wikipedia",
                    precision: str = "float32", sample_size: int | None = 100_000) -> Path:
    """Where ROME / EasyEdit look for ``site``'s statistics (their ``layer_stats``), e.g.
    ``stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz``
    (defaults: their gpt2-xl hparams' ``mom2_dataset``, ``mom2_dtype``, ``mom2_n_samples``).

    Example:
        >>> rome_stats_path("stats", "SmolLM2-135M-Instruct", "model.layers.6.mlp.down_proj").name
        'model.layers.6.mlp.down_proj_float32_mom2_100000.npz'
    """
    suffix = "" if sample_size is None else f"_{int(sample_size)}"
    name = model_name.replace("/", "_")
    return Path(stats_dir) / name / f"{dataset}_stats" / f"{site}_{precision}_mom2{suffix}.npz"


def save_npz(path: str | os.PathLike[str], mom2_sum: Float[Tensor, "d_mlp d_mlp"], count: int, *,
             sample_size: int | None = None, precision: str = "float32") -> Path:
    """Write ``mom2_sum`` (the SUM of ``k kᵀ`` over ``count`` rows) as ROME / EasyEdit do
    (keys above; ``precision`` the stored dtype, as their ``mom2_dtype``). Written to a
    temporary file and renamed, so a reader never sees half a file. Returns the path."""
    if precision not in ("float16", "float32", "float64"):
        raise ValueError(f"precision must be float16, float32 or float64, got {precision!r}")
    if int(count) < 1:
        raise ValueError(f"count must be >= 1 (the rows summed), got {count}")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: ROME / EasyEdit statistics files end in .npz")
    arr = mom2_sum.detach().cpu().to(getattr(torch, precision)).numpy()
    state = {"mom2.constructor": np.array(CONSTRUCTOR), "mom2.count": np.array(int(count)), "mom2.mom2": arr,
             "sample_size": _null() if sample_size is None else np.array(int(sample_size))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **state)  # type: ignore[arg-type]  # numpy's stub types **kwds as arrays, which these are
    tmp.replace(path)
    return path


def site_of_file(path: str | os.PathLike[str]) -> str | None:
    """The module path a ROME / EasyEdit file name names, or ``None`` if the name does not
    follow their pattern.

    Example:
        >>> site_of_file("x/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz")
        'transformer.h.17.mlp.c_proj'
    """
    m = _NAME.match(Path(path).name)
    return m.group("site") if m else None


def load_npz(path: str | os.PathLike[str], *, expect_shape: tuple[int, int] | None = None,
             site: str | None = None) -> tuple[Float[Tensor, "d_mlp d_mlp"], int]:
    """``(sum, count)`` of a ROME / EasyEdit statistics file, the sum as float64; the
    moment is ``sum / count``. With ``expect_shape`` / ``site`` the file is checked for
    that site and refused (:class:`StatsFileError`, one line) if it holds another shape,
    names another module, lacks the keys, or has a non-positive count or non-finite values."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise StatsFileError(f"{path}: no such statistics file") from None
    except (ValueError, OSError) as e:
        raise StatsFileError(f"{path}: not an npz file ({e})") from None
    if "mom2.mom2" not in data or "mom2.count" not in data:
        raise StatsFileError(f"{path.name}: not a ROME / EasyEdit second-moment file (it has {sorted(data)}, "
                             f"expected mom2.mom2 and mom2.count)")
    named = site_of_file(path)
    if site is not None and named is not None and named != site:
        raise StatsFileError(f"{path.name}: the statistics of {named}, not of {site}")
    mom2, count = data["mom2.mom2"], data["mom2.count"]
    _check_values(path, mom2, count, expect_shape, site)
    return torch.from_numpy(np.asarray(mom2, dtype=np.float64).copy()), int(count)


def _check_values(path: Path, mom2: Any, count: Any, expect: tuple[int, int] | None, site: str | None) -> None:
    shape = tuple(mom2.shape)
    if expect is not None and shape != tuple(expect):
        held = "x".join(str(s) for s in shape) or "a scalar"
        raise StatsFileError(f"{path.name}: expects {expect[0]}x{expect[1]} for {site or 'this site'}, "
                             f"the file holds {held}")
    if len(shape) != 2 or shape[0] != shape[1]:
        raise StatsFileError(f"{path.name}: mom2.mom2 is {shape}, not a square matrix")
    if np.ndim(count) != 0 or not np.issubdtype(np.asarray(count).dtype, np.integer) or int(count) < 1:
        raise StatsFileError(f"{path.name}: mom2.count is {count!r}, expected a positive integer (the rows summed)")
    if not np.isfinite(mom2).all():
        raise StatsFileError(f"{path.name}: mom2.mom2 holds non-finite values")


def find_stats(source: str | os.PathLike[str], site: str, model_name: str | None = None) -> Path | None:
    """The statistics file for ``site`` in ``source``: ``source`` itself if it is a file
    (whatever its name), else the one ``*.npz`` under the folder whose name names ``site``
    (preferring those under a folder called ``model_name``, as ROME lays them out).
    ``None`` if the folder has none; :class:`StatsFileError` if it has several."""
    src = Path(source).expanduser()
    if src.is_file():
        return src
    if not src.is_dir():
        raise StatsFileError(f"{src}: no such statistics file or folder")
    found = sorted(p for p in src.rglob("*.npz") if site_of_file(p) == site)
    if len(found) > 1 and model_name:
        mine = [p for p in found if model_name.replace("/", "_") in p.parts or model_name.split("/")[-1] in p.parts]
        found = mine or found
    if len(found) > 1:
        raise StatsFileError(f"{len(found)} statistics files for {site} under {src} ("
                             f"{', '.join(str(p.relative_to(src)) for p in found[:4])}): give the file")
    return found[0] if found else None

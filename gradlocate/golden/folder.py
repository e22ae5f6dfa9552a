"""A study folder: the one on-disk form of a golden-layer study, read and written by every verb.

``matrix(..., out=FOLDER)``, ``study(..., out_dir=FOLDER)``, ``gradlocate matrix``,
``gradlocate report`` and :meth:`~gradlocate.golden.study.Study.load` all take the same
folder. Its layout is fixed::

    manifest.json      what the study is: schema version, the model's identity, the data
                       source and the record indices used, the edits (with their content
                       ids), the proxy rule, the regime (editor + its typed settings), the
                       replicate seeds
    cells/*.jsonl      one record per (edit, layer, seed) cell, one shard file per process
    selections/        the selectors' scores on each proxy draw (first<n>.jsonl, draw<k>-first<n>.jsonl)
    batch/*.jsonl      the batch regime: the test edits edited together, one record per layer
    judgment.json      the judgment of the complete layers
    draws.json         the selectors judged over several proxy draws
    matrix.json        the whole matrix, once every cell is in
    report.md, figures/  what ``gradlocate report`` wrote

A folder made under another schema says so in one line naming its version and is never
read as this one; :func:`migrate` brings a schema-0 folder (``benchmarks/matrix.py`` of
gradlocate 0.3: ``edits.json`` and shard files at the top) to the current schema, moving
files only (the records keep their fingerprints).

Example:
    >>> import tempfile
    >>> from gradlocate.models import tiny
    >>> from gradlocate.golden.matrix import matrix
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
    >>> d = tempfile.mkdtemp()
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5"}, {"prompt": "1 + 1 =", "target_new": "3"}]
    >>> m = matrix(model, edits, hparams={"lr": 1e-2, "epochs": 2}, out=d, capability_edits=0, progress=False)
    >>> f = StudyFolder.open(d)
    >>> f.manifest.regime["editor"], len(f.manifest.edits), f.load()[1].done
    ('locft', 2, True)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlocate.data import EditRequest, Edits, as_edits
from gradlocate.golden.replicates import Replicates, ReplicateError, prompt_replicates, seed_replicates
from gradlocate.golden.scores import PRIMARY
from gradlocate.golden.table import Matrix, edit_id, layer_span
from gradlocate.golden.store import RecordStore, digest, relative_path

__all__ = ["StudyFolder", "Manifest", "Completeness", "FolderError", "NoLayerYet", "SCHEMA", "proxy_split",
           "migrate"]

#: The folder schema this gradlocate writes and reads.
SCHEMA = 1
MANIFEST = "manifest.json"


class FolderError(ValueError):
    """A study folder that cannot be used as asked: another schema, another study's
    edits, model or regime (the message names the folder and what differs)."""


class NoLayerYet(FolderError):
    """A study folder with no layer to show yet (no complete layer, or no cell at all)."""


def proxy_split(n: int, n_proxy: int | None = None, seed: int = 0, min_test: int = 2) -> tuple[list[int], list[int]]:
    """The proxy rule, defined once: ``n_proxy`` of ``n`` rows (default a quarter,
    ``max(1, n // 4)``) drawn with ``seed`` (``random.Random(seed)`` shuffles the row
    indices; the first ``n_proxy`` are the proxy rows), the rest the test rows; both sorted.
    ``min_test``: the test rows needed (a judgment needs 2; a sweep judged by its layer means, 1).

    Example:
        >>> proxy_split(8, 2, seed=0) == proxy_split(8, 2, seed=0), [len(p) for p in proxy_split(8)]
        (True, [2, 6])
    """
    k = max(1, n // 4) if n_proxy is None else n_proxy
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - min_test:
        raise ValueError(f"n_proxy must be in 1..{n - min_test} (the test rows need at least {min_test} of the {n} "
                         f"edits), got {k}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k]), sorted(order[k:])


@dataclass
class Manifest:
    """What a study folder holds (``manifest.json``; see the module doc).

    Attributes:
        model: ``spec`` (what :func:`~gradlocate.models.load_model` takes, if known),
            ``class``, ``n_layers``, ``identity`` (:func:`~gradlocate.handles.model_identity`).
        edits: each edit's fields, its content ``id`` and, where known, its record ``index``.
        sizes: the edit counts the folder has had (a folder grows: its first rows stay).
        data: ``source`` (file or dataset) and ``sample`` (the seed that drew the edits, or None).
        proxy: ``n_proxy`` (None: a quarter) and ``seed`` of the proxy rule (:func:`proxy_split`).
        regime: ``editor``, ``settings`` (every setting), ``seeds`` (replicates), and
            ``fingerprint``: the object whose digest the cells' editor fingerprint is.
        layers: the layers the study plans (None: all).
        retain: the retain texts GradRatio ran with (``None``: the built-in ones).
    """

    model: dict[str, Any]
    edits: list[dict[str, Any]]
    regime: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=lambda: {"n_proxy": None, "seed": 0})
    sizes: list[int] = field(default_factory=list)
    layers: list[int] | None = None
    retain: list[str] | None = None
    schema: int = SCHEMA
    created_by: str = ""

    def __post_init__(self) -> None:
        if not self.sizes:
            self.sizes = [len(self.edits)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.edits]

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def planned(self) -> list[int]:
        """The layers the study covers: :attr:`layers`, or every layer of the model."""
        return list(range(self.n_layers)) if self.layers is None else sorted(self.layers)

    def proxy_rows(self, n: int | None = None, seed: int | None = None) -> list[int]:
        """The proxy rows of the first ``n`` edits (default all) under this folder's rule."""
        rows = len(self.edits) if n is None else n
        return proxy_split(rows, self.proxy.get("n_proxy"), self.proxy["seed"] if seed is None else seed)[0]


@dataclass
class Completeness:
    """How much of a study folder's matrix is done: cells present of ``total`` (edits x
    layers x seeds), the layers complete, the layers with some cells, and the sizes."""

    cells: int
    total: int
    complete_layers: list[int]
    partial_layers: list[int]
    n_layers: int
    n_edits: int
    edits_used: int | None = None  # the first rows the matrix shows (None: all n_edits)

    @property
    def done(self) -> bool:
        return self.cells >= self.total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.cells}/{self.total} cells ({self.cells / max(self.total, 1):.0%}); "
                f"{len(self.complete_layers)}/{self.n_layers} layers complete"
                + (f", {len(self.partial_layers)} partial ({layer_span(self.partial_layers)})"
                   if self.partial_layers else "")
                + (f" over the first {self.edits_used} of {self.n_edits} edits"
                   if self.edits_used is not None and self.edits_used < self.n_edits else ""))


def _edit_rows(edits: Edits) -> list[dict[str, Any]]:
    idx = edits.indices if edits.indices is not None and len(edits.indices) == len(edits) else [None] * len(edits)
    return [{"index": i, "id": edit_id(e), **e.to_dict()} for i, e in zip(idx, edits)]


def edit_of(row: dict[str, Any]) -> EditRequest:
    """An edit of a manifest's ``edits`` (its fields plus ``index`` and ``id``), checked against its id."""
    d = {k: v for k, v in row.items() if k not in ("index", "id")}
    for k in ("rephrase_prompts", "locality_kinds", "portability_kinds"):  # JSON gives lists, the edit holds tuples
        d[k] = tuple(d.get(k) or ())
    for k in ("locality", "portability"):
        d[k] = tuple(tuple(p) for p in d.get(k) or ())
    e = EditRequest(**d)
    if edit_id(e) != row["id"]:
        raise FolderError(f"edit {row['id']} of the manifest does not match its content id ({edit_id(e)}): "
                          f"the manifest was changed by hand")
    return e


class StudyFolder:
    """A study folder on disk (see the module doc). :meth:`open` reads one, :meth:`bind`
    makes one or checks that a run belongs in it."""

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- paths
    @property
    def cells_dir(self) -> Path:
        return self.path / "cells"

    @property
    def batch_dir(self) -> Path:
        return self.path / "batch"

    @property
    def judgment_path(self) -> Path:
        return self.path / "judgment.json"

    @property
    def draws_path(self) -> Path:
        return self.path / "draws.json"

    def selections_path(self, n: int, seed: int = 0) -> Path:
        """The record file of the selectors on the proxy draw ``seed`` of the first ``n`` edits."""
        name = f"first{n}.jsonl" if seed == self.manifest.proxy["seed"] else f"draw{seed}-first{n}.jsonl"
        (self.path / "selections").mkdir(exist_ok=True)  # not beside the cells: every cells/*.jsonl is a cell
        return self.path / "selections" / name

    # -- opening
    @staticmethod
    def is_folder(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a study folder of any schema."""
        p = Path(path)
        return (p / MANIFEST).exists() or (p / "edits.json").exists()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> StudyFolder:
        """The study folder at ``path``.

        Raises:
            FileNotFoundError: no study folder there.
            FolderError: a folder of another schema (the message names it and what to do).
        """
        p = Path(path)
        if not (p / MANIFEST).exists():
            if (p / "edits.json").exists():
                raise FolderError(f"{relative_path(p)} is a schema-0 study folder (benchmarks/matrix.py of gradlocate "
                                  f"0.3), this gradlocate reads schema {SCHEMA}: run `gradlocate migrate {p}` once")
            raise FileNotFoundError(f"{relative_path(p)} is not a study folder (no {MANIFEST}): make one with "
                                    f"`gradlocate matrix --out {p} ...` or gradlocate.matrix(..., out=...)")
        raw = json.loads((p / MANIFEST).read_text())
        if raw.get("schema") != SCHEMA:
            raise FolderError(f"{relative_path(p)} was written under study-folder schema {raw.get('schema')!r}; this "
                              f"gradlocate reads schema {SCHEMA} only (use the gradlocate version that wrote it)")
        return cls(p, Manifest.from_dict(raw))

    @classmethod
    def bind(cls, path: str | os.PathLike[str], manifest: Manifest) -> StudyFolder:
        """The folder at ``path`` for a run described by ``manifest``: made if new; if it
        exists, the run must be the same study (model, regime, proxy rule) on some of its
        edits, in any order, or on a longer list starting with them (the folder grows), and
        may add replicate seeds.

        Raises:
            FolderError: naming what differs.
        """
        p = Path(path)
        if not (p / MANIFEST).exists():
            if StudyFolder.is_folder(p):
                cls.open(p)  # raises: a folder of another schema
            p.mkdir(parents=True, exist_ok=True)
            folder = cls(p, manifest)
            folder.write_manifest()
            return folder
        folder = cls.open(p)
        folder._grow(manifest)
        return folder

    def _grow(self, new: Manifest) -> None:
        old = self.manifest
        same = lambda d: {k: v for k, v in d.items() if k != "seeds"}  # noqa: E731 - replicates may be added
        for part in ("regime", "proxy"):
            if same(getattr(old, part)) != same(getattr(new, part)):
                raise FolderError(f"{relative_path(self.path)} holds a study with another {part}: "
                                  f"{getattr(old, part)} (this run: {getattr(new, part)}); use another folder")
        if new.regime["seeds"][0] != old.regime["seeds"][0]:
            raise FolderError(f"{relative_path(self.path)}: its first replicate seed is {old.regime['seeds'][0]}, this "
                              f"run's {new.regime['seeds'][0]}; give seeds starting with it")
        grown = [s for s in new.regime["seeds"] if s not in old.regime["seeds"]]
        if digest(old.model["identity"]) != digest(new.model["identity"]):
            raise FolderError(f"{relative_path(self.path)} holds a study of another model ({old.model.get('spec') or old.model['class']}, "
                              f"other weights): use another folder")
        if new.retain is not None and new.retain != old.retain:
            if old.retain is not None:
                raise FolderError(f"{relative_path(self.path)}'s selectors ran with other retain texts: use another folder")
            old.retain = new.retain
            self.write_manifest()
        extends = len(new.ids) > len(old.ids) and new.ids[:len(old.ids)] == old.ids
        foreign = set(new.ids) - set(old.ids)
        if foreign and not extends:
            raise FolderError(f"{relative_path(self.path)} holds a study of other edits ({len(foreign)} of this run's "
                              f"{len(new.ids)} edits are not among its {len(old.ids)}, and this run does not extend "
                              f"its list): use another folder")
        # the planned layers grow too (None, every layer, absorbs any list)
        layers = None if old.layers is None or new.layers is None else sorted(set(old.layers) | set(new.layers))
        if extends or grown or layers != old.layers:
            if extends:
                old.edits, old.data = new.edits, new.data
                old.sizes = sorted(set(old.sizes) | {len(new.edits)})
            old.regime["seeds"] = old.regime["seeds"] + grown
            old.layers = layers
            self.write_manifest()

    def write_manifest(self) -> None:
        """Write ``manifest.json`` atomically (several processes may write the same one)."""
        tmp = self.path / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(self.manifest.to_dict(), indent=1))
        os.replace(tmp, self.path / MANIFEST)

    # -- reading
    def edits(self, n: int | None = None) -> Edits:
        """The folder's edits (the first ``n``), each checked against its content id."""
        rows = self.manifest.edits[:n]
        out = as_edits([edit_of(r) for r in rows])
        out.source = self.manifest.data.get("source")
        out.indices = [r["index"] for r in rows] if all(r.get("index") is not None for r in rows) else None
        return out

    def records(self) -> dict[Any, dict[str, Any]]:
        """Every cell record (all shards), checked to be made under one fingerprint, the regime's."""
        recs = {k: r for k, r in RecordStore(self.cells_dir).read().items() if "edit" in r and "layer" in r}
        seen = {json.dumps({k: v for k, v in (r.get("fingerprint") or {}).items() if k != "cell"}, sort_keys=True)
                for r in recs.values()}
        if len(seen) > 1:
            raise FolderError(f"{relative_path(self.path)} mixes cells made under {len(seen)} fingerprints: {sorted(seen)[:3]}")
        want = digest(self.manifest.regime["fingerprint"])
        got = {(r.get("fingerprint") or {}).get("editor") for r in recs.values()}
        if recs and got != {want}:
            raise FolderError(f"{relative_path(self.path)}: its cells' editor fingerprint {sorted(map(str, got))} is not "
                              f"the manifest's regime {self.manifest.regime['editor']} ({want})")
        return recs

    def load(self, *, complete_only: bool = True, seed: int | None = None) -> tuple[Matrix, Completeness]:
        """The folder's matrix (no model needed) and how complete it is: the rows are the
        manifest's edits, the columns the layers every row has (``complete_only``; else
        every layer with a cell, NaN where absent), of replicate ``seed`` (default the first).

        Raises:
            NoLayerYet: no layer to show yet (a run that has only begun).
        """
        m = self.manifest
        seed = m.regime["seeds"][0] if seed is None else seed
        cells = {(r["edit"], int(r["layer"])): r for r in self.records().values()
                 if r.get("seed", m.regime["seeds"][0]) == seed}
        ids, every = m.ids, len(m.ids)
        if complete_only:  # a grown folder: its first rows may be complete before the new ones are
            ids = _best_prefix(ids, m.sizes, cells, m.planned)
        count = {l: sum((e, l) in cells for e in ids) for l in m.planned}
        complete = [l for l, c in count.items() if c == len(ids)]
        partial = [l for l, c in count.items() if 0 < c < len(ids)]
        layers = complete if complete_only else sorted(complete + partial)
        if not layers:
            raise NoLayerYet(f"{relative_path(self.path)}: no {'complete ' if complete_only else ''}layer yet "
                             f"({len(cells)} cells)")
        params = {"hparams": dict(m.regime["fingerprint"].get("hparams", {})), "settings": m.regime["settings"],
                  "seed": seed}
        mx = Matrix.from_cells(layers, ids, cells, m.regime["editor"], params, relative_path(self.path))
        mx.params["capability_edits"] = int(np.isfinite(mx.capability).any(1).sum())
        n_cells = sum(1 for (e, l) in cells if e in set(m.ids) and l in set(m.planned))
        return mx, Completeness(n_cells, every * len(m.planned), complete, partial, len(m.planned), every, len(ids))

    def replicates(self, metric: str = PRIMARY, *, by: str = "auto", seeds: tuple[int, int] | None = None,
                   complete_only: bool = True) -> Replicates:
        """Two replicate tables of ``metric`` (a cell metric or an overall definition) for
        :func:`~gradlocate.golden.oracle.oracle_gain`, each with its estimand
        (:mod:`gradlocate.golden.replicates`): ``by="seeds"`` the cells of two replicate
        seeds (``seeds``, default the manifest's first two), ``"prompts"`` disjoint halves of
        each cell's prompts of the metric's kind (first seed), ``"auto"`` seeds where the
        folder has two, else prompts.

        Raises:
            ReplicateError: no replicate of that kind in this folder (the message says what
                the data lacks: one seed, a deterministic editor, one prompt per kind ...).
        """
        if by not in ("auto", "seeds", "prompts"):
            raise ValueError(f"by must be 'auto', 'seeds' or 'prompts', got {by!r}")
        have = self.manifest.regime["seeds"]
        if by == "seeds" or (by == "auto" and len(have) > 1):
            pair = tuple(seeds) if seeds is not None else tuple(have[:2])
            if len(pair) != 2 or pair[0] == pair[1] or any(s not in have for s in pair):
                raise ReplicateError(f"{relative_path(self.path)}: replicate seeds must be two of the folder's seeds "
                                     f"{have}, got {list(pair)}; run the matrix with seeds=[{have[0]}, ...] to add one")
            a, _ = self.load(complete_only=complete_only, seed=pair[0])
            b, _ = self.load(complete_only=complete_only, seed=pair[1])
            return seed_replicates(a, b, metric, (int(pair[0]), int(pair[1])))
        m, _ = self.load(complete_only=complete_only)
        return prompt_replicates(m, metric)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"StudyFolder({relative_path(self.path)!r}: {len(m.edits)} edits, {m.model.get('spec') or m.model['class']}, "
                f"{m.regime['editor']})")


def _best_prefix(ids: list[str], sizes: list[int], cells: dict[tuple[str, int], Any], layers: list[int]) -> list[str]:
    """The rows in view: of the sizes the manifest has had, the first ``k`` edits whose
    complete layers hold the most cells (the larger ``k`` on a tie). A folder grown from
    32 to 64 edits keeps its 32 complete rows in view while the new rows are filled."""
    sizes = sorted({k for k in sizes if 0 < k < len(ids)} | {len(ids)})

    def held(k: int) -> int:
        return k * sum(all((e, l) in cells for e in ids[:k]) for l in layers)

    return ids[:max(sorted(sizes, reverse=True), key=held)]


def _identity(spec: str) -> tuple[str | None, dict[str, Any] | None]:
    """The class name and identity of the model ``spec`` loads (``(None, None)`` if it does not)."""
    from gradlocate.handles import down_projections, model_identity
    from gradlocate.models import load_model

    try:
        model, tok = load_model(spec)
    except Exception:  # noqa: BLE001 - a model that cannot be loaded here: the manifest says it does not know
        return None, None
    return type(model).__name__, model_identity(down_projections(model, tokenizer=tok))


#: The regime of schema-0 folders whose edits.json predates the regime fields (the first
#: published study), by folder name.
_LEGACY_REGIMES = {"smollm2-counterfact-locft-lr5e-4": {"model": "smollm2", "data": "counterfact_3k.json",
                                                        "n_layers": 30, "editor": "locft",
                                                        "hparams": {"lr": 5e-4, "epochs": 25}}}


def migrate(path: str | os.PathLike[str], identity_from: str | None = None) -> StudyFolder:
    """Bring a schema-0 folder (``benchmarks/matrix.py``: ``edits.json`` and ``*.jsonl``
    shards at the top, ``proxy_draws.json``) to the current schema, in place: the manifest is
    written from ``edits.json``, the shards move to ``cells/``, ``proxy_draws.json`` becomes
    ``draws.json``. The records are not rewritten (they keep their fingerprints); the
    manifest's regime fingerprint is what they were made under. ``identity_from``: a model
    spec to load (default: the folder's own, if it loads) for the manifest's model identity,
    which then checks the cached selections; without it they are read by every other part."""
    from gradlocate.editors import settings_for

    p = Path(path)
    if (p / MANIFEST).exists():
        return StudyFolder.open(p)
    old = json.loads((p / "edits.json").read_text())
    reg = {**_LEGACY_REGIMES.get(p.name, {}), **{k: old[k] for k in ("model", "data", "n_layers", "editor", "hparams")
                                                 if k in old}}
    missing = {"model", "n_layers", "editor", "hparams"} - set(reg)
    if missing:
        raise FolderError(f"{relative_path(p)}: its edits.json lacks {sorted(missing)}; cannot say what regime it holds")
    settings = settings_for(reg["editor"], reg["hparams"])
    seed = getattr(settings, "seed", 0)
    cls, identity = _identity(identity_from or reg["model"])
    manifest = Manifest(
        model={"spec": reg["model"], "class": cls, "n_layers": int(reg["n_layers"]), "identity": identity},
        edits=[{"index": r.get("index"), **r} for r in old["edits"]],
        regime={"editor": reg["editor"], "settings": settings.to_dict(), "seeds": [seed],
                "fingerprint": {"name": reg["editor"], "hparams": reg["hparams"]}},
        data={"source": reg.get("data"), "sample": old.get("seed")}, proxy={"n_proxy": None, "seed": 0},
        sizes=sorted(set(old.get("sizes", [])) | {len(old["edits"])}), created_by="migrated from schema 0")
    (p / "cells").mkdir(exist_ok=True)
    for f in sorted(p.glob("*.jsonl")):
        shutil.move(str(f), str(p / "cells" / f.name))
    if (p / "proxy_draws.json").exists():
        shutil.move(str(p / "proxy_draws.json"), str(p / "draws.json"))
    folder = StudyFolder(p, manifest)
    folder.write_manifest()
    (p / "edits.json").unlink()
    return folder

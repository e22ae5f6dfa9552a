"""Edit requests and text sets, read from the public formats.

An edit changes a model's answer to a prompt. Three spellings exist in the wild and
all normalise to :class:`EditRequest`:

* CounterFact / EasyEdit: ``prompt``, ``target_new``, ``ground_truth``, ``subject``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``;
* ZsRE (as processed by MEND / LocFT): ``src``, ``alt``, ``answers``, ``pred``,
  ``subject``, ``rephrase``, ``loc``, ``loc_ans``;
* KnowEdit: nested ``portability`` / ``locality`` blocks of ``{prompt, ground_truth}``.

Example:
    >>> from gradlocate.data import as_edits
    >>> e, = as_edits([{"src": "Which river system contains Charity Creek?", "alt": "Chichester River",
    ...                 "answers": ["Parramatta River"], "subject": "Charity Creek"}])
    >>> e.prompt, e.target_new, e.ground_truth
    ('Which river system contains Charity Creek?', 'Chichester River', 'Parramatta River')
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EditRequest", "Edits", "as_edits", "load_edits", "load_texts", "shared_data_path", "old_answers",
    "default_retain_texts", "warn_duplicates",
]


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``prompt`` continue with ``target_new``.

    Attributes:
        prompt: the query, e.g. ``"The capital of France is"``.
        target_new: the new answer, e.g. ``"Rome"``.
        subject: the entity the fact is about (needed by causal tracing).
        ground_truth: the true (old) answer, if known.
        pred: the unedited model's own answer, if recorded (ZsRE's ``pred``).
        rephrase_prompts: paraphrases of ``prompt`` (generalization).
        locality: ``(prompt, answer)`` pairs that must not change.
        portability: ``(prompt, answer)`` pairs that should follow from the edit.
        case_id: an identifier from the source data, if any.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    pred: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    portability: tuple[tuple[str, str], ...] = ()
    case_id: Any = field(default=None, compare=False)

    @property
    def old_answer(self) -> str | None:
        """The answer the edit replaces: ``ground_truth``, else ``pred``."""
        return self.ground_truth if self.ground_truth is not None else self.pred

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rephrase_prompts"] = list(self.rephrase_prompts)
        d["locality"] = [list(p) for p in self.locality]
        d["portability"] = [list(p) for p in self.portability]
        return d


def _first_str(v: Any, what: str, where: str) -> str | None:
    """A field that may be a string or a (nested) list of strings: its first string."""
    while isinstance(v, (list, tuple)):
        if not v:
            return None
        v = v[0]
    if v is None:
        return None
    if not isinstance(v, str):
        raise TypeError(f"{where}: field {what!r} must be a string, got {type(v).__name__} ({v!r})")
    return v


def _str_list(v: Any, what: str, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            s = _first_str(x, what, where)
            if s is not None:
                out.append(s)
        return tuple(out)
    raise TypeError(f"{where}: field {what!r} must be a string or a list of strings, got {type(v).__name__}")


def _pairs(block: Any, where: str, what: str) -> list[tuple[str, str]]:
    """KnowEdit-style ``{name: [{prompt, ground_truth}], ...}`` or a list of such dicts."""
    out: list[tuple[str, str]] = []
    if block is None:
        return out
    items: Iterable[Any]
    if isinstance(block, Mapping):
        if "prompt" in block:
            items = [block]
        else:
            items = [x for v in block.values() for x in (v if isinstance(v, list) else [v])]
    elif isinstance(block, (list, tuple)):
        items = block
    else:
        raise TypeError(f"{where}: {what} must be a dict or a list, got {type(block).__name__}")
    for it in items:
        if not isinstance(it, Mapping):
            raise TypeError(f"{where}: {what} entries must be dicts with 'prompt' and 'ground_truth'")
        prompts = _str_list(it.get("prompt"), f"{what}.prompt", where)
        ans = _first_str(it.get("ground_truth", it.get("answer", it.get("target"))), f"{what}.ground_truth", where)
        if ans is None:
            continue
        out.extend((p, ans) for p in prompts)
    return out


def _from_mapping(r: Mapping[str, Any], i: int) -> EditRequest:
    where = f"edit {i}"
    prompt = r.get("prompt", r.get("src"))
    target = r.get("target_new", r.get("alt"))
    if isinstance(target, Mapping):  # ROME's requested_rewrite: {"str": ...}
        target = target.get("str")
    if prompt is None or target is None:
        raise ValueError(
            f"{where} has no {'prompt' if prompt is None else 'target'}: expected 'prompt'/'target_new' "
            f"(CounterFact) or 'src'/'alt' (ZsRE); its keys are {sorted(r)}"
        )
    prompt = _first_str(prompt, "prompt", where)
    target = _first_str(target, "target_new", where)
    if not prompt or not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty")
    if not target or not target.strip():
        raise ValueError(f"{where}: the target is empty (prompt {prompt!r})")
    subject = _first_str(r.get("subject"), "subject", where)
    if subject is not None and "{}" in prompt:  # ROME templates: "{} is located in"
        prompt = prompt.replace("{}", subject)
    gt = _first_str(r.get("ground_truth", r.get("answers")), "ground_truth", where)
    if isinstance(gt, Mapping):
        gt = None
    pred = _first_str(r.get("pred"), "pred", where)
    rephrase = _str_list(r.get("rephrase_prompt", r.get("rephrase", r.get("rephrase_prompts"))), "rephrase", where)
    loc: list[tuple[str, str]] = []
    if "locality_prompt" in r or "loc" in r:
        lp = _str_list(r.get("locality_prompt", r.get("loc")), "locality_prompt", where)
        la = _first_str(r.get("locality_ground_truth", r.get("loc_ans")), "locality_ground_truth", where)
        if la is not None:
            loc.extend((p, la) for p in lp)
    if isinstance(r.get("locality"), (Mapping, list)):
        loc.extend(_pairs(r["locality"], where, "locality"))
    port = _pairs(r.get("portability"), where, "portability") if r.get("portability") is not None else []
    return EditRequest(
        prompt=prompt, target_new=target, subject=subject, ground_truth=gt, pred=pred,
        rephrase_prompts=rephrase, locality=tuple(loc), portability=tuple(port),
        case_id=r.get("case_id"),
    )


class Edits(list):
    """A list of :class:`EditRequest` that has been normalised and checked once (what
    :func:`as_edits` and :func:`load_edits` return). Every function accepts it as is."""


def as_edits(edits: Any, *, allow_empty: bool = False) -> Edits:
    """Normalise edits, once: :class:`EditRequest` objects, dicts in any public
    spelling, a single one of those, a ``datasets.Dataset`` / ``DatasetDict``, or a path
    / ``"zsre"`` / ``"counterfact"`` (read with :func:`load_edits`). An :class:`Edits`
    is returned as is. Duplicates are warned about here, once.

    Raises:
        ValueError: an empty list, or a record without prompt or target.
        TypeError: a field of the wrong type, or something that is not edits.

    Example:
        >>> e = as_edits([{"prompt": "Paris is in", "target_new": "Italy"}])
        >>> as_edits(e) is e
        True
    """
    if isinstance(edits, Edits) and (edits or allow_empty):
        return edits
    if isinstance(edits, (str, os.PathLike)):
        return load_edits(edits)
    if edits is None:
        raise TypeError("edits is None: give a list of edits (dicts or EditRequest), a datasets Dataset, "
                        "or a path to a JSON/JSONL file")
    if isinstance(edits, (EditRequest, Mapping)):
        edits = [edits]
    edits = _records(edits)
    if isinstance(edits, bytes) or not hasattr(edits, "__iter__"):
        raise TypeError(f"edits must be a list of edits (dicts or EditRequest), a datasets Dataset, or a path, "
                        f"got {type(edits).__name__}")
    out = Edits()
    for i, r in enumerate(edits):
        if isinstance(r, EditRequest):
            for name in ("prompt", "target_new"):
                v = getattr(r, name)
                if not isinstance(v, str):
                    raise TypeError(f"edit {i}: {name} must be a string, got {type(v).__name__} ({v!r})")
                if not v.strip():
                    raise ValueError(f"edit {i}: the {'target' if name == 'target_new' else 'prompt'} is empty "
                                     f"(prompt {r.prompt!r})")
            out.append(r)
        elif isinstance(r, Mapping):
            out.append(_from_mapping(r, i))
        else:
            raise TypeError(f"edit {i} is a {type(r).__name__}: give EditRequest objects or dicts")
    if not out and not allow_empty:
        raise ValueError("the edit list is empty: give at least one edit")
    warn_duplicates(out)
    return out


def _records(source: Any, split: str = "train") -> Any:
    """A ``datasets`` Dataset / DatasetDict as a list of dicts; anything else as is."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return source
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}: its splits are {list(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.to_list()
    return source


def shared_data_path(name: str) -> Path:
    """Path of a data set in the project's shared data folder: ``$GRADLOCATE_DATA``,
    else ``../shared/data`` beside the current folder or beside this checkout.

    ``name`` is a file name or one of ``"zsre"`` / ``"counterfact"``.
    """
    files = {"zsre": "zsre_3k.json", "counterfact": "counterfact_3k.json"}
    fname = files.get(name.lower(), name)
    roots = []
    if os.environ.get("GRADLOCATE_DATA"):
        roots.append(Path(os.environ["GRADLOCATE_DATA"]))
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        roots += [base / "shared" / "data", base.parent / "shared" / "data"]
    for root in roots:
        if (root / fname).exists():
            return root / fname
    raise FileNotFoundError(
        f"data set {name!r} not found: looked for {fname} in {', '.join(map(str, roots))}; "
        f"set GRADLOCATE_DATA to the folder that holds it"
    )


def _read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, Mapping):
        for key in ("data", "edits", "records", "requests"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    return data


def load_edits(source: Any, n: int | None = None, *, split: str = "train", offset: int = 0) -> Edits:
    """Read edits from a JSON / JSONL file, a list of records, a ``datasets``
    dataset, a Hugging Face dataset name, or ``"zsre"`` / ``"counterfact"`` (the shared
    data, see :func:`shared_data_path`).

    Args:
        source: where the edits are.
        n: keep only ``n`` edits (after ``offset``), in file order.
        split: the split to load for a hub dataset name.
        offset: skip this many records first.

    Example:
        >>> edits = load_edits([{"prompt": "The capital of France is", "target_new": "Rome"}])
        >>> edits[0].target_new
        'Rome'
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists() and str(source).lower() in ("zsre", "counterfact"):
            p = shared_data_path(str(source))
        if p.exists():
            records: Any = _read_records(p)
        elif isinstance(source, str) and "/" in source and not source.endswith((".json", ".jsonl")):
            import datasets

            records = datasets.load_dataset(source, split=split)
        else:
            raise FileNotFoundError(f"no edits file {str(source)!r}")
    else:
        records = source
    records = list(_records(records, split))[offset:]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        records = records[:n]
    return as_edits(records)


def load_texts(source: Any, n: int | None = None, *, field: str = "text", split: str = "train") -> list[str]:
    """Read general texts (the retain set): a list of strings, a ``.txt`` file (one
    text per blank-line separated paragraph), a JSON / JSONL file of strings or of
    records with ``field``, or a ``datasets`` dataset / hub name.

    Raises:
        ValueError: no non-empty text.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).exists():
        p = Path(source)
        if p.suffix == ".txt":
            raw: Any = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n")]
        else:
            raw = _read_records(p)
    elif isinstance(source, str):
        import datasets

        raw = datasets.load_dataset(source, split=split)
    else:
        raw = source
    try:
        import datasets

        if isinstance(raw, datasets.Dataset):
            raw = raw[field]
    except ImportError:  # pragma: no cover
        pass
    texts = []
    for i, t in enumerate(raw):
        if isinstance(t, Mapping):
            t = t.get(field)
        if not isinstance(t, str):
            raise TypeError(f"text {i} is a {type(t).__name__}, not a string")
        if t.strip():
            texts.append(t)
    if n is not None:
        texts = texts[:n]
    if not texts:
        raise ValueError("the text list is empty: give at least one non-empty text")
    return texts


def old_answers(edits: Sequence[EditRequest]) -> list[str | None]:
    """Each edit's old answer (``ground_truth``, else ``pred``), ``None`` if unknown."""
    return [e.old_answer for e in edits]


def warn_duplicates(edits: Sequence[EditRequest]) -> None:
    """Warn once if the same (prompt, target) appears more than once."""
    seen: dict[tuple[str, str], int] = {}
    dups = []
    for i, e in enumerate(edits):
        key = (e.prompt, e.target_new)
        if key in seen:
            dups.append((seen[key], i))
        else:
            seen[key] = i
    if dups:
        warnings.warn(f"{len(dups)} duplicate edit(s) (same prompt and target), e.g. edits {dups[0]}", stacklevel=3)


def default_retain_texts(n: int | None = None) -> list[str]:
    """General English texts shipped with gradlocate (64 paragraphs of 110-170 words
    on varied topics, written for this package), used as the retain set when the user
    gives none. GradRatio's paper uses 256 sequences of 128 tokens of general text;
    pass your own corpus (``load_texts``) to match it.

    Example:
        >>> texts = default_retain_texts(4)
        >>> len(texts), all(len(t.split()) > 100 for t in texts)
        (4, True)
    """
    from importlib.resources import files

    raw = files("gradlocate").joinpath("assets/retain_texts.txt").read_text(encoding="utf-8")
    texts = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > len(texts):
            raise ValueError(f"only {len(texts)} built-in retain texts; pass your own with load_texts(...)")
        texts = texts[:n]
    return texts

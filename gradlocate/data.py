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
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EditRequest", "Edits", "SHAPES", "as_edits", "load_edits", "load_texts", "shared_data_path", "old_answers",
    "default_retain_texts", "heldout_texts", "warn_duplicates",
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
        locality_kinds, portability_kinds: the name of each pair's group, as the data
            names it (KnowEdit's ``Relation_Specificity``, ``Reasoning`` ...; WikiBigEdit's
            ``personas`` and ``mhop``; ``neighborhood`` for flat locality prompts).
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
    locality_kinds: tuple[str, ...] = ()
    portability_kinds: tuple[str, ...] = ()
    case_id: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Pairs given without group names belong to the default groups.
        if len(self.locality_kinds) != len(self.locality):
            object.__setattr__(self, "locality_kinds", ("neighborhood",) * len(self.locality))
        if len(self.portability_kinds) != len(self.portability):
            object.__setattr__(self, "portability_kinds", ("portability",) * len(self.portability))

    @property
    def old_answer(self) -> str | None:
        """The answer the edit replaces: ``ground_truth``, else ``pred``."""
        return self.ground_truth if self.ground_truth is not None else self.pred

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("rephrase_prompts", "locality_kinds", "portability_kinds"):
            d[k] = list(getattr(self, k))
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
        return (v,) if v.strip() else ()
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            s = _first_str(x, what, where)
            if s is not None and s.strip():
                out.append(s)
        return tuple(out)
    raise TypeError(f"{where}: field {what!r} must be a string or a list of strings, got {type(v).__name__}")


def _groups(block: Any, where: str, what: str, default: str) -> list[tuple[str, str, str]]:
    """``(prompt, answer, group)`` triples from KnowEdit-style ``{group: [{prompt,
    ground_truth}], ...}``, a single ``{prompt, ground_truth}`` (prompt and answer may be
    parallel lists, as EasyEdit writes them), or a list of such dicts."""
    out: list[tuple[str, str, str]] = []
    if block is None:
        return out
    if isinstance(block, Mapping) and ("prompt" in block or "ground_truth" in block):
        items: list[tuple[str, Any]] = [(default, block)]
    elif isinstance(block, Mapping):
        items = [(str(k), x) for k, v in block.items() for x in (v if isinstance(v, (list, tuple)) else [v])]
    elif isinstance(block, (list, tuple)):
        items = [(default, x) for x in block]
    else:
        raise TypeError(f"{where}: {what} must be a dict or a list, got {type(block).__name__}")
    for group, it in items:
        if not isinstance(it, Mapping):
            raise TypeError(f"{where}: {what} entries must be dicts with 'prompt' and 'ground_truth', got "
                            f"{type(it).__name__}")
        prompts = _str_list(it.get("prompt"), f"{what}.prompt", where)
        answers = it.get("ground_truth", it.get("answer", it.get("target")))
        if isinstance(answers, (list, tuple)) and len(answers) == len(prompts) > 1:
            pairs = [(p, _first_str(a, f"{what}.ground_truth", where)) for p, a in zip(prompts, answers)]
        else:
            ans = _first_str(answers, f"{what}.ground_truth", where)
            pairs = [(p, ans) for p in prompts]
        out += [(p, a, group) for p, a in pairs if a is not None and a.strip()]
    return out


#: The record shapes gradlocate reads, for the error on an unknown one.
SHAPES = (
    "CounterFact / EasyEdit: prompt, target_new [, ground_truth, subject, rephrase_prompt, locality_prompt, "
    "locality_ground_truth, portability]",
    "ZsRE (MEND / LocFT): src, alt [, answers, pred, subject, rephrase, loc, loc_ans]",
    "KnowEdit: prompt, target_new [, subject, ground_truth, rephrase, portability{Reasoning, Subject_Aliasing, "
    "Logical_Generalization}, locality{Relation_Specificity, Forgetfulness}]",
    "KnowEdit WikiBio: concept, text, labels [, locality]",
    "WikiBigEdit: update, ans [, subject, rephrase, personas*, mhop, mhop_ans, loc, loc_ans] (or EasyEdit's "
    "flattened portability_personas, portability_hop, portability_hop_ans)",
    "ROME CounterFact: requested_rewrite{prompt, subject, target_new{str}, target_true{str}} [, paraphrase_prompts, "
    "neighborhood_prompts]",
)


def _unknown(r: Mapping[str, Any], where: str, missing: str) -> ValueError:
    known = "\n  ".join(SHAPES)
    return ValueError(f"{where} has no {missing}: its fields are {sorted(map(str, r))}; gradlocate reads these "
                      f"shapes:\n  {known}")


def _flat(r: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields of any known shape, in CounterFact / EasyEdit spelling."""
    if isinstance(r.get("requested_rewrite"), Mapping):  # ROME's raw CounterFact
        rr = r["requested_rewrite"]
        subject = _first_str(rr.get("subject"), "requested_rewrite.subject", where)
        truth = rr.get("target_true", {})
        truth = truth.get("str") if isinstance(truth, Mapping) else truth
        return {"prompt": rr.get("prompt"), "target_new": rr.get("target_new"), "subject": subject,
                "ground_truth": truth, "rephrase": r.get("paraphrase_prompts"),
                "locality": [(p, truth, "neighborhood") for p in _str_list(r.get("neighborhood_prompts"),
                                                                         "neighborhood_prompts", where)]
                if isinstance(truth, str) else [], "case_id": r.get("case_id")}
    if "text" in r and "labels" in r and "concept" in r and "prompt" not in r:  # KnowEdit WikiBio
        return {"prompt": r["text"], "target_new": r["labels"], "subject": r["concept"],
                "locality": _groups(r.get("locality"), where, "locality", "locality"), "case_id": r.get("case_id")}
    out: dict[str, Any] = {
        "prompt": r.get("prompt", r.get("src", r.get("update"))),
        "target_new": r.get("target_new", r.get("alt", r.get("ans"))),
        "subject": r.get("subject"),
        "ground_truth": r.get("ground_truth", r.get("answers")),
        "pred": r.get("pred"),
        "rephrase": r.get("rephrase_prompt", r.get("rephrase", r.get("rephrase_prompts"))),
        "case_id": r.get("case_id"),
    }
    loc: list[tuple[str, str, str]] = []
    if "locality_prompt" in r or "loc" in r:
        lp = _str_list(r.get("locality_prompt", r.get("loc")), "locality_prompt", where)
        la = _first_str(r.get("locality_ground_truth", r.get("loc_ans")), "locality_ground_truth", where)
        if la is not None and la.strip():
            loc += [(p, la, "neighborhood") for p in lp]
    if isinstance(r.get("locality"), (Mapping, list)):
        loc += _groups(r["locality"], where, "locality", "neighborhood")
    out["locality"] = loc
    port: list[tuple[str, str, str]] = _groups(r.get("portability"), where, "portability", "portability") \
        if r.get("portability") is not None else []
    # WikiBigEdit: persona-style questions (new target) and multi-hop questions (their own answer).
    target = _first_str(out["target_new"], "target_new", where) if not isinstance(out["target_new"], Mapping) else None
    if "update" in r or "portability_personas" in r:
        for k in sorted(r):
            if (k.startswith("personas") or k == "portability_personas") and target:
                port += [(p, target, "personas") for p in _str_list(r[k], k, where)]
    hop, hop_ans = r.get("mhop", r.get("portability_hop")), r.get("mhop_ans", r.get("portability_hop_ans"))
    if hop is not None and hop_ans is not None:
        a = _first_str(hop_ans, "mhop_ans", where)
        if a:
            port += [(p, a, "mhop") for p in _str_list(hop, "mhop", where)]
    out["portability"] = port
    return out


def _from_mapping(r: Mapping[str, Any], i: int) -> EditRequest:
    where = f"edit {i}"
    f = _flat(r, where)
    prompt, target = f["prompt"], f["target_new"]
    if isinstance(target, Mapping):  # ROME's {"str": ..., "id": ...}
        target = target.get("str")
    if prompt is None:
        raise _unknown(r, where, "prompt")
    if target is None:
        raise _unknown(r, where, "target")
    prompt = _first_str(prompt, "prompt", where)
    target = _first_str(target, "target_new", where)
    if not prompt or not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty")
    if not target or not target.strip():
        raise ValueError(f"{where}: the target is empty (prompt {prompt!r})")
    subject = _first_str(f.get("subject"), "subject", where)
    if subject is not None and "{}" in prompt:  # ROME templates: "{} is located in"
        prompt = prompt.replace("{}", subject)
    gt = _first_str(f.get("ground_truth"), "ground_truth", where)
    pred = _first_str(f.get("pred"), "pred", where)
    loc, port = f.get("locality", []), f.get("portability", [])
    return EditRequest(
        prompt=prompt, target_new=target, subject=subject, ground_truth=gt, pred=pred,
        rephrase_prompts=_str_list(f.get("rephrase"), "rephrase", where),
        locality=tuple((p, a) for p, a, _ in loc), portability=tuple((p, a) for p, a, _ in port),
        locality_kinds=tuple(k for *_, k in loc), portability_kinds=tuple(k for *_, k in port),
        case_id=f.get("case_id"),
    )


class Edits(list):
    """A list of :class:`EditRequest` that has been normalised and checked once (what
    :func:`as_edits` and :func:`load_edits` return). Every function accepts it as is.

    ``source`` and ``indices`` say where the edits came from when :func:`load_edits` read
    them (the file or dataset, and each edit's record index in it), so a study folder can
    state exactly which records it used; ``None`` for edits given in Python."""

    source: str | None = None
    indices: list[int] | None = None
    sample: int | None = None  # the seed that drew them at random (load_edits(sample=)), if one did


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
    """The records of a JSON file (a list, or a dict holding one) or a JSONL file (one
    record per line); a bad line is reported with its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected JSON or JSONL") from None
    stripped = text.strip()
    if path.suffix == ".jsonl" or (stripped[:1] == "{" and "\n{" in stripped):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e.msg} at column {e.colno}); a JSONL file "
                                     f"holds one JSON record per line") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, Mapping):
        for key in ("data", "edits", "records", "requests"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    return data


def _count(name: str, v: Any, least: int) -> int:
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    return int(v)


def _dataset_folder(path: Path, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(str(path), split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; say what was expected
        raise ValueError(f"{path} is a folder, and `datasets` could not read it as a dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); give a JSON / JSONL file, or a folder of "
                         f"data files") from None


def load_edits(source: Any, n: int | None = None, *, split: str = "train", offset: int = 0,
               sample: int | None = None) -> Edits:
    """Read edits from a JSON / JSONL file, a list of records, a ``datasets``
    ``Dataset`` / ``DatasetDict``, a dataset folder or Hugging Face dataset name (read
    with ``datasets.load_dataset``), or ``"zsre"`` / ``"counterfact"`` (the shared data,
    see :func:`shared_data_path`). Every record shape in :data:`SHAPES` is understood.

    Args:
        source: where the edits are.
        n: keep only ``n`` edits (after ``offset``), in file order.
        split: the split to read from a dataset with splits.
        offset: skip this many records first.
        sample: draw the ``n`` edits at random instead, with this seed (the record indices
            shuffled with ``random.Random(sample)``, the first ``n`` taken: how the
            published studies drew theirs); ``n`` must then not exceed the records.

    The result's ``source`` and ``indices`` name the records used.

    Example:
        >>> edits = load_edits([{"prompt": "The capital of France is", "target_new": "Rome"}])
        >>> edits[0].target_new
        'Rome'
    """
    offset = _count("offset", offset, 0)
    n = None if n is None else _count("n", n, 1)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists() and str(source).lower() in ("zsre", "counterfact"):
            p = shared_data_path(str(source))
        if p.is_dir():
            records: Any = _dataset_folder(p, split)
        elif p.exists():
            records = _read_records(p)
        elif isinstance(source, str) and "/" in source and not source.endswith((".json", ".jsonl")):
            import datasets

            records = datasets.load_dataset(source, split=split)
        else:
            raise FileNotFoundError(f"no edits file {str(source)!r}")
    else:
        records = source
    records = _records(records, split)
    if isinstance(records, (Mapping, EditRequest)):
        records = [records]
    records = list(records)
    index = list(range(len(records)))[offset:]
    if sample is not None:
        if n is None or n > len(index):
            raise ValueError(f"sample={sample} draws n edits at random: give n <= {len(index)} (the records "
                             f"after offset {offset}), got n={n}")
        random.Random(sample).shuffle(index)
    if n is not None:
        index = index[:n]
    out = as_edits([records[i] for i in index])
    out.source = str(source) if isinstance(source, (str, os.PathLike)) else None
    out.indices, out.sample = index, sample
    return out


def load_texts(source: Any, n: int | None = None, *, field: str = "text", split: str = "train") -> list[str]:
    """Read general texts (the retain set): a list of strings, a ``.txt`` file (one
    text per blank-line separated paragraph), a JSON / JSONL file of strings or of
    records with ``field``, or a ``datasets`` dataset / folder / hub name.

    Raises:
        TypeError: one string that is not a file or a dataset name (a text: give a list).
        ValueError: no non-empty text.
    """
    n = None if n is None else _count("n", n, 1)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        raw: Any = _dataset_folder(Path(source), split)
    elif isinstance(source, (str, os.PathLike)) and Path(source).exists():
        p = Path(source)
        if p.suffix == ".txt":
            raw = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n")]
        else:
            raw = _read_records(p)
    elif isinstance(source, str):
        if any(c.isspace() for c in source.strip()) or "/" not in source:
            raise TypeError(f"the retain texts are one string ({source[:40]!r}...), not a file or a dataset name: "
                            f"give a list of texts, a .txt / .json / .jsonl file, or a datasets name")
        import datasets

        raw = datasets.load_dataset(source, split=split)
    elif source is None:
        raise TypeError("the retain texts are None: give a list of texts, a file, or a datasets name")
    else:
        raw = source
    raw = _records(raw, split)
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


def heldout_texts(n: int | None = None) -> list[str]:
    """General English texts for measuring what an edit costs the model
    (:func:`~gradlocate.evaluation.evaluate`'s ``capability``): 16 paragraphs written for
    this package on topics disjoint from :func:`default_retain_texts` (which GradRatio
    scores against), so the layer choice never sees the text that judges it.

    Example:
        >>> texts = heldout_texts()
        >>> len(texts), not set(texts) & set(default_retain_texts())
        (16, True)
    """
    from importlib.resources import files

    raw = files("gradlocate").joinpath("assets/heldout_texts.txt").read_text(encoding="utf-8")
    texts = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()]
    return texts if n is None else texts[:_count("n", n, 1)]

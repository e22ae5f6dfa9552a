"""Where second-moment statistics come from: the text of a corpus, or text sampled from
the model itself, turned into a stream of every site's inputs, batch by batch.

A corpus (``corpus=`` of :func:`~gradlocate.editors.covariance.second_moments`) is one of

    "sampled"                   the model's own text (the offline default, below)
    ["text", ...]               a list of strings, used in order
    "notes.txt"                 paragraphs separated by blank lines (a file with no blank
                                line: one text per line), in order
    "wiki.json" / ".jsonl"      strings, or records with a ``text`` field, in order
    "folder/"                   a ``datasets`` folder (``save_to_disk``, or data files),
                                shuffled with the seed
    "wikitext"                  a Hugging Face dataset (ROME's: Salesforce/wikitext,
                                wikitext-103-raw-v1; also "wikitext-2", "wikipedia", or
                                "owner/name" / "owner/name:config"), train split, shuffled

Real text is read **forward-only**: each batch of ``rows`` texts (each cut to its first
``max_length`` tokens, special tokens as the tokenizer adds them, as ROME's
``TokenizedDataset``) runs once with every requested site's input recorded and the forward
stopped after the deepest one; every real token counts (padding does not). ``datasets``
sources are shuffled with the seed because ROME draws its texts at random too; files and
lists are read in their order. Blank texts are skipped.

Sampled text: ``rows`` sequences at a time, each started from the BOS (else EOS) token and
continued by ancestral sampling at temperature 1 over the full vocabulary, ``length``
tokens long, with a key/value cache (each token passes each site once) and the keys recorded
while generating: one traced forward per step for every site together. The start token's
keys are not text and are left out. Batch ``b`` draws from a generator seeded by
``(seed, b)``, so any batch can be recomputed alone: an interrupted collection resumes
exactly. The next token is drawn by inverse-CDF sampling (one uniform per row against the
cumulative distribution), the same distribution as ``torch.multinomial`` at a fraction of
its cost over a large vocabulary.

Example:
    >>> src = resolve_corpus(["one text", "  ", "another"], seed=0)
    >>> src.kind, len(src.texts)
    ('texts', 2)
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gradlocate import _compat
from gradlocate.handles import Handles
from gradlocate.interventions import capture, no_cache, run, stop_after, using
from gradlocate.state import input_device

__all__ = ["SAMPLED", "HUB_ALIASES", "Source", "Chunk", "resolve_corpus", "sample_next", "sampled_stream",
           "text_stream", "batch_generator", "CorpusUnavailable"]

#: The model's own text (the default corpus).
SAMPLED = "sampled"
#: Short names for the datasets ROME and EasyEdit read (``layer_stats.py``), train split.
HUB_ALIASES: dict[str, tuple[str, str | None]] = {
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
}
#: Sampled text: rows per batch and tokens per row (the start token included). Short rows
#: cost less per token (the cache grows with the row) and put the keys at the positions an
#: edit's prompts have (10-30 tokens); 128 rows amortise reading the weights once per step.
SAMPLE_ROWS, SAMPLE_LENGTH = 128, 64
#: Real text: texts per batch and the tokens kept of each.
TEXT_ROWS, TEXT_LENGTH = 32, 256


class CorpusUnavailable(RuntimeError):
    """A corpus named by the user could not be read (e.g. the hub is unreachable)."""


@dataclass(frozen=True)
class Source:
    """A resolved corpus: ``kind`` (``"sampled"``, ``"texts"``, ``"file"``, ``"dataset"``,
    ``"hub"``), ``ident`` (its part of the cache key), ``texts`` (``None`` for sampled
    text) and ``label`` (how the cost line names it)."""

    kind: str
    ident: str
    texts: Iterable[str] | None  # a datasets source: an iterable that loads on first use
    label: str


@dataclass(frozen=True)
class Chunk:
    """Keys from batch ``batch``: ``{site path: [n, d_mlp]}``; ``end`` marks the batch's
    last chunk (a point where every earlier batch is complete)."""

    batch: int
    keys: dict[str, Tensor]
    end: bool
    ids: Tensor | None = None  # sampled: the batch's tokens so far (tests read them)


def resolve_corpus(corpus: Any, seed: int, split: str = "train") -> Source:
    """The :class:`Source` of ``corpus`` (see the module docstring). Raises ``TypeError``
    for something that is no corpus, ``ValueError`` for one without text and
    :class:`CorpusUnavailable` when a dataset cannot be loaded."""
    if isinstance(corpus, str) and corpus == SAMPLED:
        return Source("sampled", f"{SAMPLED}-seed{seed}", None, "the model's own samples")
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if path.is_dir():
            return _dataset_source(_load_folder(path, split), seed, f"folder {path}", _folder_digest(path))
        if path.is_file():
            texts = _file_texts(path)
            digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
            return Source("file", f"file-{path.name}-{digest}", texts, f"{path} ({len(texts)} texts)")
        return _hub_source(str(corpus), seed, split)
    if isinstance(corpus, Sequence) and all(isinstance(t, str) for t in corpus):
        texts = [t for t in corpus if t.strip()]
        if not texts:
            raise ValueError("the corpus holds no non-blank text")
        digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12]
        return Source("texts", f"texts-{len(texts)}-{digest}", texts, f"{len(texts)} given texts")
    raise TypeError(f"corpus must be {SAMPLED!r}, a list of strings, a text / JSON / JSONL file, a datasets "
                    f"folder or a Hugging Face dataset name, got {type(corpus).__name__}")


def _file_texts(path: Path) -> list[str]:
    """A ``.txt`` file's paragraphs (its lines when it has no blank line); a JSON / JSONL
    file's strings or ``text`` fields (:func:`gradlocate.data.load_texts`)."""
    from gradlocate.data import load_texts

    if path.suffix in (".json", ".jsonl"):
        return [t for t in load_texts(path) if t.strip()]
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte {e.start} is not UTF-8); a corpus file is .txt (UTF-8), "
                         f".json or .jsonl") from None
    parts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    if len([p for p in parts if p]) <= 1:
        parts = [line.strip() for line in raw.splitlines()]
    texts = [p for p in parts if p]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def _folder_digest(path: Path) -> str:
    """A digest of a folder's files (names, sizes, modification times): a changed folder
    is another corpus."""
    sha = hashlib.sha1()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        sha.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return sha.hexdigest()[:12]


def _load_folder(path: Path, split: str) -> Any:
    import datasets

    saved = any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))
    try:
        ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; say what was expected
        raise ValueError(f"{path}: `datasets` could not read this folder ({type(e).__name__}: "
                         f"{_first_line(e)}); give a folder written by save_to_disk or holding data files") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: the dataset has no split {split!r}; its splits are {list(ds)}")
        ds = ds[split]
    return ds


def _hub_source(name: str, seed: int, split: str) -> Source:
    """A Hugging Face dataset by name (``HUB_ALIASES``, ``owner/name`` or ``owner/name:config``),
    loaded when first read: a cached result needs no hub."""
    if name.startswith(("/", ".", "~")) or Path(name).suffix in (".txt", ".json", ".jsonl", ".npz"):
        raise ValueError(f"corpus {name!r}: no such file or folder")
    repo, config = HUB_ALIASES.get(name, (name.split(":")[0], name.split(":")[1] if ":" in name else None))
    if any(c.isspace() for c in name) or not repo or (name not in HUB_ALIASES and "/" not in repo):
        raise TypeError(f"corpus {name[:60]!r} is not {SAMPLED!r}, an existing file or folder, or a dataset name "
                        f"({', '.join(HUB_ALIASES)} or owner/name[:config]): give a list for literal texts")
    label = f"{repo}{f' ({config})' if config else ''}"

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(repo, config, split=split)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, ...: one line that says what to do
            raise CorpusUnavailable(
                f"could not load the dataset {label} from the Hugging Face hub ({type(e).__name__}: "
                f"{_first_line(e)}); offline, use corpus={SAMPLED!r} (the model's own text) or a local .txt / "
                f".jsonl file or datasets folder") from None

    return Source("hub", f"hf-{repo}-{config}-{split}-shuffle{seed}", _Column(load, seed, label),
                  f"{label}, shuffled (seed {seed})")


def _dataset_source(ds: Any, seed: int, label: str, ident: str) -> Source:
    column = _Column(lambda: ds, seed, label)
    return Source("dataset", f"{ident}-shuffle{seed}", column, f"{label}, {len(column)} texts shuffled (seed {seed})")


class _Column:
    """The ``text`` column of a ``datasets`` Dataset shuffled with ``seed``, loaded on first
    use and read in slices (an iterable, not a sequence: a type check that samples an
    element would load it)."""

    def __init__(self, load: Callable[[], Any], seed: int, label: str):
        self._load, self._seed, self._label, self._ds = load, seed, label, None

    @property
    def ds(self) -> Any:
        if self._ds is None:
            ds = self._load()
            if "text" not in ds.column_names:
                raise ValueError(f"{self._label}: the dataset has no 'text' column (its columns: {ds.column_names})")
            self._ds = ds.shuffle(seed=self._seed)
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self) -> Iterator[str]:
        for i in range(0, len(self.ds), 1000):
            yield from self.ds[i:i + 1000]["text"]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------- sampling


def sample_next(logits: Float[Tensor, "rows vocab"], generator: torch.Generator,
                block: int = 256) -> Int[Tensor, "rows 1"]:
    """One token per row from ``softmax(logits)`` (temperature 1, full vocabulary), by
    inverse-CDF sampling: the first token whose cumulative probability exceeds a uniform
    draw. The sums run in float64 in two levels - over blocks of ``block`` tokens, then
    inside the block drawn - because a cumulative sum over the whole vocabulary is
    sequential (slow) and a float32 one would blur the small probabilities. A token of
    probability 0 is never drawn.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_next(torch.tensor([[0.0, -float("inf"), 0.0]]), g).item() in (0, 2)
        True
    """
    p = torch.softmax(logits.detach().float().cpu(), -1)
    rows, vocab = p.shape
    nb = -(-vocab // block)
    p = torch.nn.functional.pad(p, (0, nb * block - vocab)).view(rows, nb, block)
    mass = p.sum(-1, dtype=torch.float64)                                       # [rows, blocks]
    cb = mass.cumsum(-1)
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64) * cb[:, -1:]
    bi = torch.searchsorted(cb, u, right=True)                                  # the block drawn
    bi = torch.minimum(bi, torch.where(mass > 0, torch.arange(nb), -1).amax(-1, keepdim=True))
    u = u - torch.where(bi > 0, cb.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(u))
    inner = p[torch.arange(rows), bi[:, 0]].double()                            # [rows, block]
    j = torch.searchsorted(inner.cumsum(-1), u, right=True)
    last = torch.where(inner > 0, torch.arange(block), -1).amax(-1, keepdim=True)  # rounding never picks a zero
    return bi * block + torch.minimum(j, last)


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The random generator of sampled batch ``batch`` (seeded by ``(seed, batch)``)."""
    digest = hashlib.sha1(f"gradlocate-mom2:{int(seed)}:{int(batch)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def max_positions(root: Any) -> int | None:
    """The longest sequence the model's config allows, or ``None`` if it says nothing."""
    cfg = getattr(root, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def sampled_stream(h: Handles, paths: list[str], tokens: int, seed: int, start: int = 0, *, rows: int,
                   length: int) -> Generator[Chunk, None, None]:
    """Every site's inputs at text sampled from the model, from batch ``start`` until
    ``tokens`` keys have been produced in all (the last batch has only the rows it needs)."""
    tok = h.require_tokenizer()
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if first is None:
        raise ValueError(f"sampling needs a BOS or EOS token to start from: give corpus=[texts] or a file instead "
                         f"of {SAMPLED!r}")
    per_row = length - 1
    b = start
    with using(h), torch.no_grad(), capture(h, paths, inputs=True, outputs=False, detach=True) as cap:
        while b * rows * per_row < tokens:
            n_rows = min(rows, math.ceil((tokens - b * rows * per_row) / per_row))
            yield from _sampled_batch(h, cap, paths, b, n_rows, length, int(first), batch_generator(seed, b))
            b += 1


def _sampled_batch(h: Handles, cap: Any, paths: list[str], b: int, rows: int, length: int, first: int,
                   gen: torch.Generator) -> Generator[Chunk, None, None]:
    dev, arg = input_device(h.root), _compat.cache_argument(h.root) or ""
    ids = torch.full((rows, 1), first, dtype=torch.long)
    past = _compat.new_cache(h.root) if arg else None
    for t in range(length):
        if past is None:  # no usable cache: the whole prefix again (the caller warned)
            out = run(h, input_ids=ids.to(dev), **no_cache(h.root))
        else:
            out = run(h, input_ids=ids[:, -1:].to(dev), **{arg: past, "use_cache": True})
            past = _compat.returned_cache(out)
        if t > 0:  # the start token's keys are not text
            keys = {p: cap.inputs[p].reshape(rows, -1, cap.inputs[p].shape[-1])[:, -1] for p in paths}
            yield Chunk(b, keys, t == length - 1, ids)
        if t < length - 1:
            ids = torch.cat([ids, sample_next(out.logits[:, -1], gen)], 1)


# --------------------------------------------------------------------------- real text


def _groups(texts: Iterable[str], rows: int, start: int) -> Iterator[tuple[int, list[str]]]:
    """Consecutive non-blank texts in groups of ``rows``: ``(batch index, texts)`` from
    batch ``start`` on (the earlier ones are counted, not tokenized)."""
    b, group = 0, []
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"a corpus text is a {type(t).__name__}, not a string")
        if not t.strip():
            continue
        group.append(t)
        if len(group) == rows:
            if b >= start:
                yield b, group
            b, group = b + 1, []
    if group and b >= start:
        yield b, group


def text_stream(h: Handles, paths: list[str], texts: Iterable[str], start: int = 0, *, rows: int,
                length: int) -> Generator[Chunk, None, None]:
    """Every site's inputs at the real tokens of ``texts``, ``rows`` texts per forward,
    each cut to ``length`` tokens; the forward stops after the deepest site."""
    tok = h.require_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dev, last = input_device(h.root), paths[-1]
    with using(h), torch.no_grad(), capture(h, paths, inputs=True, outputs=False, detach=True) as cap, \
            stop_after(h, last):
        for b, group in _groups(texts, rows, start):
            enc = [list(tok(t, add_special_tokens=True)["input_ids"])[:length] for t in group]
            enc = [e for e in enc if e]
            if not enc:
                continue
            width = max(len(e) for e in enc)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], dtype=torch.long)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], dtype=torch.long)
            run(h, input_ids=ids.to(dev), attention_mask=mask.to(dev), **no_cache(h.root))
            real = mask.bool().to(dev)
            keys = {p: cap.inputs[p].reshape(len(enc), width, -1)[real] for p in paths}
            yield Chunk(b, keys, True)

"""Evaluate an edit: reliability, generalization, locality, portability, fluency.

Every metric is reported under the two scorings in use:

* **teacher-forced token accuracy** (EasyEdit's convention): feed ``prompt + " " +
  answer``, take the model's argmax prediction at each answer position, and score the
  fraction of answer tokens predicted right;
* **generation exact match** (the WILD / LocFT-BF convention): greedy decoding from the
  prompt, stopped at ``"."``, a newline or EOS (at most ``max_new_tokens`` tokens),
  then the generated text and the answer are compared after normalisation (lower
  case, punctuation and the articles a/an/the removed, whitespace collapsed).

The metrics:

* reliability: the edit prompts, scored against the new target;
* generalization: the rephrased prompts, scored against the new target;
* locality: the unrelated (locality) prompts; the post-edit predictions must *agree
  with the pre-edit ones* (EasyEdit's definition), so it needs the pre-edit
  predictions: pass ``pre=`` an evaluation made before the edit (or a
  :func:`locality_reference`). Without it locality is ``None``, not guessed;
* portability: the edits' portability prompts (KnowEdit), scored against their answers;
* fluency (option): the weighted bi-/tri-gram entropy of generations from the edit
  prompts (ROME / EasyEdit's ``n_gram_entropy``).

Each edit's score for a metric is the mean over its prompts; the reported value is the
mean over the edits that have such prompts.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=16)
    >>> edits = [{"prompt": "Paris is in", "target_new": "Italy",
    ...           "locality_prompt": "Berlin is in", "locality_ground_truth": "Germany"}]
    >>> pre = evaluate(model, edits, generation=False)
    >>> pre.teacher_forced["locality"] is None   # no pre-edit reference yet
    True
    >>> post = evaluate(model, edits, pre=pre, generation=False)
    >>> post.teacher_forced["locality"]          # the model did not change
    1.0
"""

from __future__ import annotations

import html
import math
import re
import string
import time
from collections import Counter
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from gradlocate import _compat
from gradlocate.data import EditRequest, as_edits
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import no_cache, run, using
from gradlocate.losses import (IGNORE, NonFiniteLossError, TokenBatch, context_length, logits_of, prompt_ids,
                               tokenize_edits)
from gradlocate.state import input_device

__all__ = [
    "evaluate",
    "EditEvaluation",
    "LocalityReference",
    "locality_reference",
    "normalize_answer",
    "exact_match",
    "truncate_at_stop",
    "ngram_entropy",
    "teacher_forced_scores",
    "greedy_generate",
    "METRICS",
    "text_loss",
]

METRICS = ("reliability", "generalization", "locality", "portability")
#: Where a generated answer ends (besides EOS), as in LocFT-BF's evaluation.
STOP_STRINGS = (".", "\n")

_T = TypeVar("_T")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# --------------------------------------------------------------------------- text scoring


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation (as LocFT-BF's ``eval_edit_metric.py``): lower
    case, punctuation removed, the articles a/an/the removed, whitespace collapsed.

    Example:
        >>> normalize_answer("  The Chichester-River. ")
        'chichesterriver'
        >>> normalize_answer("An apple a day")
        'apple day'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` and ``answer`` are equal after :func:`normalize_answer`.

    Example:
        >>> exact_match(" the Liverpool", "Liverpool")
        True
    """
    return normalize_answer(prediction) == normalize_answer(answer)


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to (not including) the first stop string.

    Example:
        >>> truncate_at_stop(" St. Louis")
        ' St'
        >>> truncate_at_stop("Rome\\nParis")
        'Rome'
    """
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _words(text: str) -> list[str]:
    # Approximates nltk.word_tokenize (words and punctuation marks as separate tokens)
    # without the nltk dependency.
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure of one text: for each ``n``, the entropy (bits) of the
    frequency distribution of its word n-grams; the result is the mean of
    ``weight_n * entropy_n``. Repetitive text scores low. An empty n-gram set has
    entropy 0.

    Example:
        >>> round(ngram_entropy("a b a b"), 4)   # bigrams ab, ba, ab; trigrams aba, bab
        0.9728
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    words = _words(text)
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * h
    return total / len(ns)


# --------------------------------------------------------------------------- locality reference


@dataclass
class LocalityReference:
    """The unedited model's predictions on the locality prompts, which post-edit
    locality is scored against.

    Attributes:
        pairs: per edit, its ``(prompt, answer)`` locality pairs.
        tokens: per edit and pair, the argmax token ids at the answer positions
            (teacher-forced on the answer).
        generations: per edit and pair, the greedy generation (truncated at a stop
            string), or ``None`` if generation was off.
    """

    pairs: list[list[tuple[str, str]]]
    tokens: list[list[list[int]]]
    generations: list[list[str]] | None = None

    def check(self, edits: Sequence[EditRequest]) -> None:
        """Raise if ``edits`` do not have the locality prompts this was computed on."""
        theirs = [list(e.locality) for e in edits]
        if len(theirs) != len(self.pairs) or any(list(map(tuple, a)) != list(map(tuple, b))
                                                 for a, b in zip(theirs, self.pairs)):
            raise ValueError(
                "pre= was computed on other edits (their locality prompts differ): evaluate the same "
                "edits, in the same order, before and after editing"
            )

    def __repr__(self) -> str:
        n = sum(len(p) for p in self.pairs)
        return f"LocalityReference({len(self.pairs)} edits, {n} locality prompts, generations={self.generations is not None})"


# --------------------------------------------------------------------------- result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@dataclass
class EditEvaluation:
    """Edit metrics under both scorings, and per-edit rows.

    Attributes:
        teacher_forced: metric -> mean teacher-forced token accuracy (``None`` when
            not available: no such prompts, or locality without ``pre``).
        generation: metric -> mean generation exact match, or ``None`` if generation
            was off.
        fluency: mean n-gram entropy of generations from the edit prompts, if asked.
        general: what the edit costs the model beyond its locality prompts, when asked
            (``capability=``, ``fluency=``): ``lm_loss`` (mean next-token NLL on held-out
            general text), and against ``pre``: ``lm_loss_change`` (after minus before),
            ``capability`` = ``min(1, exp(-lm_loss_change))`` (the general text's perplexity
            before over after, capped at 1: 1 = nothing lost) and ``fluency_ratio`` =
            ``min(1, fluency after / before)``.
        rows: one dict per edit with its scores and generations.
        n_edits: number of edits.
        reference: the locality predictions of this evaluation, to pass as ``pre=``
            to a later one.
        notes: why a metric is unavailable.
        params, timings: settings and wall times (seconds).
    """

    teacher_forced: dict[str, float | None]
    generation: dict[str, float | None] | None
    fluency: float | None
    rows: list[dict[str, Any]]
    n_edits: int
    reference: LocalityReference | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    general: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self, rows: bool = True) -> dict[str, Any]:
        d = {"n_edits": self.n_edits, "teacher_forced": dict(self.teacher_forced),
             "generation": None if self.generation is None else dict(self.generation),
             "fluency": self.fluency, "general": dict(self.general), "notes": list(self.notes),
             "params": dict(self.params), "timings": dict(self.timings)}
        if rows:
            d["rows"] = [dict(r) for r in self.rows]
        return d

    def to_table(self) -> str:
        """Metrics as a plain-text table (teacher-forced and generation EM columns)."""
        lines = [f"{'metric':<15} {'teacher-forced':>15} {'generation EM':>14}"]
        for m in METRICS:
            g = None if self.generation is None else self.generation.get(m)
            lines.append(f"{m:<15} {_fmt(self.teacher_forced.get(m)):>15} {_fmt(g):>14}")
        if self.fluency is not None:
            lines.append(f"{'fluency':<15} {self.fluency:>15.3f}")
        for k, v in self.general.items():
            if k != "fluency" and v is not None:
                lines.append(f"{k:<15} {v:>15.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        tf = ", ".join(f"{m}={_fmt(v)}" for m, v in self.teacher_forced.items())
        s = f"EditEvaluation(n_edits={self.n_edits}, teacher-forced: {tf}"
        if self.generation is not None:
            s += "; generation EM: " + ", ".join(f"{m}={_fmt(v)}" for m, v in self.generation.items())
        if self.fluency is not None:
            s += f"; fluency={self.fluency:.3f}"
        return s + ")"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{m}</td><td>{_fmt(self.teacher_forced.get(m))}</td>"
            f"<td>{_fmt(None if self.generation is None else self.generation.get(m))}</td></tr>" for m in METRICS)
        flu = f"<p>fluency (n-gram entropy): {self.fluency:.3f}</p>" if self.fluency is not None else ""
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f"<div><b>Edit evaluation</b> ({self.n_edits} edits)<table><tr><th>metric</th>"
                f"<th>teacher-forced</th><th>generation EM</th></tr>{rows}</table>{flu}"
                + (f"<ul>{notes}</ul>" if notes else "") + "</div>")

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """Grouped bar chart of the metrics under both scorings. Returns the Axes."""
        from gradlocate.plotting import plot_edit_evaluation

        return plot_edit_evaluation(self, ax=ax, title=title)


# --------------------------------------------------------------------------- model calls


@dataclass
class _Query:
    kind: str
    edit: int
    item: int
    prompt: str
    answer: str
    group: str = ""


def _queries(edits: Sequence[EditRequest]) -> list[_Query]:
    out = []
    for i, e in enumerate(edits):
        out.append(_Query("reliability", i, 0, e.prompt, e.target_new))
        out += [_Query("generalization", i, j, p, e.target_new) for j, p in enumerate(e.rephrase_prompts)]
        out += [_Query("locality", i, j, p, a, g) for j, ((p, a), g) in enumerate(zip(e.locality, e.locality_kinds))]
        out += [_Query("portability", i, j, p, a, g)
                for j, ((p, a), g) in enumerate(zip(e.portability, e.portability_kinds))]
    return out


@torch.no_grad()
def teacher_forced_scores(h: Handles, prompts: Sequence[str], answers: Sequence[str], *,
                          batch_size: int = 32) -> list[tuple[float, list[int]]]:
    """For each ``(prompt, answer)``: the fraction of answer tokens that are the argmax
    prediction given ``prompt + " " + answer`` up to that token, and the predicted
    token ids at the answer positions (prompts in ``h``'s format, ``h.chat``).

    Example:
        >>> from gradlocate.handles import resolve
        >>> from gradlocate.models import tiny
        >>> h = resolve(tiny("gpt2", n_layers=1, d_model=16)[0])
        >>> [(type(acc).__name__, len(ids)) for acc, ids in teacher_forced_scores(h, ["Hi"], ["you"])]
        [('float', 4)]
    """
    root = h.root
    batch = tokenize_edits(h.require_tokenizer(), prompts, answers, max_length=context_length(root),
                           chat=h.chat).to(input_device(root))
    out: list[tuple[float, list[int]]] = []
    with using(h):
        for rows in torch.arange(len(batch)).split(batch_size):
            mb = batch[rows.to(batch.input_ids.device)]
            logits = _logits(h, mb.input_ids, mb.attention_mask)
            finite = torch.isfinite(logits[:, :-1]).all(-1) | (mb.labels[:, 1:] == IGNORE)
            if not bool(finite.all()):
                bad = [prompts[int(rows[r])] for r in (~finite).any(1).nonzero().flatten().tolist()]
                raise NonFiniteLossError(f"the model's outputs are not finite (NaN/inf) for {bad[:3]}: check its "
                                         f"weights, or its dtype for overflow; no metric can be scored")
            pred = logits[:, :-1].argmax(-1).cpu()
            lab = mb.labels[:, 1:].cpu()
            for p, l in zip(pred, lab):
                m = l != IGNORE
                out.append((float((p[m] == l[m]).float().mean()), p[m].tolist()))
    return out


def _logits(h: Handles, ids: Int[Tensor, "rows pos"], am: Int[Tensor, "rows pos"]) -> Float[Tensor, "rows pos vocab"]:
    return logits_of(run(h, input_ids=ids, attention_mask=am, **no_cache(h.root)))


def _left_pad(tokenizer: Any, prompts: Sequence[str], device: Any,
              chat: bool = False) -> tuple[Int[Tensor, "rows pos"], Int[Tensor, "rows pos"]]:
    rows = [prompt_ids(tokenizer, p, chat) for p in prompts]
    for p, r in zip(prompts, rows):
        if not r:
            raise ValueError(f"prompt {p!r} tokenizes to no tokens")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        am[b, width - len(r):] = 1
    return ids.to(device), am.to(device)


class _FiniteScores:
    """Logits processor: generation stops with a clear error at a NaN or +inf logit, or a
    row with no finite logit (greedy decoding would otherwise pick a token from garbage
    and go on). A -inf logit is a masked token (e.g. EOS under ``min_new_tokens``)."""

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if bool(torch.isnan(scores).any() or torch.isposinf(scores).any()
                or not torch.isfinite(scores).any(-1).all()):
            raise NonFiniteLossError("the model's outputs are not finite (NaN/inf) during generation: check its "
                                     "weights, or its dtype for overflow; no metric can be scored")
        return scores


class _StopStrings:
    """Stopping criterion: a row is done once its new text contains a stop string."""

    def __init__(self, tokenizer: Any, start: int, stops: Sequence[str]):
        self.tokenizer, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def greedy_generate(h: Handles, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    stops: Sequence[str] = STOP_STRINGS, batch_size: int = 32, fixed_length: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded, with the key/value
    cache, token for token what ``model.generate(do_sample=False)`` makes), each cut
    before its first stop string; EOS ends a continuation too. ``stops=()`` generates
    ``max_new_tokens`` tokens (or up to EOS); ``fixed_length=True`` never ends at EOS
    (its logit is masked until ``max_new_tokens`` tokens exist), as ROME / EasyEdit
    generate for fluency. Every forward goes through :func:`~gradlocate.interventions.run`.

    Example:
        >>> from gradlocate.handles import resolve
        >>> from gradlocate.models import tiny
        >>> h = resolve(tiny("llama", n_layers=1, d_model=16)[0])
        >>> out = greedy_generate(h, ["Hi", "Hello there"], max_new_tokens=3, stops=())
        >>> len(out), all(isinstance(t, str) for t in out)
        (2, True)
    """
    tok = h.require_tokenizer()
    ctx = context_length(h.root)
    out: list[str] = []
    with using(h):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start: start + batch_size])
            ids, am = _left_pad(tok, chunk, input_device(h.root), h.chat)
            width = ids.shape[1]
            budget = max_new_tokens if ctx is None else min(max_new_tokens, ctx - width)
            if budget < 1:
                raise ValueError(f"a prompt of {width} tokens leaves no room to generate in the model's context of {ctx}")
            stop = _StopStrings(tok, width, stops) if stops else None
            gen = _greedy_tokens(h, ids, am, budget, stop, fixed_length)
            texts = tok.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
            out += [truncate_at_stop(t, stops) for t in texts]
    return out


def _greedy_tokens(h: Handles, ids: Int[Tensor, "rows pos"], am: Int[Tensor, "rows pos"], budget: int,
                   stop: _StopStrings | None, fixed_length: bool) -> Int[Tensor, "rows _"]:
    """``ids`` and up to ``budget`` greedy tokens, as transformers' greedy search: the
    scores are the last position's logits in float32 (EOS masked with ``fixed_length``),
    a finished row gets pad tokens, and decoding ends once every row is finished."""
    eos, pad = h.tokenizer.eos_token_id, h.tokenizer.pad_token_id
    step = _Decoder(h, ids, am)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for n in range(budget):
        scores = step.next_logits().float()
        if fixed_length and eos is not None:
            scores[:, eos] = -math.inf
        _FiniteScores()(ids, scores)
        nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), scores.argmax(-1).to(ids.device))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos if eos is not None else torch.zeros_like(done)
        if stop is not None:
            done |= stop(ids, scores).to(done.device)
        if bool(done.all()) or n == budget - 1:
            break
        step.advance(nxt)
    return ids


class _Decoder:
    """The forwards of greedy decoding, each through :func:`~gradlocate.interventions.run`:
    the prompt once, then one token per step at the next position with the key/value
    cache (under the forward's keyword for it, :func:`~gradlocate._compat.cache_argument`);
    a forward that takes no cache gets the whole sequence each step."""

    def __init__(self, h: Handles, ids: Int[Tensor, "rows pos"], am: Int[Tensor, "rows pos"]):
        self.h, self.ids = h, ids
        self.key = _compat.cache_argument(h.root)
        self.pos = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)  # left padding: positions from the mask
        self.with_pos = "position_ids" in inspect.signature(h.root.forward).parameters
        self.am: Tensor | None = None if bool(am.all()) else am  # generate drops an all-ones mask
        self.cache: Any = None
        self.new = ids

    def next_logits(self) -> Float[Tensor, "rows vocab"]:
        kw: dict[str, Any] = {"input_ids": self.new}
        if self.am is not None:
            kw["attention_mask"] = self.am
        if self.with_pos:
            kw["position_ids"] = self.pos[:, -self.new.shape[1]:]
        if self.key is not None:
            kw["use_cache"] = True
            if self.cache is not None:
                kw[self.key] = self.cache
        out = run(self.h, **kw)
        self.cache = _compat.returned_cache(out) if self.key is not None else None
        return logits_of(out)[:, -1]

    def advance(self, nxt: Int[Tensor, " rows"]) -> None:
        self.ids = torch.cat([self.ids, nxt[:, None]], dim=1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)
        if self.am is not None:
            self.am = torch.cat([self.am, self.am.new_ones(self.am.shape[0], 1)], dim=1)
        self.new = nxt[:, None] if self.cache is not None else self.ids


# --------------------------------------------------------------------------- evaluate


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _aggregate(per_edit: list[dict[str, list[float]]], kind: str) -> tuple[list[float | None], float | None]:
    """Per-edit means of ``kind``, and their mean over the edits that have it."""
    each = [_mean(d.get(kind, [])) for d in per_edit]
    return each, _mean([v for v in each if v is not None])


def locality_reference(model: Any, edits: Any, *, tokenizer: Any = None, generation: bool = True,
                       max_new_tokens: int = 32, batch_size: int = 32) -> LocalityReference:
    """The unedited model's predictions on the edits' locality prompts (only those:
    cheaper than a full :func:`evaluate`). Pass it as ``pre=`` after editing.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=1, d_model=16)
        >>> ref = locality_reference(model, [{"prompt": "a", "target_new": "b", "loc": "x", "loc_ans": "y"}],
        ...                          generation=False)
        >>> len(ref.tokens[0][0])   # " y": a space and a "y" byte token
        2
    """
    edits = as_edits(edits)
    h = resolve(model, tokenizer)
    qs = [q for q in _queries(edits) if q.kind == "locality"]
    with using(h), torch.no_grad():
        prompts, answers = [q.prompt for q in qs], [q.answer for q in qs]
        tf = teacher_forced_scores(h, prompts, answers, batch_size=batch_size) if qs else []
        gens = greedy_generate(h, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size) if qs and generation else []
    return _reference(edits, qs, [t for _, t in tf], gens if generation else None)


def _reference(edits: Sequence[EditRequest], qs: list[_Query], tokens: list[list[int]],
               gens: list[str] | None) -> LocalityReference:
    tok_rows: list[list[list[int]]] = [[] for _ in edits]
    gen_rows: list[list[str]] = [[] for _ in edits]
    for k, q in enumerate(qs):
        tok_rows[q.edit].append(tokens[k])
        if gens is not None:
            gen_rows[q.edit].append(gens[k])
    return LocalityReference([list(e.locality) for e in edits], tok_rows, gen_rows if gens is not None else None)


def evaluate(model: Any, edits: Any, *, tokenizer: Any = None, pre: EditEvaluation | LocalityReference | None = None,
             generation: bool = True, fluency: bool = False, capability: bool | Sequence[str] = False,
             batch_size: int = 32, max_new_tokens: int = 32, fluency_tokens: int = 100,
             fluency_prompts: int | None = None, progress: bool | None = None) -> EditEvaluation:
    """Score ``model`` on ``edits``: reliability, generalization, locality and
    portability, teacher-forced and (if ``generation``) by generation exact match.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: EditRequest objects or dicts (CounterFact / ZsRE / KnowEdit spellings).
        tokenizer: defaults to the one the model carries.
        pre: the evaluation (or :func:`locality_reference`) of the *unedited* model on
            the same edits; needed for locality. Without it locality is ``None``.
        generation: also score by greedy generation exact match.
        fluency: also report the n-gram entropy of ``fluency_tokens``-token greedy
            generations from the edit prompts (text = prompt + generation, as ROME; EOS is
            masked so every generation has that length, as in ROME / EasyEdit);
            ``fluency_prompts`` limits it to the first that many edits (it costs generation).
        capability: also measure the language-model loss on held-out general text:
            ``True`` for the built-in texts (:func:`~gradlocate.data.heldout_texts`,
            disjoint from GradRatio's retain texts), or a list of your own. With ``pre``
            the change is reported (see :attr:`EditEvaluation.general`).
        batch_size: sequences per forward / generate call.
        max_new_tokens: the longest generated answer (LocFT's evaluation uses 32).
        progress: a progress bar over the stages (``None``: on a terminal only).

    Returns:
        :class:`EditEvaluation`; its ``reference`` can serve as ``pre`` later.

    Raises:
        ValueError: no edits; ``pre`` computed on other edits; a prompt too long.
        HandleError: the model is not a causal LM (encoder-only, seq2seq, no LM head).
        NonFiniteLossError: the model's outputs are NaN or infinite (names the prompts).
    """
    _check_sizes(batch_size, max_new_tokens)
    plan = _plan(model, edits, tokenizer, pre, generation, fluency, capability)
    m = _measure(plan, generation, max_new_tokens, batch_size, fluency_prompts, fluency_tokens, progress)
    out = _assemble(plan.edits, plan.qs, m.tf, m.gens, plan.ref, m.fluency.scores, m.fluency.texts, m.timings,
                    {"generation": generation, "fluency": plan.fluency, "max_new_tokens": max_new_tokens,
                     "fluency_tokens": fluency_tokens if plan.fluency else None, "batch_size": batch_size,
                     "capability": None if plan.texts is None else len(plan.texts), "pre": plan.ref is not None})
    out.general = _general(out.fluency, m.lm, pre if isinstance(pre, EditEvaluation) else None)
    if fluency and not plan.fluency:
        out.notes.append(f"fluency: {type(plan.h.root).__name__} has no generate(), so nothing was generated to score")
    return out


class _Plan(NamedTuple):
    """:func:`evaluate`'s inputs, checked: what it will measure."""

    h: Handles
    edits: list[EditRequest]
    ref: LocalityReference | None  # the pre-edit locality predictions
    qs: list[_Query]               # every (prompt, answer) to score
    texts: list[str] | None        # held-out texts (capability), or None
    fluency: bool                  # fluency asked for and possible (the model can generate)


def _plan(model: Any, edits: Any, tokenizer: Any, pre: Any, generation: bool, fluency: bool,
          capability: bool | Sequence[str] | None) -> _Plan:
    edits = as_edits(edits)
    h = resolve(model, tokenizer)  # encoder-only / seq2seq / head-less models: a clear error
    can_generate = callable(getattr(h.root, "generate", None))  # a plain torch LM has no fluency to score
    return _Plan(h, edits, _checked_reference(pre, edits, generation), _queries(edits), _heldout(capability),
                 fluency and can_generate)


class _Measured(NamedTuple):
    """What :func:`evaluate`'s model calls produced."""

    tf: list[tuple[float, list[int]]]  # per query: teacher-forced accuracy, predicted answer tokens
    gens: list[str] | None             # per query: the greedy answer (generation on)
    fluency: _FluencyTexts
    lm: float | None                   # held-out LM loss (capability on)
    timings: dict[str, float]


def _measure(plan: _Plan, generation: bool, max_new_tokens: int, batch_size: int, fluency_prompts: int | None,
             fluency_tokens: int, progress: bool | None) -> _Measured:
    """Every stage's model calls, in one ``using`` block, timed, under one progress bar."""
    h, qs, texts = plan.h, plan.qs, plan.texts
    names = (["teacher-forced"] + (["generation"] if generation else []) + (["fluency"] if plan.fluency else [])
             + (["capability"] if texts else []))
    with _Stages(names, progress) as stages, using(h), torch.no_grad():
        tf = stages.run("teacher-forced", lambda: teacher_forced_scores(
            h, [q.prompt for q in qs], [q.answer for q in qs], batch_size=batch_size))
        gens = stages.run("generation", lambda: _generations(h, qs, max_new_tokens, batch_size)) if generation else None
        flu = stages.run("fluency", lambda: _fluency(h, plan.edits, fluency_prompts, fluency_tokens, batch_size)) \
            if plan.fluency else _FluencyTexts(None, [])
        lm = stages.run("capability", lambda: text_loss(h, texts, batch_size=batch_size)) if texts else None
    return _Measured(tf, gens, flu, lm, stages.timings)


def _check_sizes(batch_size: Any, max_new_tokens: Any) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def _checked_reference(pre: Any, edits: Sequence[EditRequest], generation: bool) -> LocalityReference | None:
    """``pre``'s locality reference, checked against ``edits`` and ``generation``."""
    ref = _as_reference(pre)
    if ref is not None:
        ref.check(edits)
        if generation and ref.generations is None:
            raise ValueError("pre= has no generations (it was computed with generation=False); "
                             "recompute it with generation=True or evaluate with generation=False")
    return ref


def _heldout(capability: bool | Sequence[str] | None) -> list[str] | None:
    """The held-out texts ``capability=`` asks for (``None``: capability is off)."""
    if capability is False or capability is None:
        return None
    from gradlocate.data import heldout_texts, load_texts

    return list(heldout_texts() if capability is True else load_texts(capability))


class _Stages:
    """The progress bar over :func:`evaluate`'s stages, and each stage's wall time."""

    def __init__(self, names: list[str], progress: bool | None):
        self.bar = tqdm(names, desc="evaluate", disable=None if progress is None else not progress, leave=False)
        self.timings: dict[str, float] = {}

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def run(self, name: str, fn: Callable[[], _T]) -> _T:
        t0 = time.perf_counter()
        self.bar.set_postfix(stage=name)
        out = fn()
        self.timings[name.replace("-", "_")] = time.perf_counter() - t0
        self.bar.update()
        return out


def _generations(h: Handles, qs: list[_Query], max_new_tokens: int, batch_size: int) -> list[str]:
    """Each query's greedy answer (each distinct prompt generated once)."""
    unique = list(dict.fromkeys(q.prompt for q in qs))
    answers = greedy_generate(h, unique, max_new_tokens=max_new_tokens, batch_size=batch_size)
    by_prompt = dict(zip(unique, answers))
    return [by_prompt[q.prompt] for q in qs]


class _FluencyTexts(NamedTuple):
    scores: list[float] | None  # n-gram entropy per text; None: fluency not measured
    texts: list[str]            # prompt + its fixed-length generation


def _fluency(h: Handles, edits: Sequence[EditRequest], n_prompts: int | None, tokens: int,
             batch_size: int) -> _FluencyTexts:
    """ROME's fluency of fixed-length generations from the first ``n_prompts`` edit prompts."""
    prompts = [e.prompt for e in edits][:n_prompts]
    # Fixed length: an edit trained with EOS after its target ends generation
    # there, and every edited layer would score the same text.
    cont = greedy_generate(h, prompts, max_new_tokens=tokens, stops=(), batch_size=batch_size, fixed_length=True)
    texts = [p + c for p, c in zip(prompts, cont)]
    return _FluencyTexts([ngram_entropy(t) for t in texts], texts)


def _general(fluency: float | None, lm: float | None, pre: EditEvaluation | None) -> dict[str, float | None]:
    """What an edit cost the model beyond its locality prompts (see :attr:`EditEvaluation.general`)."""
    out: dict[str, float | None] = {}
    before = pre.general if pre is not None else {}
    if lm is not None:
        out["lm_loss"] = lm
        lm_before = before.get("lm_loss")
        if lm_before is not None:
            change = lm - lm_before
            out["lm_loss_change"] = change
            out["capability"] = min(1.0, math.exp(-change))
    if fluency is not None:
        out["fluency"] = fluency
        fluency_before = before.get("fluency")
        if fluency_before:
            out["fluency_ratio"] = min(1.0, fluency / fluency_before)
    return out


@torch.no_grad()
def text_loss(h: Handles, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 32) -> float:
    """The language-model loss on general texts: the mean next-token NLL over every
    scored token (each text cut to ``max_length`` tokens), as GradRatio's retain loss.
    The forwards go through :func:`~gradlocate.interventions.run`, so an intervention
    active around the call (e.g. an ``edited`` weight change) applies.

    Example:
        >>> from gradlocate.handles import resolve
        >>> from gradlocate.models import tiny
        >>> h = resolve(tiny("gpt2", n_layers=1, d_model=16)[0])
        >>> 5.0 < text_loss(h, ["Some general text.", "Another one."]) < 6.0   # about log(258)
        True
    """
    from gradlocate.losses import token_nll, tokenize_texts

    ctx = context_length(h.root)
    batch = tokenize_texts(h.require_tokenizer(), list(texts),
                           max_length=min(max_length, ctx or max_length)).to(input_device(h.root))
    total, count = 0.0, 0
    with using(h):
        for start in range(0, len(batch), batch_size):
            mb = batch[torch.arange(start, min(len(batch), start + batch_size), device=batch.input_ids.device)]
            nll = token_nll(_logits(h, mb.input_ids, mb.attention_mask), mb.labels)
            total += float(nll.sum())
            count += int((mb.labels[:, 1:] != IGNORE).sum())
    if not math.isfinite(total):
        raise NonFiniteLossError("the language-model loss on the held-out texts is not finite: the model outputs "
                                 "NaN/inf; check its weights, or its dtype for overflow")
    return total / count


def _as_reference(pre: Any) -> LocalityReference | None:
    if pre is None:
        return None
    if isinstance(pre, LocalityReference):
        return pre
    if isinstance(pre, EditEvaluation):
        return pre.reference  # None when its edits had no locality prompts: nothing to compare against
    raise TypeError(f"pre must be an EditEvaluation or a LocalityReference, got {type(pre).__name__}")


def _assemble(edits: list[EditRequest], qs: list[_Query], tf: list[tuple[float, list[int]]],
              gens: list[str] | None, ref: LocalityReference | None, flu: list[float] | None,
              flu_texts: list[str], timings: dict[str, float], params: dict[str, Any]) -> EditEvaluation:
    per_tf: list[dict[str, list[float]]] = [{} for _ in edits]
    per_em: list[dict[str, list[float]]] = [{} for _ in edits]
    rows: list[dict[str, Any]] = [{"edit": i, "prompt": e.prompt, "target_new": e.target_new} for i, e in enumerate(edits)]
    loc_tokens = [t for (_, t), q in zip(tf, qs) if q.kind == "locality"]
    loc_qs = [q for q in qs if q.kind == "locality"]
    for k, q in enumerate(qs):
        acc, pred = tf[k]
        if q.kind == "locality":
            if ref is not None:
                before = ref.tokens[q.edit][q.item]
                if len(before) != len(pred):
                    raise ValueError(f"edit {q.edit}: locality answer tokenizes differently than in pre= "
                                     "(another tokenizer?)")
                v = float(sum(a == b for a, b in zip(before, pred)) / len(pred))
                for key in ("locality", f"locality/{q.group}"):
                    per_tf[q.edit].setdefault(key, []).append(v)
                    if gens is not None:
                        per_em[q.edit].setdefault(key, []).append(
                            float(exact_match(gens[k], ref.generations[q.edit][q.item])))  # type: ignore[index]  # not None: pre= without generations is refused above when gens is
        else:
            for key in (q.kind, f"{q.kind}/{q.group}") if q.group else (q.kind,):
                per_tf[q.edit].setdefault(key, []).append(acc)
                if gens is not None:
                    per_em[q.edit].setdefault(key, []).append(float(exact_match(gens[k], q.answer)))
        if gens is not None:
            rows[q.edit].setdefault(f"{q.kind}_generations", []).append(gens[k])
    teacher: dict[str, float | None] = {}
    gen_scores: dict[str, float | None] | None = {} if gens is not None else None
    # Each named group of locality / portability prompts (KnowEdit's Reasoning, ...) is
    # reported under "kind/group" too, when the data has more than the default group.
    groups = []
    for kind, default in (("locality", "neighborhood"), ("portability", "portability")):
        names = sorted({q.group for q in qs if q.kind == kind and q.group})
        if names and names != [default]:
            groups += [f"{kind}/{g}" for g in names]
    for m in (*METRICS, *groups):
        each, teacher[m] = _aggregate(per_tf, m)
        for r, value in zip(rows, each):
            r[f"{m}_tf"] = value
        if gen_scores is not None:
            each_em, gen_scores[m] = _aggregate(per_em, m)
            for r, value in zip(rows, each_em):
                r[f"{m}_em"] = value
    notes = _notes(qs, ref)
    fluency = None
    if flu is not None:
        fluency = _mean(flu)
        for r, v, t in zip(rows, flu, flu_texts):
            r["fluency"], r["fluency_text"] = v, t
    reference = _reference(edits, loc_qs, loc_tokens, [g for g, q in zip(gens, qs) if q.kind == "locality"]
                           if gens is not None else None) if loc_qs else None
    return EditEvaluation(teacher, gen_scores, fluency, rows, len(edits), reference, notes, params, timings)


def _notes(qs: list[_Query], ref: LocalityReference | None) -> list[str]:
    """Why a metric is unavailable."""
    notes = []
    has_loc = any(q.kind == "locality" for q in qs)
    if has_loc and ref is None:
        notes.append("locality: no pre-edit predictions; pass pre=evaluate(model, edits) computed before the edit")
    if not has_loc:
        notes.append("locality: the edits have no locality prompts")
    if not any(q.kind == "portability" for q in qs):
        notes.append("portability: the edits have no portability prompts")
    return notes

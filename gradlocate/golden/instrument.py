"""The matrix's instrument: each cell measured per prompt and per target token.

A cell of the single-edit matrix (:func:`gradlocate.golden.matrix.matrix`) is scored
teacher-forced on every prompt of its edit: the rewrite prompt, every rephrase, every
locality prompt and every portability prompt. :func:`instrument` returns, per edit, the
record sections a cell stores (metrics version 2):

* ``prompts``: per prompt kind (``rewrite``, ``rephrase``, ``locality``, ``portability``;
  the list index is the prompt's index in the edit), per target token:

  - ``acc``: token accuracy, 1 where the argmax prediction is the token (teacher-forced);
  - ``logprob``: the natural log-probability of the token under the edited model;
  - rewrite and rephrase prompts of an edit with an old answer (``ground_truth``, else
    ``pred``: :attr:`~gradlocate.data.EditRequest.old_answer`): ``old_logprob``, each old
    answer token's log-probability, teacher-forced on ``prompt + old answer`` under the
    **same edited weights**, and ``margin`` = mean(``logprob``) - mean(``old_logprob``):
    how much more likely, per token, the edited model finds the new answer than the one it
    replaces (CounterFact's efficacy comparison, Meng et al. 2022, which compares the two
    answers' mean token NLLs, in log space). Per token the margin is defined only up to
    the first token where the two answers differ (their prefixes then differ): there it is
    ``logprob[t] - old_logprob[t]`` (both given the same prefix), before it 0;
  - locality prompts: ``acc`` is agreement with the unedited model's argmax (as
    :func:`~gradlocate.evaluation.evaluate`'s locality), ``logprob`` the edited model's
    log-probability of the unedited model's argmax token, ``kl`` KL(unedited || edited) of
    the next-token distributions at each answer position (nats; rounding below 0 is
    clipped to 0).

* ``scores``: today's token-accuracy aggregates (reliability, generalization, locality,
  portability), each the mean over the kind's prompts of the prompt's token accuracy,
  exactly as metrics version 1 defined them;
* ``continuous``: the continuous aggregates (:data:`~gradlocate.golden.table.CONTINUOUS_METRICS`),
  each the mean over the kind's prompts of :func:`~gradlocate.golden.table.prompt_values`.

Every float stored is rounded to 6 significant digits (the records stay small: about
0.5-0.7 kB per CounterFact or ZsRE cell for these sections, see docs/editing.md).

Cost: the forwards of metrics version 1 (one edited, teacher-forced forward per prompt)
plus one edited forward per old-answer row and one unedited forward per locality prompt
(run right beside its edited forward, in the same padded batch, so an edit that changes
nothing has a KL of exactly 0). The LM head runs at the scored positions only
(:func:`~gradlocate.interventions.head_at`) and rows of similar length share a batch, so on
SmolLM2 the whole takes 0.96x (CounterFact) to 1.33x (ZsRE) version 1's CPU time
(``benchmarks/bench_instrument.py``).

Example:
    >>> import torch
    >>> from gradlocate.handles import resolve
    >>> from gradlocate.models import tiny
    >>> h = resolve(tiny("gpt2", n_layers=2, d_model=16)[0])
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5", "ground_truth": "4",
    ...           "locality_prompt": "1 + 1 =", "locality_ground_truth": "2"}]
    >>> ref = [[[0, 0]]]   # the unedited model's tokens on the locality answer " 2"
    >>> cell = instrument(h, 1, edits, None, ref)[0]
    >>> sorted(cell["prompts"]), cell["prompts"]["locality"][0]["kl"]
    (['locality', 'rewrite'], [0.0, 0.0])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gradlocate.data import Edits, as_edits
from gradlocate.editors.executors import row_delta
from gradlocate.evaluation import _queries
from gradlocate.handles import Handles
from gradlocate.interventions import edited, head_at, no_cache, run, using
from gradlocate.losses import IGNORE, logits_of, tokenize_edits
from gradlocate.state import input_device
from gradlocate.golden.table import CONTINUOUS_METRICS, MATRIX_METRICS, PROMPT_KINDS, prompt_values

__all__ = ["instrument", "SIGNIFICANT"]

#: Significant digits of every float a cell stores.
SIGNIFICANT = 6


def _sig(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


@dataclass
class _Row:
    """One teacher-forced sequence to measure: a prompt of an edit with an answer."""

    edit: int
    kind: str                # the prompt kind (PROMPT_KINDS' values)
    item: int                # the prompt's index among the edit's prompts of its kind
    prompt: str
    answer: str
    old: bool = False        # the old answer's row (for the margin)
    want: list[int] | None = None  # locality: the unedited model's argmax tokens


def _rows(edits: Edits, reference: list[list[list[int]]]) -> tuple[list[_Row], list[_Row]]:
    """The answer rows (rewrite, rephrase, portability, and the old answers of the first
    two) and the locality rows, each scored against the unedited model's tokens."""
    answers, local = [], []
    for q in _queries(edits):
        kind = PROMPT_KINDS[q.kind]
        if q.kind == "locality":
            local.append(_Row(q.edit, kind, q.item, q.prompt, q.answer, want=list(reference[q.edit][q.item])))
            continue
        answers.append(_Row(q.edit, kind, q.item, q.prompt, q.answer))
        old = edits[q.edit].old_answer
        if kind in ("rewrite", "rephrase") and old is not None and old.strip():
            answers.append(_Row(q.edit, kind, q.item, q.prompt, old, old=True))
    return answers, local


def _scored(h: Handles, site: str, kw: dict[str, Any], mask: Bool[Tensor, "rows _"],
            delta: Float[Tensor, "rows d_out d_in"] | None) -> Float[Tensor, "k vocab"]:
    """The logits at the scored positions of one padded batch, with each row's weight
    change ``delta[row]`` at ``site`` (``None``: the unedited model). The LM head runs at
    those positions only (:func:`~gradlocate.interventions.head_at`), where the model has one."""
    with contextlib.ExitStack() as stack:
        if h.head is not None:
            rows, pos = mask.nonzero(as_tuple=True)
            stack.enter_context(head_at(h, rows, pos))
        if delta is not None:
            stack.enter_context(edited(h, site, lambda x, o: o + row_delta(x, delta)))
        out = logits_of(run(h, **kw))
    return out[0] if h.head is not None else out[:, :-1][mask]


def _measure(h: Handles, layer: int, rows: list[_Row], delta: Float[Tensor, "edits d_out d_in"] | None,
             batch_size: int, paired: bool) -> list[dict[str, list[Any]]]:
    """Per row: ``acc`` and ``logprob`` of its scored tokens (the answer's, or ``want``),
    and with ``paired`` the ``kl`` of the unedited model's next-token distribution to the
    edited one's at each position (the unedited forward on the same padded batch)."""
    batch = tokenize_edits(h.require_tokenizer(), [r.prompt for r in rows], [r.answer for r in rows],
                           chat=h.chat).to(input_device(h.root))
    owner = torch.tensor([r.edit for r in rows])
    out: list[dict[str, list[Any]]] = [{} for _ in rows]
    # rows of similar length share a batch: less padding
    for idx in torch.argsort(batch.attention_mask.sum(1).cpu(), stable=True).split(batch_size):
        mb = batch[idx.to(batch.input_ids.device)]
        mask = mb.labels[:, 1:] != IGNORE
        counts = mask.sum(1).tolist()
        want = _wanted(rows, idx.tolist(), mb.labels[:, 1:][mask], counts)
        d = None if delta is None else delta[owner[idx].to(delta.device)]
        kw = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **no_cache(h.root))
        logits = _scored(h, h[layer].path, kw, mask, d)
        lp = logits.float().log_softmax(-1)
        acc = (logits.argmax(-1) == want).long()
        got = lp.gather(-1, want[:, None])[:, 0]
        stats = {"acc": acc, "logprob": got}
        if paired:
            stats["kl"] = _kl(_scored(h, "", kw, mask, None), lp) if d is not None else torch.zeros_like(got)
        for i, per in zip(idx.tolist(), zip(*[v.cpu().split(counts) for v in stats.values()])):
            out[i] = {k: v.tolist() for k, v in zip(stats, per)}
    return out


def _wanted(rows: list[_Row], idx: list[int], labels: Int[Tensor, " k"], counts: list[int]) -> Int[Tensor, " k"]:
    """The tokens each row is scored against at its scored positions: its answer's, or
    (locality) the unedited model's, which must be as many."""
    if all(rows[i].want is None for i in idx):
        return labels
    parts = []
    for i, lab, n in zip(idx, labels.split(counts), counts):
        w = rows[i].want
        if w is not None and len(w) != n:
            raise ValueError(f"edit {rows[i].edit}: its locality answer tokenizes to {n} tokens here but the "
                             f"unedited reference has {len(w)} (computed with another tokenizer?)")
        parts.append(lab if w is None else torch.tensor(w, dtype=lab.dtype, device=lab.device))
    return torch.cat(parts)


def _kl(ref_logits: Float[Tensor, "k vocab"], lp: Float[Tensor, "k vocab"]) -> Float[Tensor, " k"]:
    """KL(unedited || edited) per position, in nats, clipped at 0 (rounding)."""
    ref = ref_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - lp)).sum(-1).clamp_min(0.0)


@torch.no_grad()
def instrument(h: Handles, layer: int, edits: Any, delta: Tensor | None, reference: list[list[list[int]]],
               batch_size: int = 32) -> list[dict[str, Any]]:
    """Each edit's cell sections (``scores``, ``continuous``, ``prompts``: see the module
    doc) with its own weight change ``delta[i]`` ``[edits, d_out, d_in]`` at ``layer``'s
    site (``None``: the unedited model). ``reference``: per edit and locality prompt, the
    unedited model's argmax tokens on its answer
    (:attr:`~gradlocate.evaluation.LocalityReference.tokens`)."""
    edits = as_edits(edits)
    answers, local = _rows(edits, reference)
    with using(h):
        got = _measure(h, layer, answers, delta, batch_size, paired=False) if answers else []
        got_local = _measure(h, layer, local, delta, batch_size, paired=True) if local else []
    sections: list[dict[str, list[dict[str, Any]]]] = [{} for _ in edits]
    entry: dict[tuple[int, str, int], dict[str, Any]] = {}
    for r, s in [*zip(answers, got), *zip(local, got_local)]:
        if r.old:
            continue
        e: dict[str, Any] = {k: (v if k == "acc" else [_sig(x) for x in v]) for k, v in s.items()}
        entry[(r.edit, r.kind, r.item)] = e
        sections[r.edit].setdefault(r.kind, []).append(e)
    for r, s in zip(answers, got):
        if r.old:
            row = entry[(r.edit, r.kind, r.item)]
            new, old = row["logprob"], [_sig(x) for x in s["logprob"]]
            row["old_logprob"], row["margin"] = old, _sig(sum(new) / len(new) - sum(old) / len(old))
    return [_cell(sec) for sec in sections]


def _cell(section: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A cell's ``scores`` and ``continuous`` aggregates from its ``prompts`` section."""
    def mean(metric: str) -> float | None:
        v = prompt_values(section, metric)
        return sum(v) / len(v) if v else None

    cont = {m: mean(m) for m in CONTINUOUS_METRICS}
    return {"scores": {m: mean(m) for m in MATRIX_METRICS},
            "continuous": {m: _sig(v) for m, v in cont.items() if v is not None}, "prompts": section}

"""ROME's v* for many edits at once: each edit's own δ, templates and early stop, one
forward and one backward per step for all of them.

:func:`~gradlocate.editors.rank_one.optimise_value` optimises one edit's δ over its
templated prompts and its KL prompt. When several edits are each optimised *alone on
the same model* (the single-edit matrix, EMMET's values), their optimisations are
independent, so they can share the forwards: :func:`optimise_values` stacks every edit's
rows (its rewrite prompts, then its KL prompt) into one batch, with ``δ`` an
``[edits, d_model]`` parameter whose row ``i`` enters edit ``i``'s rows only. Each edit's
loss is computed from its own rows exactly as the single run computes it, and the
backward of their sum gives each δ row the gradient of its own loss. Adam is
elementwise, so one Adam over the stacked rows is one Adam per edit provided each row
keeps its own step count (:func:`~gradlocate.editors.locft_rows._adam`); an edit whose
loss falls below :data:`~gradlocate.editors.rank_one.EARLY_STOP` (or that reaches the
last step) stops and leaves the batch, its history ending where its single run's does.
Each edit is clamped to its own ``clamp_norm_factor · ‖target_init‖``.

The single path's speed-ups carry over: the blocks below the layer run once for the
whole batch, and the positions before each row's subject-last token come from one
key/value cache (the rows left-aligned at the latest subject token of the batch).
Every row of a batch is padded to its widest suffix (the positions from δ on), so the
edits are batched by suffix width (:data:`PAD_SLACK`) and by size (:data:`MAX_TOKENS`):
each batch is an independent optimisation.

The results equal the one-at-a-time ones up to floating-point reduction order: rows
of different edits are padded to one width, and the padded positions, masked out of
attention, change how some kernels block their sums (``tests/test_vstar_batched.py``:
in float64 equal, in float32 δ, v*, history and ΔW to 1e-5; a batch of one edit runs
the single path's shapes and equals it bit for bit).

What it buys depends on the hardware. On one CPU core a v* step of one edit is
already bound by its matrix products (``benchmarks/bench_vstar.py``: about 70 % of the
time, at about 70 % of a large product's throughput), so a chunk costs about what its
edits cost one at a time. Where one edit's step (22 prompts of a few tokens) leaves
the hardware idle, as on a GPU, the chunk shares its steps' fixed costs (not measured
here).

Example:
    >>> from gradlocate import down_projections
    >>> from gradlocate.data import as_edits
    >>> from gradlocate.models import tiny
    >>> h = down_projections(tiny("llama", n_layers=2, d_model=16)[0])
    >>> edits = as_edits([{"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"},
    ...                   {"prompt": "Rome is in", "subject": "Rome", "target_new": "Spain"}])
    >>> fits = optimise_values(h, 0, edits, ["", "Hi. "], steps=3, lr=0.5, kl_factor=0.0625,
    ...                        weight_decay=1e-3, clamp_norm_factor=4.0)
    >>> [len(f.history) for f in fits], tuple(fits[1].delta.shape)
    ([3, 3], (16,))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.data import EditRequest
from gradlocate.editors.executors import cache_mode
from gradlocate.editors import rank_one as _ro  # its _nll and EARLY_STOP read at call time: one definition for both paths
from gradlocate.editors.locft import EditTrainingError
from gradlocate.editors.locft_rows import _adam
from gradlocate.editors.rank_one import (Located, ValueFit, _Forward, _forward_layout, _Rows,
                                         _value_batch, _ValueBatch, locate, site_io, subject_of)
from gradlocate.handles import Handles
from gradlocate.interventions import capture, from_layer, head_at, replaced, rewrap, run, stop_after, using
from gradlocate.losses import TokenBatch
from gradlocate.state import input_device

__all__ = ["optimise_values", "edit_keys", "MAX_TOKENS"]

#: The most token positions one batched v* forward runs (rows x padded suffix width);
#: a chunk of edits needing more is split into groups of whole edits, each optimised
#: on its own (exactly: the edits are independent). Bounds the activations the backward
#: keeps: about ``MAX_TOKENS · layers above · 40 KB`` on SmolLM2-135M (~2.5 GB at layer 2).
MAX_TOKENS = 2048
#: How much padding a batch may add (a fraction of its real token positions) to take in
#: one more edit rather than start a batch of its own.
PAD_SLACK = 0.2
#: The most rows one key forward (:func:`edit_keys`) runs.
_KEY_ROWS = 512


# --------------------------------------------------------------------------- keys


def edit_keys(h: Handles, layer: int, edits: Sequence[EditRequest],
              prefixes: Sequence[str] | Sequence[Sequence[str]]) -> list[tuple[Tensor, Tensor]]:
    """Each edit's site inputs and outputs at its subject's last token in every templated
    prompt (:func:`~gradlocate.editors.rank_one.site_io`), ``[prompts, d_mlp]`` and
    ``[prompts, d_model]``: the prompts of several edits share a forward."""
    tok = h.require_tokenizer()
    per = _prefixes_per_edit(edits, prefixes)
    located: list[Located] = []
    for e, ps in zip(edits, per):
        located += [locate(tok, p + e.prompt, subject_of(e), len(p)) for p in ps]
    K, O = [], []
    for k in range(0, len(located), _KEY_ROWS):
        a, b = site_io(h, layer, located[k:k + _KEY_ROWS])
        K.append(a)
        O.append(b)
    sizes = [len(ps) for ps in per]
    return list(zip(torch.cat(K).split(sizes), torch.cat(O).split(sizes)))


def _prefixes_per_edit(edits: Sequence[EditRequest],
                       prefixes: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """One prefix list per edit: ``prefixes`` shared by all (a list of str) or given per edit."""
    if isinstance(prefixes, str):
        raise TypeError(f"prefixes must be a list of template prefixes (or one list per edit), got the str {prefixes!r}")
    if all(isinstance(p, str) for p in prefixes):
        shared = [str(p) for p in prefixes]
        if not shared:
            raise ValueError("prefixes is empty: give at least the bare prompt's prefix ''")
        return [shared] * len(edits)
    per = [list(ps) for ps in prefixes]
    if len(per) != len(edits) or any(not ps or not all(isinstance(p, str) for p in ps) for ps in per):
        raise ValueError(f"prefixes per edit must be {len(edits)} non-empty lists of str (one per edit), got "
                         f"{len(per)} lists")
    return per


# --------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class _Chunk:
    """Several edits' value batches stacked: ``rows[i]`` are edit ``i``'s rows of the
    merged batch, ``heads[i]`` its scored entries (its target tokens, then its KL
    position, as in its own batch), ``owner`` the edit of every row."""

    merged: _Rows
    vbs: list[_ValueBatch]
    rows: list[Tensor]
    heads: list[Tensor]
    owner: Tensor
    firsts: Tensor


def _chunk(vbs: list[_ValueBatch], pad: int) -> _Chunk:
    width = max(vb.ids.shape[1] for vb in vbs)
    ids = torch.cat([torch.nn.functional.pad(vb.ids, (0, width - vb.ids.shape[1]), value=pad) for vb in vbs])
    mask = torch.cat([torch.nn.functional.pad(vb.mask, (0, width - vb.mask.shape[1])) for vb in vbs])
    starts = [0]
    for vb in vbs:
        starts.append(starts[-1] + len(vb.lookup))
    hstarts = [0]
    for vb in vbs:
        hstarts.append(hstarts[-1] + len(vb.head_rows))
    merged = _Rows(ids, mask, torch.cat([vb.lookup for vb in vbs]),
                   torch.cat([vb.head_rows + s for vb, s in zip(vbs, starts)]), torch.cat([vb.head_pos for vb in vbs]))
    rows = [torch.arange(a, b) for a, b in zip(starts, starts[1:])]
    owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])
    return _Chunk(merged, vbs, rows, [torch.arange(a, b) for a, b in zip(hstarts, hstarts[1:])], owner,
                  torch.tensor(starts[:-1]))


def _subset(fw: _Forward, rows: Tensor, heads: Tensor) -> _Forward:
    """``fw`` on some of its rows (the edits still optimising), their scored entries
    ``heads`` renumbered to the kept rows."""
    if len(rows) == fw.ids.shape[0]:
        return fw
    dev = fw.ids.device
    renumber = torch.full((fw.ids.shape[0],), -1, dtype=torch.long)
    renumber[rows] = torch.arange(len(rows))
    r = rows.to(dev)
    return dataclasses.replace(fw, ids=fw.ids[r], mask=fw.mask[r], where=fw.where[r],
                               head_rows=renumber[fw.head_rows[heads]], head_pos=fw.head_pos[heads],
                               positions=None if fw.positions is None else fw.positions[r],
                               cache_rows=None if fw.cache is None else r)


def _groups(vbs: list[_ValueBatch], max_tokens: int, slack: float = PAD_SLACK) -> list[list[int]]:
    """The edits in groups that each run as one batch: ordered by their suffix width
    (every row of a batch is padded to its widest), an edit joins the group before it
    while the group's padded tokens stay within ``max_tokens`` and within ``1 + slack``
    times its real ones."""
    width = [int((vb.mask.sum(1) - vb.lookup).max()) for vb in vbs]
    groups: list[list[int]] = []
    rows = real = wide = 0
    for i in sorted(range(len(vbs)), key=lambda i: (width[i], i)):
        n, w = len(vbs[i].lookup), width[i]
        padded = (rows + n) * max(wide, w)
        if groups and padded <= max_tokens and padded <= (1 + slack) * (real + n * w):
            groups[-1].append(i)
            rows, real, wide = rows + n, real + n * w, max(wide, w)
        else:
            groups.append([i])
            rows, real, wide = n, n * w, w
    return groups


# --------------------------------------------------------------------------- δ at the site


@dataclass
class _Site:
    """What the site intervention reads each forward: the merged ``rows`` it runs, and
    each edit's unedited site output at its first row's δ position (``init``, recorded
    by the first forward, which runs every row)."""

    rows: Tensor
    init: Tensor | None = None


@contextlib.contextmanager
def _deltas_at_site(h: Handles, layer: int, fw: _Forward, ch: _Chunk, probe: TokenBatch,
                    delta: Float[Tensor, "edits d_model"], cache: bool) -> Iterator[_Site]:
    """:func:`~gradlocate.editors.rank_one._delta_at_site` for a chunk: row ``r`` of a
    forward sees ``δ[owner[r]]`` at its δ position; the blocks below are computed once
    for every row and each forward takes the rows in ``site.rows``."""
    site, block = h[layer], h.block_paths[layer]
    where, now = fw.where, _Site(torch.arange(len(ch.owner)))
    cols = where[..., 0].argmax(1).cpu()

    def keep_init(out: Tensor) -> None:
        o = out.reshape(where.shape[:2] + (-1,))
        now.init = o[ch.firsts.to(o.device), cols[ch.firsts].to(o.device)].detach().float().cpu()

    def added(like: Tensor) -> Tensor:
        r = now.rows
        d = delta[ch.owner[r].to(delta.device)][:, None, :]
        return (where[r.to(where.device)].to(like.device) * d).to(like.dtype)

    mode = cache_mode(h, layer, probe) if cache else "none"
    if mode == "down_input":
        with torch.no_grad(), capture(h, [block, site.path], detach=True) as cap, stop_after(h, block):
            run(h, **fw.inputs())
        like, state = cap.raw[block], cap.outputs[block]
        keep_init(cap.outputs[site.path])
        with from_layer(h, layer + 1, lambda: rewrap(like, state[now.rows.to(state.device)] + added(state))):
            yield now
        return

    def add(out: Tensor) -> Tensor:
        if now.init is None:
            keep_init(out)
        return out + added(out).reshape(out.shape)

    with contextlib.ExitStack() as stack:
        if mode == "residual":
            below = h.block_paths[layer - 1]
            with torch.no_grad(), capture(h, [below], detach=True) as cap, stop_after(h, below):
                run(h, **fw.inputs())
            like, state = cap.raw[below], cap.outputs[below]
            stack.enter_context(from_layer(h, layer, lambda: rewrap(like, state[now.rows.to(state.device)])))
        stack.enter_context(replaced(h, site.path, add))
        yield now


# --------------------------------------------------------------------------- the optimisation


@dataclass(frozen=True)
class _Settings:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float


@dataclass
class _State:
    """The optimisation of a group: δ, per-edit Adam moments and step counts, KL references."""

    delta: Tensor
    m: Tensor
    v: Tensor
    taken: Tensor
    kl0: list[Tensor | None]
    fits: list[ValueFit]

    @classmethod
    def of(cls, n: int, d: int, device: Any) -> _State:
        delta = torch.zeros(n, d, device=device, requires_grad=True)
        return cls(delta, torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros(n, dtype=torch.long),
                   [None] * n, [ValueFit(torch.zeros(d), torch.zeros(d)) for _ in range(n)])


def optimise_values(h: Handles, layer: int, edits: Sequence[EditRequest],
                    prefixes: Sequence[str] | Sequence[Sequence[str]], *, steps: int, lr: float, kl_factor: float,
                    weight_decay: float, clamp_norm_factor: float,
                    callback: Callable[[int, int, float], Any] | None = None, cache: bool = True,
                    reuse_prefix: bool = True, max_tokens: int = MAX_TOKENS,
                    progress: bool | None = False) -> list[ValueFit]:
    """Each edit's :func:`~gradlocate.editors.rank_one.optimise_value` on the model as it
    is, the edits optimised together (see the module doc); one :class:`ValueFit` per
    edit, in order. ``prefixes``: the template prefixes shared by every edit, or one list
    per edit. ``callback(edit, step, loss)`` after each edit's step. ``max_tokens``: see
    :data:`MAX_TOKENS`. ``cache`` and ``reuse_prefix`` as for ``optimise_value``."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    edits = list(edits)
    if not edits:
        return []
    tok = h.require_tokenizer()
    vbs = [_value_batch(tok, e, ps) for e, ps in zip(edits, _prefixes_per_edit(edits, prefixes))]
    s = _Settings(int(steps), float(lr), float(kl_factor), float(weight_decay), float(clamp_norm_factor))
    fits: dict[int, ValueFit] = {}
    for group in _groups(vbs, max_tokens):
        def cb(i: int, it: int, loss: float, group: list[int] = group) -> None:
            if callback is not None:
                callback(group[i], it, loss)
        got = _optimise_group(h, layer, [edits[i] for i in group], [vbs[i] for i in group], s, cb,
                              cache, reuse_prefix, progress)
        fits.update(zip(group, got))
    return [fits[i] for i in range(len(edits))]


def _optimise_group(h: Handles, layer: int, edits: list[EditRequest], vbs: list[_ValueBatch], s: _Settings,
                    callback: Callable[[int, int, float], Any], cache: bool, reuse_prefix: bool,
                    progress: bool | None) -> list[ValueFit]:
    from tqdm.auto import tqdm

    tok = h.require_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ch = _chunk(vbs, int(pad))
    st = _State.of(len(vbs), h.d_model, h[layer].device)
    dev, t0 = input_device(h.root), time.perf_counter()
    with using(h):
        fw = _forward_layout(h, ch.merged, dev, reuse_prefix and cache, stacklevel=5)
        probe = TokenBatch(ch.merged.ids.to(dev), ch.merged.mask.to(dev), torch.full_like(ch.merged.ids, -100).to(dev))
        with torch.enable_grad(), _deltas_at_site(h, layer, fw, ch, probe, st.delta, cache) as site:
            active = list(range(len(vbs)))
            bar = tqdm(total=s.steps, desc=f"v* layer {layer}, {len(vbs)} edits", leave=False,
                       disable=None if progress is None else not progress)
            with bar:
                for it in range(s.steps):
                    active = _step(h, fw, ch, site, st, s, active, it, edits, callback)
                    bar.update(1)
                    bar.set_postfix(optimising=len(active))
                    if not active:
                        break
    seconds = (time.perf_counter() - t0) / len(vbs)
    assert site.init is not None  # the first forward recorded it
    for i, f in enumerate(st.fits):
        f.delta, f.target_init, f.seconds = st.delta[i].detach().float().cpu(), site.init[i].clone(), seconds
    return st.fits


def _step(h: Handles, fw_all: _Forward, ch: _Chunk, site: _Site, st: _State, s: _Settings, active: list[int],
          it: int, edits: list[EditRequest], callback: Callable[[int, int, float], Any]) -> list[int]:
    """One forward of the ``active`` edits' rows, each edit's loss as its single run
    computes it, and a step of those that go on. Returns them."""
    rows = torch.cat([ch.rows[i] for i in active])
    fw = _subset(fw_all, rows, torch.cat([ch.heads[i] for i in active]))
    site.rows = rows
    with head_at(h, fw.head_rows, fw.head_pos):
        logits = run(h, **fw.inputs()).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    assert site.init is not None
    init = site.init.to(st.delta.device)
    going, losses, at = [], [], 0
    for i in active:
        lp = logp[at:at + len(ch.heads[i])]
        at += len(ch.heads[i])
        kl_now = lp[-1:]
        kl0 = st.kl0[i]
        if kl0 is None:  # the edit's first forward, δ = 0: its reference distribution
            kl0 = st.kl0[i] = kl_now.detach().clone()
        nll = _ro._nll(lp, ch.vbs[i])
        kl = s.kl_factor * torch.nn.functional.kl_div(kl0, kl_now, log_target=True, reduction="batchmean")
        loss = nll + kl + s.weight_decay * (st.delta[i].norm() / init[i].norm() ** 2)
        value = float(loss.item())
        if not math.isfinite(value):
            raise EditTrainingError(f"the v* loss became {value} at step {it} for {edits[i].prompt!r} -> "
                                    f"{edits[i].target_new!r}; the weight was restored. Try a smaller v_lr (now {s.lr:g})")
        st.fits[i].history.append(value)
        st.fits[i].nll.append(float(nll.item()))
        callback(i, it, value)
        if not (value < _ro.EARLY_STOP or it == s.steps - 1):
            going.append(i)
            losses.append(loss)
    if going:
        (grad,) = torch.autograd.grad(torch.stack(losses).sum(), st.delta)
        _adam(st.delta, grad, st.m, st.v, st.taken, torch.tensor(going), s.lr)
        _clamp(st.delta, init, going, s.clamp_norm_factor)
    return going


@torch.no_grad()
def _clamp(delta: Float[Tensor, "edits d_model"], init: Float[Tensor, "edits d_model"], rows: list[int],
           factor: float) -> None:
    """Each stepping edit's δ back into its own ball ``‖δ‖ ≤ factor · ‖target_init‖``
    (the single run's operations, row by row)."""
    for i in rows:
        cap = factor * init[i].norm()
        if delta[i].norm() > cap:
            delta[i].mul_(cap / delta[i].norm())


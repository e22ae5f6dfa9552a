"""The pieces ROME, R-ROME and EMMET share: context templates, subject keys, the
value optimisation (v*) and the closed-form updates. Everything runs through
:mod:`gradlocate.interventions`; the updates are plain tensor algebra.

Notation (``[d_model, d_mlp]`` layout, the site computes ``o = W k (+ b)``):

    k_t      the site's input at the subject's last token of prompt t (a template prefix + the prompt)
    k̄        mean over the context templates of k_t (ROME's key k*)
    k_p      the key of the bare prompt (template "{}")
    δ        the vector added to the site's output at the subject's last token, optimised so
             the target follows every templated prompt (plus KL and weight decay, clamped)
    v*       target_init + δ, target_init = the site's output at the bare prompt

    rank_one(C, k, k_den, r) = r (C⁻¹k)ᵀ / (k_denᵀ C⁻¹ k)
    emmet(C, K, R)           = R (K C⁻¹ Kᵀ + λI)⁻¹ K C⁻¹     (K: [edits, d_mlp], R: [edits, d_model])

Example:
    >>> import torch
    >>> C, k, r = torch.eye(3), torch.tensor([1., 0, 0]), torch.tensor([0., 2])
    >>> (rank_one(C, k, k, r).float() @ k).tolist()    # ΔW k = r
    [0.0, 2.0]
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate import _compat
from gradlocate.data import EditRequest
from gradlocate.editors.executors import cache_mode
from gradlocate.editors.locft import EditTrainingError
from gradlocate.handles import Handles
from gradlocate.interventions import capture, from_layer, head_at, no_cache, replaced, rewrap, run, stop_after, using
from gradlocate.losses import TokenBatch, target_ids
from gradlocate.state import input_device

__all__ = ["context_templates", "Located", "locate", "site_io", "ValueFit", "optimise_value",
           "rank_one", "emmet_update", "STARTS", "KL_PROMPT", "EARLY_STOP"]

#: ROME's generation starts for the context templates (``rome_main.get_context_templates``).
STARTS = ("The", "Therefore", "Because", "I", "You")
#: ROME's essence prompt: the KL term keeps the subject's distribution here.
KL_PROMPT = "{} is a"
#: ROME stops the v* optimisation once the loss is below this.
EARLY_STOP = 5e-2


# --------------------------------------------------------------------------- context templates


def context_templates(h: Handles, length_params: Sequence[Sequence[int]], seed: int = 0,
                      top_k: int = 5) -> list[list[str]]:
    """ROME's context templates as prefixes, in groups: ``[[""], group per (length, n)]``
    where a group holds ``n`` texts sampled from the model (top-k ``top_k``, seeded),
    ``n // 5`` from each of :data:`STARTS`, ``length`` tokens long (start included), each
    followed by ``". "``; ``""`` is the bare prompt ("{}").

    Example:
        >>> from gradlocate import down_projections
        >>> from gradlocate.models import tiny
        >>> h = down_projections(tiny("llama", n_layers=1, d_model=16)[0])
        >>> groups = context_templates(h, [(4, 5)])
        >>> [len(g) for g in groups], groups[1][0].endswith(". ")
        ([1, 5], True)
    """
    gen = torch.Generator().manual_seed(seed)
    groups = [[""]]
    for length, n in length_params:
        texts: list[str] = []
        for start in STARTS:
            texts += _sample_texts(h, start, max(1, n // len(STARTS)), int(length), gen, top_k)
        groups.append([t.replace("{", " ").replace("}", " ") + ". " for t in texts])
    return groups


def _sample_texts(h: Handles, start: str, n: int, length: int, gen: torch.Generator, top_k: int) -> list[str]:
    """``n`` continuations of ``start``, ``length`` tokens in all, through the kernel."""
    tok = h.require_tokenizer()
    first = list(tok(start, add_special_tokens=True)["input_ids"])
    ids = torch.tensor([first] * n)
    dev = input_device(h.root)
    with using(h), torch.no_grad():
        while ids.shape[1] < max(length, len(first) + 1):
            logits = run(h, input_ids=ids.to(dev), **no_cache(h.root)).logits[:, -1].float().cpu()
            top = logits.topk(min(top_k, logits.shape[-1]))
            pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
            ids = torch.cat([ids, top.indices.gather(1, pick)], 1)
    return [tok.decode(r, skip_special_tokens=True) for r in ids.tolist()]


# --------------------------------------------------------------------------- subject positions


@dataclass(frozen=True)
class Located:
    """A tokenized text and the index of the subject's last token in it."""

    ids: tuple[int, ...]
    last: int


def subject_of(edit: EditRequest) -> str:
    """The edit's subject, which ROME-style editors need (the key is read at its last token)."""
    if not edit.subject:
        raise ValueError(f"edit {edit.prompt!r} -> {edit.target_new!r} has no subject: ROME-style editors read "
                         f"the key at the subject's last token; give 'subject'")
    return edit.subject


def locate(tok: Any, text: str, subject: str, start: int = 0) -> Located:
    """Tokenize ``text`` (special tokens added, as prompts are fed) and find the last
    token of ``subject``'s first occurrence at or after character ``start``.

    Example:
        >>> from gradlocate.models import byte_tokenizer
        >>> loc = locate(byte_tokenizer(), "Paris is in France", "Paris")
        >>> loc.last, len(loc.ids)
        (4, 18)
    """
    c0 = text.find(subject, start)
    if c0 < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text[start:]!r}: ROME needs the edit's "
                         f"subject inside its prompt")
    c1 = c0 + len(subject)
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not hit:
        raise ValueError(f"subject {subject!r} covers no token of {text!r}")
    return Located(tuple(int(i) for i in enc["input_ids"]), hit[-1])


def _padded(tok: Any, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask (the lookup indices stay valid)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    am = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s))
        am[i, :len(s)] = 1
    return ids, am


def site_io(h: Handles, layer: int, located: Sequence[Located]) -> tuple[Float[Tensor, "n d_mlp"], Float[Tensor, "n d_model"]]:
    """The site's input (key) and output at each text's subject-last token (one forward,
    stopped after the site), float32."""
    path = h[layer].path
    ids, am = _padded(h.require_tokenizer(), [loc.ids for loc in located])
    dev, rows = input_device(h.root), torch.arange(len(located))
    last = torch.tensor([loc.last for loc in located])
    with using(h), torch.no_grad(), capture(h, [path], inputs=True, detach=True) as cap, stop_after(h, path):
        run(h, input_ids=ids.to(dev), attention_mask=am.to(dev), **no_cache(h.root))
    k = cap.inputs[path].reshape(len(located), ids.shape[1], -1)[rows, last].float()
    o = cap.outputs[path].reshape(len(located), ids.shape[1], -1)[rows, last].float()
    return k, o


# --------------------------------------------------------------------------- the value v*


@dataclass
class ValueFit:
    """The v* optimisation of one edit: ``delta`` (δ, added at the site's output),
    ``target_init`` (the site's output at the bare prompt), each step's total loss and
    NLL (``history``, ``nll``), and the target's mean probability at the end."""

    delta: Float[Tensor, " d_model"]
    target_init: Float[Tensor, " d_model"]
    history: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def v_star(self) -> Float[Tensor, " d_model"]:
        return self.target_init + self.delta


@dataclass(frozen=True)
class _Rows:
    """Right-padded rows where δ enters at one position each (``lookup``) and the head
    scores a few (row, position) pairs."""

    ids: Tensor
    mask: Tensor
    lookup: Tensor          # [rows]: subject-last index of every row (rewrite rows, then the KL row)
    head_rows: Tensor       # scored (row, position) pairs: the target tokens, then the KL row's lookup
    head_pos: Tensor


@dataclass(frozen=True)
class _ValueBatch(_Rows):
    """One edit's v* rows: its templated rewrite prompts (with ``targets`` ``[n_rewrite, T]``)
    and its KL prompt, last."""

    targets: Tensor
    n_rewrite: int


def _value_batch(tok: Any, edit: EditRequest, prefixes: Sequence[str]) -> _ValueBatch:
    """ROME's rewriting prompts (each template's prompt + the target but its last token)
    and its KL prompt ``"{subject} is a"``."""
    subject = subject_of(edit)
    rewrite = [locate(tok, p + edit.prompt, subject, len(p)) for p in prefixes]
    tgt = target_ids(tok, edit.prompt, edit.target_new)
    if not tgt:
        raise ValueError(f"target {edit.target_new!r} tokenizes to no tokens")
    kl = locate(tok, KL_PROMPT.format(subject), subject)
    seqs = [list(r.ids) + tgt[:-1] for r in rewrite] + [list(kl.ids)]
    ids, am = _padded(tok, seqs)
    rows, pos = [], []
    for i, r in enumerate(rewrite):
        rows += [i] * len(tgt)
        pos += [len(r.ids) - 1 + j for j in range(len(tgt))]
    rows.append(len(rewrite))
    pos.append(kl.last)
    return _ValueBatch(ids, am, torch.tensor([r.last for r in rewrite] + [kl.last]), torch.tensor(rows),
                       torch.tensor(pos), torch.tensor([tgt] * len(rewrite)), len(rewrite))


def _nll(logp: Float[Tensor, "k vocab"], vb: _ValueBatch) -> Float[Tensor, ""]:
    """ROME's rewriting loss: per prompt the target tokens' summed NLL over their count,
    averaged over prompts."""
    n, t = vb.targets.shape
    got = logp[: n * t].gather(1, vb.targets.reshape(-1, 1).to(logp.device)).reshape(n, t)
    return -(got.sum(1) / t).mean()


@dataclass
class _Forward:
    """The value batch as each v* step's forward sees it. ``whole``: every row from its
    first token, right-padded. ``suffix``: the rows left-aligned so every subject-last
    token (where δ enters) is at column ``past``; the positions before it cannot see δ
    (causal attention), so their keys and values are computed once (``cache``) and each
    step runs only the columns from ``past`` on."""

    ids: Tensor             # [rows, width]: the positions each forward runs
    mask: Tensor            # [rows, past + width]
    where: Tensor           # [rows, width, 1]: 1 where δ is added
    head_rows: Tensor
    head_pos: Tensor        # columns of ``ids``
    col0: int               # row 0's δ column in ``ids``
    past: int = 0
    positions: Tensor | None = None
    cache: Any = None
    cache_arg: str | None = None
    no_cache: dict[str, Any] = field(default_factory=dict)
    cache_rows: Tensor | None = None  # the rows of ``cache`` that ``ids``' rows continue (None: all, in order)

    def inputs(self) -> dict[str, Any]:
        """One forward's keyword arguments (a fresh copy of the prefix cache: a forward appends to it)."""
        kw: dict[str, Any] = {"input_ids": self.ids, "attention_mask": self.mask}
        if self.cache is None:
            return kw | self.no_cache
        rows = torch.arange(self.ids.shape[0], device=self.ids.device) if self.cache_rows is None else self.cache_rows
        return kw | {"position_ids": self.positions, self.cache_arg or "cache": _compat.prefix_cache(self.cache, self.past, rows),
                     "use_cache": True}


def _whole(h: Handles, vb: _Rows, dev: Any) -> _Forward:
    where = torch.zeros(vb.ids.shape + (1,), device=dev)
    where[torch.arange(len(vb.lookup)), vb.lookup] = 1.0
    return _Forward(vb.ids.to(dev), vb.mask.to(dev), where, vb.head_rows, vb.head_pos, int(vb.lookup[0]),
                    no_cache=no_cache(h.root))


@torch.no_grad()
def _suffix(h: Handles, vb: _Rows, dev: Any) -> tuple[_Forward | None, str | None]:
    """The ``suffix`` layout with its prefix cache, or ``None`` and why it cannot engage."""
    arg = _compat.cache_argument(h.root)
    if arg is None:
        return None, f"{type(h.root).__name__}'s forward takes no key/value cache"
    lengths, lookup = vb.mask.sum(1), vb.lookup
    past, width = int(lookup.max()), int((lengths - lookup).max())
    if past == 0:
        return None, None  # nothing precedes δ anywhere: the whole rows are the suffix
    rows = len(lookup)
    ids = torch.zeros((rows, past + width), dtype=torch.long)  # left padding: masked, its id never matters
    mask = torch.zeros_like(ids)
    for i in range(rows):
        a, n = past - int(lookup[i]), int(lengths[i])
        ids[i, a:a + n], mask[i, a:a + n] = vb.ids[i, :n], 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    cache = _compat.new_cache(h.root)
    if cache is None:
        return None, "this transformers has no DynamicCache that takes the model's config"
    with head_at(h, torch.tensor([0]), torch.tensor([past - 1])):  # the prefix's logits are not needed
        out = run(h, input_ids=ids[:, :past], attention_mask=mask[:, :past], position_ids=positions[:, :past],
                  **{arg: cache, "use_cache": True})
    cache = _compat.returned_cache(out)
    for layer in range(h.n_layers):
        got = int(cache.get_seq_length(layer)) if cache is not None else -1
        if got != past:
            return None, (f"its key/value cache holds {got} of the prompts' {past} prefix positions at layer {layer} "
                          f"(a sliding window shorter than the prefix?)")
    where = torch.zeros((rows, width, 1), device=dev)
    where[:, 0] = 1.0
    head_pos = vb.head_pos - lookup[vb.head_rows]
    return _Forward(ids[:, past:], mask, where, vb.head_rows, head_pos, 0, past, positions[:, past:], cache, arg), None


def _forward_layout(h: Handles, vb: _Rows, dev: Any, reuse_prefix: bool, stacklevel: int = 3) -> _Forward:
    if not reuse_prefix:
        return _whole(h, vb, dev)
    fw, why = _suffix(h, vb, dev)
    if why is not None:
        warnings.warn(f"v*: prefix reuse is off ({why}): every step recomputes the positions before the subject, "
                      f"which is slower; the result is the same", stacklevel=stacklevel)
    return fw if fw is not None else _whole(h, vb, dev)


def optimise_value(h: Handles, layer: int, edit: EditRequest, prefixes: Sequence[str], *, steps: int, lr: float,
                   kl_factor: float, weight_decay: float, clamp_norm_factor: float,
                   callback: Callable[[int, float], Any] | None = None, cache: bool = True,
                   reuse_prefix: bool = True) -> ValueFit:
    """ROME's ``compute_v``: Adam on δ (zeros, ``lr``) added to the site's output at the
    subject's last token of every prompt, minimising

        L(δ) = NLL(target | templated prompts) + kl_factor · KL(p_δ ‖ p_0)("{subject} is a")
               + weight_decay · ‖δ‖ / ‖target_init‖²

    stopping below :data:`EARLY_STOP`, after ``steps`` forwards (the last takes no step),
    with ‖δ‖ clamped to ``clamp_norm_factor · ‖target_init‖`` after each step.

    What δ cannot change is computed once (``False`` for either runs the whole model every
    step: the reference, ``tests/test_rome.py`` checks they agree):

    * ``cache``: the blocks below ``layer`` (and, where the block is residual-additive,
      the edited block itself); each step runs only the blocks above (:func:`_delta_at_site`);
    * ``reuse_prefix`` (with ``cache``): the positions before each prompt's subject-last
      token, whose keys and values come from a cache computed once; each step runs only
      the positions from δ on (a quarter of the tokens with ROME's templates). Where the
      model has no usable cache this is off, with a warning naming why."""
    tok = h.require_tokenizer()
    vb = _value_batch(tok, edit, prefixes)
    dev = input_device(h.root)
    delta = torch.zeros(h.d_model, device=h[layer].device, requires_grad=True)
    fit = ValueFit(delta, torch.zeros(h.d_model))
    opt, kl0, t0 = torch.optim.Adam([delta], lr=lr), None, time.perf_counter()
    with using(h):
        fw = _forward_layout(h, vb, dev, reuse_prefix and cache)
        probe = TokenBatch(vb.ids.to(dev), vb.mask.to(dev), torch.full_like(vb.ids, -100).to(dev))
        with torch.enable_grad(), _delta_at_site(h, layer, fw, probe, delta, cache) as seen, \
                head_at(h, fw.head_rows, fw.head_pos):
            for it in range(steps):
                opt.zero_grad()
                logits = run(h, **fw.inputs()).logits[0]
                logp = torch.log_softmax(logits.float(), -1)
                kl_now = logp[-1:]
                kl0 = kl_now.detach().clone() if kl0 is None else kl0
                nll = _nll(logp, vb)
                kl = kl_factor * torch.nn.functional.kl_div(kl0, kl_now, log_target=True, reduction="batchmean")
                init = seen["init"].to(delta.device)
                loss = nll + kl + weight_decay * (delta.norm() / init.norm() ** 2)
                value = float(loss.item())
                if not math.isfinite(value):
                    raise EditTrainingError(f"the v* loss became {value} at step {it} for {edit.prompt!r} -> "
                                            f"{edit.target_new!r}; the weight was restored. Try a smaller v_lr (now {lr:g})")
                fit.history.append(value)
                fit.nll.append(float(nll.item()))
                if callback is not None:
                    callback(it, value)
                if value < EARLY_STOP or it == steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    cap = clamp_norm_factor * init.norm()
                    if delta.norm() > cap:
                        delta.mul_(cap / delta.norm())
    fit.delta, fit.target_init, fit.seconds = delta.detach().float().cpu(), seen["init"], time.perf_counter() - t0
    return fit


@contextlib.contextmanager
def _delta_at_site(h: Handles, layer: int, fw: _Forward, probe: TokenBatch, delta: Float[Tensor, " d_model"],
                   cache: bool) -> Iterator[dict[str, Tensor]]:
    """Forwards in the block see ``fw.where * delta`` added to ``layer``'s site output; the
    dict yielded holds ``"init"``, the site's unedited output at row 0's subject token.

    With ``cache``, what cannot change is computed once: for a residual-additive block
    (its output is ``c + site(x)``, :func:`~gradlocate.editors.executors.cache_mode`,
    probed on the right-padded rows ``probe``) the block's output, so the site's change
    enters as ``+ where * delta`` above it; otherwise the stream entering the block. Else,
    and at layer 0 of a non-additive model, the whole model runs every step."""
    site, block = h[layer], h.block_paths[layer]
    where = fw.where
    seen: dict[str, Tensor] = {}

    def keep_init(out: Tensor) -> None:
        seen["init"] = out.reshape(where.shape[:2] + (-1,))[0, fw.col0].detach().float().cpu()

    mode = cache_mode(h, layer, probe) if cache else "none"
    if mode == "down_input":
        with torch.no_grad(), capture(h, [block, site.path], detach=True) as cap, stop_after(h, block):
            run(h, **fw.inputs())
        like, state = cap.raw[block], cap.outputs[block]
        keep_init(cap.outputs[site.path])
        with from_layer(h, layer + 1, lambda: rewrap(like, state + (where.to(state.device) * delta).to(state.dtype))):
            yield seen
        return

    def add(out: Tensor) -> Tensor:
        if "init" not in seen:
            keep_init(out)
        return out + (where.to(out.device).reshape(out.shape[:-1] + (1,)) * delta).to(out.dtype)

    with contextlib.ExitStack() as stack:
        if mode == "residual":
            below = h.block_paths[layer - 1]
            with torch.no_grad(), capture(h, [below], detach=True) as cap, stop_after(h, below):
                run(h, **fw.inputs())
            like, state = cap.raw[below], cap.outputs[below]
            stack.enter_context(from_layer(h, layer, lambda: rewrap(like, state)))
        stack.enter_context(replaced(h, site.path, add))
        yield seen


# --------------------------------------------------------------------------- closed forms


def _solve(C: Tensor | None, x: Tensor) -> Tensor:
    """``C⁻¹ x`` in float64 (``C = None``: the identity, ROME's ``mom2_adjustment=False``)."""
    x = x.double()
    return x if C is None else torch.linalg.solve(C.double(), x)


def rank_one(C: Float[Tensor, "d_mlp d_mlp"] | None, key: Float[Tensor, " d_mlp"], key_den: Float[Tensor, " d_mlp"],
             residual: Float[Tensor, " d_model"]) -> Float[Tensor, "d_model d_mlp"]:
    """ROME's update ``ΔW = r uᵀ / (k_denᵀ u)`` with ``u = C⁻¹ k`` (float64): the edited
    layer maps ``k_den`` to ``W k_den + r``, and leaves every ``x`` with ``uᵀx = 0``
    unchanged. ROME: ``k`` = k̄, ``k_den`` = k_p; R-ROME: both k̄.

    Example:
        >>> C = torch.tensor([[2., 0], [0, 1]])
        >>> rank_one(C, torch.tensor([1., 1]), torch.tensor([1., 1]), torch.tensor([3.])).tolist()
        [[1.0, 2.0]]
    """
    u = _solve(C, key)
    return torch.outer(residual.double(), u) / (key_den.double() @ u)


def emmet_update(C: Float[Tensor, "d_mlp d_mlp"] | None, keys: Float[Tensor, "edits d_mlp"],
                 residuals: Float[Tensor, "edits d_model"], *, mom2_update_weight: float = 1.0,
                 emmet_lambda: float = 0.0, update_norm_lambda: float = 0.0) -> Float[Tensor, "d_model d_mlp"]:
    """EMMET's batched update under equality constraints (float64):

        C' = mom2_update_weight · C + update_norm_lambda · I,   D = K C'⁻¹ Kᵀ + emmet_lambda · I
        ΔW = Rᵀ D⁻¹ K C'⁻¹

    With ``emmet_lambda = 0`` the edited layer satisfies ``ΔW k_i = r_i`` for every edit
    (exactly, if the keys are independent); one edit gives :func:`rank_one`'s update.

    Example:
        >>> K, R = torch.eye(2, 3), torch.tensor([[1.], [2.]])
        >>> (emmet_update(None, K, R) @ K.T.double()).tolist()
        [[1.0, 2.0]]
    """
    d = keys.shape[1]
    Cp = torch.eye(d, dtype=torch.float64) if C is None else C.double() * mom2_update_weight
    if update_norm_lambda:
        Cp = Cp + update_norm_lambda * torch.eye(d, dtype=torch.float64)
    ck = torch.linalg.solve(Cp, keys.double().T)                       # C'⁻¹ Kᵀ   [d_mlp, edits]
    D = keys.double() @ ck + emmet_lambda * torch.eye(len(keys), dtype=torch.float64)
    return residuals.double().T @ torch.linalg.solve(D, ck.T)          # Rᵀ D⁻¹ K C'⁻¹

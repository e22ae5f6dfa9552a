"""The layer selectors, each returning a :class:`~gradlocate.results.LayerScores`.

* :func:`gradratio` (GradRatio-Select): ``S(l) = ||g_edit(l)||_F^2 / ||g_retain(l)||_F^2``,
  the argmax over layers ``l >= l_min`` with ``l_min = max(3, ceil(0.15 L))``
  (:func:`adaptive_min_layer`).
* :func:`lga` (Layer Gradient Analysis, "Golden Layers", arXiv 2602.20207):
  ``S(l) = sum_i <grad_{W_l} L_old^i, grad_{W_l} L_new^i>``; layers outside Tukey's
  fences (:func:`tukey_fences`, ``k = 1.5``) are excluded, the golden layer is the argmax
  of the signed score among the rest.
* :func:`cma_layer` (causal mediation analysis, ROME): the layer whose MLPs at the last
  subject token carry the most of the fact, from :func:`~gradlocate.trace.causal_trace`.

Both gradient selectors score the answer tokens only (``append_eos=False``,
:data:`~gradlocate.losses.SELECTOR_APPEND_EOS`), as their papers define the losses;
LocFT-BF, the trainer, appends EOS.

The exact definitions and the choices made are in ``docs/methods.md``.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=6, d_model=16)
    >>> edits = [{"prompt": "Paris is in", "target_new": "Rome", "ground_truth": "France"}]
    >>> r = gradratio(model, edits, ["Some general text.", "More text here."])
    >>> r.method, r.selected >= adaptive_min_layer(6), len(r.scores)
    ('gradratio', True, 6)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from gradlocate.data import EditRequest, as_edits, load_texts
from gradlocate.gradients import LayerGradients, edit_gradients, per_sample_inner_products, retain_gradients
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import require_gradients, run, using
from gradlocate.losses import SELECTOR_APPEND_EOS, context_length, logits_of, prompt_ids
from gradlocate.memory import check_max_memory
from gradlocate.results import LayerScores
from gradlocate.state import input_device

__all__ = ["adaptive_min_layer", "TukeyFences", "tukey_fences", "gradratio", "lga", "cma_layer", "greedy_answers"]


# --------------------------------------------------------------------------- helpers


def adaptive_min_layer(n_layers: int) -> int:
    """GradRatio-Select's lowest eligible layer: ``l_min = max(3, ceil(0.15 L))``.

    Computed in exact integer arithmetic, ``ceil(15 L / 100)``, so no floating-point
    rounding can move the ceiling. ``L`` is the model's number of decoder layers.

    Example:
        >>> [adaptive_min_layer(L) for L in (12, 20, 28, 30, 32, 80)]
        [3, 3, 5, 5, 5, 12]
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    return max(3, -(-15 * int(n_layers) // 100))


class TukeyFences(NamedTuple):
    """Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]`` of a score vector.

    Attributes:
        lower, upper: the fences.
        q1, q3: the quartiles (linear interpolation between order statistics, i.e.
            numpy's default / Hyndman-Fan type 7).
        k: the multiplier.
        inside: per score, whether ``lower <= score <= upper``.
    """

    lower: float
    upper: float
    q1: float
    q3: float
    k: float
    inside: list[bool]


def tukey_fences(scores: Sequence[float], k: float = 1.5) -> TukeyFences:
    """Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]`` of ``scores`` and which scores lie inside.

    Quartiles use linear interpolation between order statistics (type 7, numpy's
    default ``np.quantile``). Scores on a fence count as inside. ``k = 1.5`` (the default)
    is Tukey's rule. Hoaglin, Iglewicz & Tukey (1986, "Performance of some resistant
    rules for outlier labeling", JASA 81:991-999), the reference LGA cites, study it: on
    Gaussian samples of 5 to 20, 14-33% of samples have one or more "outside" values.
    ``k = 2.2`` is the less eager rule recommended in that line of work (Hoaglin &
    Iglewicz 1987, "Fine-tuning some resistant rules for outlier labeling", JASA
    82:1147-1149): about 5% of Gaussian samples then have any outside value. LGA's
    layers are few (one score per layer), so ``k`` decides how many are excluded.

    Raises:
        ValueError: empty or non-finite scores, or ``k`` negative or not finite.

    Example:
        >>> f = tukey_fences([1.0, 2.0, 3.0, 4.0, 100.0], k=1.0)
        >>> f.q1, f.q3, f.lower, f.upper, f.inside
        (2.0, 4.0, 0.0, 6.0, [True, True, True, True, False])
    """
    x = np.asarray([float(s) for s in scores], dtype=np.float64)
    if x.size == 0:
        raise ValueError("tukey_fences needs at least one score")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"tukey_fences needs finite scores, got {x.tolist()}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"the fence multiplier k must be a finite number >= 0, got {k!r}")
    q1, q3 = (float(v) for v in np.quantile(x, [0.25, 0.75]))
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    return TukeyFences(lo, hi, q1, q3, float(k), [bool(lo <= v <= hi) for v in x])


def _argmax(values: Sequence[float], mask: Sequence[bool]) -> int:
    """Position of the largest value where ``mask`` holds (nan counts as -inf; ties: the first)."""
    cands = [i for i, m in enumerate(mask) if m]
    if not cands:
        raise ValueError("no eligible layer to select from")
    return max(cands, key=lambda i: -math.inf if math.isnan(values[i]) else values[i])


def _resolve_min_layer(min_layer: Any, n_layers: int) -> int:
    if min_layer == "adaptive":
        l_min = adaptive_min_layer(n_layers)
        if l_min >= n_layers:
            warnings.warn(f"the model has only {n_layers} layer(s): GradRatio's l_min = max(3, ceil(0.15 L)) = "
                          f"{l_min} leaves no eligible layer, so l_min is clamped to the last layer "
                          f"({n_layers - 1})", stacklevel=3)
            l_min = n_layers - 1
        return l_min
    if isinstance(min_layer, bool) or not isinstance(min_layer, (int, np.integer)):
        raise ValueError(f"min_layer must be 'adaptive' or an int, got {min_layer!r}")
    if not 0 <= int(min_layer) < n_layers:
        raise ValueError(f"min_layer={min_layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return int(min_layer)


def _check_precomputed(g: LayerGradients, what: str, layers: list[int] | None) -> None:
    if g.loss_kind != what:
        raise ValueError(f"the {what} argument is a LayerGradients of the {g.loss_kind!r} loss, not of the {what!r} loss")
    if layers is not None and list(g.layers) != list(layers):
        raise ValueError(f"the precomputed {what} gradients cover layers {g.layers}, not the requested {layers}")


# --------------------------------------------------------------------------- GradRatio


def gradratio(model: Any, edits: Any, retain: Any, *, tokenizer: Any = None,
              min_layer: int | Literal["adaptive"] = "adaptive", layers: Sequence[int] | int | None = None,
              batch_size: int = 8, max_length: int | None = 128, append_eos: bool = SELECTOR_APPEND_EOS,
              progress: bool | None = None, max_memory: int | None = None) -> LayerScores:
    """GradRatio-Select: the layer whose site gradient is largest for the edits
    relative to general text.

    ``S(l) = ||grad_{W_l} L_edit||_F^2 / ||grad_{W_l} L_retain||_F^2`` with ``L_edit``
    the edit loss (eq. 1, the loss LocFT-BF trains with) and ``L_retain`` the mean
    next-token NLL of the retain texts (eq. 2). Selected: ``argmax_{l >= l_min} S(l)``
    with ``l_min = max(3, ceil(0.15 L))`` (``min_layer="adaptive"``; on a model with
    ``L <= 3`` layers it is clamped to ``L - 1`` with a warning) or ``min_layer=`` an int.

    Also reported per layer (``extras``): ``g_edit_sq``, ``g_retain_sq``,
    ``cos`` = cos(g_edit, g_retain), and ``first_formulation`` =
    ``||g_edit||^2 (1 - |cos|)`` (the paper's first formulation).

    Paper defaults: 32 edits, 256 retain sequences of 128 tokens. gradlocate uses what
    it is given, cutting retain texts to ``max_length`` tokens (128).

    Args:
        model: a Hugging Face causal LM, an nnsight wrapper, a TransformerLens bridge,
            or :class:`~gradlocate.handles.Handles`.
        edits: edits in any public form (see :func:`~gradlocate.data.as_edits`), or a
            precomputed :class:`~gradlocate.gradients.LayerGradients` of the edit loss.
        retain: retain texts (a list of strings or anything
            :func:`~gradlocate.data.load_texts` reads), or a precomputed
            :class:`~gradlocate.gradients.LayerGradients` of the retain loss (computing
            it once with ``retain_gradients(..., keep=True)`` saves half the work).
        min_layer: ``"adaptive"`` or the lowest eligible layer index.
        layers: score only these layers (``l_min`` still refers to the model's depth).
        batch_size: sequences per forward/backward (memory only).
        max_length: retain texts are cut to this many tokens.
        append_eos: score EOS after each target in ``L_edit``. Default ``False``: the
            answer tokens only: GradRatio-Select's edit loss (eq. 1) is the NLL of the
            target given the prompt, with no end-of-sequence term, and EasyEdit's
            fine-tuning loss (``ft_main.py``) scores the target tokens alone. ``True``
            scores LocFT-BF's training loss (which appends EOS); ``gradlocate edit
            --layer auto`` selects with that.
        progress: progress bars (``None``: on a terminal only).
        max_memory: a byte budget for activations; micro-batches shrink to fit it.

    Raises:
        ValueError: empty edits or retain set, bad targets, layers out of range, or no
            requested layer at or above ``l_min``.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=8, d_model=16)
        >>> r = gradratio(model, [{"src": "Who wrote Hamlet?", "alt": "Marlowe"}], ["It rained all day."])
        >>> r.params["l_min"], r.eligible[:4], sorted(r.extras)
        (3, [False, False, False, True], ['cos', 'first_formulation', 'g_edit_sq', 'g_retain_sq'])
    """
    t0 = time.perf_counter()
    require_gradients("gradratio")
    check_max_memory(max_memory)
    h = resolve(model, tokenizer)
    pre = [g for g in (edits, retain) if isinstance(g, LayerGradients)]
    idx = h.layer_indices(layers) if (layers is not None or not pre) else list(pre[0].layers)
    l_min = _resolve_min_layer(min_layer, h.n_layers)
    eligible = [l >= l_min for l in idx]
    if not any(eligible):
        raise ValueError(f"none of the layers {idx} is at or above l_min = {l_min}: score higher layers "
                         f"or pass min_layer=")
    # Check both inputs before the (long) gradient computations.
    if not isinstance(edits, LayerGradients):
        edits = as_edits(edits)
    if not isinstance(retain, LayerGradients):
        retain = load_texts(retain)
    if isinstance(edits, LayerGradients):
        _check_precomputed(edits, "edit", idx)
    if isinstance(retain, LayerGradients):
        _check_precomputed(retain, "retain", idx)
    with using(h):  # one caller owns the model for the whole selection
        g_e = edits if isinstance(edits, LayerGradients) else edit_gradients(
            h, edits, append_eos=append_eos, layers=idx, batch_size=batch_size, keep=True, progress=progress,
            max_memory=max_memory)
        g_r = retain if isinstance(retain, LayerGradients) else retain_gradients(
            h, retain, max_length=max_length, layers=idx, batch_size=batch_size, keep=True, progress=progress,
            max_memory=max_memory)

    e, r = g_e.sq_norms, g_r.sq_norms
    if g_e.grads is not None and g_r.grads is not None:
        cos = g_e.cosine(g_r)
    else:
        warnings.warn("precomputed gradients without keep=True: cos and first_formulation are nan", stacklevel=2)
        cos = [math.nan] * len(idx)
    scores = [_ratio(a, b) for a, b in zip(e, r)]
    sel = idx[_argmax(scores, eligible)]
    params = {
        "n_layers": h.n_layers, "l_min": l_min, "min_layer": min_layer, "n_edits": g_e.n_sequences,
        "edit_tokens": g_e.n_tokens, "n_retain": g_r.n_sequences, "retain_tokens": g_r.n_tokens,
        "edit_loss": g_e.loss, "retain_loss": g_r.loss, "batch_size": batch_size,
        "max_length": max_length, "append_eos": g_e.params.get("append_eos", append_eos), "max_memory": max_memory,
    }
    # Parts that add up to the wall time (LayerScores' repr shows their sum).
    timings = {"edit_gradients": g_e.timings.get("gradients", 0.0) if g_e is not edits else 0.0,
               "retain_gradients": g_r.timings.get("gradients", 0.0) if g_r is not retain else 0.0}
    timings["other"] = max(0.0, time.perf_counter() - t0 - sum(timings.values()))
    return LayerScores("gradratio", scores, eligible, sel, params,
                       {"g_edit_sq": e, "g_retain_sq": r, "cos": cos,
                        "first_formulation": [a * (1 - abs(c)) for a, c in zip(e, cos)]}, timings, idx)


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


# --------------------------------------------------------------------------- LGA


_STOP = ("\n", ".")


@torch.no_grad()
def greedy_answers(model: Any, prompts: Sequence[str], *, tokenizer: Any = None,
                   max_new_tokens: int = 8) -> list[str]:
    """The model's own answer to each prompt: LGA's old answer when the data has none.

    Defined exactly: greedy decoding from the prompt, fed as every gradlocate function
    feeds it (the chat template included, for a model resolved with ``chat=True``), for
    at most ``max_new_tokens`` tokens, stopping at EOS, or before a newline or a period
    once some non-space text has been produced; the answer is that text, stripped. When
    there is no such text - the first token is EOS (an instruct model's end of turn in
    reply to a bare question), or nothing but whitespace comes before EOS or the token
    limit - the answer is the EOS token itself (``tokenizer.eos_token``): a valid
    one-token answer, scored as that single token. (EasyEdit's loaders write the EOS
    string as the ground truth of every new-knowledge edit; here that is what the model
    says only where the model says it: ``lga(old="eos")`` takes EasyEdit's convention.)

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=1, d_model=16)
        >>> isinstance(greedy_answers(model, ["Paris is in"], max_new_tokens=3)[0], str)
        True
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    h = resolve(model, tokenizer)
    tok = h.tokenizer
    dev = input_device(h.root)
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which an empty answer would be: give old answers "
                         "(ground_truth) or a tokenizer with an EOS token")
    ctx = context_length(h.root)
    answers = []
    with using(h):
        for i, p in enumerate(prompts):
            ids = prompt_ids(tok, p, h.chat)
            if ctx is not None and len(ids) >= ctx:
                raise ValueError(f"edit {i}: the prompt is {len(ids)} tokens, no shorter than the model's context of "
                                 f"{ctx}: no room to generate its old answer; shorten the prompt")
            new: list[int] = []
            text = ""
            for _ in range(max_new_tokens):
                if ctx is not None and len(ids) + len(new) >= ctx:
                    break
                logits = logits_of(run(h, input_ids=torch.tensor([ids + new], device=dev)))
                nxt = int(logits.float()[0, -1].argmax())
                if nxt == eos:
                    break
                cand = tok.decode(new + [nxt])
                if text.strip() and any(s in cand[len(text):] for s in _STOP):
                    break
                new.append(nxt)
                text = cand
            answer = text.strip()
            for s in _STOP:
                answer = answer.split(s)[0].strip()
            answers.append(answer or tok.eos_token)
    return answers


def lga(model: Any, edits: Any, *, tokenizer: Any = None, k: float = 1.5,
        aggregate: Literal["sum", "mean"] = "sum", sign: Literal["signed", "negative", "abs"] = "signed",
        old: Literal["data", "greedy", "eos"] = "data",
        layers: Sequence[int] | int | None = None, batch_size: int = 8, append_eos: bool = SELECTOR_APPEND_EOS,
        max_new_tokens: int = 8, progress: bool | None = None, max_memory: int | None = None,
        fence: float | None = None) -> LayerScores:
    """Layer Gradient Analysis: the "golden layer" from per-sample gradient inner products.

    ``S(l) = sum_i <grad_{W_l} L_old^i, grad_{W_l} L_new^i>_F`` where ``L_new^i`` is edit
    ``i``'s edit loss on ``target_new`` and ``L_old^i`` that on its old answer
    (``ground_truth``, else ``pred``, else the model's own answer, see
    :func:`greedy_answers`; ``old=`` chooses). Layers whose score lies outside Tukey's fences
    ``[Q1 - k IQR, Q3 + k IQR]`` over all scored layers are excluded; the golden layer is
    the argmax of the score among the rest.

    The inner products come from the ghost identity (two forward+backward passes per
    micro-batch, no per-sample weight gradient materialised).

    Arguments not listed below are as in :func:`gradratio`.

    Args:
        k: Tukey's multiplier (default 1.5, Tukey's rule, as studied by Hoaglin, Iglewicz
            & Tukey 1986, which LGA cites; 2.2 is the less eager rule Hoaglin & Iglewicz
            1987 recommend; see :func:`tukey_fences`).
        fence: the old name of ``k`` (deprecated: use ``k``).
        aggregate: ``"sum"`` (the definition) or ``"mean"`` over edits; the selection and
            the fences are the same for both (the fences are scale-equivariant).
        sign: what is maximised among the layers inside the fences: ``"signed"`` (``S``),
            ``"negative"`` (``-S``: the layer where lowering the new target's loss most
            raises the old answer's) or ``"abs"`` (``|S|``). The fences are always on ``S``.
        old: the old answer: ``"data"`` (the edit's ``ground_truth`` / ``pred``, else the
            model's own answer), ``"greedy"`` (always the model's own answer,
            :func:`greedy_answers`) or ``"eos"`` (always the EOS token: EasyEdit's
            convention for new-knowledge sets).
        max_new_tokens: length cap of a generated old answer.
        append_eos: score EOS after each answer in ``L_new`` and ``L_old``. Default
            ``False``: the answer tokens only. Golden Layers (arXiv 2602.20207) runs its
            editors through EasyEdit on the KnowEdit sets, whose fine-tuning loss scores
            the target tokens alone; the copies of the paper we could read do not add an
            EOS term. With EOS, a one-token CounterFact answer's loss is half EOS, and
            the EOS terms of ``L_new`` and ``L_old`` (the same token, predicted after
            similar contexts) tend to align their gradients, adding a shared term to ``S``.

    Returns:
        :class:`~gradlocate.results.LayerScores` with ``scores`` = ``S`` (aggregated as asked),
        ``eligible`` = inside the fences, extras ``mean`` / ``std`` (over edits) and
        ``cos_mean`` (mean per-edit cosine of the two gradients), and the fences in ``params``.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("gpt2", n_layers=4, d_model=16)
        >>> r = lga(model, [{"prompt": "Paris is in", "target_new": "Rome", "ground_truth": "France"},
        ...                 {"src": "Who wrote Hamlet?", "alt": "Marlowe", "answers": ["Shakespeare"]}])
        >>> r.method, len(r.scores), r.eligible[r.selected], sorted(r.extras)
        ('lga', 4, True, ['cos_mean', 'mean', 'std'])
    """
    t0 = time.perf_counter()
    require_gradients("lga")
    if aggregate not in ("sum", "mean"):
        raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
    if sign not in ("signed", "negative", "abs"):
        raise ValueError(f"sign must be 'signed', 'negative' or 'abs', got {sign!r}")
    if fence is not None:
        warnings.warn("lga(fence=) is deprecated: pass Tukey's multiplier as k=", DeprecationWarning, stacklevel=2)
        k = fence
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"k (Tukey's fence multiplier) must be a finite number >= 0, got {k!r}")
    check_max_memory(max_memory)
    edits = as_edits(edits)
    h = resolve(model, tokenizer)
    idx = h.layer_indices(layers)

    if old not in ("data", "greedy", "eos"):
        raise ValueError(f"old must be 'data', 'greedy' or 'eos', got {old!r}")
    eos = h.tokenizer.eos_token
    if old == "eos" and eos is None:
        raise ValueError("old='eos' but the tokenizer has no EOS token")
    answers: list[str | None] = [
        eos if old == "eos" else e.old_answer if old == "data" and e.old_answer and e.old_answer.strip() else None
        for e in edits]
    missing = [i for i, o in enumerate(answers) if o is None]
    t1 = time.perf_counter()
    with using(h):  # one caller owns the model for the whole selection
        if missing:
            for i, g in zip(missing, greedy_answers(h, [edits[i].prompt for i in missing],
                                                    max_new_tokens=max_new_tokens)):
                answers[i] = g
        t_old = time.perf_counter() - t1
        olds = [a for a in answers if a is not None]
        if len(olds) != len(edits):  # greedy_answers gives one answer per prompt
            raise RuntimeError(f"lga_layer: {len(edits) - len(olds)} edits got no old answer")
        prods = per_sample_inner_products(h, [e.prompt for e in edits], [e.target_new for e in edits], olds,
                                          layers=idx, batch_size=batch_size, append_eos=append_eos,
                                          progress=progress, max_memory=max_memory)
    per = prods.dot  # [edits, layers], float64
    scores = [float(v) for v in (per.sum(0) if aggregate == "sum" else per.mean(0))]
    f = tukey_fences(scores, k)
    if not any(f.inside):
        raise ValueError(f"every layer is outside Tukey's fences [{f.lower:.4g}, {f.upper:.4g}] with k={k}: "
                         f"use a larger k")
    key = {"signed": scores, "negative": [-s for s in scores], "abs": [abs(s) for s in scores]}[sign]
    sel = idx[_argmax(key, f.inside)]
    n = per.shape[0]
    std = per.std(0, unbiased=True) if n > 1 else torch.zeros(per.shape[1], dtype=per.dtype)
    params = {
        "k": k, "fence": k, "aggregate": aggregate, "sign": sign, "lower": f.lower, "upper": f.upper,
        "q1": f.q1, "q3": f.q3, "n_edits": n, "old": old, "generated_old_answers": len(missing),
        "eos_old_answers": sum(a == eos for a in answers), "old_answers": list(answers),
        "batch_size": batch_size, "append_eos": append_eos, "max_memory": max_memory,
        "new_loss": float(prods.loss_a.mean()), "old_loss": float(prods.loss_b.mean()),
    }
    timings = {"old_answers": t_old, "capture": prods.timings["capture"], "ghost": prods.timings["ghost"]}
    timings["other"] = max(0.0, time.perf_counter() - t0 - sum(timings.values()))
    return LayerScores("lga", scores, list(f.inside), sel, params,
                       {"mean": [float(v) for v in per.mean(0)], "std": [float(v) for v in std],
                        "cos_mean": [float(v) for v in torch.nanmean(prods.cosine, 0)]}, timings, idx)


# --------------------------------------------------------------------------- CMA


def _edit_answer(e: EditRequest, answer: str) -> str | None:
    if answer == "predicted":
        return None
    if answer == "new":
        return e.target_new
    if answer == "old":
        if e.old_answer is None:
            raise ValueError(f"answer='old' but edit {e.prompt!r} has no ground_truth or pred")
        return e.old_answer
    raise ValueError(f"answer must be 'predicted', 'old' or 'new', got {answer!r}")


def cma_layer(model: Any, edits: Any, *, tokenizer: Any = None, samples: int | None = None,
              noise: float | Sequence[torch.Tensor] = 3.0, std: float | None = None, seed: int = 0,
              window: int = 10, layers: Sequence[int] | int | None = None, answer: str = "predicted",
              batch_size: int = 256, merge: bool | None = None, method: str = "exact",
              progress: bool | None = None) -> LayerScores:
    """The CMA layer choice: the layer whose MLPs (restored in a window of ``window``
    layers centred on it) at the last subject token have the largest average indirect
    effect ``score - low_score`` over ``edits``.

    Only the last subject token's row of each edit's ``kind="mlp"`` causal trace is
    computed (:func:`~gradlocate.trace.causal_trace`).

    Args:
        model: a transformers causal LM, an nnsight wrapper, a TransformerLens bridge, or
            :class:`~gradlocate.handles.Handles`.
        edits: edits in any public form; each needs a ``subject`` that occurs in its ``prompt``.
        noise: a multiple of ``std``, or one explicit tensor
            ``[samples, n_subject_tokens, d_model]`` per edit.
        std: the embedding std; default ROME's: :func:`~gradlocate.trace.core.embedding_std`
            over the edits' subjects.
        seed: seed of the noise (the same seed for every edit, as ROME).
        answer: whose probability is traced: ``"predicted"`` (the clean argmax, as
            ROME), ``"old"`` (the edit's ground truth) or ``"new"`` (its target).
        samples: corrupted rows per cell, as in :func:`~gradlocate.trace.causal_trace`.
        window: layers restored per cell, as there.
        layers: the layers traced, as there.
        batch_size: rows per forward, as there.
        merge: the fast executor's batching, as there.
        method: ``"exact"`` (ROME's algorithm) or ``"atp"`` (attribution patching: the
            whole row from two forwards and one backward per edit, an estimate).
        progress: a progress bar over the edits (``None``: on a terminal only).

    Returns:
        :class:`~gradlocate.results.LayerScores` with ``method="cma"``, ``scores`` the
        mean indirect effect per layer; extras ``"ie_std"`` (its std over the edits) and
        ``"mean_prob"`` (the mean restored probability); ``params["low_score"]`` /
        ``["high_score"]`` the means over the edits.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, tok = tiny("llama", n_layers=4, d_model=32)
        >>> edits = [{"prompt": "Paris is the capital of", "target_new": "Italy", "subject": "Paris"},
        ...          {"prompt": "The Nile flows through", "target_new": "Peru", "subject": "The Nile"}]
        >>> r = cma_layer(model, edits, samples=3, window=2, progress=False)
        >>> r.method, len(r.scores), r.selected == r.layers[max(range(4), key=r.scores.__getitem__)]
        ('cma', 4, True)
    """
    from tqdm.auto import tqdm

    from gradlocate.trace import trace_prompt
    from gradlocate.trace.core import TracePrompt, embedding_std

    t_start = time.perf_counter()
    edits = as_edits(edits)
    for i, e in enumerate(edits):
        if e.subject is None:
            raise ValueError(f"edit {i} ({e.prompt!r}) has no subject: cma_layer traces the subject's tokens")
    if isinstance(noise, torch.Tensor):
        raise TypeError("cma_layer takes a multiple of the embedding std, or a list with one noise tensor per edit "
                        "(subjects differ in length), not one tensor")
    if isinstance(noise, bool):
        raise ValueError(f"noise must be a non-negative multiple of the embedding std or a list of tensors, "
                         f"got {noise!r}")
    scale, noises = (noise, None) if isinstance(noise, (int, float)) else (3.0, list(noise))
    explicit = noises is not None
    if noises is not None and len(noises) != len(edits):
        raise ValueError(f"{len(noises)} explicit noise tensors for {len(edits)} edits: give one per edit")
    h = resolve(model, tokenizer)
    prompts = [TracePrompt.of(h, e.prompt, e.subject, where=f"edit {i}") for i, e in enumerate(edits)]
    t0 = time.perf_counter()
    if std is None and not explicit:
        std = embedding_std(h, [e.subject for e in edits])
    t_std = time.perf_counter() - t0
    ies, probs, lows, highs = [], [], [], []
    layer_idx: list[int] = []
    r = None
    bar = tqdm(list(zip(edits, prompts)), desc="cma_layer", disable=None if progress is None else not progress)
    with using(h):  # one caller owns the model for the whole selection
        for i, (e, tp) in enumerate(bar):
            r = trace_prompt(h, tp, kind="mlp", samples=samples, noise=scale if noises is None else noises[i],
                             std=std, seed=seed, window=window, answer=_edit_answer(e, answer),
                             tokens=[tp.subject_range[1] - 1], layers=layers, batch_size=batch_size, merge=merge,
                             method=method, progress=False)
            layer_idx = r.layers
            probs.append(r.scores[0])
            ies.append(r.scores[0] - r.low_score)
            lows.append(r.low_score)
            highs.append(r.high_score)
    ie = torch.stack(ies).double()
    mean = ie.mean(0)
    return LayerScores(
        method="cma", scores=mean.tolist(), eligible=[True] * len(layer_idx), selected=layer_idx[int(mean.argmax())],
        params={"kind": "mlp", "token": "last_subject", "samples": r.samples if r else samples,
                "noise": "explicit" if explicit else float(scale), "std": std, "seed": seed,
                "window": window, "answer": answer, "n_edits": len(edits), "method": method,
                "low_score": float(sum(lows) / len(lows)), "high_score": float(sum(highs) / len(highs))},
        extras={"ie_std": (ie.std(0) if len(ies) > 1 else torch.zeros_like(mean)).tolist(),
                "mean_prob": torch.stack(probs).double().mean(0).tolist()},
        timings={"noise_std": t_std, "trace": time.perf_counter() - t0 - t_std, "setup": t0 - t_start},
        layers=layer_idx,
    )

"""ROME and R-ROME: one rank-one update of one layer's down-projection per edit.

ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT";
``kmeng01/rome``) writes a fact ``(subject, prompt) -> target`` into the MLP of one
layer by treating its down-projection ``W`` as a linear associative memory:

    key      k̄ = mean_t k_t                         (the site input at the subject's last token,
                                                       over ROME's context templates t)
    value    v* = target_init + δ                     (δ optimised: see :func:`~gradlocate.editors.rank_one.optimise_value`)
    update   ΔW = (v* − o_p) (C⁻¹k̄)ᵀ / (k_pᵀ C⁻¹ k̄)   (C = E[k kᵀ], :mod:`~gradlocate.editors.covariance`)

where ``k_p`` and ``o_p`` are the key and site output of the bare prompt. R-ROME
(Gupta et al., 2024, "Rebuilding ROME") uses the averaged key in the denominator too,
and the averaged output in the residual (EasyEdit's ``enable_random_prefix_keys``):

    R-ROME   ΔW = (v* − ō) (C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄),   ō = mean_t o_t = W k̄ (+ b)

so the edited layer maps k̄ to exactly v*; ROME's maps k_p to v* and k̄ to a scaled
point (``k̄ᵀC⁻¹k̄ / k_pᵀC⁻¹k̄`` of the way), which is what let its updates blow up.

:class:`ROME` and :class:`RROME` edit in place, sequentially (one update per edit, each
computed on the model as the previous ones left it), with the LocFT-BF interface:
context manager, :meth:`fit`, ``edited``, ``delta``, ``restore``, ``commit``.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> edit = {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"}
    >>> with ROME(model, 1, v_num_grad_steps=3, context_template_length_params=[(4, 5)],
    ...           mom2_n_tokens=512, progress=False) as ed:
    ...     r = ed.fit([edit])
    ...     ed.edited, r.n_edits
    (True, 1)
    >>> ed.edited
    False
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

import torch
from jaxtyping import Float
from torch import Tensor

from gradlocate.data import EditRequest, as_edits
from gradlocate.editors.covariance import second_moment, second_moments
from gradlocate.editors.rank_one import (EARLY_STOP, ValueFit, context_templates, locate, optimise_value, rank_one,
                                         site_io, subject_of)
from gradlocate.editors.values import edit_keys, optimise_values
from gradlocate.editors.base import InPlaceEdit
from gradlocate.editors.protocol import EditorSpec, TrainStep, summary
from gradlocate.editors.settings import ROMESettings
from gradlocate.handles import Handle, Handles, resolve
from gradlocate.interventions import require_gradients
from gradlocate.state import Undo

__all__ = ["ROME", "RROME", "RankOneResult", "ROME_HPARAMS", "rome_per_edit", "rrome_per_edit", "memo_templates"]

#: ROME's hyper-parameters (a dict view of :class:`~gradlocate.editors.settings.ROMESettings`'
#: defaults: EasyEdit's ``hparams/ROME/llama3.2-1b.yaml``, the closest family to SmolLM2-135M,
#: with ``mom2_adjustment`` on). No ``mom2_update_weight``: ROME's update is invariant to C's
#: scale (C⁻¹ appears in its numerator and denominator); EasyEdit's scaling matters only
#: through EMMET's λ.
ROME_HPARAMS: dict[str, Any] = {k: getattr(ROMESettings(), k) for k in ROMESettings().to_dict()
                                if k not in ("seed", "mom2_corpus", "mom2_seed", "mom2_stats")}


@dataclass
class RankOneResult:
    """What one :meth:`ROME.fit` (or R-ROME's, EMMET's) did.

    Attributes:
        method, layer, n_edits: the setting.
        key_norms, value_norms: per edit ``‖k̄‖`` and ``‖v*‖``.
        residual_norms: per edit ``‖v* − W k‖`` (the change asked of the layer's output).
        delta_norms: per edit ``‖δ‖`` (the optimised change of the site's output).
        update_norms: per update ``‖ΔW‖_F`` (one per edit for ROME, one for EMMET).
        histories: per edit the v* loss at each step; ``final_nll`` its last NLL.
        timings: seconds for the context templates, the covariance, keys, values, updates.
    """

    method: str
    layer: int
    n_edits: int
    key_norms: list[float] = field(default_factory=list)
    value_norms: list[float] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    delta_norms: list[float] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    histories: list[list[float]] = field(default_factory=list)
    final_nll: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def summary(self) -> dict[str, Any]:
        """The protocol's summary fields for the fit: converged when every edit's v* loss fell
        below the early stop, the mean final loss, the steps taken, the mean loss per step."""
        n = max((len(h) for h in self.histories), default=0)
        mean = [sum(h[min(i, len(h) - 1)] for h in self.histories) / len(self.histories) for i in range(n)]
        done = bool(self.histories) and all(h[-1] < EARLY_STOP for h in self.histories)
        return summary(mean, done, sum(len(h) for h in self.histories), edits=self.n_edits)

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Each edit's v* loss per optimisation step. Returns the Axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.subplots(figsize=(5, 3))[1]
        for i, hist in enumerate(self.histories):
            ax.plot(range(len(hist)), hist, label=f"edit {i}" if len(self.histories) <= 10 else None)
        ax.set(xlabel="step", ylabel="v* loss", title=f"{self.method}, layer {self.layer}")
        if log:
            ax.set_yscale("log")
        if 0 < len(self.histories) <= 10:
            ax.legend(fontsize=7)
        return ax

    def __repr__(self) -> str:
        upd = max(self.update_norms) if self.update_norms else float("nan")
        nll = sum(self.final_nll) / len(self.final_nll) if self.final_nll else float("nan")
        return (f"RankOneResult({self.method}, layer={self.layer}, {self.n_edits} edit(s), max ‖ΔW‖ {upd:.4g}, "
                f"mean final NLL {nll:.4g}, {sum(self.timings.values()):.2f} s)")


def _need_subject(edit: EditRequest, i: int) -> EditRequest:
    if not edit.subject:
        raise ValueError(f"edit {i} ({edit.prompt!r} -> {edit.target_new!r}) has no subject: ROME-style editors "
                         f"read the key at the subject's last token; give 'subject'")
    return edit


def rome_update(h: Handles, layer: int, edit: EditRequest, groups: Sequence[Sequence[str]],
                C: Tensor | None, hp: dict[str, Any], *, averaged: bool,
                callback: Callable[[int, float], Any] | None = None) -> tuple[Float[Tensor, "d_model d_mlp"], dict]:
    """One edit's rank-one ΔW at ``layer`` (float64, ``[d_model, d_mlp]``) on the model
    as it is, and what went into it. ``averaged``: R-ROME's key and output (k̄, ō) in
    the denominator and residual; else ROME's (k_p, o_p)."""
    prefixes = [p for g in groups for p in g]
    tok = h.require_tokenizer()
    t0 = time.perf_counter()
    subject = subject_of(edit)
    K, O = site_io(h, layer, [locate(tok, p + edit.prompt, subject, len(p)) for p in prefixes])
    t_keys = time.perf_counter() - t0
    vf = optimise_value(h, layer, edit, prefixes, callback=callback, **_value_settings(hp))
    return _rank_one_of(K, O, vf, C, averaged, t_keys)


def rome_updates(h: Handles, layer: int, edits: Sequence[EditRequest], groups: Sequence[Sequence[str]],
                 C: Tensor | None, hp: dict[str, Any], *,
                 averaged: bool) -> list[tuple[Float[Tensor, "d_model d_mlp"], dict]]:
    """:func:`rome_update` for each edit alone on the model as it is (none sees another's
    update), the edits' keys and v* computed together
    (:func:`~gradlocate.editors.values.optimise_values`); equal to one call per edit up to
    floating-point reduction order."""
    prefixes = [p for g in groups for p in g]
    t0 = time.perf_counter()
    keys = edit_keys(h, layer, edits, prefixes)
    t_keys = (time.perf_counter() - t0) / max(1, len(edits))
    fits = optimise_values(h, layer, edits, prefixes, **_value_settings(hp))
    return [_rank_one_of(K, O, vf, C, averaged, t_keys) for (K, O), vf in zip(keys, fits)]


def _value_settings(hp: dict[str, Any]) -> dict[str, Any]:
    """The v* optimisation's settings from an editor's hyper-parameters."""
    return dict(steps=hp["v_num_grad_steps"], lr=hp["v_lr"], kl_factor=hp["kl_factor"],
                weight_decay=hp["v_weight_decay"], clamp_norm_factor=hp["clamp_norm_factor"])


def _rank_one_of(K: Tensor, O: Tensor, vf: ValueFit, C: Tensor | None, averaged: bool,
                 t_keys: float) -> tuple[Float[Tensor, "d_model d_mlp"], dict]:
    """The rank-one ΔW from an edit's keys and outputs over the templates (row 0: the bare
    prompt) and its v*, and what went into it."""
    t1 = time.perf_counter()
    k_bar, v_star = K.mean(0), vf.v_star
    # The one-line difference: ROME divides by k_pᵀu and subtracts o_p; R-ROME uses k̄ and ō.
    k_den, o_ref = (k_bar, O.mean(0)) if averaged else (K[0], O[0])
    residual = v_star - o_ref
    dW = rank_one(C, k_bar, k_den, residual)
    info = {"key_norm": float(k_bar.norm()), "value_norm": float(v_star.norm()), "residual_norm": float(residual.norm()),
            "delta_norm": float(vf.delta.norm()), "update_norm": float(dW.norm()), "history": vf.history,
            "final_nll": vf.nll[-1], "t_keys": t_keys, "t_value": vf.seconds, "t_update": time.perf_counter() - t1,
            "k_bar": k_bar, "k_prompt": K[0], "o_bar": O.mean(0), "o_prompt": O[0], "v_star": v_star}
    return dW, info


class _RankOneEditor(InPlaceEdit):
    """The LocFT-BF editor interface around a closed-form update (see :class:`ROME`)."""

    method = "ROME"
    settings_class: type[ROMESettings] = ROMESettings

    h: Handles
    layer: int
    handle: Handle
    settings: ROMESettings
    hp: dict[str, Any]
    seed: int
    _C: Float[Tensor, "d_mlp d_mlp"] | None
    progress: bool | None
    callback: Callable[[TrainStep], Any] | None
    undo: Undo

    def __init__(self, model: Any, layer: SupportsIndex, settings: ROMESettings | None = None, *,
                 tokenizer: Any = None, covariance: Tensor | None = None, progress: bool | None = None,
                 callback: Callable[[TrainStep], Any] | None = None, **overrides: Any):
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"{self.method} edits one layer: give an int, got {layer!r}")
        cls = self.settings_class
        if settings is not None and type(settings) is not cls:
            raise TypeError(f"{self.method} takes {cls.__name__}, got {type(settings).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step: TrainStep), got {callback!r}")
        self.settings = (settings or cls()).replace(**overrides)  # checked: SettingsError names a bad one
        # a dict view for the functions that take one (rank_one / rome_update)
        self.hp = {k: getattr(self.settings, k) for k in self.settings.to_dict()}
        self.h = resolve(model, tokenizer)
        self.layer = self.h.layer_indices(int(layer))[0]
        self.handle: Handle = self.h[self.layer]
        if covariance is not None and tuple(covariance.shape) != (self.h.d_mlp, self.h.d_mlp):
            raise ValueError(f"covariance must be [d_mlp, d_mlp] = [{self.h.d_mlp}, {self.h.d_mlp}], "
                             f"got {tuple(covariance.shape)}")
        self.seed, self._C = self.settings.seed, covariance
        self.progress, self.callback = progress, callback
        self.undo = Undo(self.handle.parameter)

    # -- ingredients
    def covariance(self) -> Float[Tensor, "d_mlp d_mlp"] | None:
        """C of the site's inputs (``None`` with ``mom2_adjustment=False``: C = I)."""
        if not self.hp["mom2_adjustment"]:
            return None
        if self._C is None:
            self._C = second_moment(self.h, self.layer, tokens=self.settings.mom2_n_tokens,
                                    corpus=self.settings.mom2_corpus, seed=self.settings.mom2_seed,
                                    stats=self.settings.mom2_stats, progress=self.progress)
        return self._C

    def templates(self) -> list[list[str]]:
        """The context templates (prefixes in groups), sampled from the model, seeded."""
        return context_templates(self.h, self.settings.context_template_length_params, self.seed)

    def _apply(self, dW: Tensor) -> None:
        p = self.handle.parameter
        with torch.no_grad():
            p.add_(self.handle.canonical(dW).to(device=p.device, dtype=p.dtype))

    # -- editing
    def fit(self, edits: Any) -> RankOneResult:
        """Edit ``edits`` (each needs a ``subject`` in its prompt) in place. An exception,
        ``KeyboardInterrupt`` or a non-finite loss/weight restores the weight as it was
        when ``fit`` began (the loss: :class:`~gradlocate.editors.locft.EditTrainingError`)."""
        require_gradients(f"{self.method}.fit")
        edits = [_need_subject(e, i) for i, e in enumerate(as_edits(edits))]
        result = RankOneResult(self.method, self.layer, len(edits))
        start = Undo(self.handle.parameter)
        try:
            t0 = time.perf_counter()
            groups = self.templates()
            t1 = time.perf_counter()
            C = self.covariance()
            result.timings.update(templates=t1 - t0, covariance=time.perf_counter() - t1)
            self._fit(edits, groups, C, result)
            if not bool(torch.isfinite(self.handle.parameter).all()):
                raise FloatingPointError(f"{self.method}: the edited weight of layer {self.layer} is non-finite "
                                         f"(NaN/inf); the weight was restored")
        except BaseException:
            start.restore()
            raise
        return result

    def _fit(self, edits: Sequence[EditRequest], groups: list[list[str]], C: Tensor | None,
             result: RankOneResult) -> None:
        """Sequential, one edit after another: each edit's keys and v* are computed on the
        model as the previous updates left it, so they cannot be batched (each edit alone
        on the unedited model, :func:`rome_per_edit`, batches them)."""
        from tqdm.auto import tqdm

        bar = tqdm(edits, desc=f"{self.method} layer {self.layer}", leave=False,
                   disable=None if self.progress is None else not self.progress)
        for i, edit in enumerate(bar):
            dW, info = rome_update(self.h, self.layer, edit, groups, C, self.hp, averaged=self.method == "R-ROME",
                                   callback=_stepper(self.callback, i))
            self._apply(dW)
            _record(result, info)
            bar.set_postfix(nll=f"{info['final_nll']:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method.lower(), "layer": self.layer, "path": self.handle.path,
                **self.settings.to_dict()}

    def __repr__(self) -> str:
        state = "committed" if self.undo.committed else ("edited" if self.edited else "unedited")
        return f"{type(self).__name__}(layer={self.layer}, path={self.handle.path!r}, {state})"


def _stepper(callback: Callable[[TrainStep], Any] | None, edit: int) -> Callable[[int, float], Any] | None:
    """The v* loop's ``(step, loss)`` as the protocol's :class:`TrainStep` of edit ``edit``."""
    if callback is None:
        return None
    return lambda step, loss: callback(TrainStep(step, loss, edit=edit))


def _record(result: RankOneResult, info: dict[str, Any]) -> None:
    result.key_norms.append(info["key_norm"])
    result.value_norms.append(info["value_norm"])
    result.residual_norms.append(info["residual_norm"])
    result.delta_norms.append(info["delta_norm"])
    result.update_norms.append(info["update_norm"])
    result.histories.append(list(info["history"]))
    result.final_nll.append(info["final_nll"])
    for k in ("keys", "value", "update"):
        result.timings[k] = result.timings.get(k, 0.0) + info[f"t_{k}"]


class ROME(_RankOneEditor):
    """ROME: one rank-one update per edit at one layer's site (see the module docs).
    :meth:`fit` edits sequentially, each edit's v* on the model as the previous edits
    left it (so one at a time; :func:`rome_per_edit` optimises many at once).

    Args:
        model: a causal LM, an nnsight wrapper, a bridge, or :class:`~gradlocate.handles.Handles`.
        layer: the layer whose site is edited (negative counts from the end).
        settings: :class:`~gradlocate.editors.settings.ROMESettings` (default: EasyEdit's);
            ``overrides`` change single settings by name (``v_num_grad_steps``, ``v_lr``,
            ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``, ``mom2_adjustment``,
            ``mom2_n_tokens``, ``mom2_corpus``, ``mom2_seed``, ``context_template_length_params``,
            ``seed``: the context templates' seed).
        tokenizer: defaults to the one the model carries.
        covariance: a precomputed ``C`` ``[d_mlp, d_mlp]`` (else computed/cached, see
            :func:`~gradlocate.editors.covariance.second_moments`).
        progress: progress bars (``None``: on a terminal only).
        callback: called with a :class:`~gradlocate.editors.protocol.TrainStep` (step, loss,
            edit) after each v* step.
    """

    method = "ROME"


class RROME(_RankOneEditor):
    """R-ROME: ROME with the averaged key k̄ (and output ō) used consistently."""

    method = "R-ROME"


def memo_templates(ed: _RankOneEditor, memo: dict[Any, Any] | None) -> list[list[str]]:
    """``ed.templates()``, sampled once per ``memo`` (a dict kept across calls on the same,
    unedited model: the templates depend on the model, their lengths and the seed only)."""
    if memo is None:
        return ed.templates()
    key = ("context templates", id(ed.h.root), ed.settings.context_template_length_params, ed.seed)
    if key not in memo:
        memo[key] = ed.templates()
    return memo[key]


def _per_edit(cls: type[_RankOneEditor], h: Handles, layer: int, edits: Any, memo: dict[Any, Any] | None = None,
              **hparams: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    ed = cls(h, layer, **{"progress": False, **hparams})
    edits = [_need_subject(e, i) for i, e in enumerate(as_edits(edits))]
    groups, C = memo_templates(ed, memo), ed.covariance()
    out, summaries = [], []
    # each edit alone on the unedited model: independent, so their v* run together
    for dW, info in rome_updates(ed.h, ed.layer, edits, groups, C, ed.hp, averaged=cls is RROME):
        out.append(dW.float())
        # the protocol's fields: v*'s losses, converged when the last fell below the early stop
        summaries.append(summary(info["history"], info["history"][-1] < EARLY_STOP,
                                 **{k: info[k] for k in ("key_norm", "value_norm", "residual_norm", "delta_norm",
                                                         "update_norm", "final_nll")}))
    return torch.stack(out), summaries


def rome_per_edit(h: Handles, layer: int, edits: Any, memo: dict[Any, Any] | None = None,
                  **hparams: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    """Each edit's ROME ΔW alone on the unedited model: ``[edits, d_model, d_mlp]``
    (float32, canonical layout) and a summary per edit. The model is not changed.
    ``memo``: see :func:`memo_templates`."""
    return _per_edit(ROME, h, layer, edits, memo, **hparams)


def rrome_per_edit(h: Handles, layer: int, edits: Any, memo: dict[Any, Any] | None = None,
                   **hparams: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    """:func:`rome_per_edit` for R-ROME."""
    return _per_edit(RROME, h, layer, edits, memo, **hparams)


def prepare_moments(h: Handles, layers: Sequence[int], settings: ROMESettings, progress: bool | None = None) -> None:
    """The registry's ``prepare`` for the rank-one editors: C of every layer in ``layers``
    in one pass over the corpus (cached on disk, so each editor then reads its layer's)."""
    if settings.mom2_adjustment:
        second_moments(h, list(layers), tokens=settings.mom2_n_tokens, corpus=settings.mom2_corpus,
                       seed=settings.mom2_seed, stats=settings.mom2_stats, progress=progress)


def _registered(cls: type[_RankOneEditor]) -> Callable[..., tuple[Tensor, list[dict[str, Any]]]]:
    def per_edit(h: Handles, layer: int, edits: Any, settings: ROMESettings, memo: dict[Any, Any] | None = None,
                 **runtime: Any) -> tuple[Tensor, list[dict[str, Any]]]:
        return _per_edit(cls, h, layer, edits, memo, settings=settings, **runtime)
    return per_edit


SPECS = [
    EditorSpec("rome", "ROME", ROME, ROMESettings, _registered(ROME), prepare_moments, (),
               "one rank-one update per edit (Meng et al. 2022)"),
    EditorSpec("r-rome", "R-ROME", RROME, ROMESettings, _registered(RROME), prepare_moments, ("rrome",),
               "ROME with the averaged key used consistently (Gupta et al. 2024)"),
]

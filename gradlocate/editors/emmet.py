"""EMMET: several edits at one layer in one closed-form update under equality constraints.

EMMET (Gupta et al., 2024, "A Unified Framework for Model Editing"; code
``scalable-model-editing/unified-model-editing``, EasyEdit ``easyeditor/models/emmet``)
generalises ROME's equality-constrained objective to a batch: minimise the change of
the layer's outputs on general keys (weighted by C) subject to ``(W + ΔW) k_i = W k_i + r_i``
for every edit i,

    ΔW = Rᵀ (K C⁻¹ Kᵀ + λ I)⁻¹ K C⁻¹

with ``K`` the edits' keys (rows) and ``R`` their residuals. ``λ = emmet_lambda``
regularises an ill-conditioned ``K C⁻¹ Kᵀ`` (near-duplicate keys); EasyEdit also
scales C by ``mom2_update_weight`` first, which only matters through λ (without it
the update does not depend on C's scale). With one edit and ``λ = 0`` this is ROME's
rank-one update with key k̄ and residual r (R-ROME's, when the bare prompt's key is
the templates' mean).

As EasyEdit computes it: each edit's key is the mean over template *groups* of each
group's mean key (MEMIT's ``compute_ks``; templates: the bare prompt and 5 sampled
prefixes of 10 tokens), and its residual is ``r_i = v*_i − o_p,i`` (the optimised
value minus the bare prompt's output: δ_i). Unlike EasyEdit, δ is optimised at the
site's output rather than the block's: the same for GPT-2/LLaMA blocks (the MLP
output is added to the residual stream); for Gemma's post-feed-forward norm only the
site's form makes ``ΔW k = δ`` the change the optimisation found. The solve is
well-posed at these sizes (a handful of edits, ``d_mlp`` ≥ 64): the constrained form is
used, not MEMIT's least squares.

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> edits = [{"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"},
    ...          {"prompt": "Rome is in", "subject": "Rome", "target_new": "Spain"}]
    >>> with EMMET(model, 1, v_num_grad_steps=2, context_template_length_params=[(4, 5)],
    ...            mom2_n_tokens=512, progress=False) as ed:
    ...     r = ed.fit(edits)
    ...     len(r.update_norms), r.n_edits
    (1, 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradlocate.data import EditRequest, as_edits
from gradlocate.editors.protocol import EditorSpec, TrainStep, summary
from gradlocate.editors.rank_one import EARLY_STOP, ValueFit, emmet_update, locate, optimise_value, site_io, subject_of
from gradlocate.editors.rome import (RankOneResult, _need_subject, _RankOneEditor, _value_settings, memo_templates,
                                     prepare_moments)
from gradlocate.editors.settings import EMMETSettings
from gradlocate.editors.values import edit_keys, optimise_values
from gradlocate.handles import Handles

__all__ = ["EMMET", "EMMET_HPARAMS", "emmet_per_edit", "emmet_ingredients"]

#: EMMET's hyper-parameters (a dict view of :class:`~gradlocate.editors.settings.EMMETSettings`'
#: defaults): EasyEdit's ``hparams/EMMET/llama3.2-3b.yaml`` (the smallest LLaMA-family file;
#: its ``layers``/``v_loss_layer`` are model specific) except ``mom2_update_weight``: 1, as
#: ``hparams/EMMET/gpt2-xl.yaml``. The LLaMA files' 100,000 with ``emmet_lambda`` 0.1 shrinks
#: each edit to ``d / (d + 0.1)`` of its residual with ``d = kᵀC⁻¹k / 100,000``: on
#: SmolLM2-135M (layer 12, kᵀC⁻¹k ≈ 1,200-2,700) to 11-21 %, so no edit is written (rewrite
#: 0.0 on 4 CounterFact edits). Context templates of ``emmet_main.get_context_templates``: ``[(10, 5)]``.
EMMET_HPARAMS: dict[str, Any] = {k: getattr(EMMETSettings(), k) for k in EMMETSettings().to_dict()
                                 if k not in ("seed", "mom2_corpus", "mom2_seed", "mom2_stats")}


def emmet_ingredients(h: Handles, layer: int, edit: EditRequest, groups: Sequence[Sequence[str]],
                      hp: dict[str, Any], callback: Callable[[int, float], Any] | None = None) -> dict[str, Any]:
    """One edit's key (mean of the template groups' mean keys), v* and residual
    ``r = v* − o_p``, computed on the model as it is."""
    tok, prefixes = h.require_tokenizer(), [p for g in groups for p in g]
    subject = subject_of(edit)
    t0 = time.perf_counter()
    K, O = site_io(h, layer, [locate(tok, p + edit.prompt, subject, len(p)) for p in prefixes])
    t_keys = time.perf_counter() - t0
    vf = optimise_value(h, layer, edit, prefixes, callback=callback, **_value_settings(hp))
    return _ingredients(K, O, [len(g) for g in groups], vf, t_keys)


def emmet_ingredients_batch(h: Handles, layer: int, edits: Sequence[EditRequest], groups: Sequence[Sequence[str]],
                            hp: dict[str, Any], callback: Callable[[TrainStep], Any] | None = None,
                            progress: bool | None = False) -> list[dict[str, Any]]:
    """:func:`emmet_ingredients` of each edit on the model as it is, the edits' keys and
    v* computed together (:func:`~gradlocate.editors.values.optimise_values`; equal to one
    call per edit up to floating-point reduction order). ``callback`` gets a
    :class:`~gradlocate.editors.protocol.TrainStep` (its ``edit`` set) after each edit's step."""
    prefixes = [p for g in groups for p in g]
    t0 = time.perf_counter()
    keys = edit_keys(h, layer, edits, prefixes)
    t_keys = (time.perf_counter() - t0) / max(1, len(edits))
    cb = None if callback is None else (lambda i, it, loss: callback(TrainStep(it, loss, edit=i)))
    fits = optimise_values(h, layer, edits, prefixes, callback=cb, progress=progress, **_value_settings(hp))
    return [_ingredients(K, O, [len(g) for g in groups], vf, t_keys) for (K, O), vf in zip(keys, fits)]


def _ingredients(K: Tensor, O: Tensor, sizes: list[int], vf: ValueFit, t_keys: float) -> dict[str, Any]:
    key = torch.stack([k.mean(0) for k in K.split(sizes)]).mean(0)
    residual = vf.v_star - O[0]
    return {"key": key, "residual": residual, "key_norm": float(key.norm()), "value_norm": float(vf.v_star.norm()),
            "residual_norm": float(residual.norm()), "delta_norm": float(vf.delta.norm()), "history": vf.history,
            "final_nll": vf.nll[-1], "t_keys": t_keys, "t_value": vf.seconds}


class EMMET(_RankOneEditor):
    """EMMET: all edits at one layer in one batched update (see the module docs).

    Arguments as :class:`~gradlocate.editors.rome.ROME`; hyper-parameters
    :data:`EMMET_HPARAMS` (adds ``emmet_lambda`` and ``update_norm_lambda``).
    """

    method = "EMMET"
    settings_class = EMMETSettings

    def _fit(self, edits: Sequence[EditRequest], groups: list[list[str]], C: Tensor | None,
             result: RankOneResult) -> None:
        # every v* on the unedited model (the update comes after): they run together
        got = emmet_ingredients_batch(self.h, self.layer, edits, groups, self.hp, self.callback, self.progress)
        t0 = time.perf_counter()
        dW = self.update(C, torch.stack([g["key"] for g in got]), torch.stack([g["residual"] for g in got]))
        self._apply(dW)
        for g in got:
            for name in ("key_norm", "value_norm", "residual_norm", "delta_norm"):
                getattr(result, name + "s").append(g[name])
            result.histories.append(list(g["history"]))
            result.final_nll.append(g["final_nll"])
        result.update_norms.append(float(dW.norm()))
        result.timings.update(keys=sum(g["t_keys"] for g in got), value=sum(g["t_value"] for g in got),
                              update=time.perf_counter() - t0)

    def update(self, C: Tensor | None, keys: Tensor, residuals: Tensor) -> Tensor:
        """:func:`~gradlocate.editors.rank_one.emmet_update` with this editor's λs."""
        return emmet_update(C, keys, residuals, mom2_update_weight=self.hp["mom2_update_weight"],
                            emmet_lambda=self.hp["emmet_lambda"], update_norm_lambda=self.hp["update_norm_lambda"])


def emmet_per_edit(h: Handles, layer: int, edits: Any, memo: dict[Any, Any] | None = None,
                   **hparams: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    """Each edit's EMMET ΔW alone (a batch of one) on the unedited model:
    ``[edits, d_model, d_mlp]`` (float32, canonical layout). The model is not changed.
    ``memo``: see :func:`~gradlocate.editors.rome.memo_templates`."""
    ed = EMMET(h, layer, **{"progress": False, **hparams})
    edits = [_need_subject(e, i) for i, e in enumerate(as_edits(edits))]
    groups, C = memo_templates(ed, memo), ed.covariance()
    out, summaries = [], []
    for g in emmet_ingredients_batch(ed.h, ed.layer, edits, groups, ed.hp):
        dW = ed.update(C, g["key"][None], g["residual"][None])
        out.append(dW.float())
        summaries.append(summary(g["history"], g["history"][-1] < EARLY_STOP, update_norm=float(dW.norm()),
                                 **{k: g[k] for k in ("key_norm", "value_norm", "residual_norm", "delta_norm",
                                                      "final_nll")}))
    return torch.stack(out), summaries


def _per_edit(h: Handles, layer: int, edits: Any, settings: EMMETSettings, memo: dict[Any, Any] | None = None,
              **runtime: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    return emmet_per_edit(h, layer, edits, memo, settings=settings, **runtime)


SPECS = [EditorSpec("emmet", "EMMET", EMMET, EMMETSettings, _per_edit, prepare_moments, (),
                    "all edits at one layer in one closed-form update (Gupta et al. 2024)")]

"""Shared helpers of the robustness suite: a model's full state (weights bit for bit,
requires_grad flags, train/eval modes, hooks, instance forwards) and its comparison.

Written independently of gradlocate's internals: plain torch attributes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

import gradlocate as gl
from gradlocate.golden.compare import compare
from gradlocate.handles import unwrap_model
from gradlocate.golden.sweep import sweep
from gradlocate.selectors import cma_layer
from gradlocate.trace import causal_trace

# Every per-module hook dictionary torch keeps.
HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
# Module-level registries of global hooks.
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
# Instance attributes that wrappers (nnsight, accelerate) install on modules.
INSTANCE_ATTRS = ("forward", "__nnsight__", "_hf_hook", "_old_forward")


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (so NaN == NaN and -0.0 != 0.0)."""
    t = t.detach()
    if t.is_meta:  # shapes only
        return t
    if t.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(ints).clone()
    return t.clone()


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    return same and (a.is_meta or torch.equal(as_bits(a), as_bits(b)))


def model_state(model: Any) -> dict[str, Any]:
    """Everything a gradlocate function could leave changed on ``model``."""
    root = unwrap_model(model)
    params = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        params[n] = {
            "bits": as_bits(p), "requires_grad": p.requires_grad, "id": id(p),
            "grad": None if p.grad is None else as_bits(p.grad),
            "tensor_hooks": dict(getattr(p, "_backward_hooks", None) or {}),
            "post_acc_hooks": dict(getattr(p, "_post_accumulate_grad_hooks", None) or {}),
        }
    mods = {}
    for n, m in root.named_modules(remove_duplicate=False):
        mods[n] = {
            "training": m.training,
            "hooks": {h: dict(getattr(m, h, {}) or {}) for h in HOOK_DICTS},
            "attrs": {a: m.__dict__[a] for a in INSTANCE_ATTRS if a in m.__dict__},
            "n_children": len(m._modules), "param_ids": {k: id(v) for k, v in m._parameters.items()},
        }
    return {
        "params": params,
        "buffers": {n: as_bits(b) for n, b in root.named_buffers(remove_duplicate=False)},
        "modules": mods,
        "global_hooks": {g: dict(getattr(torch_module, g, {}) or {}) for g in GLOBAL_HOOKS},
        "grad_enabled": torch.is_grad_enabled(),
    }


def state_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`model_state` snapshots (empty if none)."""
    out = []
    if before["grad_enabled"] != after["grad_enabled"]:
        out.append("torch.is_grad_enabled() changed")
    for g in GLOBAL_HOOKS:
        if before["global_hooks"][g].keys() != after["global_hooks"][g].keys():
            out.append(f"global hooks {g} changed")
    if before["params"].keys() != after["params"].keys():
        out.append("parameter names changed")
    for n, b in before["params"].items():
        a = after["params"].get(n)
        if a is None:
            continue
        if not bitwise_equal(b["bits"], a["bits"]):
            out.append(f"weight {n} changed")
        if b["requires_grad"] != a["requires_grad"]:
            out.append(f"requires_grad of {n} changed")
        if b["id"] != a["id"]:
            out.append(f"parameter object {n} replaced")
        if (b["grad"] is None) != (a["grad"] is None) or (b["grad"] is not None and not bitwise_equal(b["grad"], a["grad"])):
            out.append(f".grad of {n} changed")
        if b["tensor_hooks"].keys() != a["tensor_hooks"].keys() or b["post_acc_hooks"].keys() != a["post_acc_hooks"].keys():
            out.append(f"tensor hooks of {n} changed")
    if before["buffers"].keys() != after["buffers"].keys():
        out.append("buffer names changed")
    for n, b in before["buffers"].items():
        if n in after["buffers"] and not bitwise_equal(b, after["buffers"][n]):
            out.append(f"buffer {n} changed")
    if before["modules"].keys() != after["modules"].keys():
        out.append("module tree changed")
    for n, b in before["modules"].items():
        a = after["modules"].get(n)
        if a is None:
            continue
        if b["training"] != a["training"]:
            out.append(f"train/eval mode of {n or 'root'} changed")
        for h in HOOK_DICTS:
            if b["hooks"][h].keys() != a["hooks"][h].keys() or any(
                    b["hooks"][h][k] is not a["hooks"][h][k] for k in b["hooks"][h]):
                out.append(f"{h} of {n or 'root'} changed")
        if b["attrs"].keys() != a["attrs"].keys() or any(b["attrs"][k] is not a["attrs"][k] for k in b["attrs"]):
            out.append(f"instance attributes {sorted(set(b['attrs']) ^ set(a['attrs'])) or sorted(b['attrs'])} "
                       f"of {n or 'root'} changed")
        if b["param_ids"] != a["param_ids"]:
            out.append(f"parameters of {n or 'root'} replaced")
    return out


def assert_same_state(before: dict[str, Any], model: Any) -> None:
    diff = state_diff(before, model_state(model))
    assert not diff, "model state changed: " + "; ".join(diff[:10])


def no_instrumentation(model: Any) -> bool:
    """No nnsight forward or state left on any module."""
    root = unwrap_model(model)
    return not any("__nnsight__" in m.__dict__ for m in root.modules()) and not any(
        type(m.__dict__.get("forward")).__module__.startswith("nnsight") for m in root.modules())


def n_hooks(model: nn.Module) -> int:
    """Number of forward / backward hooks of every kind registered on ``model``."""
    return sum(len(getattr(m, h, {}) or {}) for m in model.modules()
               for h in HOOK_DICTS[:7])


def numbers(result: Any) -> list[float]:
    """The numbers a result reports, flattened, to compare two runs."""
    from gradlocate.golden.compare import Comparison
    from gradlocate.evaluation import EditEvaluation
    from gradlocate.gradients import LayerGradients
    from gradlocate.results import LayerScores
    from gradlocate.golden.sweep import SweepResult
    from gradlocate.trace.result import TraceResult

    if isinstance(result, LayerGradients):
        return [*result.sq_norms, result.loss]
    if isinstance(result, LayerScores):
        return [float(result.selected), *result.scores]
    if isinstance(result, TraceResult):
        return [*result.scores.flatten().tolist(), result.low_score, result.high_score]
    if isinstance(result, gl.FitResult):
        return list(result.history)
    if isinstance(result, EditEvaluation):
        return [v for d in (result.teacher_forced, result.generation or {}) for v in d.values() if v is not None]
    if isinstance(result, SweepResult):
        return [v for v in result.overall if v is not None] + [r.train["final_loss"] for r in result.records
                                                                 if not r.error]
    if isinstance(result, Comparison):
        return ([float(r.layer) for r in result.rows if r.layer is not None] + numbers(result.sweep)
                + [x for sel in result.selections.values() for x in numbers(sel)])
    return []


# --------------------------------------------------------------------------- the public entry points

EDITS = [
    {"prompt": "Paris is the capital of", "target_new": "Italy", "ground_truth": "France", "subject": "Paris",
     "rephrase_prompt": "The city of Paris is the capital of", "locality_prompt": "Berlin is in",
     "locality_ground_truth": "Germany"},
    {"prompt": "The Nile flows through", "target_new": "Peru", "ground_truth": "Egypt", "subject": "The Nile",
     "rephrase_prompt": "The river Nile runs through", "locality_prompt": "Rome is in",
     "locality_ground_truth": "Italy"},
    {"prompt": "Mozart was born in", "target_new": "Oslo", "ground_truth": "Salzburg", "subject": "Mozart",
     "locality_prompt": "Water is", "locality_ground_truth": "wet"},
    {"prompt": "Tokyo is located in", "target_new": "Chile", "ground_truth": "Japan", "subject": "Tokyo",
     "locality_prompt": "Snow is", "locality_ground_truth": "cold"},
]
TEXTS = ["The sky was grey all morning, and then it rained.", "A short text about trains and stations.",
         "Bread is baked from flour, water and yeast."]
TRAINER = {"epochs": 2, "lr": 1e-2, "edits_per_step": 2}


def call(name: str, model: Any, *, tokenizer: Any = None, edits: Any = None, texts: Any = None,
         layers: Any = None, via: Callable[[Any], Any] = lambda fn: fn, **kw: Any) -> Any:
    """Run public function ``name`` with small, fast settings; ``via=unchecked`` (the
    fixture) runs it without the test-time type checker, for a wrongly typed argument."""
    edits = EDITS if edits is None else edits
    texts = TEXTS if texts is None else texts
    lay = {} if layers is None else {"layers": layers}
    if name == "down_projections":
        return via(gl.down_projections)(model)
    if name == "edit_gradients":
        return via(gl.edit_gradients)(model, edits, tokenizer=tokenizer, **lay, **kw)
    if name == "retain_gradients":
        return via(gl.retain_gradients)(model, texts, tokenizer=tokenizer, **lay, **kw)
    if name == "gradratio":
        return via(gl.gradratio)(model, edits, texts, tokenizer=tokenizer, min_layer=0, **lay, **kw)
    if name == "lga":
        return via(gl.lga)(model, edits, tokenizer=tokenizer, **lay, **kw)
    if name == "causal_trace":
        e = gl.data.as_edits(edits)[0]
        return via(causal_trace)(model, e.prompt, e.subject, tokenizer=tokenizer, samples=2, window=2,
                                 progress=False, **lay, **kw)
    if name == "cma_layer":
        return via(cma_layer)(model, edits, tokenizer=tokenizer, samples=2, window=2, progress=False, **lay, **kw)
    if name == "LocFTBF.fit":
        layer = -1 if layers is None else layers
        with via(gl.LocFTBF)(model, layer, tokenizer=tokenizer, progress=False, **{**TRAINER, **kw}) as ft:
            return ft.fit(edits)
    if name == "evaluate":
        return via(gl.evaluate)(model, edits, tokenizer=tokenizer, max_new_tokens=3, **kw)
    if name == "sweep":
        return via(sweep)(model, edits, tokenizer=tokenizer, layers=layers if layers is not None else [0, 2],
                          trainer=dict(TRAINER, **kw.pop("trainer", {})), generation=False, progress=False, **kw)
    if name == "compare":
        return via(compare)(model, edits, texts, tokenizer=tokenizer, proxy=0.5,
                            layers=layers if layers is not None else [0, 2], trainer=dict(TRAINER, **kw.pop("trainer", {})),
                            generation=False, progress=False,
                            selector_kwargs={"gradratio": {"min_layer": 0}, "cma": {"samples": 2, "window": 2}}, **kw)
    raise KeyError(name)


#: Every public entry point that runs the model.
COMPUTING = ("edit_gradients", "retain_gradients", "gradratio", "lga", "causal_trace", "cma_layer",
             "LocFTBF.fit", "evaluate", "sweep", "compare")
#: Those that take edits.
TAKES_EDITS = ("edit_gradients", "gradratio", "lga", "cma_layer", "LocFTBF.fit", "evaluate", "sweep", "compare")
#: Those that take a ``layers`` selection (LocFTBF: its one layer).
TAKES_LAYERS = ("edit_gradients", "retain_gradients", "gradratio", "lga", "causal_trace", "cma_layer",
                "LocFTBF.fit", "sweep", "compare")

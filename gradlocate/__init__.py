"""gradlocate: which layer should I edit? Find it, then edit it.

The public surface: the verbs, their result types and the errors, in the order data
flows (model → handles → signals → scores → layer → edit → evaluation → study):

* the model, resolved once: :func:`down_projections` -> :class:`Handles`
* edits: :func:`load_edits`, :func:`default_retain_texts`
* signals: :func:`edit_gradients`, :func:`retain_gradients` -> :class:`LayerGradients`
* selectors, each -> :class:`LayerScores`: :func:`gradratio`, :func:`lga`, :func:`cma_layer`;
  gradlocate's own, :func:`search` -> :class:`Search` (a budgeted search over the layers that
  edits with the editor it will edit with)
* causal tracing: :func:`causal_trace` -> :class:`TraceResult`
* editors (in place, exact undo; one registry, :mod:`gradlocate.editors`, with a typed
  settings class each): :class:`LocFTBF` -> :class:`FitResult`; :class:`ROME`, :class:`RROME`,
  :class:`EMMET` -> :class:`RankOneResult`; evaluation: :func:`evaluate` -> :class:`EditEvaluation`
* the golden-layer study, kept in a study folder every verb reads and writes:
  :func:`matrix` -> :class:`Matrix` (every edit alone at every layer), :func:`sweep` ->
  :class:`SweepResult` (all edits together), :func:`compare` -> :class:`Comparison`,
  :func:`study` -> :class:`Study` (``Study.load(folder)``), :func:`report` (study folders
  judged and written up)
* errors: :class:`HandleError`, :class:`ModelBusyError`, :class:`EditTrainingError`,
  :class:`NonFiniteLossError`, :class:`StoreError`
* models: :mod:`gradlocate.models` (``smollm2()``, ``gemma3_270m()``, ``tiny()``, ``load_model()``)

The plumbing (tokenization, losses, ghost inner products, Tukey fences, the record store,
the interventions kernel, ...) is imported from its module, e.g.
``from gradlocate.interventions import using, capture, run``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from gradlocate import models
from gradlocate.handles import HandleError, Handles, down_projections
from gradlocate.interventions import ModelBusyError
from gradlocate.data import default_retain_texts, load_edits
from gradlocate.losses import NonFiniteLossError
from gradlocate.results import LayerScores
from gradlocate.gradients import LayerGradients, edit_gradients, retain_gradients
from gradlocate.selectors import cma_layer, gradratio, lga
from gradlocate.trace import causal_trace
from gradlocate.trace.result import TraceResult
from gradlocate.editors.locft import EditTrainingError, FitResult, LocFTBF
from gradlocate.editors.rome import ROME, RROME, RankOneResult
from gradlocate.editors.emmet import EMMET
from gradlocate.evaluation import EditEvaluation, evaluate
from gradlocate.golden.store import StoreError
from gradlocate.golden.matrix import Matrix, matrix
from gradlocate.golden.sweep import SweepResult, sweep
from gradlocate.golden.compare import Comparison, compare
from gradlocate.golden.study import Study, study
from gradlocate.golden.report import report
from gradlocate.golden.search import Search, search

#: The one version number: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``).
__version__ = "0.4.0"

__all__ = [
    "models",
    "down_projections", "Handles",
    "load_edits", "default_retain_texts",
    "edit_gradients", "retain_gradients", "LayerGradients",
    "gradratio", "lga", "cma_layer", "LayerScores",
    "causal_trace", "TraceResult",
    "LocFTBF", "FitResult", "ROME", "RROME", "EMMET", "RankOneResult", "evaluate", "EditEvaluation",
    "matrix", "Matrix", "sweep", "SweepResult", "compare", "Comparison", "study", "Study", "report",
    "search", "Search",
    "HandleError", "ModelBusyError", "EditTrainingError", "NonFiniteLossError", "StoreError",
]

#: Names that were public before 0.3 and are plumbing now: still reachable, with a warning
#: naming the module to import them from.
_MOVED = {
    "Handle": "handles", "resolve": "handles", "unwrap_model": "handles", "find_tokenizer": "handles",
    "instrumented": "interventions", "EditRequest": "data", "Edits": "data", "as_edits": "data",
    "load_texts": "data", "shared_data_path": "data", "TokenBatch": "losses", "edit_nll": "losses",
    "lm_loss": "losses", "per_sample_nll": "losses", "tokenize_edits": "losses", "tokenize_texts": "losses",
    "edit_loss": "gradients", "SampleProducts": "gradients", "ghost_inner_products": "gradients",
    "per_sample_inner_products": "gradients", "greedy_answers": "selectors", "adaptive_min_layer": "selectors",
    "tukey_fences": "selectors", "TukeyFences": "selectors", "embedding_std": "trace.core",
    "subject_token_range": "trace.core", "LocalityReference": "evaluation", "locality_reference": "evaluation",
    "LayerRecord": "golden.sweep", "SelectorRow": "golden.compare",
    "split_edits": "golden.compare", "StudyRow": "golden.study", "check_materialized": "state",
}
#: Old names of public types.
_RENAMED = {"DownProjection": ("handles", "Handle"), "DownProjections": ("handles", "Handles")}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        new = name
    elif name in _RENAMED:
        module, new = _RENAMED[name]
    else:
        raise AttributeError(f"module 'gradlocate' has no attribute {name!r}")
    warnings.warn(f"gradlocate.{name} is deprecated: use gradlocate.{module}.{new}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(f"gradlocate.{module}"), new)

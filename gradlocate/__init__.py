"""gradlocate: which layer should I edit? Find it, then edit it.

The public API, re-exported here, in the order data flows through it:

* the model, resolved once: :func:`down_projections` -> :class:`Handles` (one :class:`Handle`
  per layer's editing site), :func:`resolve`, :func:`unwrap_model`, :func:`find_tokenizer`
* interventions, the one place the model is intercepted: :mod:`gradlocate.interventions`
* data: :class:`EditRequest`, :class:`Edits`, :func:`as_edits`, :func:`load_edits`, :func:`load_texts`
* losses: :func:`tokenize_edits`, :func:`tokenize_texts`, :func:`edit_nll`, :func:`edit_loss`, :func:`lm_loss`
* gradients: :func:`edit_gradients`, :func:`retain_gradients`, :func:`per_sample_inner_products`,
  :func:`ghost_inner_products`
* selectors (each returns :class:`LayerScores`): :func:`gradratio`, :func:`lga`, :func:`cma_layer`;
  :func:`tukey_fences`, :func:`adaptive_min_layer`
* causal tracing: :func:`causal_trace` -> :class:`TraceResult`
* editing and evaluation: :class:`LocFTBF` -> :class:`FitResult`, :func:`evaluate` -> :class:`EditEvaluation`
* ground truth: :func:`sweep` -> :class:`SweepResult`, :func:`compare` -> :class:`Comparison`;
  every edit alone at every layer: :func:`matrix` -> :class:`Matrix`; the whole
  golden-layer study: :func:`study` -> :class:`Study`
* models: :mod:`gradlocate.models` (``smollm2()``, ``gemma3_270m()``, ``tiny()``, ``load_model()``)
"""
from gradlocate import models
from gradlocate.handles import (
    DownProjection,
    DownProjections,
    Handle,
    HandleError,
    Handles,
    down_projections,
    find_tokenizer,
    resolve,
    unwrap_model,
)
from gradlocate.interventions import ModelBusyError, instrumented
from gradlocate.data import EditRequest, Edits, as_edits, default_retain_texts, load_edits, load_texts, shared_data_path
from gradlocate.losses import (
    NonFiniteLossError,
    TokenBatch,
    edit_nll,
    lm_loss,
    per_sample_nll,
    tokenize_edits,
    tokenize_texts,
)
from gradlocate.results import LayerScores
from gradlocate.gradients import (
    LayerGradients,
    SampleProducts,
    edit_gradients,
    edit_loss,
    ghost_inner_products,
    per_sample_inner_products,
    retain_gradients,
)
from gradlocate.selectors import TukeyFences, adaptive_min_layer, cma_layer, gradratio, greedy_answers, lga, tukey_fences
from gradlocate.trace import causal_trace
from gradlocate.trace.core import embedding_std, subject_token_range
from gradlocate.trace.result import TraceResult
from gradlocate.editors.locft import EditTrainingError, FitResult, LocFTBF
from gradlocate.evaluation import EditEvaluation, LocalityReference, evaluate, locality_reference
from gradlocate.golden.store import StoreError
from gradlocate.golden.sweep import LayerRecord, SweepResult, overall_score, sweep
from gradlocate.golden.compare import Comparison, SelectorRow, compare, split_edits
from gradlocate.golden.matrix import Matrix, matrix
from gradlocate.golden.study import Study, StudyRow, study
from gradlocate.state import check_materialized

__version__ = "0.2.0"

__all__ = [
    "models",
    "Handle", "Handles", "DownProjection", "DownProjections", "HandleError", "down_projections", "resolve",
    "unwrap_model", "find_tokenizer", "ModelBusyError", "instrumented",
    "EditRequest", "Edits", "as_edits", "default_retain_texts", "load_edits", "load_texts", "shared_data_path",
    "TokenBatch", "edit_nll", "edit_loss", "lm_loss", "per_sample_nll", "tokenize_edits", "tokenize_texts",
    "NonFiniteLossError",
    "LayerScores",
    "LayerGradients", "SampleProducts", "edit_gradients", "retain_gradients", "ghost_inner_products",
    "per_sample_inner_products",
    "gradratio", "lga", "cma_layer", "greedy_answers", "adaptive_min_layer", "tukey_fences", "TukeyFences",
    "causal_trace", "TraceResult", "embedding_std", "subject_token_range",
    "LocFTBF", "FitResult", "EditTrainingError", "evaluate", "EditEvaluation", "LocalityReference",
    "locality_reference",
    "sweep", "SweepResult", "LayerRecord", "StoreError", "overall_score", "compare", "Comparison",
    "SelectorRow", "split_edits", "matrix", "Matrix", "study", "Study", "StudyRow",
    "check_materialized",
]

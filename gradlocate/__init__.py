"""gradlocate: which layer should I edit? Find it, then edit it.

The public API, re-exported here:

* handles: :func:`down_projections`, :class:`DownProjection`, :func:`instrumented`
* data: :class:`EditRequest`, :func:`load_edits`, :func:`load_texts`
* losses: :func:`tokenize_edits`, :func:`tokenize_texts`, :func:`edit_loss`, :func:`lm_loss`
* results: :class:`LayerScores`
* gradients: :func:`edit_gradients`, :func:`retain_gradients`, :func:`per_sample_inner_products`,
  :func:`ghost_inner_products`; selectors: :func:`gradratio`, :func:`lga`, :func:`tukey_fences`
* causal tracing: :func:`causal_trace`, :func:`cma_layer`
* editing and evaluation: :class:`LocFTBF`, :func:`evaluate`
* ground truth: :func:`sweep`, :func:`compare`
* models: :mod:`gradlocate.models` (``smollm2()``, ``gemma3_270m()``, ``tiny()``, ``load_model()``)
"""
from gradlocate import models
from gradlocate.data import EditRequest, as_edits, default_retain_texts, load_edits, load_texts, shared_data_path
from gradlocate.handles import (
    DownProjection,
    DownProjections,
    HandleError,
    down_projections,
    find_tokenizer,
    instrumented,
    unwrap_model,
)
from gradlocate.losses import TokenBatch, edit_loss, lm_loss, per_sample_nll, tokenize_edits, tokenize_texts
from gradlocate.results import LayerScores
from gradlocate.gradients import (
    LayerGradients,
    SampleProducts,
    edit_gradients,
    ghost_inner_products,
    greedy_answers,
    per_sample_inner_products,
    retain_gradients,
)
from gradlocate.selectors import TukeyFences, adaptive_min_layer, gradratio, lga, tukey_fences
from gradlocate.editing import EditTrainingError, LocFTBF
from gradlocate.evaluation import EditEvaluation, LocalityReference, evaluate, locality_reference
from gradlocate.tracing import TraceResult, causal_trace, cma_layer, embedding_std, subject_token_range
from gradlocate.sweep import SweepResult, overall_score, sweep
from gradlocate.compare import Comparison, compare, split_edits
from gradlocate.losses import NonFiniteLossError
from gradlocate.state import check_materialized

__version__ = "0.1.0"

__all__ = [
    "models",
    "EditRequest", "as_edits", "default_retain_texts", "load_edits", "load_texts", "shared_data_path",
    "DownProjection", "DownProjections", "HandleError", "down_projections", "find_tokenizer",
    "instrumented", "unwrap_model",
    "TokenBatch", "edit_loss", "lm_loss", "per_sample_nll", "tokenize_edits", "tokenize_texts",
    "LayerScores",
    "LayerGradients", "SampleProducts", "edit_gradients", "retain_gradients", "ghost_inner_products",
    "per_sample_inner_products", "greedy_answers",
    "gradratio", "lga", "adaptive_min_layer", "tukey_fences", "TukeyFences",
    "LocFTBF", "EditTrainingError", "evaluate", "EditEvaluation", "LocalityReference", "locality_reference",
    "causal_trace", "TraceResult", "cma_layer", "embedding_std", "subject_token_range",
    "sweep", "SweepResult", "overall_score", "compare", "Comparison", "split_edits",
    "NonFiniteLossError", "check_materialized",
]

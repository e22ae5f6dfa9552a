"""gradlocate: which layer should I edit? Find it, then edit it.

The public API, re-exported here:

* handles: :func:`down_projections`, :class:`DownProjection`, :func:`instrumented`
* data: :class:`EditRequest`, :func:`load_edits`, :func:`load_texts`
* losses: :func:`tokenize_edits`, :func:`tokenize_texts`, :func:`edit_loss`, :func:`lm_loss`
* results: :class:`LayerScores`
* models: :mod:`gradlocate.models` (``smollm2()``, ``gemma3_270m()``, ``tiny()``, ``load_model()``)
"""
from gradlocate import models
from gradlocate.data import EditRequest, as_edits, load_edits, load_texts, shared_data_path
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

__version__ = "0.1.0"

__all__ = [
    "models",
    "EditRequest", "as_edits", "load_edits", "load_texts", "shared_data_path",
    "DownProjection", "DownProjections", "HandleError", "down_projections", "find_tokenizer",
    "instrumented", "unwrap_model",
    "TokenBatch", "edit_loss", "lm_loss", "per_sample_nll", "tokenize_edits", "tokenize_texts",
    "LayerScores",
]

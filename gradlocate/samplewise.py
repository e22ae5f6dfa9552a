"""Sample-wise optimal layers (the Golden Layers paper's Table 1), at batched cost.

For every edit alone, at every candidate layer, train LocFT-BF on that one edit and
score it; the edit's **optimal layer** is where it scores best. Done naively that is
one LocFT-BF run per (edit, layer). Here all edits of a layer train at once, in one
batched forward and backward per epoch, each batch row carrying its own weight change
``delta[i]`` on that layer's site (:class:`~gradlocate.editors.executors.Executor` with
``delta``: no copy of the model). Adam is elementwise, so one Adam over the stacked
deltas is N independent Adams; a row stops stepping below the loss threshold and stops
training once it has converged, exactly as a single-edit run does
(``tests/test_samplewise.py`` checks each row against :class:`~gradlocate.editors.locft.LocFTBF`
on that edit alone, to 1e-5).

Scores are teacher-forced reliability, generalization, locality and portability of each
edit with its own delta (the edit metrics of :func:`~gradlocate.evaluation.evaluate`);
the sample-wise overall is their mean (capability and fluency cost a generation or a
held-out pass per edit and layer, so the sample-wise comparison leaves them out).

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5"}, {"prompt": "The sky is", "target_new": "green"}]
    >>> s = sample_sweep(model, edits, trainer={"lr": 1e-2, "epochs": 3}, progress=False)
    >>> s.layers, len(s.optimum())
    ([0, 1], 2)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradlocate.data import Edits, as_edits
from gradlocate.editors.locft_rows import train_per_sample
from gradlocate.evaluation import _queries
from gradlocate.editors.executors import row_delta
from gradlocate.gradients import edit_batch
from gradlocate.handles import Handles, resolve
from gradlocate.interventions import edited, no_cache, require_gradients, run, using
from gradlocate.losses import IGNORE, logits_of, tokenize_edits
from gradlocate.study.matrix import MATRIX_METRICS, score_per_sample

__all__ = ["sample_sweep", "SampleSweep", "SAMPLE_METRICS"]

#: The metrics of the sample-wise comparison (teacher-forced), and their mean, "overall".
SAMPLE_METRICS = MATRIX_METRICS


@dataclass
class SampleSweep:
    """Every edit trained alone at every candidate layer.

    Attributes:
        layers: the candidate layers.
        scores: per layer, per metric, one value per edit (``None`` where the edit has
            no prompts of that kind).
        train: per layer, each edit's training summary (epochs, final loss, converged).
        timings: seconds per layer (train, score).
    """

    layers: list[int]
    scores: dict[int, dict[str, list[float | None]]]
    train: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    timings: dict[int, dict[str, float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edits(self) -> int:
        return len(next(iter(self.scores.values()))["reliability"])

    def overall(self, layer: int) -> list[float | None]:
        """Each edit's mean of the metrics it has, at ``layer``."""
        cols = [self.scores[layer][m] for m in SAMPLE_METRICS]
        out = []
        for vals in zip(*cols):
            have = [x for x in vals if x is not None]
            out.append(sum(have) / len(have) if have else None)
        return out

    def value(self, metric: str, layer: int) -> list[float | None]:
        return self.overall(layer) if metric == "overall" else self.scores[layer][metric]

    def optimum(self) -> list[int]:
        """Each edit's best layer by its overall (ties: the lowest layer)."""
        per_layer = {l: self.overall(l) for l in self.layers}
        return [max(self.layers, key=lambda l: (per_layer[l][i] if per_layer[l][i] is not None else -math.inf, -l))
                for i in range(self.n_edits)]

    def at_optimum(self, metric: str) -> list[float | None]:
        """Each edit's ``metric`` at its own optimal layer."""
        opt = self.optimum()
        return [self.value(metric, l)[i] for i, l in enumerate(opt)]

    def versus(self, golden: int) -> dict[str, dict[str, float | None]]:
        """Golden layer vs each edit's own optimum, per metric: the means and a paired
        t-test (``scipy.stats.ttest_rel``) over the edits that have the metric."""
        from scipy.stats import ttest_rel

        out = {}
        for m in (*SAMPLE_METRICS, "overall"):
            pairs = [(g, o) for g, o in zip(self.value(m, golden), self.at_optimum(m)) if g is not None and o is not None]
            if not pairs:
                continue
            g, o = [p[0] for p in pairs], [p[1] for p in pairs]
            t = ttest_rel(o, g) if len(pairs) > 1 and any(a != b for a, b in pairs) else None
            out[m] = {"golden": sum(g) / len(g), "optimum": sum(o) / len(o), "n": len(pairs),
                      "t": None if t is None else float(t.statistic), "p": None if t is None else float(t.pvalue)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "scores": {str(k): v for k, v in self.scores.items()},
                "train": {str(k): v for k, v in self.train.items()}, "optimum": self.optimum(),
                "timings": {str(k): v for k, v in self.timings.items()}, "params": self.params}

    def plot(self, ax: Any = None, *, golden: int | None = None, title: str | None = None) -> Any:
        """How many edits have each layer as their optimum (the golden layer marked)."""
        from gradlocate.plotting import plot_optimum_histogram

        return plot_optimum_histogram(self.layers, self.optimum(), golden=golden, ax=ax, title=title)

    def __repr__(self) -> str:
        from collections import Counter

        top = Counter(self.optimum()).most_common(3)
        return (f"SampleSweep({self.n_edits} edits x {len(self.layers)} layers; most common optimal layers "
                f"{', '.join(f'{l} ({c})' for l, c in top)})")


def sample_sweep(model: Any, edits: Any, *, tokenizer: Any = None, layers: Sequence[int] | None = None,
                 trainer: dict[str, Any] | None = None, chunk: int = 32, out: Any = None,
                 progress: bool | None = None) -> SampleSweep:
    """Each edit alone at each candidate layer: LocFT-BF trained for all edits of a
    layer at once (per-row weight changes, ``chunk`` edits per batch to bound memory),
    then each edit scored with its own change. ``sweep(..., per_sample=True)`` calls this.

    Args:
        model: a transformers causal LM, an nnsight wrapper, a bridge, or :class:`~gradlocate.handles.Handles`.
        edits: the edits (any public form).
        layers: candidate layers (default: all).
        trainer: LocFT-BF settings (``lr``, ``epochs``, ``seed``, ``loss_threshold``,
            ``append_eos``, ``cache``, ``head``), as for :class:`~gradlocate.editors.locft.LocFTBF`.
        chunk: edits trained together (memory: ``4 * chunk * d_model * d_mlp`` bytes of
            weight changes and Adam state).
        out: a JSONL file; each finished layer is appended, and a re-run with the same
            model, edits and settings skips the layers already there (resume).
        progress: a progress bar over layers (``None``: on a terminal only).
    """
    from tqdm.auto import tqdm

    require_gradients("sample_sweep")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (edits per batch), got {chunk!r}")
    edits = as_edits(edits)
    h = resolve(model, tokenizer)
    cand = h.layer_indices(list(layers) if layers is not None else None)
    trainer = dict(trainer or {})
    settings = {k: v for k, v in trainer.items() if k not in ("callback", "progress")}
    result = SampleSweep(cand, {}, params={"trainer": settings, "n_edits": len(edits), "chunk": chunk})
    path, fp, done = _resume(out, h, edits, settings)
    for layer, rec in done.items():
        if layer in cand:
            result.scores[layer], result.train[layer], result.timings[layer] = rec["scores"], rec["train"], rec["timings"]
    todo = [l for l in cand if l not in result.scores]
    with using(h):
        from gradlocate.evaluation import locality_reference

        ref = locality_reference(h, edits, generation=False).tokens if todo else []
        for layer in tqdm(todo, desc="sample-wise sweep", unit="layer",
                          disable=None if progress is None else not progress):
            t0 = time.perf_counter()
            parts, summaries = [], []
            for start in range(0, len(edits), chunk):
                part = Edits(edits[start:start + chunk])
                d, s = train_per_sample(h, layer, part, **trainer)
                parts.append(d)
                summaries += s
            delta = torch.cat(parts)
            t1 = time.perf_counter()
            result.scores[layer] = score_per_sample(h, layer, edits, delta, ref)
            result.train[layer] = summaries
            result.timings[layer] = {"train": t1 - t0, "score": time.perf_counter() - t1}
            if path is not None:
                from gradlocate.sweep import _append_line

                _append_line(path, json.dumps({"fingerprint": fp, "layer": layer, "scores": result.scores[layer],
                                               "train": summaries, "timings": result.timings[layer]}))
    return result


def _resume(out: Any, h: Handles, edits: Edits, settings: dict[str, Any]) -> tuple[Any, str, dict[int, Any]]:
    """The sample-wise sweep's file, its fingerprint, and the layers it already holds."""
    if out is None:
        return None, "", {}
    from pathlib import Path

    from gradlocate.sweep import SweepFileError, _fingerprint

    path = Path(out)
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} for the sample-wise sweep file does not exist")
    fp = _fingerprint(h, edits, [], settings, "per-sample")
    done: dict[int, Any] = {}
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # cut short by an interruption: that layer runs again
                    continue
                raise SweepFileError(f"{path} line {n}: not JSON") from None
            if not isinstance(d, dict) or d.get("fingerprint") != fp:
                raise SweepFileError(f"{path} line {n} holds a sample-wise sweep of another model, other edits or "
                                     f"other settings; use another file")
            done[int(d["layer"])] = {"scores": d["scores"], "train": d["train"], "timings": d["timings"]}
    return path, fp, done


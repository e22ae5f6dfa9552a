"""The golden-layer sweep: edit at every candidate layer, evaluate, restore, move on.

A selector is only as good as the layer it picks; the sweep is the ground truth. For
each candidate layer ``l`` it fine-tunes layer ``l``'s down-projection with
:class:`~gradlocate.editing.LocFTBF`, scores the edited model with
:func:`~gradlocate.evaluation.evaluate` (reliability, generalization, locality, both
scorings), restores the weight bit for bit, and records one JSON line. The **overall**
score of a layer is the mean of reliability, generalization and locality (the Golden
Layers paper's "Overall"); the **golden layer** is the layer with the best overall
score.

A sweep is the expensive thing, so it is resumable: give ``out="sweep.jsonl"`` and a
re-run skips the layers already in the file (if they were run with the same model,
edits and trainer settings).

Example:
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("gpt2", n_layers=2, d_model=32)
    >>> edits = [{"prompt": "2 + 2 =", "target_new": "5", "locality_prompt": "1 + 1 =",
    ...           "locality_ground_truth": "2"}]
    >>> res = sweep(model, edits, trainer={"lr": 1e-2, "epochs": 3}, progress=False, generation=False)
    >>> res.layers, res.golden in res.layers
    ([0, 1], True)
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradlocate.data import EditRequest, as_edits, warn_duplicates
from gradlocate.handles import down_projections, find_tokenizer
from gradlocate.state import check_materialized

__all__ = ["sweep", "SweepResult", "OVERALL_METRICS", "overall_score"]

#: The metrics averaged into the overall score (Golden Layers' rewrite / rephrase / locality).
OVERALL_METRICS = ("reliability", "generalization", "locality")
SCORINGS = ("teacher_forced", "generation")


def overall_score(metrics: dict[str, float | None], names: Sequence[str] = OVERALL_METRICS) -> float | None:
    """Mean of the available metrics among ``names`` (``None`` if none is available)."""
    vals = [metrics.get(m) for m in names]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(model: Any, edits: Sequence[EditRequest], eval_edits: Sequence[EditRequest],
                 trainer: dict[str, Any], generation: bool) -> str:
    hs = down_projections(model)
    # A cheap checksum of the editable weights tells a different checkpoint apart.
    with torch.no_grad():
        weights = [float(h.parameter.detach().double().sum()) for h in hs]
    return _digest({
        "model": type(hs.root).__name__,
        "name": getattr(getattr(hs.root, "config", None), "_name_or_path", ""),
        "weights": [f"{w:.10e}" for w in weights],
        "edits": [e.to_dict() for e in edits],
        "eval": [e.to_dict() for e in eval_edits],
        "trainer": trainer,
        "generation": generation,
    })


@dataclass
class SweepResult:
    """Per-layer edit metrics from a sweep, and the golden layer.

    Attributes:
        records: one dict per swept layer (``layer``, ``teacher_forced`` and
            ``generation`` metric dicts, ``train`` statistics, ``timings``), in layer order.
        scoring: which scoring the overall score and the golden layer use
            (``"teacher_forced"`` or ``"generation"``).
        path: the JSONL file the sweep was written to, if any.
    """

    records: list[dict[str, Any]]
    scoring: str = "teacher_forced"
    path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not self.records:
            raise ValueError("a sweep result needs at least one layer")
        self.records = sorted(self.records, key=lambda r: r["layer"])

    @property
    def layers(self) -> list[int]:
        return [r["layer"] for r in self.records]

    def metric(self, name: str, scoring: str | None = None) -> list[float | None]:
        """Per-layer values of one metric (``"overall"`` included)."""
        scoring = scoring or self.scoring
        if name == "overall":
            return [overall_score(r.get(scoring) or {}) for r in self.records]
        return [(r.get(scoring) or {}).get(name) for r in self.records]

    @property
    def overall(self) -> list[float | None]:
        return self.metric("overall")

    @property
    def golden(self) -> int:
        """The layer with the best overall score (the lowest such layer on ties)."""
        ov = self.overall
        best = max(range(len(ov)), key=lambda i: (ov[i] if ov[i] is not None else -math.inf, -i))
        return self.layers[best]

    def best_layers(self, scoring: str | None = None) -> dict[str, int]:
        """For each metric (and overall) the layer that scores best."""
        out = {}
        for m in (*OVERALL_METRICS, "portability", "overall"):
            vals = self.metric(m, scoring)
            if all(v is None for v in vals):
                continue
            i = max(range(len(vals)), key=lambda j: (vals[j] if vals[j] is not None else -math.inf, -j))
            out[m] = self.layers[i]
        return out

    def at(self, layer: int) -> dict[str, Any]:
        """The record of one layer."""
        for r in self.records:
            if r["layer"] == layer:
                return r
        raise KeyError(f"layer {layer} was not swept (swept: {self.layers})")

    def to_dict(self) -> dict[str, Any]:
        return {"scoring": self.scoring, "golden": self.golden, "best": self.best_layers(),
                "layers": self.layers, "overall": self.overall, "records": self.records,
                "path": self.path, "params": self.params}

    def to_markdown(self, scoring: str | None = None) -> str:
        """Per-layer table: the three metrics, overall, portability if present."""
        scoring = scoring or self.scoring
        cols = [m for m in (*OVERALL_METRICS, "portability") if any(v is not None for v in self.metric(m, scoring))]
        head = "| layer | " + " | ".join(cols) + " | overall |\n|---:|" + "---:|" * (len(cols) + 1)
        rows = []
        golden = self.golden
        for i, layer in enumerate(self.layers):
            vals = [self.metric(m, scoring)[i] for m in cols] + [self.metric("overall", scoring)[i]]
            cells = " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals)
            mark = " **(golden)**" if layer == golden and scoring == self.scoring else ""
            rows.append(f"| {layer}{mark} | {cells} |")
        return head + "\n" + "\n".join(rows)

    def __repr__(self) -> str:
        ov = self.overall
        best = max((v for v in ov if v is not None), default=None)
        t = sum(r.get("timings", {}).get("total", 0.0) for r in self.records)
        return (f"SweepResult({len(self.records)} layers {self.layers[0]}..{self.layers[-1]}, golden={self.golden} "
                f"(overall {best:.3f}), scoring={self.scoring!r}, time={t:.1f}s)" if best is not None else
                f"SweepResult({len(self.records)} layers, no metric available)")

    def _repr_html_(self) -> str:
        return f"<div><b>Sweep</b>: golden layer <b>{self.golden}</b><pre>{html.escape(self.to_markdown())}</pre></div>"

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """Metrics and overall score across layers, the golden layer marked."""
        from gradlocate.plotting import plot_sweep

        return plot_sweep(self, ax=ax, title=title)

    @classmethod
    def load(cls, path: str | Path, scoring: str = "teacher_forced") -> SweepResult:
        """Read a sweep's JSONL file (the latest record of each layer)."""
        recs: dict[int, dict[str, Any]] = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                recs[r["layer"]] = r
        return cls(list(recs.values()), scoring=scoring, path=str(path))


def _append_line(path: Path, line: str) -> None:
    """Append one line; after a line cut short by an interruption, start a new one."""
    with path.open("ab+") as f:
        f.seek(0, 2)
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((line + "\n").encode("utf-8"))


def _read_done(path: Path, fingerprint: str) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            # A line cut short by an interruption: everything before it is good.
            continue
        if r.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path} line {n} holds a sweep with another model, other edits or other trainer settings; "
                f"use another output file or delete this one"
            )
        done[int(r["layer"])] = r
    return done


def sweep(model: Any, edits: Any, *, tokenizer: Any = None, layers: Sequence[int] | None = None,
          trainer: dict[str, Any] | None = None, eval_edits: Any = None, out: str | Path | None = None,
          scoring: str = "teacher_forced", generation: bool = True, progress: bool = True) -> SweepResult:
    """Edit with LocFT-BF at each candidate layer, evaluate, restore; find the golden layer.

    Args:
        model: a transformers causal LM, an nnsight wrapper or a TransformerLens bridge.
        edits: the edits to make (any format :func:`~gradlocate.data.as_edits` takes).
        tokenizer: defaults to the one the model carries.
        layers: candidate layers (default: all).
        trainer: keyword arguments for :class:`~gradlocate.editing.LocFTBF`
            (default: its defaults).
        eval_edits: the edits to evaluate on (default: ``edits``).
        out: a JSONL file; each finished layer is appended as it comes, and layers
            already there are skipped (resume).
        scoring: ``"teacher_forced"`` (EasyEdit) or ``"generation"`` (exact match) for
            the overall score and the golden layer. Both are always recorded.
        generation: also score by generation exact match (slower).
        progress: a progress bar over layers.

    Returns:
        :class:`SweepResult`.

    The model is restored bit for bit after each layer, also when a layer fails or
    the sweep is interrupted (the finished layers stay in ``out``).
    """
    from tqdm.auto import tqdm

    from gradlocate.editing import LocFTBF
    from gradlocate.evaluation import evaluate

    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "generation" and not generation:
        raise ValueError("scoring='generation' needs generation=True")
    edits = as_edits(edits)
    warn_duplicates(edits)
    eval_edits = edits if eval_edits is None else as_edits(eval_edits)
    tok = find_tokenizer(model, tokenizer)
    hs = down_projections(model)
    check_materialized(hs.root)  # before the fingerprint reads the weights
    cand = hs.layer_indices(list(layers) if layers is not None else None)
    trainer = dict(trainer or {})
    trainer.setdefault("progress", False)
    fp = _fingerprint(model, edits, eval_edits, {k: v for k, v in trainer.items() if k not in ("progress", "callback")},
                      generation)
    path = Path(out) if out is not None else None
    done = _read_done(path, fp) if path is not None else {}
    if path is not None and not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} for the sweep file does not exist")
    todo = [l for l in cand if l not in done]

    t0 = time.perf_counter()
    pre = evaluate(model, eval_edits, tokenizer=tok, generation=generation)
    t_pre = time.perf_counter() - t0
    records = [done[l] for l in cand if l in done]
    bar = tqdm(todo, desc="sweep", unit="layer", disable=not progress or not todo)
    for layer in bar:
        bar.set_postfix(layer=layer)
        t1 = time.perf_counter()
        with LocFTBF(model, layer, tokenizer=tok, **trainer) as ft:
            ft.fit(edits)
            t2 = time.perf_counter()
            ev = evaluate(model, eval_edits, tokenizer=tok, pre=pre, generation=generation)
        t3 = time.perf_counter()
        rec = {
            "fingerprint": fp,
            "layer": layer,
            "teacher_forced": ev.teacher_forced,
            "generation": ev.generation,
            "train": {"epochs": len(ft.history), "final_loss": ft.history[-1] if ft.history else None,
                      "steps": int(sum(ft.steps)), "batch_size": ft.batch_size_used},
            "timings": {"train": t2 - t1, "evaluate": t3 - t2, "total": t3 - t1},
            "n_edits": len(edits), "n_eval": len(eval_edits),
        }
        records.append(rec)
        if path is not None:
            _append_line(path, json.dumps(rec, default=float))
        bar.set_postfix(layer=layer, overall=f"{overall_score(rec[scoring] or {}) or float('nan'):.3f}")
    return SweepResult(records, scoring=scoring, path=str(path) if path else None,
                       params={"trainer": trainer, "generation": generation, "n_edits": len(edits),
                               "n_eval": len(eval_edits), "pre_eval_s": t_pre, "layers": cand})

"""The result of a causal trace: :class:`TraceResult`.

A grid of scores, one per traced (token, layer) cell, with the clean and corrupted
probabilities that bound it, what was traced and how, and the cost. Every executor of
:func:`gradlocate.trace.causal_trace` returns one.

Example:
    >>> import torch
    >>> r = TraceResult(scores=torch.tensor([[0.125, 0.25], [0.75, 0.5]]), low_score=0.125, high_score=0.875,
    ...                 subject_range=(0, 1), tokens=["Paris", " is"], token_indices=[0, 1], layers=[0, 1],
    ...                 kind="hidden", answer=7, answer_text=" in")
    >>> r.best(), r.total_effect, r.indirect_effect[1].tolist()  # (token, layer); high - low; scores - low
    ((1, 0), 0.75, [0.625, 0.375])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gradlocate.results import _fmt

__all__ = ["TraceResult"]


@dataclass
class TraceResult:
    """A causal trace: the answer's probability with each state restored.

    Attributes:
        scores: ``[len(token_indices), len(layers)]``: the mean probability of the
            answer over the corrupted rows with that (token, layer) state restored.
        low_score: the answer's mean probability in the corrupted runs, nothing restored.
        high_score: its probability in the clean run.
        subject_range: ``(start, end)`` token range of the subject (noised).
        tokens: every prompt token, decoded.
        token_indices: the traced token positions (rows of ``scores``).
        layers: the traced layers (columns; the window centre for mlp/attn).
        kind: ``"hidden"``, ``"mlp"`` or ``"attn"``.
        answer: the answer token id; ``answer_text`` its text.
        window: layers restored per cell (mlp/attn).
        samples: corrupted rows per cell.
        params: the noise used (multiple, std, seed, or ``"explicit"``) and other settings.
        stats: forward passes and token-block evaluations, ours and ROME's.
        timings: wall times in seconds.
        method: ``"exact"`` or ``"atp"`` (the scores are attribution-patching estimates).
        exact: with ``method="atp"``, the cells re-run exactly (``verify=``), same shape as ``scores``.
    """

    scores: Float[Tensor, "pos layers"]
    low_score: float
    high_score: float
    subject_range: tuple[int, int]
    tokens: list[str]
    token_indices: list[int]
    layers: list[int]
    kind: str
    answer: int
    answer_text: str
    prompt: str = ""
    subject: str = ""
    window: int = 10
    samples: int = 10
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "exact"
    exact: Bool[Tensor, "pos layers"] | None = None

    @property
    def estimated(self) -> bool:
        """Whether the scores are attribution-patching estimates (``method="atp"``); the
        cells re-run exactly (``verify=``) are marked in :attr:`exact`."""
        return self.method != "exact"

    @property
    def indirect_effect(self) -> Float[Tensor, "pos layers"]:
        """``scores - low_score``: how much restoring each state brings the answer back."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        """``high_score - low_score``: what the corruption took away."""
        return self.high_score - self.low_score

    def row(self, token: int) -> Float[Tensor, " layers"]:
        """Scores of one token position (negatives count from the end of the prompt)."""
        t = token % len(self.tokens)
        if t not in self.token_indices:
            raise KeyError(f"token {token} was not traced (traced: {self.token_indices})")
        return self.scores[self.token_indices.index(t)]

    def best(self) -> tuple[int, int]:
        """The (token, layer) with the highest score; for an estimate with verified
        cells, the highest among those computed exactly."""
        scores = self.scores
        if self.exact is not None and bool(self.exact.any()):
            scores = torch.where(self.exact, self.scores, torch.full_like(self.scores, -torch.inf))
        r, c = divmod(int(scores.argmax()), self.scores.shape[1])
        return self.token_indices[r], self.layers[c]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "prompt": self.prompt, "subject": self.subject,
            "answer": self.answer, "answer_text": self.answer_text,
            "scores": self.scores.tolist(), "low_score": self.low_score, "high_score": self.high_score,
            "subject_range": list(self.subject_range), "tokens": list(self.tokens),
            "token_indices": list(self.token_indices), "layers": list(self.layers),
            "window": self.window, "samples": self.samples, "params": dict(self.params),
            "stats": dict(self.stats), "timings": dict(self.timings), "method": self.method,
            "exact": None if self.exact is None else self.exact.tolist(),
        }

    def __repr__(self) -> str:
        t, l = self.best()
        what = "" if not self.estimated else (
            f", AtP estimate ({int(self.exact.sum()) if self.exact is not None else 0} cells verified)")
        # Two lines, so it reads in a 100-column terminal whatever the tokens.
        return (f"TraceResult(kind={self.kind!r}{what}, answer={self.answer_text!r}, scores=[{self.scores.shape[0]} tokens x "
                f"{self.scores.shape[1]} layers],\n            low={_fmt(self.low_score)}, high={_fmt(self.high_score)}, "
                f"best=(token {t} {self.tokens[t][:20]!r}, layer {l}): {_fmt(float(self.scores.max()))}, "
                f"subject={self.subject_range})")

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """ROME's heatmap: tokens down, layers across, subject tokens marked ``*``,
        colour from ``low_score``. Returns the matplotlib ``Axes``."""
        from gradlocate.plotting import plot_trace_heatmap

        return plot_trace_heatmap(self, ax=ax, title=title)

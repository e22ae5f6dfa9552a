"""Tokenization and the two losses, each defined once and used everywhere.

* **Edit loss** (:func:`edit_nll`; GradRatio eq. 1): for each edit, the mean negative
  log-likelihood of the target tokens given the prompt (prompt and padding masked; a
  space between prompt and target). Whether the tokenizer's EOS follows the target is
  ``append_eos``: the trainer (LocFT-BF) appends it (:data:`APPEND_EOS`, as the LocFT
  code does); the selectors' losses score the answer tokens only
  (:data:`SELECTOR_APPEND_EOS`, as the papers define them). ``gradlocate edit --layer
  auto`` selects with the trainer's setting, so that layer is chosen for the loss it is
  then trained with.
* **Retain loss** (GradRatio eq. 2): the language-model loss over general texts: the
  mean next-token NLL over every non-padding token.

Sequences are right-padded; labels follow the transformers convention (``labels[b, t]``
is the token at position ``t``; ``-100`` is not scored), and the shift happens in the
loss. All losses are computed in float32 whatever the model's dtype.

Example:
    >>> from gradlocate.models import byte_tokenizer
    >>> tok = byte_tokenizer()
    >>> b = tokenize_edits(tok, ["Paris is in"], ["France"])
    >>> tok.decode(b.input_ids[0][b.labels[0] != -100])
    ' France'
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "APPEND_EOS",
    "SELECTOR_APPEND_EOS",
    "NonFiniteLossError",
    "edit_nll",
    "scored_positions",
    "head_nll",
    "logits_of",
    "render_prompt",
    "prompt_ids",
    "target_ids",
    "TokenBatch",
    "tokenize_edits",
    "tokenize_texts",
    "context_length",
    "per_sample_nll",
    "token_nll",
    "lm_loss",
    "target_text",
]

IGNORE = -100
#: LocFT-BF's training loss scores the target followed by the tokenizer's EOS token
#: (the LocFT code appends it): the trainer's default.
APPEND_EOS = True
#: The selectors' edit losses (GradRatio's ``L_edit``, LGA's ``L_new`` / ``L_old``) score the
#: answer tokens only, as both papers and EasyEdit's fine-tuning loss do: the default of
#: :func:`~gradlocate.gradients.edit_gradients`,
#: :func:`~gradlocate.gradients.per_sample_inner_products` and the selectors. On a
#: one-token CounterFact target an appended EOS would be half the loss.
SELECTOR_APPEND_EOS = False


class NonFiniteLossError(FloatingPointError):
    """A loss (or a score computed from the model's outputs) came out NaN or infinite:
    the model has non-finite weights or its activations overflowed. The message names
    the edits or texts concerned; no weight was changed."""


@dataclass
class TokenBatch:
    """A right-padded batch with labels.

    Attributes:
        input_ids: token ids, ``[rows, pos]``.
        attention_mask: 1 for real tokens, 0 for padding.
        labels: the ids to score at each position, ``-100`` elsewhere.
    """

    input_ids: Int[Tensor, "rows pos"]
    attention_mask: Int[Tensor, "rows pos"]
    labels: Int[Tensor, "rows pos"]

    def to(self, device: Any) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, idx: Any) -> TokenBatch:
        """Rows ``idx`` (a slice or index tensor), trimmed of all-padding columns."""
        ids, am, lab = self.input_ids[idx], self.attention_mask[idx], self.labels[idx]
        if ids.dim() == 1:
            ids, am, lab = ids[None], am[None], lab[None]
        width = int(am.sum(1).max()) if am.numel() else 0
        return TokenBatch(ids[:, :width], am[:, :width], lab[:, :width])

    @property
    def n_scored(self) -> Int[Tensor, " rows"]:
        """Number of scored (next-token) positions per row."""
        return (self.labels[:, 1:] != IGNORE).sum(1)


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length from its config, if it declares one."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def target_text(prompt: str, target: str) -> str:
    """The target as appended to the prompt: with one separating space, unless the
    prompt already ends in whitespace or the target starts with it."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return target
    return " " + target


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> tuple[str, bool]:
    """The text a prompt is fed to the model as, and whether the tokenizer adds its
    special tokens to it: the prompt itself (with special tokens: a BOS if the tokenizer
    adds one), or with ``chat`` the tokenizer's chat template applied to one user turn
    with the generation prompt (the template writes its special tokens itself).

    Example:
        >>> from gradlocate.models import byte_tokenizer
        >>> render_prompt(byte_tokenizer(), "Who wrote Hamlet?")
        ('Who wrote Hamlet?', True)
    """
    if not chat:
        return prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template: give an instruct model's tokenizer, or "
                         "use plain prompts (chat=False)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return text, False


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """The token ids of a prompt as every gradlocate function feeds it (see :func:`render_prompt`)."""
    text, special = render_prompt(tokenizer, prompt, chat)
    return _ids(tokenizer, text, special)


def target_ids(tokenizer: Any, prompt_text: str, target: str) -> list[int]:
    """A target's ids as it follows the (rendered) prompt: with one separating space
    (:func:`target_text`), no special tokens; a target that *is* one of the tokenizer's
    special tokens (an EOS as the answer) is that token alone."""
    if target in getattr(tokenizer, "all_special_tokens", ()):
        return [int(tokenizer.convert_tokens_to_ids(target))]
    return _ids(tokenizer, target_text(prompt_text, target), False)


def tokenize_edits(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
                   append_eos: bool = False, max_length: int | None = None, chat: bool = False) -> TokenBatch:
    """Tokenize ``prompt + " " + target`` pairs; only target tokens are labelled.

    The prompt is tokenized as :func:`prompt_ids` feeds it (special tokens, or the chat
    template with ``chat``), the target separately (:func:`target_ids`), so the label
    mask covers exactly the target tokens whatever the tokenizer merges. With
    ``append_eos`` the tokenizer's EOS follows the target (not twice, if the target is EOS).

    Raises:
        ValueError: no pairs, a target that tokenizes to nothing, or a sequence longer
            than ``max_length`` (the model's context).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no edits to tokenize: the edit list is empty")
    rows, labels = [], []
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no EOS token")
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if not isinstance(p, str) or not isinstance(t, str):
            raise TypeError(f"edit {i}: prompt and target must be strings, got {type(p).__name__}, {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"edit {i}: target {t!r} is blank: it tokenizes to no tokens")
        text, special = render_prompt(tokenizer, p, chat)
        p_ids = _ids(tokenizer, text, special)
        t_ids = target_ids(tokenizer, text, t)
        if not t_ids:
            raise ValueError(f"edit {i}: target {t!r} tokenizes to no tokens")
        if not p_ids:
            raise ValueError(f"edit {i}: prompt {p!r} tokenizes to no tokens")
        if append_eos and eos is not None and t_ids[-1:] != [eos]:  # eos is not None: checked above
            t_ids = t_ids + [eos]
        ids = p_ids + t_ids
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"edit {i}: prompt + target is {len(ids)} tokens, longer than the model's context of "
                f"{max_length}; shorten the prompt"
            )
        rows.append(ids)
        labels.append([IGNORE] * len(p_ids) + t_ids)
    return _pad(tokenizer, rows, labels)


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int | None = 128,
                   truncate: bool = True) -> TokenBatch:
    """Tokenize general texts for the LM loss; every real token is labelled.

    Texts longer than ``max_length`` tokens are cut to their first ``max_length``
    tokens (GradRatio uses 128-token sequences) unless ``truncate=False``, which
    raises instead.
    """
    if not texts:
        raise ValueError("no texts: the retain set is empty")
    rows = []
    for i, t in enumerate(texts):
        ids = _ids(tokenizer, t, True)
        if len(ids) < 2:
            raise ValueError(f"text {i} has {len(ids)} token(s): an LM loss needs at least 2 ({t!r})")
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                raise ValueError(f"text {i} is {len(ids)} tokens, longer than max_length={max_length}")
            ids = ids[:max_length]
        rows.append(ids)
    return _pad(tokenizer, rows, [list(r) for r in rows])


def _pad(tokenizer: Any, rows: list[list[int]], labels: list[list[int]]) -> TokenBatch:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (r, lr) in enumerate(zip(rows, labels)):
        ids[b, : len(r)] = torch.tensor(r)
        am[b, : len(r)] = 1
        lab[b, : len(lr)] = torch.tensor(lr)
    return TokenBatch(ids, am, lab)


def token_nll(logits: Float[Tensor, "rows pos vocab"], labels: Int[Tensor, "rows pos"]) -> Float[Tensor, "rows pos-1"]:
    """Next-token NLL at every position (0 where not scored), in float32."""
    lp = logits[:, :-1].float().log_softmax(-1)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return nll * mask


def per_sample_nll(logits: Float[Tensor, "rows pos vocab"], labels: Int[Tensor, "rows pos"]) -> Float[Tensor, " rows"]:
    """Mean NLL of each row's scored tokens (the per-edit loss of GradRatio eq. 1)."""
    n = (labels[:, 1:] != IGNORE).sum(1)
    if bool((n == 0).any()):
        raise ValueError("a row has no scored tokens (empty target)")
    return token_nll(logits, labels).sum(1) / n


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: ``output.logits``, or the output itself (or its
    first item) for a plain torch LM that returns the tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    return output[0] if isinstance(output, (tuple, list)) else output


def scored_positions(labels: Int[Tensor, "rows pos"]) -> tuple[Int[Tensor, " k"], Int[Tensor, " k"]]:
    """``(rows, positions)`` of every logit that is scored: position ``t`` predicts ``labels[:, t + 1]``."""
    rows, pos = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows, pos


def edit_nll(logits: Float[Tensor, "#rows _ vocab"], labels: Int[Tensor, "rows pos"], *,
             scored_only: bool = False) -> Float[Tensor, " rows"]:
    """The edit loss of each row: the mean NLL of its scored (target) tokens, in float32.

    ``logits`` are the model's full ``[rows, pos, vocab]`` logits, or with
    ``scored_only`` only those at the scored positions ``[1, k, vocab]`` in
    :func:`scored_positions` order (what the model returns under
    :func:`~gradlocate.interventions.head_at`).

    Example:
        >>> import torch
        >>> labels = torch.tensor([[-100, -100, 3, 1]])
        >>> full = torch.randn(1, 4, 5)
        >>> at = full[0, [1, 2]][None]                      # the two scored positions
        >>> torch.allclose(edit_nll(full, labels), edit_nll(at, labels, scored_only=True))
        True
    """
    if scored_only:
        rows, pos = scored_positions(labels.to(logits.device))
        if tuple(logits.shape[:2]) != (1, rows.numel()):
            raise ValueError(f"scored_only: expected logits [1, {rows.numel()}, vocab], got {list(logits.shape)}")
        target = labels.to(logits.device)[rows, pos + 1]
        nll = -logits[0].float().log_softmax(-1).gather(-1, target[:, None])[:, 0]
        return row_means(nll, rows, labels.shape[0])
    return per_sample_nll(logits, labels.to(logits.device))


def row_means(values: Float[Tensor, " k"], rows: Int[Tensor, " k"], n_rows: int) -> Float[Tensor, " rows"]:
    """Mean of ``values`` per row index (every row must have at least one value)."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    count = torch.bincount(rows, minlength=n_rows).to(values.dtype)
    if bool((count == 0).any()):
        raise ValueError("a row has no scored tokens (empty target)")
    return total / count


class _HeadNLL(torch.autograd.Function):
    """NLL of ``target`` under ``softmax(h @ weight.T + bias)`` and its gradient in ``h``,
    in one pass over the vocabulary (online softmax): autograd would read the head's
    weight twice (logits, then their gradient), and at the few scored positions of an
    edit batch reading that weight is most of the cost. Float32; no gradient for the head."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                chunk: int) -> Tensor:
        h32 = h.float()
        run_max = torch.full((h32.shape[0], 1), -math.inf, device=h.device)
        run_sum = torch.zeros((h32.shape[0], 1), device=h.device)
        acc = torch.zeros_like(h32)  # sum_v exp(logit_v - max) * weight_v
        for lo in range(0, weight.shape[0], chunk):
            w = weight[lo: lo + chunk].float()
            logits = h32 @ w.T
            if bias is not None:
                logits = logits + bias[lo: lo + chunk].float()
            new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
            rescale = torch.exp(run_max - new_max)
            p = torch.exp(logits - new_max)
            run_sum = run_sum * rescale + p.sum(1, keepdim=True)
            acc = acc * rescale + p @ w
            run_max = new_max
        w_t = weight[target].float()
        logit_t = (h32 * w_t).sum(1) + (bias[target].float() if bias is not None else 0.0)
        ctx.save_for_backward(acc / run_sum - w_t)  # d nll / d h = E_p[w] - w_target
        ctx.h_dtype = h.dtype
        return run_max.squeeze(1) + run_sum.squeeze(1).log() - logit_t

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor) -> tuple[Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_nll.unsqueeze(1)).to(ctx.h_dtype), None, None, None, None


def head_nll(states: Float[Tensor, "k d_model"], head: Any, target: Int[Tensor, " k"],
             chunk: int = 1024) -> Float[Tensor, " k"]:
    """The NLL of ``target`` at each of ``k`` final hidden states under the linear LM
    ``head``, fused (see :class:`_HeadNLL`): equal to ``-log_softmax(head(states))[target]``
    for a plain linear head. Differentiable in ``states``.

    Example:
        >>> import torch
        >>> head, x, t = torch.nn.Linear(4, 10), torch.randn(3, 4), torch.tensor([1, 5, 9])
        >>> ref = -head(x).log_softmax(-1).gather(-1, t[:, None])[:, 0]
        >>> torch.allclose(head_nll(x, head, t), ref, atol=1e-6)
        True
    """
    return _HeadNLL.apply(states, head.weight, getattr(head, "bias", None), target, chunk)


def lm_loss(logits: Float[Tensor, "rows pos vocab"], labels: Int[Tensor, "rows pos"]) -> Float[Tensor, ""]:
    """GradRatio eq. 2: mean next-token NLL over every scored token of the batch."""
    n = (labels[:, 1:] != IGNORE).sum()
    return token_nll(logits, labels).sum() / n

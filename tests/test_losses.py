"""Tokenization masks and the two losses against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlocate.gradients import edit_loss
from gradlocate.losses import (
    context_length,
    lm_loss,
    per_sample_nll,
    target_text,
    tokenize_edits,
    tokenize_texts,
)

PROMPTS = ["The capital of France is", "Paris is in", "Q: who wrote Hamlet?"]
TARGETS = ["Rome", "Germany", "Shakespeare"]


def test_labels_cover_exactly_the_target(tiny_gpt2):
    _, tok = tiny_gpt2
    b = tokenize_edits(tok, PROMPTS, TARGETS)
    for row, p, t in zip(range(3), PROMPTS, TARGETS):
        scored = b.input_ids[row][b.labels[row] != -100]
        assert tok.decode(scored) == " " + t
        real = b.input_ids[row][b.attention_mask[row] == 1]
        assert tok.decode(real) == p + " " + t


def test_append_eos(tiny_gpt2):
    _, tok = tiny_gpt2
    b = tokenize_edits(tok, PROMPTS[:1], TARGETS[:1], append_eos=True)
    scored = b.input_ids[0][b.labels[0] != -100]
    assert scored[-1].item() == tok.eos_token_id


def test_target_spacing():
    assert target_text("a", "b") == " b"
    assert target_text("a ", "b") == "b"
    assert target_text("a", " b") == " b"


def test_edit_loss_matches_manual(tiny_llama):
    model, tok = tiny_llama
    b = tokenize_edits(tok, PROMPTS, TARGETS)
    got = edit_loss(model, b)
    # Independent: one sequence at a time, no padding, loop over target tokens.
    per_edit = []
    for p, t in zip(PROMPTS, TARGETS):
        p_ids = tok(p).input_ids
        t_ids = tok(" " + t, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + t_ids])
        logp = model(ids).logits[0].log_softmax(-1)
        nll = [-logp[len(p_ids) + j - 1, tok_id] for j, tok_id in enumerate(t_ids)]
        per_edit.append(torch.stack(nll).mean())
    torch.testing.assert_close(got, torch.stack(per_edit).mean(), rtol=1e-5, atol=1e-6)


def test_lm_loss_matches_transformers(tiny_gpt2):
    model, tok = tiny_gpt2
    texts = ["a general sentence about nothing", "short one", "another, longer text about the weather today"]
    b = tokenize_texts(tok, texts)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    ref = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    torch.testing.assert_close(lm_loss(logits, b.labels), ref, rtol=1e-5, atol=1e-6)


def test_truncation_and_errors(tiny_gpt2):
    model, tok = tiny_gpt2
    b = tokenize_texts(tok, ["x" * 300], max_length=128)
    assert b.input_ids.shape == (1, 128)
    with pytest.raises(ValueError, match="longer than max_length"):
        tokenize_texts(tok, ["x" * 300], max_length=128, truncate=False)
    with pytest.raises(ValueError, match="empty"):
        tokenize_texts(tok, [])
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        tokenize_edits(tok, ["p"], [""])
    n_ctx = context_length(model)
    with pytest.raises(ValueError, match="longer than the model's context"):
        tokenize_edits(tok, ["y" * n_ctx], ["z"], max_length=n_ctx)
    with pytest.raises(ValueError, match="empty"):
        tokenize_edits(tok, [], [])


def test_rows_slice_trims_padding(tiny_gpt2):
    _, tok = tiny_gpt2
    b = tokenize_edits(tok, ["a", "a much longer prompt here"], ["b", "c"])
    first = b[0:1]
    assert first.input_ids.shape[1] == int(b.attention_mask[0].sum())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=6))
def test_per_sample_nll_is_row_independent(tiny_gpt2, rows):
    """Padding and batch composition do not change an edit's loss."""
    model, tok = tiny_gpt2
    prompts = [PROMPTS[r] for r in rows]
    targets = [TARGETS[r] for r in rows]
    b = tokenize_edits(tok, prompts, targets)
    with torch.no_grad():
        got = per_sample_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        for i, r in enumerate(rows):
            s = tokenize_edits(tok, [PROMPTS[r]], [TARGETS[r]])
            alone = per_sample_nll(model(input_ids=s.input_ids).logits, s.labels)[0]
            assert math.isclose(got[i].item(), alone.item(), rel_tol=1e-5)

"""Every public function leaves the model as it found it: weights bit for bit,
requires_grad flags, train/eval mode, ``.grad``, hooks (the user's survive and still
fire), and no nnsight or other instance forward left behind - also when the model
comes in with unusual state."""

from __future__ import annotations

import math

import pytest
import torch

from gradlocate.models import tiny
from robust_helpers import COMPUTING, assert_same_state, call, model_state, no_instrumentation, numbers

FUNCTIONS = ("down_projections",) + COMPUTING


@pytest.fixture(scope="module")
def model_tok():
    # gpt2 has dropout (p=0.1), so a function that ran in train mode would differ.
    return tiny("gpt2", n_layers=4, d_model=32, n_ctx=64, seed=3)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_state_identical_after_call(model_tok, name):
    model, tok = model_tok
    before = model_state(model)
    call(name, model, tokenizer=tok)
    assert_same_state(before, model)
    assert no_instrumentation(model)


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, *args, **kwargs):
        self.n += 1  # returns None: observes, changes nothing


@pytest.mark.parametrize("name", FUNCTIONS)
def test_unusual_state_restored_and_user_hooks_survive(model_tok, name):
    """Train mode, every requires_grad False, stale .grad tensors, and user hooks of
    every kind: all back as they were, the hooks still registered and still called,
    and the numbers are those of the model in its ordinary state (eval mode)."""
    model, tok = model_tok
    reference = numbers(call(name, model, tokenizer=tok))
    block = model.transformer.h[1]
    down = block.mlp.c_proj
    fwd, pre, bwd, tensor_hook = _Counter(), _Counter(), _Counter(), _Counter()
    handles = [block.register_forward_hook(fwd), model.register_forward_pre_hook(pre),
               block.mlp.register_full_backward_hook(bwd), down.weight.register_hook(tensor_hook)]
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    down.weight.grad = torch.full_like(down.weight, 0.5)
    try:
        before = model_state(model)
        result = call(name, model, tokenizer=tok)
        assert_same_state(before, model)
        assert no_instrumentation(model)
        assert model.training and all(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        assert torch.equal(down.weight.grad, torch.full_like(down.weight, 0.5))
        if name != "down_projections":
            assert fwd.n > 0 and pre.n > 0  # the user's hooks stayed in place during the call
        # ... and after it.
        n = fwd.n
        model(torch.tensor([[1, 2, 3]]))
        assert fwd.n == n + 1
        got = numbers(result)
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-6), name
    finally:
        for h in handles:
            h.remove()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        down.weight.grad = None

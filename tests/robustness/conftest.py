"""Fixtures of the robustness suite: small fresh models (module scope: a test may
break one on purpose)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def gpt2():
    from gradlocate.models import tiny

    return tiny("gpt2", n_layers=4, d_model=32, n_ctx=64, seed=1)


@pytest.fixture(scope="module")
def llama():
    from gradlocate.models import tiny

    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, n_ctx=64, seed=2)

"""The public surface: the verbs, their result types and the errors; plumbing from its module."""

from __future__ import annotations

import inspect
import warnings

import pytest

import gradlocate as gl


def test_the_surface_is_small_and_documented():
    assert 25 <= len(gl.__all__) <= 40, sorted(gl.__all__)
    for name in gl.__all__:
        obj = getattr(gl, name)
        assert inspect.getdoc(obj), f"gradlocate.{name} has no docstring"
    errors = [n for n in gl.__all__ if isinstance(getattr(gl, n), type) and issubclass(getattr(gl, n), Exception)]
    assert sorted(errors) == ["EditTrainingError", "HandleError", "ModelBusyError", "NonFiniteLossError", "StoreError"]


@pytest.mark.parametrize("old, module, new", [
    ("resolve", "gradlocate.handles", "resolve"),
    ("as_edits", "gradlocate.data", "as_edits"),
    ("tukey_fences", "gradlocate.selectors", "tukey_fences"),
    ("embedding_std", "gradlocate.trace.core", "embedding_std"),
    ("DownProjections", "gradlocate.handles", "Handles"),
])
def test_old_names_still_work_with_a_deprecation_warning(old, module, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"gradlocate.{old} is deprecated: use {module}.{new}"):
        got = getattr(gl, old)
    assert got is getattr(importlib.import_module(module), new)


def test_unknown_names_are_attribute_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            gl.nope  # noqa: B018


def test_down_projections_blocks_and_its_old_spelling():
    from gradlocate.models import tiny

    model, _ = tiny("llama", n_layers=2, d_model=16)
    new = gl.down_projections(model, blocks="model.layers", down="self_attn.o_proj")
    with pytest.warns(DeprecationWarning, match="blocks="):
        old = gl.down_projections(model, layers="model.layers", down="self_attn.o_proj")
    assert [x.path for x in old] == [x.path for x in new] == ["model.layers.0.self_attn.o_proj",
                                                                 "model.layers.1.self_attn.o_proj"]

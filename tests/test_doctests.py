"""Every docstring example in the package runs and prints what it says (the examples
in the API reference are code a reader will paste)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gradlocate

# walk_packages: the modules of subpackages (editors/, study/) too
MODULES = sorted(m.name for m in pkgutil.walk_packages(gradlocate.__path__, "gradlocate.") if m.name != "gradlocate.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (run " \
                               f"`python -m pytest --doctest-modules {name.replace('.', '/')}.py` to see them)"

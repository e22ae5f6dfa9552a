"""Griffe extension for the docs build: make gradlocate's docstrings render cleanly.

Two rewrites, applied to each docstring before griffe parses it (only in ``mkdocs
build``, which loads this file from ``mkdocs.yml``; the source is untouched):

* A line that is exactly ``Example:`` becomes ``Examples:``. gradlocate heads its
  doctests ``Example:`` (Google style as Napoleon reads it); griffe's Google parser only
  knows the plural and renders the singular as an admonition of plain Markdown, where
  ``>>>`` lines become block quotes and an output line ``[...]`` after an input line
  ``[...]`` becomes a broken reference link.
* Sphinx roles (``:func:`~gradlocate.data.load_texts```) become inline code
  (```load_texts```; the full path without ``~``): Markdown has no roles, so they would
  show up literally.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _role(m: re.Match) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


def clean(text: str) -> str:
    """The docstring ``text`` with both rewrites applied."""
    return _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", text))


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)

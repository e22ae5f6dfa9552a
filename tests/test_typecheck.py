"""The package is clean under a static type checker: ``mypy`` with the configuration in
``pyproject.toml`` (``[tool.mypy]``), run as the user would run it from the repository root.

Shapes are checked at run time instead, by every other test: jaxtyping's pytest plugin
runs each annotated function of ``gradlocate`` under beartype (``addopts`` in
``pyproject.toml``), with the dimension names of :mod:`gradlocate.dims`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")


def test_mypy_clean():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # About a minute on one core the first time; mypy's cache (.mypy_cache/, git-ignored) speeds up the next.
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out, status = (proc.stdout + proc.stderr).strip(), proc.returncode
    assert status == 0, f"mypy reports errors (run `python -m mypy` from the repository root):\n{out}"

"""The tutorials in ``tutorials/`` run top to bottom, and are stored without outputs;
their executed copies in ``docs/tutorials/`` (what the docs site shows) are current.

Each notebook is executed with nbclient in a fresh kernel running *this* interpreter
(a kernelspec written to a temporary ``JUPYTER_PATH``, so the test works in a fresh
virtual environment and never touches the user's Jupyter setup), with the small
settings (``GRADLOCATE_SMALL=1``), a non-interactive matplotlib backend and one torch
thread per kernel (the machine is shared; several threads per process thrash).

Run alone with ``python -m pytest tests/test_tutorials.py``; the executing tests load
SmolLM2 and are marked ``slow`` (deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_three_selectors", "03_golden_layer", "04_your_own_model", "05_causal_tracing"]
KERNEL = "python3"
CELL_TIMEOUT_S = 600
SMALL_ENV = {"GRADLOCATE_SMALL": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_five_tutorials_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_stripped(path: Path):
    """No stale outputs: every code cell is committed unexecuted."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them (see tutorials/README.md)"
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_the_small_switch(path: Path):
    """The first code cell reads GRADLOCATE_SMALL, so the run below is the small one."""
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("GRADLOCATE_SMALL", "0") == "1"' in first.source


EXECUTED = ROOT / "docs" / "tutorials"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_docs_copy_is_this_notebook_executed(path: Path):
    """The docs site shows ``docs/tutorials/<name>.ipynb``, the copy that
    ``scripts/execute-tutorials`` executed: it must hold exactly this notebook's cells
    (else it is stale: re-run the script), every code cell ran in order, none failed."""
    source = nbformat.read(path, as_version=4)
    copy_path = EXECUTED / path.name
    assert copy_path.exists(), f"no executed copy of {path.name}: run `python scripts/execute-tutorials {path.stem[:2]}`"
    copy = nbformat.read(copy_path, as_version=4)
    nbformat.validate(copy)
    cells = [(c.cell_type, c.source) for c in source.cells]
    assert [(c.cell_type, c.source) for c in copy.cells] == cells, (
        f"docs/tutorials/{path.name} is stale (its cells differ from tutorials/{path.name}): "
        f"run `python scripts/execute-tutorials {path.stem[:2]}`")
    ran = [c.execution_count for c in copy.cells if c.cell_type == "code"]
    assert ran == list(range(1, len(ran) + 1)), f"docs/tutorials/{path.name}: not one in-order run ({ran})"
    errors = [o.get("ename") for c in copy.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, f"docs/tutorials/{path.name} holds errors: {errors}"
    assert any(c.outputs for c in copy.cells if c.cell_type == "code")
    meta = copy.metadata.get("gradlocate", {})
    assert {"executed", "seconds", "small", "versions"} <= set(meta), "not written by scripts/execute-tutorials"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``python3`` kernelspec that runs this interpreter with the small settings."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (gradlocate tutorials test)",
        "language": "python",
        "env": SMALL_ENV,
    }))
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch,
                       record_property: pytest.RecordProperty):
    # JUPYTER_PATH comes first in the kernelspec search, so our spec wins over any other.
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell
    seconds = time.perf_counter() - t0
    record_property("seconds", round(seconds, 1))
    print(f"{path.name}: {seconds:.0f} s")

    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    ran = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert all(n is not None for n in ran), f"{path.name}: cells were skipped"
    assert ran == sorted(ran), f"{path.name}: cells ran out of order"

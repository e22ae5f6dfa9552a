"""What a user installs: one version number, the licences and the type marker inside the
built wheel and sdist, every environment variable documented.

The wheel and the sdist are built here, from a copy of the files that go into them,
with setuptools' PEP 517 backend (what ``pip install .`` and ``python -m build`` call),
without network or build isolation: a few seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import gradlocate

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _source_of_installed() -> Path | None:
    """The source tree an editable install of gradlocate points at, or None (a regular install)."""
    dist = importlib.metadata.distribution("gradlocate")
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable"):
        return None
    url = info.get("url", "")
    return Path(url.removeprefix("file://")).resolve() if url.startswith("file://") else None


def test_installed_metadata_version_is_the_package_version():
    # The README's test command installs this checkout (editable); scripts/test-oldest installs
    # it as a wheel. Either way there is metadata, and an editable one points here: anything
    # else is an environment the suite does not test, so it fails, naming what to run.
    try:
        source = _source_of_installed()
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("gradlocate is imported from a checkout that is not installed: pip install -e '.[test]'")
    package = Path(gradlocate.__file__).resolve().parent
    assert source is None or package.parent == source, (
        f"the installed gradlocate is an editable install of {source}, not of this checkout ({package.parent}): "
        f"pip install -e '.[test]' here")
    installed = importlib.metadata.version("gradlocate")
    assert installed == gradlocate.__version__, (
        f"installed metadata says {installed}, gradlocate.__version__ is {gradlocate.__version__}: "
        f"reinstall (pip install -e .) after changing the version")


def test_the_version_is_single_sourced():
    assert "version" not in PYPROJECT and "version" in PYPROJECT.get("dynamic", [])
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "gradlocate.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", gradlocate.__version__)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from packaging.version import Version

    setuptools = importlib.metadata.version("setuptools")
    assert Version(setuptools) >= Version("77"), (
        f"setuptools {setuptools} is installed; the build backend needs >= 77 (PEP 639 licence metadata, "
        f"[build-system] in pyproject.toml): pip install -e '.[test]'")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "gradlocate", src / "gradlocate", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ["pyproject.toml", "README.md", *PYPROJECT["license-files"]]:
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    # The backend logs to stdout (the two file names it returns go to a file) and
    # rewrites sys.argv (read it first).
    code = ("import json, sys; from setuptools import build_meta as b; out, dest = sys.argv[1:3]; "
            "names = [b.build_wheel(out), b.build_sdist(out)]; open(dest, 'w').write(json.dumps(names))")
    names = src / "built.json"
    run = subprocess.run([sys.executable, "-c", code, str(out), str(names)], cwd=src, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    wheel, sdist = json.loads(names.read_text())
    return {"wheel": out / wheel, "sdist": out / sdist}


def test_the_wheel_has_the_version_licences_and_type_marker(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        licences = {f: z.read(f"{info}/licenses/{f}").decode() for f in PYPROJECT["license-files"]}
    assert meta["Version"] == gradlocate.__version__
    assert meta["License-Expression"] == "MIT"
    assert sorted(meta.get_all("License-File")) == sorted(PYPROJECT["license-files"])
    assert "gradlocate/py.typed" in names and "gradlocate/assets/retain_texts.txt" in names
    assert licences["LICENSE"] == (ROOT / "LICENSE").read_text()
    assert licences["LICENSE"].startswith("MIT License") and "the gradlocate authors" in licences["LICENSE"]
    # The notice of the MIT-licensed code the README credits (LocFT), with its copyright line.
    notice = licences["THIRD_PARTY_LICENSES"]
    assert "ICT-STAR/LocFT" in notice and "Copyright (c) 2026 Wanli Yang" in notice
    assert "ICT-STAR/LocFT, MIT" in (ROOT / "README.md").read_text()


def test_the_sdist_has_the_licences_and_type_marker(built):
    with tarfile.open(built["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "THIRD_PARTY_LICENSES", "gradlocate/py.typed", "pyproject.toml"} <= names


def _documented(path: Path) -> set[str]:
    """The names in a markdown table's first column: ``| `NAME` | ...``."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", path.read_text(), flags=re.M))


def test_every_environment_variable_is_documented():
    sources = [*(ROOT / "gradlocate").rglob("*.py"), *(ROOT / "tutorials").glob("*.ipynb")]
    used = {name for p in sources for name in re.findall(r"\bGRADLOCATE_[A-Z0-9_]+", p.read_text())}
    assert {"GRADLOCATE_DATA", "GRADLOCATE_CACHE", "GRADLOCATE_DEBUG", "GRADLOCATE_THREADS"} <= used
    for doc in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        missing = used - _documented(doc)
        assert not missing, f"{doc.name}'s environment-variable table lacks {sorted(missing)}"

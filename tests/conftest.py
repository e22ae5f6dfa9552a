"""Shared fixtures: tiny random models (fast) and, for tests marked ``slow``, SmolLM2."""

from __future__ import annotations

import contextlib
import os
import warnings

# The test-time type checker (beartype, via jaxtyping's plugin: pyproject addopts) must be
# imported before nnsight, which adds an unhashable ``save`` to ``object``'s namespace that
# beartype's own import trips over (TypeError: unhashable type: 'instancemethod').
with contextlib.suppress(ImportError):
    import beartype  # noqa: F401

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def unchecked(fn):
    """``fn`` (a function, bound method or class) called without the test-time type checker.

    The checker (jaxtyping + beartype, ``addopts`` in ``pyproject.toml``) would reject a
    wrongly typed argument before the library's own check runs. A test that checks the
    library's own error message calls ``unchecked(fn)(...)``: users never run the
    checker, so that message is what they see.

    Not just ``inspect.unwrap(fn)``: the library's own check often sits one call deeper
    (``Handles.layer_indices`` under ``gradratio``, a class's ``__init__``), where the
    checker would still intercept. So the checker is off (jaxtyping's
    ``jaxtyping_disable``, read at every call) for the duration of this one call.
    """
    from jaxtyping import config

    def call(*args, **kwargs):
        was = config.jaxtyping_disable
        config.update("jaxtyping_disable", True)
        try:
            return fn(*args, **kwargs)
        finally:
            config.update("jaxtyping_disable", was)

    return call


@pytest.fixture(name="unchecked")
def _unchecked():
    """:func:`unchecked` as a fixture, for test modules in any folder (the name
    ``conftest`` is not importable reliably: pytest loads one per folder under it)."""
    return unchecked


@pytest.fixture(scope="session")
def tiny_gpt2():
    from gradlocate.models import tiny

    return tiny("gpt2", n_layers=4, d_model=32, seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    from gradlocate.models import tiny

    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_bpe():
    """A tiny LLaMA with a BPE tokenizer that merges and prepends BOS (the byte
    tokenizer does neither), to stress the prompt/target conventions."""
    from gradlocate.models import bpe_tokenizer, tiny

    return tiny("llama", n_layers=4, d_model=32, d_mlp=48, seed=0, tokenizer=bpe_tokenizer())


@pytest.fixture(scope="session")
def smollm2():
    from gradlocate.models import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def zsre_edits():
    from gradlocate.data import load_edits

    return load_edits("zsre", n=8)


def write_folder(path, ids, n_layers, hparams=None, sizes=None, spec=None):
    """A study folder written by hand: its manifest (locft with ``hparams``) and the store its
    cells go to (fingerprinted as the manifest's regime), for judging made-up cells."""
    from gradlocate.editors import settings_for
    from gradlocate.golden.folder import Manifest, StudyFolder
    from gradlocate.golden.matrix import regime_fingerprint
    from gradlocate.golden.store import Fingerprint, RecordStore, digest

    s = settings_for("locft", hparams or {"lr": 1e-3, "epochs": 5})
    man = Manifest(model={"spec": spec, "class": "Tiny", "n_layers": n_layers, "identity": None},
                   edits=[{"id": e, "index": i, "prompt": e, "target_new": "x"} for i, e in enumerate(ids)],
                   regime={"editor": "locft", "settings": s.to_dict(), "seeds": [0],
                           "fingerprint": regime_fingerprint("locft", s)}, sizes=sizes or [len(ids)])
    path.mkdir(parents=True, exist_ok=True)
    folder = StudyFolder(path, man)
    folder.write_manifest()
    part = {"editor": digest(man.regime["fingerprint"])}
    return folder, RecordStore(folder.cells_dir, lambda k: Fingerprint(dict(part)), shard="shard0of1")


@pytest.fixture
def make_folder():
    """:func:`write_folder`, as a fixture."""
    return write_folder

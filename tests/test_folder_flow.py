"""A study folder from end to end, as a user drives it from the command line: `gradlocate
matrix` with LocFT-BF and with R-ROME, `gradlocate report` on the folders, and
`gradlocate.Study.load` reading them back without a model - tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gradlocate as gl
from gradlocate.cli import main

FIXTURE = str(Path(__file__).parent / "fixtures" / "edits_small.json")
FAST_RROME = ["--set", "v_num_grad_steps=3", "--set", "mom2_n_tokens=256",
              "--set", "context_template_length_params=[[4, 5]]"]


@pytest.mark.parametrize("editor, extra", [("locft", ["--set", "epochs=2", "--set", "lr=1e-2"]),
                                           ("r-rome", FAST_RROME)])
def test_matrix_report_and_load(tmp_path, editor, extra):
    out = tmp_path / f"tiny-{editor}"
    base = ["matrix", "--model", "tiny-llama", "--edits", FIXTURE, "--editor", editor, *extra,
            "--capability-edits", "1", "--out", str(out)]
    assert main([*base, "--layers", "0,2", "--shard", "0/2"]) == 0   # layer 0
    # resumed from the folder alone: its model, edits, regime and planned layers (layer 2)
    assert main(["matrix", "--out", str(out), "--shard", "1/2"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["layers"] == [0, 2] and (out / "matrix.json").exists()  # the study's 2 planned layers are complete
    assert man["schema"] == 1 and man["regime"]["editor"] == editor and man["model"]["spec"] == "tiny-llama"
    assert len(man["edits"]) == 4 and man["data"]["source"].endswith("edits_small.json")
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["shard0of2.jsonl", "shard1of2.jsonl"]
    page = tmp_path / "report.md"
    # judged on its planned layers; the selectors need the model: --no-selectors
    assert main(["report", str(out), "--no-selectors", "--n-boot", "20", "--out", str(page)]) == 0
    assert f"### {out.name}" in page.read_text() and (out / "judgment.json").exists()
    s = gl.Study.load(out, selectors=False, n_boot=20)
    assert s.matrix.layers == [0, 2] and s.matrix.n_edits == 4 and s.matrix.editor == editor
    assert s.judgment.to_dict()["layers"] == json.loads((out / "judgment.json").read_text())["layers"]
    cell = json.loads((out / "cells" / "shard0of2.jsonl").read_text().splitlines()[0])
    assert {"converged", "final_loss", "steps", "trajectory"} <= set(cell["train"])  # one summary for every editor


def test_a_folder_of_another_schema_says_so_in_one_line(tmp_path):
    from gradlocate.golden.folder import FolderError, StudyFolder

    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(FolderError, match="schema 99.*reads schema 1 only"):
        StudyFolder.open(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "edits.json").write_text(json.dumps({"edits": []}))
    with pytest.raises(FolderError, match="schema-0 study folder .* run `gradlocate migrate"):
        StudyFolder.open(old)


def test_planned_layers_grow_and_decide_completeness(tmp_path):
    """A folder's planned layers: what ``layers`` asked (a later run's are added; every layer
    absorbs any list); completeness and judging count those layers, not the model's."""
    from gradlocate.golden.folder import StudyFolder
    from gradlocate.golden.matrix import matrix
    from gradlocate.models import tiny

    model, tok = tiny("llama", n_layers=4, d_model=16, seed=0)
    edits = gl.load_edits(FIXTURE)
    hp = {"epochs": 1, "lr": 1e-2}
    out = tmp_path / "f"
    matrix(model, edits, tokenizer=tok, hparams=hp, layers=[1], out=out, capability_edits=0, progress=False)
    f = StudyFolder.open(out)
    assert f.manifest.layers == [1] and f.load()[1].done and str(f.load()[1]).startswith("4/4 cells")
    matrix(model, edits, tokenizer=tok, hparams=hp, layers=[3], out=out, capability_edits=0, progress=False)
    f = StudyFolder.open(out)
    assert f.manifest.layers == [1, 3] and f.load()[0].layers == [1, 3] and f.load()[1].n_layers == 2
    # a shard: fills layer 0 of a study planned over every layer
    matrix(model, edits, tokenizer=tok, hparams=hp, layers=[0], planned_layers=range(4), out=out,
           capability_edits=0, progress=False)
    f = StudyFolder.open(out)
    done = f.load()[1]
    assert f.manifest.layers is None and done.n_layers == 4 and done.complete_layers == [0, 1, 3] and not done.done


def test_a_folder_too_small_for_a_proxy_is_judged_on_every_edit(tmp_path):
    """2 edits cannot give a proxy and 2 test edits: without selectors both are test edits;
    with selectors the error says what to do."""
    from gradlocate.golden.matrix import matrix
    from gradlocate.golden.study import judge_folder
    from gradlocate.models import tiny

    model, tok = tiny("llama", n_layers=2, d_model=16, seed=0)
    out = tmp_path / "two"
    matrix(model, gl.load_edits(FIXTURE)[:2], tokenizer=tok, hparams={"epochs": 1, "lr": 1e-2}, out=out,
           capability_edits=1, progress=False)
    s = judge_folder(out, selectors=False, n_boot=20)
    assert s.params["n_proxy"] == 0 and s.params["n_test"] == 2 and s.judgment.golden is not None
    with pytest.raises(ValueError, match="judge it without selectors"):
        judge_folder(out, selectors=True, compute=False, n_boot=20)

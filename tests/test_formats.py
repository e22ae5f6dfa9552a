"""The record shapes people have on disk, each from a small fixture written for these
tests, with every field in its place; ``datasets`` objects and folders; and a clear
error for a shape nobody knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gradlocate as gl
from gradlocate.data import SHAPES
from gradlocate.models import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def test_knowedit_nested_portability_and_locality():
    e, = gl.load_edits(FIXTURES / "knowedit.json")
    assert (e.prompt, e.target_new, e.subject, e.ground_truth) == (
        "The occupation of Auguste Rodin is", "astronaut", "Auguste Rodin", "sculptor")
    assert e.rephrase_prompts == ("What did Auguste Rodin do for a living?",)
    assert dict(zip(e.portability_kinds, e.portability)) == {
        "Reasoning": ("The workplace of someone with Auguste Rodin's occupation is", "space station"),
        "Subject_Aliasing": ("The occupation of François-Auguste-René Rodin is", "astronaut"),
        "Logical_Generalization": ("Auguste Rodin travels to", "space"),
    }
    assert dict(zip(e.locality_kinds, e.locality)) == {
        "Relation_Specificity": ("The place of birth of Auguste Rodin is", "Paris"),
        "Forgetfulness": ("The occupation of Auguste Rodin's father is", "clerk"),
    }


def test_knowedit_prompts_reach_evaluate():
    model, _ = tiny("gpt2", n_layers=2, d_model=16)
    edits = gl.load_edits(FIXTURES / "knowedit.json")
    pre = gl.evaluate(model, edits, generation=False)
    post = gl.evaluate(model, edits, pre=pre, generation=False)
    tf = post.teacher_forced
    for key in ("portability/Reasoning", "portability/Subject_Aliasing", "portability/Logical_Generalization",
                "locality/Relation_Specificity", "locality/Forgetfulness"):
        assert tf[key] is not None, key
    assert tf["locality"] == 1.0  # the model did not change
    assert tf["portability"] == pytest.approx(
        (tf["portability/Reasoning"] + tf["portability/Subject_Aliasing"] + tf["portability/Logical_Generalization"]) / 3)


def test_wikibio():
    e, = gl.load_edits(FIXTURES / "wikibio.json")
    assert (e.prompt, e.subject) == ("Leo Tolstoy was a Russian writer who", "Leo Tolstoy")
    assert e.target_new.startswith("is regarded as one of the greatest")
    assert e.locality == (("Fyodor Dostoevsky was a", "Russian novelist"),)
    assert e.locality_kinds == ("Relation_Specificity",)


@pytest.mark.parametrize("name", ["wikibigedit.json", "wikibigedit_flat.json"])
def test_wikibigedit_and_its_flattened_form(name):
    e, = gl.load_edits(FIXTURES / name)
    assert (e.prompt, e.target_new, e.subject) == ("Who is the head of state of Exampleland?", "Ada Quill",
                                                   "Exampleland")
    assert e.rephrase_prompts == ("Who leads the state of Exampleland?",)
    port = list(zip(e.portability_kinds, e.portability))
    assert ("personas", ("Yo, who's running Exampleland these days?", "Ada Quill")) in port
    assert ("mhop", ("Where was the head of state of Exampleland born?", "Port Ivory")) in port
    if name == "wikibigedit.json":  # every persona variant
        assert ("personas", ("Kindly identify the current head of state of Exampleland.", "Ada Quill")) in port
    assert e.locality == (("Who is the head of state of Otherland?", "Bram Stone"),)
    assert e.ground_truth is None and e.old_answer is None  # new knowledge: no old answer


def test_wikirecent():
    e, = gl.load_edits(FIXTURES / "wikirecent.json")
    assert (e.prompt, e.target_new, e.ground_truth) == ("The winner of the Zorvath Prize 2024 is", "Mira Talbot", None)
    assert dict(zip(e.portability_kinds, e.portability))["Reasoning"] == (
        "The nationality of the winner of the Zorvath Prize 2024 is", "Canadian")
    assert e.locality_kinds == ("Relation_Specificity",)


def test_raw_rome_counterfact():
    e, = gl.load_edits(FIXTURES / "rome_counterfact.json")
    assert (e.prompt, e.target_new, e.ground_truth, e.subject, e.case_id) == (
        "The mother tongue of Danielle Darrieux is", "English", "French", "Danielle Darrieux", 0)
    assert len(e.rephrase_prompts) == 2
    assert e.locality == (("The mother tongue of Léon Blum is", "French"),
                          ("The native language of Montesquieu is", "French"))


def test_unknown_shape_lists_the_fields_and_the_known_spellings():
    with pytest.raises(ValueError) as err:
        gl.data.as_edits([{"question": "Who?", "answer": "Me"}])
    msg = str(err.value)
    assert "['answer', 'question']" in msg
    for shape in ("CounterFact", "ZsRE", "KnowEdit", "WikiBio", "WikiBigEdit", "ROME CounterFact"):
        assert shape in msg
    assert len(SHAPES) == 6


def test_datasets_objects_folders_and_json_loader(tmp_path):
    import datasets

    records = json.loads((FIXTURES / "knowedit.json").read_text()) + json.loads(
        (FIXTURES / "wikirecent.json").read_text())
    flat = [{"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"]} for r in records]
    ds = datasets.Dataset.from_list(flat)
    assert [e.target_new for e in gl.data.as_edits(ds)] == ["astronaut", "Mira Talbot"]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    assert [e.target_new for e in gl.load_edits(dd, split="test")] == ["Mira Talbot"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        gl.load_edits(dd, split="dev")
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in flat))
    from_loader = datasets.load_dataset("json", data_files=str(path), split="train")
    assert gl.data.as_edits(from_loader)[1].prompt == "The winner of the Zorvath Prize 2024 is"
    # A dataset name resolves like a hub name; here a local folder of data files stands in.
    folder = tmp_path / "my-edits"
    folder.mkdir()
    (folder / "train.jsonl").write_text(path.read_text())
    assert [e.subject for e in gl.load_edits(str(folder))] == ["Auguste Rodin", "Zorvath Prize 2024"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        gl.load_edits(empty)

"""Edit and text loading in every public spelling."""

from __future__ import annotations

import json

import pytest

from gradlocate.data import EditRequest, as_edits, load_edits, load_texts, shared_data_path


def test_counterfact_spelling():
    (e,) = as_edits([{
        "case_id": 7, "prompt": "Reedy Glacier is in", "target_new": "Asia", "subject": "Reedy Glacier",
        "ground_truth": "Antarctica", "rephrase_prompt": "Reedy Glacier lies in the continent",
        "locality_prompt": "Mount Erebus, in", "locality_ground_truth": "Antarctica",
    }])
    assert e == EditRequest("Reedy Glacier is in", "Asia", "Reedy Glacier", "Antarctica", None,
                            ("Reedy Glacier lies in the continent",), (("Mount Erebus, in", "Antarctica"),))
    assert e.case_id == 7 and e.old_answer == "Antarctica"


def test_zsre_spelling():
    (e,) = as_edits({"subject": "Charity Creek", "src": "Which river system contains Charity Creek?",
                     "pred": "Parramatta River", "rephrase": "What river system is Charity Creek in?",
                     "alt": "Chichester River", "answers": ["Parramatta River"],
                     "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"})
    assert (e.prompt, e.target_new, e.ground_truth, e.pred) == (
        "Which river system contains Charity Creek?", "Chichester River", "Parramatta River", "Parramatta River")
    assert e.locality == (("nq question: who wrote hamlet", "Shakespeare"),)


def test_knowedit_nested_blocks():
    (e,) = as_edits([{
        "subject": "Ray Charles", "prompt": "The instrument Ray Charles played was", "target_new": "violin",
        "ground_truth": ["piano"],
        "portability": {"Reasoning": [{"prompt": "The violin is a", "ground_truth": [["string instrument"]]}]},
        "locality": {"Relation_Specificity": [{"prompt": "Ray Charles was born in", "ground_truth": ["Albany"]}]},
    }])
    assert e.ground_truth == "piano"
    assert e.portability == (("The violin is a", "string instrument"),)
    assert e.locality == (("Ray Charles was born in", "Albany"),)


def test_rome_template_filled():
    (e,) = as_edits([{"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "Rome"}}])
    assert e.prompt == "Paris is located in" and e.target_new == "Rome"


@pytest.mark.parametrize("record, exc, msg", [
    ({"target_new": "x"}, ValueError, "has no prompt"),
    ({"prompt": "p"}, ValueError, "has no target"),
    ({"prompt": "p", "target_new": "   "}, ValueError, "target is empty"),
    ({"prompt": 3, "target_new": "x"}, TypeError, "must be a string"),
    ({"prompt": "p", "target_new": "x", "rephrase_prompt": 5}, TypeError, "rephrase"),
])
def test_bad_records(record, exc, msg):
    with pytest.raises(exc, match=msg):
        as_edits([record])


def test_empty_and_wrong_types():
    with pytest.raises(ValueError, match="empty"):
        as_edits([])
    with pytest.raises(TypeError):
        as_edits(["just a string"])


def test_files_json_jsonl_and_shared(tmp_path):
    recs = [{"prompt": f"p{i}", "target_new": f"t{i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert [e.prompt for e in load_edits(tmp_path / "a.json", n=2, offset=1)] == ["p1", "p2"]
    assert len(load_edits(tmp_path / "a.jsonl")) == 5
    with pytest.raises(FileNotFoundError):
        load_edits(tmp_path / "missing.json")
    assert len(load_edits(shared_data_path("zsre"))) == 3000
    cf = load_edits("counterfact")
    assert len(cf) == 3000 and all(e.subject and e.subject in e.prompt for e in cf[:50])


def test_datasets_object():
    import datasets

    ds = datasets.Dataset.from_list([{"src": "q?", "alt": "a", "answers": ["b"]}] * 3)
    assert [e.target_new for e in load_edits(ds)] == ["a"] * 3


def test_load_texts(tmp_path):
    (tmp_path / "t.txt").write_text("first text\n\nsecond text\n\n")
    assert load_texts(tmp_path / "t.txt") == ["first text", "second text"]
    (tmp_path / "t.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert load_texts(tmp_path / "t.jsonl") == ["a b", "c d"]
    with pytest.raises(ValueError, match="empty"):
        load_texts(["", "  "])
    with pytest.raises(TypeError):
        load_texts([1, 2])

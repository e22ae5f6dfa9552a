"""The record store: interrupted and concurrent writers, shards merged, stale and foreign
records refused with errors that say where and what differs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from gradlocate.golden.store import Fingerprint, RecordStore, StoreError, relative_path

FP = {"model": {"name": "gpt2", "weights": ["1.0e+00"]}, "editor": {"name": "locft", "lr": 1e-3},
      "metrics": {"version": 1}}


def test_round_trip_and_the_fingerprint_written_per_part(tmp_path):
    s = RecordStore(tmp_path / "r.jsonl", FP)
    s.append(0, {"score": 0.5})
    s.append("a/1", {"score": [1, None]})
    got = RecordStore(tmp_path / "r.jsonl", FP).read()
    assert got[0]["score"] == 0.5 and got["a/1"]["score"] == [1, None]
    line = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert set(line["fingerprint"]) == {"model", "editor", "metrics"}
    assert line["fingerprint"] == dict(Fingerprint.of(FP).parts)


def test_interrupted_writer_last_line_cut_is_redone(tmp_path):
    path = tmp_path / "r.jsonl"
    s = RecordStore(path, FP)
    for k in range(3):
        s.append(k, {"v": k})
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # the third record's line cut mid-write
    assert sorted(RecordStore(path, FP).read()) == [0, 1]
    # the next writer cuts the cut line off and appends; nothing is lost or merged
    RecordStore(path, FP).append(2, {"v": 2})
    again = RecordStore(path, FP).read()
    assert sorted(again) == [0, 1, 2] and again[2]["v"] == 2
    assert path.read_text().count("\n") == 3
    # a whole record that lost only its newline is kept, and closed
    path.write_bytes(path.read_bytes()[:-1])
    RecordStore(path, FP).append(3, {"v": 3})
    assert sorted(RecordStore(path, FP).read()) == [0, 1, 2, 3]


@pytest.mark.parametrize("cut", [5, 17, 30, 44])
def test_cut_anywhere_in_a_line_is_recognised(tmp_path, cut):
    path = tmp_path / "r.jsonl"
    RecordStore(path, FP).append(0, {"v": 1.25, "flag": True, "name": "x"})
    line = path.read_text()
    path.write_text(line[:cut])
    assert RecordStore(path, FP).read() == {}


def test_other_damage_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    s = RecordStore(path, FP)
    s.append(0, {"v": 1})
    with path.open("a") as f:
        f.write("this is not json\n")
    s.append(1, {"v": 2})
    with pytest.raises(StoreError, match=r"r\.jsonl line 2: not a JSON record"):
        RecordStore(path, FP).read()
    path.write_text('{"key": 0, "v": 1}\n')
    with pytest.raises(StoreError, match=r"line 1: an object without 'fingerprint', expected a record"):
        RecordStore(path, FP).read()
    path.write_text("[1, 2]\n")
    with pytest.raises(StoreError, match=r"line 1: a list, expected a record"):
        RecordStore(path, FP).read()
    path.write_text('{"key": 0, "fingerprint": {}, "v": 1}}\n{"key": 1, "fingerprint": {}}\n')
    with pytest.raises(StoreError, match=r"line 1: not a JSON record \(Extra data"):
        RecordStore(path).read()
    # a record cut short and closed by a later line (an older writer's repair) is only redone
    path.write_text('{"key": 0, "fingerprint": {}, "v": 1\n{"key": 1, "fingerprint": {}}\n')
    assert list(RecordStore(path).read()) == [1]
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(StoreError, match="not UTF-8"):
        RecordStore(path, FP).read()


def test_stale_record_refused_naming_what_differs(tmp_path):
    path = tmp_path / "r.jsonl"
    RecordStore(path, FP).append(0, {"v": 1})
    newer_metrics = {**FP, "metrics": {"version": 2}}
    with pytest.raises(StoreError) as e:
        RecordStore(path, newer_metrics).read()
    msg = str(e.value)
    assert "r.jsonl line 1" in msg and "key 0" in msg and "metrics differs" in msg
    assert "model" not in msg.split("conditions:")[1].split("differs")[0]
    assert isinstance(e.value, ValueError)


def test_foreign_record_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    RecordStore(path, FP).append(0, {"v": 1})
    other_model = {**FP, "model": {"name": "llama", "weights": ["2.0e+00"]}}
    with pytest.raises(StoreError, match=r"line 1: the record for key 0 .*: model differs"):
        RecordStore(path, other_model).read()
    missing_part = {k: v for k, v in FP.items() if k != "editor"}
    with pytest.raises(StoreError, match="editor differs"):
        RecordStore(path, missing_part).read()


def test_per_key_fingerprint(tmp_path):
    path = tmp_path / "r.jsonl"
    per_key = lambda key: {**FP, "cell": key}  # noqa: E731
    s = RecordStore(path, per_key)
    s.append("e1/0", {"v": 1})
    assert "e1/0" in RecordStore(path, per_key).read()
    text = path.read_text().replace('"key": "e1/0"', '"key": "e2/0"')  # a record under another key
    path.write_text(text)
    with pytest.raises(StoreError, match="key 'e2/0'.*cell differs"):
        RecordStore(path, per_key).read()


def _writer(path: str, start: int, n: int) -> None:
    s = RecordStore(path, FP)
    for k in range(start, start + n):
        s.append(k, {"v": k, "pad": "x" * 3000})  # long lines: a torn write would show


def test_concurrent_writers_on_one_file(tmp_path):
    path = str(tmp_path / "r.jsonl")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, 1000 * i, 40)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = RecordStore(path, FP).read()
    assert sorted(got) == list(range(40)) + list(range(1000, 1040))
    assert all(len(line) > 3000 for line in open(path).read().splitlines())


def test_shards_merged_and_read_as_a_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(folder / f"shard{i}.jsonl"), 100 * i, 5)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    merged = RecordStore.merge([folder / "shard0.jsonl", folder / "shard1.jsonl"], FP)
    assert sorted(merged) == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]
    as_folder = RecordStore(folder, FP, shard="shard2")
    assert as_folder.read() == merged
    as_folder.append(7, {"v": 7})
    assert (folder / "shard2.jsonl").exists() and 7 in RecordStore(folder, FP).read()
    (folder / "shard1.jsonl").write_text((folder / "shard1.jsonl").read_text().replace(
        Fingerprint.of(FP).parts["editor"], "0" * 16))
    with pytest.raises(StoreError, match=r"shard1\.jsonl line 1: .*editor differs"):
        RecordStore(folder, FP).read()


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert relative_path(tmp_path / "a" / "b.jsonl") == "a/b.jsonl"
    assert relative_path("/somewhere/else.jsonl") == "/somewhere/else.jsonl"
    assert relative_path(None) is None
    assert os.path.isabs(relative_path("/"))


def test_bad_keys_and_payloads(tmp_path, unchecked):
    s = RecordStore(tmp_path / "r.jsonl", FP)
    with pytest.raises(TypeError, match="int or a str"):
        unchecked(s.append)(1.5, {})
    with pytest.raises(ValueError, match="cannot hold"):
        s.append(1, {"fingerprint": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RecordStore(tmp_path / "nope" / "r.jsonl", FP).append(1, {})

"""Durable JSONL: an interrupted writer loses no finished record and repeats none."""

import json
import re

import pytest

from eto_ref.jsonl import JsonlWriter, read_jsonl_records, write_json_atomic


def test_records_round_trip(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        for i in range(3):
            w.write({"id": i, "text": "é"})
    assert [r["id"] for r in read_jsonl_records(path)] == [0, 1, 2]


def test_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write({"id": 0})
        w.write({"id": 1})
    with open(path, "ab") as f:  # a process killed in the middle of writing record 2
        f.write(b'{"id": 2, "conv')
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert [r["id"] for r in read_jsonl_records(path)] == [0, 1]
    with JsonlWriter(path) as w:  # the resumed run redoes record 2 only
        w.write({"id": 2})
    assert [r["id"] for r in read_jsonl_records(path)] == [0, 1, 2]


def test_corrupt_middle_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"out.jsonl: line 2"):
        read_jsonl_records(path)


def test_missing_file_reads_as_empty(tmp_path):
    assert read_jsonl_records(tmp_path / "none.jsonl") == []


def test_atomic_json_leaves_no_temp_file(tmp_path):
    write_json_atomic({"a": 1}, tmp_path / "s.json")
    write_json_atomic({"a": 2}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_jsonl_log_torn_last_line_is_dropped_and_a_corrupt_middle_line_is_named(tmp_path):
    """Exploration output (eto_ref/jsonl.py): a kill mid-write loses only the record being written."""
    path = tmp_path / "trajectories.jsonl"
    with JsonlWriter(path) as w:
        w.write({"id": "a"})
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "rew')  # killed here
    with pytest.warns(UserWarning, match=r"trajectories.jsonl: line 2: incomplete last record dropped"):
        assert read_jsonl_records(path) == [{"id": "a"}]
    path.write_bytes(b'{"id": "a"}\n\xff\xfe\n{"id": "c"}\n')  # non-UTF-8 bytes inside the file
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: not valid JSON")):
        read_jsonl_records(path)

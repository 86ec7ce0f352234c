"""Append-only JSONL files that survive being killed, and atomic JSON writes.

Long jobs (exploration, evaluation) write one record per finished episode as a
line, flushed and fsynced, so an interrupted run loses nothing it finished. A
process killed in the middle of a write leaves at most one partial last line;
`read_jsonl_records` drops it (with a warning) and `JsonlWriter` cuts it off
before appending, so a resumed run repeats that one episode and no other.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path


def read_jsonl_records(path: str | Path) -> list[dict]:
    """All complete records of a JSONL file ([] if it does not exist). A torn last line is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if number == len(lines):  # the last line has no newline: a write that was cut off
                warnings.warn(f"{path}: line {number}: incomplete last record dropped ({e})")
                continue
            raise ValueError(f"{path}: line {number}: not valid JSON ({e})") from None
    return records


class JsonlWriter:
    """Append records to a JSONL file, one durable line each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self._f = open(self.path, "a", encoding="utf-8")

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write text to a temp file in the same directory, fsync it, then rename it over `path`:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(obj, path: str | Path, indent: int | None = 2) -> Path:
    """Write JSON atomically (see write_text_atomic)."""
    return write_text_atomic(json.dumps(obj, indent=indent, ensure_ascii=False), path)

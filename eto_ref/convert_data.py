"""Convert common chat-data formats into the official ETO trajectory format.

    python -m eto_ref.convert_data data/chats.jsonl --out data/chats.eto.json

Accepted inputs (JSON list or JSONL, one conversation per record):

    Hugging Face messages   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    ShareGPT / OpenAI turns {"conversations": [{"from": "user"|"assistant"|"human"|"gpt"|"system",
                                                "value": ...}, ...]}   ("role"/"content" keys too)

Output: {"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}], "reward"?} per
record, written atomically (JSONL when --out ends in .jsonl). Ids are kept, else
"record-<index>". Every converted record is then checked by the ETO loader, and a
record it rejects is reported by file, record and field.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eto_ref.trajectory import TrajectoryError, load_trajectories, read_records, write_records

ROLE_TO_FROM = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}


def convert_turn(turn: dict, where: str) -> dict:
    """One message ({role, content} or {from, value}) -> an ETO turn {from, value}."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: expected an object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    text = turn.get("content", turn.get("value"))
    if role not in ROLE_TO_FROM:
        raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLE_TO_FROM)})")
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected string content, got {type(text).__name__}")
    return {"from": ROLE_TO_FROM[role], "value": text}


def convert_record(record, index: int) -> dict:
    """A messages / ShareGPT record -> an ETO trajectory record."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    key = "messages" if "messages" in record else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list):
        raise ValueError(f"{key}: expected a list of messages (found keys: {sorted(record)})")
    out = {"id": str(record.get("id", f"record-{index}")),
           "conversations": [convert_turn(t, f"{key}[{i}]") for i, t in enumerate(turns)]}
    if record.get("reward") is not None:
        out["reward"] = record["reward"]
    return out


def convert_file(src: str | Path, dst: str | Path) -> tuple[int, list[str]]:
    """Convert every record of `src` into `dst`; returns (records written, problems of the others)."""
    converted, problems = [], []
    for index, line, record in read_records(src):
        where = f"{src}: record {index}" + ("" if line is None else f" (line {line})")
        try:
            if isinstance(record, TrajectoryError):
                raise ValueError(str(record).split(": ", 1)[-1])
            converted.append(convert_record(record, index))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    write_records(converted, dst)
    return len(converted), problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="input file (JSON list or JSONL)")
    p.add_argument("--out", required=True, help="output file (.json list, or .jsonl)")
    args = p.parse_args(argv)
    try:
        written, problems = convert_file(args.src, args.out)
        for problem in problems:
            print(f"skipped {problem}")
        valid = load_trajectories(args.out) if written else []
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {written} records converted, {len(valid)} valid ETO trajectories, "
          f"{len(problems)} skipped")


if __name__ == "__main__":
    main()

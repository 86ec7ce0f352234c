"""Trajectory data: read and validate the official ETO formats, render, collate.

Formats (the released ETO data loads unchanged), as a JSON list or JSONL:

    SFT trajectory  {"id", "conversations": [{"from": "human"|"gpt", "value": str}, ...], "reward"?}
    preference pair {"id", "prompt": [...], "chosen": [...], "rejected": [...]}

A conversation is `u, a1, o1, ..., an`: human turns are the instruction, the
task and the observations; gpt turns are the agent's. A pair's prompt is the
instruction part and the task (ends with a human turn); chosen and rejected
start and end with a gpt turn.

A bad record is reported by file, record index, id and field. With
`on_error="skip"` it is logged as a warning and the good records are kept; with
`on_error="raise"` a `TrajectoryError` stops the load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
FROM = {v: k for k, v in ROLES.items()}


class TrajectoryError(ValueError):
    """A malformed record; the message names file, record and field."""


@dataclass
class Trajectory:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    reward: float | None = None


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


# --------------------------------------------------------------------------- reading and validation


def read_records(path: str | Path) -> list[tuple[int, object]]:
    """(record index, parsed record or TrajectoryError) for a JSON list or a JSONL file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return _read_records_bytes(path, e)
    if not text.strip():
        raise TrajectoryError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{path}: not valid JSON ({e})") from None
        return list(enumerate(data))
    records = []
    for index, line in enumerate(l for l in text.split("\n") if l.strip()):
        try:
            records.append((index, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((index, TrajectoryError(f"{path}: record {index}: invalid JSON line ({e.msg})")))
    return records


def _read_records_bytes(path: Path, error: UnicodeDecodeError) -> list[tuple[int, object]]:
    """JSONL with some non-UTF-8 lines: those lines are bad records, the rest are kept."""
    records = []
    for index, line in enumerate(l for l in path.read_bytes().split(b"\n") if l.strip()):
        try:
            records.append((index, json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            records.append((index, TrajectoryError(f"{path}: record {index}: not UTF-8 JSON ({e})")))
    return records


def check_turns(turns, field: str, first: str | None, last: str | None) -> list[dict]:
    """Validate a list of ETO turns; returns them as chat messages. Raises ValueError('field: problem')."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{field}: expected a non-empty list of turns")
    messages, previous = [], None
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"{where}.from: unknown role {role!r} (expected 'human' or 'gpt')")
        if not isinstance(value, str):
            raise ValueError(f"{where}.value: expected a string, got {type(value).__name__}")
        if role == "gpt" and not value.strip():
            raise ValueError(f"{where}.value: empty agent turn")
        if previous is not None and role == previous:
            raise ValueError(f"{where}.from: expected {'human' if role == 'gpt' else 'gpt'} after {previous!r}, got {role!r}")
        previous = role
        messages.append({"role": ROLES[role], "content": value})
    if first and turns[0]["from"] != first:
        raise ValueError(f"{field}[0].from: must be {first!r}, got {turns[0]['from']!r}")
    if last and turns[-1]["from"] != last:
        raise ValueError(f"{field}[{len(turns) - 1}].from: must end with {last!r}, got {turns[-1]['from']!r}")
    return messages


def _record_id(record) -> str | None:
    if not isinstance(record, dict) or "id" not in record:
        raise ValueError("id: missing")
    return str(record["id"])


def parse_trajectory(record) -> Trajectory:
    rid = _record_id(record)
    if "conversations" not in record:
        raise ValueError("conversations: missing")
    messages = check_turns(record["conversations"], "conversations", first=None, last="gpt")
    reward = record.get("reward")
    if reward is not None and not isinstance(reward, (int, float)):
        raise ValueError(f"reward: expected a number, got {reward!r}")
    return Trajectory(rid, messages, None if reward is None else float(reward))


def parse_pair(record) -> PreferencePair:
    rid = _record_id(record)
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{key}: missing")
    prompt = check_turns(record["prompt"], "prompt", first=None, last="human")
    chosen = check_turns(record["chosen"], "chosen", first="gpt", last="gpt")
    rejected = check_turns(record["rejected"], "rejected", first="gpt", last="gpt")
    if chosen == rejected:
        raise ValueError("rejected: identical to chosen (nothing to prefer)")
    return PreferencePair(rid, prompt, chosen, rejected)


def _load(path, parse, on_error: str) -> list:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    good, seen = [], set()
    for index, record in read_records(path):
        try:
            if isinstance(record, TrajectoryError):
                raise record
            try:
                item = parse(record)
            except ValueError as e:
                rid = record.get("id") if isinstance(record, dict) else None
                raise TrajectoryError(f"{path}: record {index} (id {rid!r}): {e}") from None
            if item.id in seen:
                raise TrajectoryError(f"{path}: record {index} (id {item.id!r}): id: duplicate of an earlier record")
            seen.add(item.id)
            good.append(item)
        except TrajectoryError as e:
            if on_error == "raise":
                raise
            log.warning("skipping bad record: %s", e)
    return good


def load_trajectories(path: str | Path, on_error: str = "skip") -> list[Trajectory]:
    """Read SFT trajectories (JSON list or JSONL), validating each record."""
    return _load(path, parse_trajectory, on_error)


def load_pairs(path: str | Path, on_error: str = "skip") -> list[PreferencePair]:
    """Read preference pairs (JSON list or JSONL), validating each record."""
    return _load(path, parse_pair, on_error)


# --------------------------------------------------------------------------- writing


def to_turns(messages: list[dict]) -> list[dict]:
    return [{"from": FROM[m["role"]], "value": m["content"]} for m in messages]


def _write_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_trajectories(trajectories: list[Trajectory], path: str | Path) -> None:
    """Write the official SFT format (JSON list), atomically."""
    _write_json([{"id": t.id, "conversations": to_turns(t.messages),
                  **({} if t.reward is None else {"reward": t.reward})} for t in trajectories], path)


def save_pairs(pairs: list[PreferencePair], path: str | Path) -> None:
    """Write the official pair format (JSON list), atomically."""
    _write_json([{"id": p.id, "prompt": to_turns(p.prompt), "chosen": to_turns(p.chosen),
                  "rejected": to_turns(p.rejected)} for p in pairs], path)


# --------------------------------------------------------------------------- rendering and batching


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # True on agent tokens
    truncated: bool = False


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    prompt_len: int  # tokens of the shared prompt (never scored)
    truncated: bool = False


def truncate(ids: list[int], mask: list[bool], max_len: int) -> Example:
    """Cut from the right; ids and mask stay aligned."""
    return Example(ids[:max_len], mask[:max_len], truncated=len(ids) > max_len)


def encode_sft(traj: Trajectory, tokenizer, max_len: int) -> Example:
    """Render a trajectory with the chat template: ids + agent-token mask (instruction and observations masked)."""
    ids, mask = tokenizer.render(traj.messages)
    return truncate(ids, mask, max_len)


def encode_pair(pair: PreferencePair, tokenizer, max_len: int) -> PairExample:
    """Render prompt+chosen and prompt+rejected. The shared prompt (incl. its "OK" turn) is masked on both sides."""
    prompt_len = len(tokenizer.render(pair.prompt)[0])
    sides = []
    for side in (pair.chosen, pair.rejected):
        ids, mask = tokenizer.render(pair.prompt + side)
        mask = [False] * prompt_len + mask[prompt_len:]
        sides.append(truncate(ids, mask, max_len))
    return PairExample(sides[0], sides[1], prompt_len, sides[0].truncated or sides[1].truncated)


def collate_sft(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into (B, T) tensors: input_ids, loss_mask (False on pad), attention_mask (False on pad)."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.bool)  # (B, T)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.bool)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        loss_mask[i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, padded together: one (2B, T) batch, one forward."""
    return collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)


def split_chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> (B, ...), (B, ...): undo `collate_pairs`' concatenation."""
    half = x.shape[0] // 2
    return x[:half], x[half:]

"""Trajectory data: read and validate the official ETO formats, render with the agent mask.

Batches of rendered examples: eto_ref/batches.py.

Formats (the released ETO data loads unchanged), as a JSON list or as JSONL
(one record per line); the reader tells them apart by the first character:

    SFT trajectory  {"id", "conversations": [{"from": "human"|"gpt", "value": str}, ...], "reward"?: float}
    preference pair {"id", "prompt": [...turns...], "chosen": [...], "rejected": [...]}

A conversation is `u, a1, o1, ..., an`: human turns are the instruction, the
task and the observations; gpt turns are the agent's (the first is the "OK" that
answers the instruction). An optional "system" turn may come first. A pair's
prompt is the instruction part and the task (ends with a human turn); chosen
and rejected start and end with a gpt turn. Roles become chat roles:
"human" -> "user", "gpt" -> "assistant", "system" -> "system".

A bad record is reported by file, record index, id and field, e.g.

    data/x.json: record 7 (id 'abc'): conversations[3].from: expected 'gpt' after 'human', got 'human'
    data/x.jsonl: record 7 (id 'abc', line 8): conversations[3].from: expected 'gpt' after 'human', got 'human'
    data/x.jsonl: record 8 (line 9): invalid JSON line (Expecting ',' delimiter: line 1 column 40 (char 39))
    data/x.jsonl: record 9 (id 'abc', line 10): id: duplicate of record 7 (ids must be unique)

With `on_error="skip"` it is logged as a warning and the good records are kept;
with `on_error="raise"` a `TrajectoryError` stops the load. Only a file that
cannot be read at all (empty, or a JSON list that does not parse) always raises.
Each loaded record remembers where it came from (`.source`), so a later warning
(a trajectory longer than max_len, cut when rendered) names the same file and record.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


from eto_ref.jsonl import write_text_atomic

log = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ETO "from" -> chat role
FROM = {v: k for k, v in ROLES.items()}


class TrajectoryError(ValueError):
    """A malformed record or file; the message names the file, the record and the field."""


@dataclass
class Trajectory:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    reward: float | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # "<file>: record i (id ...)"


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # chat messages: instruction, "OK", task (ends with a user turn)
    chosen: list[dict]  # chat messages: starts and ends with an assistant turn
    rejected: list[dict]
    source: str | None = field(default=None, compare=False, repr=False)  # "<file>: record i (id ...)"


# --------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[tuple[int, int | None, object]]:
    """(record index, line number or None, parsed record or TrajectoryError) for a JSON list or JSONL file.

    The record index is 0-based; JSONL records also carry their 1-based line
    number. An invalid JSONL line is a bad record, not a crash.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    if not data.strip():
        raise TrajectoryError(f"{path}: file is empty")
    if data.lstrip().startswith(b"["):
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrajectoryError(f"{path}: not a valid JSON list ({e})") from None
        return [(i, None, r) for i, r in enumerate(records)]
    try:  # a single pretty-printed JSON object is one record
        whole = json.loads(data.decode("utf-8"))
        if isinstance(whole, dict):
            return [(0, None, whole)]
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass  # JSONL: parse line by line below
    records = []
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    for index, (number, line) in enumerate(lines):
        try:
            records.append((index, number, json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            error = TrajectoryError(f"{path}: record {index} (line {number}): invalid JSON line ({e})")
            records.append((index, number, error))
    return records


# --------------------------------------------------------------------------- validation


def check_turns(turns, field: str, first: str | None, last: str | None, allow_empty_agent: bool = False) -> list[dict]:
    """Validate a list of ETO turns and return them as chat messages.

    Checks: a non-empty list of {"from", "value"} objects, known roles, string
    values, non-empty agent turns (unless `allow_empty_agent`), a "system" turn
    only at index 0, human and gpt alternating, and the first (after any system
    turn) and last roles when given. Raises ValueError("<field>[i].<key>: <problem>").
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{field}: expected a non-empty list of turns, got {_describe(turns)}")
    messages, previous = [], None
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object with 'from' and 'value', got {_describe(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise ValueError(f"{where}.{key}: missing")
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            raise ValueError(f"{where}.from: unknown role {role!r} (expected 'human' or 'gpt')")
        if not isinstance(value, str):
            raise ValueError(f"{where}.value: expected a string, got {_describe(value)}")
        if role == "system" and i > 0:
            raise ValueError(f"{where}.from: a 'system' turn may only come first")
        if role == "gpt" and not value.strip() and not allow_empty_agent:
            raise ValueError(f"{where}.value: empty agent turn")
        expected = {"human": "gpt", "gpt": "human"}.get(previous) or first
        if expected is not None and role != "system" and role != expected:
            after = f"after {previous!r}" if previous in ("human", "gpt") else "first"
            raise ValueError(f"{where}.from: expected {expected!r} {after}, got {role!r}")
        previous = role
        messages.append({"role": ROLES[role], "content": value})
    if last is not None and previous != last:
        raise ValueError(f"{field}[{len(turns) - 1}].from: must end with {last!r}, got {previous!r}")
    return messages


def _describe(value) -> str:
    if value is None:
        return "null"
    return "an empty list" if value == [] else type(value).__name__


def _record_id(record) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_describe(record)}")
    if "id" not in record:
        raise ValueError("id: missing")
    rid = record["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise ValueError(f"id: expected a non-empty string or an integer, got {rid!r}")
    return str(rid)  # integer ids (some released files) become strings


def parse_reward(reward) -> float | None:
    """A record's reward as a float (numbers, or numeric strings like "1.0"); ValueError otherwise."""
    if reward is None:
        return None
    if isinstance(reward, str):
        try:
            reward = float(reward)
        except ValueError:
            raise ValueError(f"reward: expected a number, got {reward!r}") from None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"reward: expected a finite number, got {reward!r}")
    return float(reward)


def parse_trajectory(record, episode: bool = False) -> Trajectory:
    """One SFT record -> Trajectory. Raises ValueError naming the field.

    A conversation that ends with an observation (as explored episodes do) loses
    that last human turn: nothing after the agent's last action is trained on.
    An `episode` (an explored run, for RL) must carry its reward, and may hold an
    empty reply: the agent ended its turn at once, a choice its reward judges.
    """
    rid = _record_id(record)
    if "conversations" not in record:
        raise ValueError("conversations: missing")
    turns = record["conversations"]
    if isinstance(turns, list) and len(turns) > 2 and isinstance(turns[-1], dict) and turns[-1].get("from") == "human":
        turns = turns[:-1]
    messages = check_turns(turns, "conversations", first="human", last="gpt", allow_empty_agent=episode)
    reward = parse_reward(record.get("reward"))
    if episode and reward is None:
        raise ValueError("reward: missing; RL learns from each episode's reward")
    return Trajectory(rid, messages, reward)


def parse_pair(record) -> PreferencePair:
    """One preference record -> PreferencePair. Raises ValueError naming the field."""
    rid = _record_id(record)
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{key}: missing")
    prompt = check_turns(record["prompt"], "prompt", first="human", last="human")
    chosen = check_turns(record["chosen"], "chosen", first="gpt", last="gpt")
    # An explored failure may hold an empty reply (the policy stopped at once): a lesson, not broken data.
    rejected = check_turns(record["rejected"], "rejected", first="gpt", last="gpt", allow_empty_agent=True)
    if chosen == rejected:
        raise ValueError("rejected: identical to chosen (nothing to prefer)")
    return PreferencePair(rid, prompt, chosen, rejected)


def record_name(path, index: int, rid, line: int | None) -> str:
    """`data/x.jsonl: record 7 (id 'abc', line 8)`: how messages name a record."""
    return f"{path}: record {index} (id {rid!r}" + ("" if line is None else f", line {line}") + ")"


EXPECTED_FORMAT = {
    "trajectory": '{"id": ..., "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}',
    "pair": '{"id": ..., "prompt": [<human/gpt turns, ending with human>], "chosen": [<gpt first>], '
            '"rejected": [<gpt first>]}',
}


def problem_kind(message: str) -> str:
    """`conversations[3].from: unknown role 'user' (...)` -> `conversations[i].from: unknown role 'user'`."""
    return re.sub(r"\[\d+\]", "[i]", message.split(" (")[0])


def format_hint(records: list, kind: str) -> str:
    """What a file that holds no valid record looks like instead, when it is a known other format."""
    sample = next((r for _, _, r in records if isinstance(r, dict)), {})
    turns = sample.get("conversations") or []
    roles = {t.get("from", t.get("role")) for t in turns if isinstance(t, dict)}
    if "messages" in sample:
        return "it looks like the Hugging Face `messages` (role/content) format"
    if roles & {"user", "assistant"}:
        return "it looks like ShareGPT/OpenAI turns with user/assistant roles"
    if kind == "trajectory" and {"prompt", "chosen", "rejected"} <= set(sample):
        return "it holds preference pairs: pass it as --pairs"
    if kind == "pair" and "conversations" in sample:
        return "it holds SFT trajectories: pass it as --data"
    return ""


def no_valid_record_error(path, records: list, problems: Counter, kind: str) -> TrajectoryError:
    """One error for a file none of whose records could be used: counts, the commonest problem, the format."""
    common, n = problems.most_common(1)[0] if problems else ("no records", 0)
    hint = format_hint(records, kind)
    return TrajectoryError(
        f"{path}: 0 of {len(records)} records are valid ETO {kind} records; most common problem "
        f"({n} records): {common}. Expected one {kind} per list item or line: {EXPECTED_FORMAT[kind]}"
        + (f". {hint[0].upper() + hint[1:]}" if hint else "")
        + f". To convert Hugging Face messages or ShareGPT files: python -m eto_ref.convert_data {path} "
          f"--out {Path(path).with_suffix('.eto.json')}")


def _load(path, parse, on_error: str, kind: str) -> list:
    """Parse every record of `path`; bad ones are skipped with a warning or raised (`on_error`).

    A record whose id was already seen is bad too (the first one is kept): ids
    key the reference log-prob cache and the exploration resume. A file with no
    valid record at all is always an error (see no_valid_record_error).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    records = read_records(path)
    good, first_index, problems = [], {}, Counter()  # first_index: id -> index of the record that holds it
    for index, line, record in records:
        try:
            if isinstance(record, TrajectoryError):
                raise record
            rid = record.get("id") if isinstance(record, dict) else None
            try:
                item = parse(record)
            except ValueError as e:
                problems[problem_kind(str(e))] += 1
                raise TrajectoryError(f"{record_name(path, index, rid, line)}: {e}") from None
            if item.id in first_index:
                problems["id: duplicate"] += 1
                raise TrajectoryError(f"{record_name(path, index, rid, line)}: id: duplicate of record "
                                      f"{first_index[item.id]} (ids must be unique)")
            first_index[item.id] = index
            item.source = record_name(path, index, rid, line)
            good.append(item)
        except TrajectoryError as e:
            if on_error == "raise":
                raise
            problems["invalid JSON line"] += isinstance(record, TrajectoryError)
            log.warning("skipping bad record: %s", e)
    if records and not good:
        raise no_valid_record_error(path, records, problems, kind)
    if len(good) < len(records):
        log.warning("%s: kept %d of %d records (%d bad)", path, len(good), len(records), len(records) - len(good))
    return good


def load_trajectories(path: str | Path, on_error: str = "skip") -> list[Trajectory]:
    """Read SFT trajectories (JSON list or JSONL), validating each record."""
    return _load(path, parse_trajectory, on_error, "trajectory")


def load_episodes(path: str | Path) -> list[Trajectory]:
    """Read explored episodes, each with its reward (`parse_trajectory(episode=True)`). A bad record is an
    error, not skipped: RL compares the episodes of a batch or a group, and a missing one would bias that."""
    return _load(path, partial(parse_trajectory, episode=True), "raise", "episode")


def load_pairs(path: str | Path, on_error: str = "skip") -> list[PreferencePair]:
    """Read preference pairs (JSON list or JSONL), validating each record."""
    return _load(path, parse_pair, on_error, "pair")


# --------------------------------------------------------------------------- writing


def to_turns(messages: list[dict]) -> list[dict]:
    """Chat messages -> official ETO turns."""
    return [{"from": FROM[m["role"]], "value": m["content"]} for m in messages]


def write_records(records: list[dict], path: str | Path) -> None:
    """Write records atomically: JSONL if the name ends in .jsonl, else a JSON list.

    The text goes to a temp file in the same directory, is fsynced, then renamed
    over `path` (os.replace), so a reader never sees a half-written file.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    write_text_atomic(text, path)


def save_trajectories(trajectories: list[Trajectory], path: str | Path) -> None:
    """Write the official SFT format (JSON list, or JSONL for *.jsonl), atomically."""
    write_records([{"id": t.id, "conversations": to_turns(t.messages),
                    **({} if t.reward is None else {"reward": t.reward})} for t in trajectories], path)


def save_pairs(pairs: list[PreferencePair], path: str | Path) -> None:
    """Write the official pair format (JSON list, or JSONL for *.jsonl), atomically."""
    write_records([{"id": p.id, "prompt": to_turns(p.prompt), "chosen": to_turns(p.chosen),
                    "rejected": to_turns(p.rejected)} for p in pairs], path)


# --------------------------------------------------------------------------- rendering


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # True on agent tokens (assistant content + end-of-turn)
    truncated: bool = False


@dataclass
class PairExample:
    chosen: Example  # prompt + chosen, rendered
    rejected: Example  # prompt + rejected, rendered
    prompt_len: int  # tokens of the shared prompt, identical on both sides, never scored
    truncated: bool = False  # either side was cut to max_len

    @property
    def chosen_ids(self) -> list[int]:
        return self.chosen.input_ids

    @property
    def chosen_mask(self) -> list[bool]:
        return self.chosen.loss_mask

    @property
    def rejected_ids(self) -> list[int]:
        return self.rejected.input_ids

    @property
    def rejected_mask(self) -> list[bool]:
        return self.rejected.loss_mask


def truncate(ids: list[int], mask: list[bool], max_len: int) -> Example:
    """Cut from the right to at most max_len tokens; ids and mask stay aligned; flag the cut."""
    assert len(ids) == len(mask), "ids and mask must be aligned"
    return Example(ids[:max_len], mask[:max_len], truncated=len(ids) > max_len)


def warn_if_cut(example: Example, full_len: int, max_len: int, source: str, field_name: str) -> None:
    """Log a warning naming the record and field when rendering cut it to max_len (the rest is not trained on)."""
    if example.truncated:
        log.warning("%s: %s: %d tokens, longer than max_len %d; cut to the first %d (%d agent tokens kept)",
                    source, field_name, full_len, max_len, max_len, sum(example.loss_mask))


def encode_sft(traj: Trajectory, tokenizer, max_len: int) -> Example:
    """Render a trajectory with the chat template: ids + agent-token mask (instruction, observations masked).

    `tokenizer.render(messages) -> (ids, mask)` decides the mask: True on the
    content and end-of-turn token of every assistant turn. A trajectory longer
    than max_len is cut from the right, flagged, and named in a warning.
    """
    ids, mask = tokenizer.render(traj.messages)
    example = truncate(ids, mask, max_len)
    warn_if_cut(example, len(ids), max_len, traj.source or f"trajectory {traj.id!r}", "conversations")
    return example


def encode_pair(pair: PreferencePair, tokenizer, max_len: int) -> PairExample:
    """Render prompt + chosen and prompt + rejected; the shared prompt is masked on both sides.

    The prompt (instruction, its "OK" assistant turn, the task) is the first
    prompt_len tokens of both renderings; its mask is forced False there, so
    log pi(e) sums only the agent turns after the prompt (losses.sequence_logprobs).
    """
    prompt_ids, _ = tokenizer.render(pair.prompt)
    prompt_len = len(prompt_ids)
    sides = []
    for side in (pair.chosen, pair.rejected):
        ids, mask = tokenizer.render(pair.prompt + side)
        if ids[:prompt_len] != prompt_ids:
            raise ValueError(f"pair {pair.id!r}: the rendered prompt is not a prefix of prompt + response; "
                             "the tokenizer must render a conversation as per-message segments")
        mask = [False] * prompt_len + list(mask[prompt_len:])
        sides.append(truncate(ids, mask, max_len))
        warn_if_cut(sides[-1], len(ids), max_len, pair.source or f"pair {pair.id!r}",
                    "prompt + " + ("chosen" if len(sides) == 1 else "rejected"))
    chosen, rejected = sides
    return PairExample(chosen, rejected, prompt_len, chosen.truncated or rejected.truncated)

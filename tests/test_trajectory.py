"""Reading, validating, rendering and batching trajectories in the official ETO formats."""

import json
import logging

import pytest
import torch

from eto_ref.losses import bc_loss
from eto_ref.tokenizer import train_bpe_tokenizer
from eto_ref.trajectory import (
    PreferencePair, Trajectory, TrajectoryError, collate_pairs, collate_sft, encode_pair, encode_sft,
    load_pairs, load_trajectories, save_pairs, save_trajectories, split_chosen_rejected,
)

INSTRUCTION = [{"from": "human", "value": "You are an agent. Act."}, {"from": "gpt", "value": "OK"}]
TASK = {"from": "human", "value": "Put a mug in the cabinet."}
A1 = {"from": "gpt", "value": "Thought: find mug.\nAction: go to desk 1"}
O1 = {"from": "human", "value": "Observation: You see a mug 1."}
A2 = {"from": "gpt", "value": "Thought: take it.\nAction: take mug 1 from desk 1"}
GOOD = {"id": "t0", "conversations": INSTRUCTION + [TASK, A1, O1, A2], "reward": 1.0}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t["value"] for t in GOOD["conversations"]] * 10
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"), template="chatml")


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


BAD_TRAJECTORIES = {
    "missing id": ({"conversations": GOOD["conversations"]}, r"id: missing"),
    "missing conversations": ({"id": "x"}, r"conversations: missing"),
    "unknown role": ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}]}, r"conversations\[0\]\.from: unknown role 'bot'"),
    "non-alternating": ({"id": "x", "conversations": INSTRUCTION + [TASK, O1, A1]}, r"conversations\[3\]\.from: expected gpt after 'human'"),
    "ends with human": ({"id": "x", "conversations": INSTRUCTION + [TASK, A1, O1]}, r"conversations\[4\]\.from: must end with 'gpt'"),
    "empty action": ({"id": "x", "conversations": INSTRUCTION + [TASK, {"from": "gpt", "value": "  "}]}, r"conversations\[3\]\.value: empty agent turn"),
    "non-string value": ({"id": "x", "conversations": INSTRUCTION + [TASK, {"from": "gpt", "value": 3}]}, r"conversations\[3\]\.value: expected a string"),
    "invalid json line": ('{"id": "x", "conversations": [', r"record 1: invalid JSON line"),
    "duplicate id": (GOOD, r"id: duplicate"),
}


@pytest.mark.parametrize("kind", list(BAD_TRAJECTORIES))
def test_each_bad_trajectory_is_named_and_the_rest_kept(kind, tmp_path, caplog):
    bad, message = BAD_TRAJECTORIES[kind]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [GOOD, bad, {**GOOD, "id": "t2"}])
    with caplog.at_level(logging.WARNING):
        kept = load_trajectories(path)
    assert [t.id for t in kept] == ["t0", "t2"]
    assert any(f"data.jsonl: record 1" in r.message for r in caplog.records)
    with pytest.raises(TrajectoryError, match=message):
        load_trajectories(path, on_error="raise")


def test_non_utf8_line_is_a_bad_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe garbage\n" + json.dumps({**GOOD, "id": "t2"}).encode() + b"\n")
    assert [t.id for t in load_trajectories(path)] == ["t0", "t2"]


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "e.json").write_text("")
    with pytest.raises(TrajectoryError, match="e.json: file is empty"):
        load_trajectories(tmp_path / "e.json")


def pair_record(**overrides):
    return {"id": "p0", "prompt": INSTRUCTION + [TASK], "chosen": [A1, O1, A2], "rejected": [A2], **overrides}


@pytest.mark.parametrize("bad,message", [
    (pair_record(rejected=[A1, O1, A2]), r"rejected: identical to chosen"),
    (pair_record(chosen=[O1, A2]), r"chosen\[0\]\.from: must be 'gpt'"),
    (pair_record(prompt=INSTRUCTION), r"prompt\[1\]\.from: must end with 'human'"),
    ({"id": "p0", "prompt": INSTRUCTION + [TASK], "chosen": [A1]}, r"rejected: missing"),
])
def test_bad_pairs(bad, message, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair_record(id="ok"), bad]))
    assert [p.id for p in load_pairs(path)] == ["ok"]
    with pytest.raises(TrajectoryError, match=r"pairs.json: record 1 \(id 'p0'\): " + message):
        load_pairs(path, on_error="raise")


def test_json_list_and_jsonl_round_trip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD]))
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    a, b = load_trajectories(tmp_path / "a.json"), load_trajectories(tmp_path / "a.jsonl")
    assert a == b and a[0].reward == 1.0 and a[0].messages[1] == {"role": "assistant", "content": "OK"}
    save_trajectories(a, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == [GOOD]
    pairs = load_pairs(_write(tmp_path / "p.json", [pair_record()]))
    save_pairs(pairs, tmp_path / "p2.json")
    assert json.loads((tmp_path / "p2.json").read_text()) == [pair_record()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.jsonl", "out.json", "p.json", "p2.json"]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_sft_mask_holds_exactly_the_agent_turns(tok):
    traj = load_trajectories(_write_tmp(GOOD))[0]
    ex = encode_sft(traj, tok, max_len=10_000)
    masked = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert masked == "OK<|im_end|>" + A1["value"] + "<|im_end|>" + A2["value"] + "<|im_end|>"
    assert not ex.truncated


def _write_tmp(record, _counter=[0]):
    import tempfile, pathlib
    _counter[0] += 1
    path = pathlib.Path(tempfile.mkdtemp()) / "t.json"
    path.write_text(json.dumps([record]))
    return path


def test_truncation_keeps_mask_aligned_and_is_flagged(tok):
    traj = load_trajectories(_write_tmp(GOOD))[0]
    full = encode_sft(traj, tok, 10_000)
    cut = encode_sft(traj, tok, 25)
    assert cut.truncated and len(cut.input_ids) == len(cut.loss_mask) == 25
    assert cut.input_ids == full.input_ids[:25] and cut.loss_mask == full.loss_mask[:25]


def test_pair_prompt_is_masked_on_both_sides(tok):
    pair = load_pairs(_write_tmp(pair_record()))[0]
    ex = encode_pair(pair, tok, 10_000)
    for side, turns in ((ex.chosen, pair.chosen), (ex.rejected, pair.rejected)):
        assert not any(side.loss_mask[:ex.prompt_len])  # not even the "OK" of the instruction part
        masked = tok.decode([i for i, m in zip(side.input_ids, side.loss_mask) if m])
        assert masked == "".join(t["content"] + "<|im_end|>" for t in turns if t["role"] == "assistant")
    assert ex.chosen.input_ids[:ex.prompt_len] == ex.rejected.input_ids[:ex.prompt_len]


def test_collation_pads_with_mask_false_and_pairs_share_one_batch(tok):
    pair = load_pairs(_write_tmp(pair_record()))[0]
    ex = encode_pair(pair, tok, 10_000)
    batch = collate_pairs([ex, ex], pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 4
    chosen, rejected = split_chosen_rejected(batch["loss_mask"])
    assert chosen.sum() > rejected.sum()
    n = len(ex.rejected.input_ids)
    assert not batch["attention_mask"][2, n:].any() and not batch["loss_mask"][2, n:].any()
    assert (batch["input_ids"][2, n:] == tok.pad_id).all()
    # padding never changes the BC loss
    logits = torch.randn(4, batch["input_ids"].shape[1], tok.vocab_size)
    alone = collate_sft([ex.rejected], tok.pad_id)
    torch.testing.assert_close(bc_loss(logits[2:3, :n], alone["input_ids"], alone["loss_mask"]),
                               bc_loss(logits[2:3], batch["input_ids"][2:3], batch["loss_mask"][2:3]))

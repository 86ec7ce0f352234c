"""Reading, validating, rendering and batching trajectories in the official ETO formats.

Rendering tests use `FakeTokenizer` (tests/conftest.py), whose ids are written by
hand: one header id per message, one id per character, END closing each turn.
One test at the end uses the real `eto_ref.tokenizer`.
"""

import json
import logging
import re

import pytest
import torch

from eto_ref.batches import collate_pairs, collate_sft, split_chosen_rejected
from eto_ref.losses import agent_token_logprobs, next_token_targets, sequence_logprobs
from eto_ref.trajectory import (
    Example,
    PairExample,
    PreferencePair,
    Trajectory,
    TrajectoryError,
    encode_pair,
    encode_sft,
    load_pairs,
    load_trajectories,
    save_pairs,
    save_trajectories,
)
from tests.conftest import FakeTokenizer

INSTRUCTION = [{"from": "human", "value": "You are an agent. Act."}, {"from": "gpt", "value": "OK"}]
TASK = {"from": "human", "value": "Put a mug in the cabinet."}
A1 = {"from": "gpt", "value": "Thought: find mug.\nAction: go to desk 1"}
O1 = {"from": "human", "value": "Observation: You see a mug 1."}
A2 = {"from": "gpt", "value": "Thought: take it.\nAction: take mug 1 from desk 1"}
GOOD = {"id": "t0", "conversations": INSTRUCTION + [TASK, A1, O1, A2], "reward": 1.0}
U, A, S, END = FakeTokenizer.USER, FakeTokenizer.ASSISTANT, FakeTokenizer.SYSTEM, FakeTokenizer.END


def write_jsonl(path, records):
    """Records as JSONL; a str is written as a raw line (to write broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2))
    return path


def pair_record(**overrides):
    return {"id": "p0", "prompt": INSTRUCTION + [TASK], "chosen": [A1, O1, A2], "rejected": [A2], **overrides}


def chars(text):
    return FakeTokenizer().encode(text)


# --------------------------------------------------------------------------- malformed records

BAD_TRAJECTORIES = {  # kind: (record written as line 2, expected message after "<file>: ")
    "missing id": ({"conversations": GOOD["conversations"]}, "record 1 (id None, line 2): id: missing"),
    "missing conversations": ({"id": "x"}, "record 1 (id 'x', line 2): conversations: missing"),
    "conversations not a list": ({"id": "x", "conversations": "hi"},
                                 "record 1 (id 'x', line 2): conversations: expected a non-empty list of turns, got str"),
    "missing turn field": ({"id": "x", "conversations": INSTRUCTION + [{"from": "human"}, A1]},
                           "record 1 (id 'x', line 2): conversations[2].value: missing"),
    "unknown role": ({"id": "x", "conversations": INSTRUCTION + [{"from": "bot", "value": "hi"}, A1]},
                     "record 1 (id 'x', line 2): conversations[2].from: unknown role 'bot' (expected 'human' or 'gpt')"),
    "non-alternating": ({"id": "x", "conversations": INSTRUCTION + [TASK, O1, A1]},
                        "record 1 (id 'x', line 2): conversations[3].from: expected 'gpt' after 'human', got 'human'"),
    "starts with gpt": ({"id": "x", "conversations": [A1]},
                        "record 1 (id 'x', line 2): conversations[0].from: expected 'human' first, got 'gpt'"),
    "no agent turn": ({"id": "x", "conversations": [TASK]},
                      "record 1 (id 'x', line 2): conversations[0].from: must end with 'gpt', got 'human'"),
    "infinite reward": ({**GOOD, "id": "x", "reward": float("inf")},
                        "record 1 (id 'x', line 2): reward: expected a finite number, got inf"),
    "empty action": ({"id": "x", "conversations": INSTRUCTION + [TASK, {"from": "gpt", "value": "  \n"}]},
                     "record 1 (id 'x', line 2): conversations[3].value: empty agent turn"),
    "non-string value": ({"id": "x", "conversations": INSTRUCTION + [TASK, {"from": "gpt", "value": 3}]},
                         "record 1 (id 'x', line 2): conversations[3].value: expected a string, got int"),
    "system not first": ({"id": "x", "conversations": INSTRUCTION + [{"from": "system", "value": "s"}, A1]},
                         "record 1 (id 'x', line 2): conversations[2].from: a 'system' turn may only come first"),
    "bad reward": ({**GOOD, "id": "x", "reward": "high"}, "record 1 (id 'x', line 2): reward: expected a number, got 'high'"),
    "not an object": ([1, 2], "record 1 (id None, line 2): expected a JSON object, got list"),
    "invalid JSON line": ('{"id": "x", "conversations": [', "record 1 (line 2): invalid JSON line (Expecting value"),
}


@pytest.mark.parametrize("kind", list(BAD_TRAJECTORIES))
def test_each_bad_trajectory_is_named_and_the_rest_of_the_file_kept(kind, tmp_path, caplog):
    bad, message = BAD_TRAJECTORIES[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad, {**GOOD, "id": "t2"}])
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        kept = load_trajectories(path)  # on_error="skip" is the default
    assert [t.id for t in kept] == ["t0", "t2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{path}: {message}" in w for w in warnings), warnings
    assert any("kept 2 of 3 records" in w for w in warnings), warnings
    with pytest.raises(TrajectoryError) as raised:
        load_trajectories(path, on_error="raise")
    assert str(raised.value).startswith(f"{path}: {message}")
    assert isinstance(raised.value, ValueError)


def test_a_final_observation_is_dropped_and_a_numeric_string_reward_is_a_number(tmp_path):
    """Explored episodes end with the environment's observation; some files give rewards as strings."""
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "e", "conversations": INSTRUCTION + [TASK, A1, O1],
                                                  "reward": "0.75"}])
    (traj,) = load_trajectories(path, on_error="raise")
    assert traj.reward == 0.75 and traj.messages[-1] == {"role": "assistant", "content": A1["value"]}


@pytest.mark.parametrize("records, hint", [
    ([{"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 3,
     "Hugging Face `messages`"),
    ([{"id": i, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}]}
      for i in range(3)], "user/assistant roles"),
    ([{"id": i, **{k: v for k, v in pair_record().items() if k != "id"}} for i in range(3)], "pass it as --pairs"),
])
def test_a_file_with_no_valid_record_says_what_it_is_and_how_to_convert_it(records, hint, tmp_path):
    path = write_json(tmp_path / "data.json", records)
    with pytest.raises(TrajectoryError) as raised:
        load_trajectories(path)  # even when skipping bad records
    message = str(raised.value)
    assert message.startswith(f"{path}: 0 of 3 records are valid ETO trajectory records; most common problem (3")
    assert hint in message and f"python -m eto_ref.convert_data {path}" in message
    assert '{"id": ..., "conversations": [{"from": "human"' in message


def test_bad_record_in_a_json_list_is_named_by_index_without_a_line(tmp_path):
    path = write_json(tmp_path / "data.json", [GOOD, {"id": "abc", "conversations": INSTRUCTION + [TASK, O1, A1]}])
    assert [t.id for t in load_trajectories(path)] == ["t0"]
    with pytest.raises(TrajectoryError) as raised:
        load_trajectories(path, on_error="raise")
    assert str(raised.value) == (f"{path}: record 1 (id 'abc'): conversations[3].from: "
                                 "expected 'gpt' after 'human', got 'human'")


def test_jsonl_line_numbers_count_blank_lines_and_record_indices_do_not(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + '{"id": "cut", "conv' + "\n" + json.dumps({**GOOD, "id": "t2"}) + "\n")
    with pytest.raises(TrajectoryError, match=r"record 1 \(line 4\): invalid JSON line"):
        load_trajectories(path, on_error="raise")
    assert [t.id for t in load_trajectories(path)] == ["t0", "t2"]


def test_truncated_last_line_is_a_bad_record_not_a_crash(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "t1"})[:40])  # killed mid-write
    assert [t.id for t in load_trajectories(path)] == ["t0"]


def test_non_utf8_line_is_a_bad_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe garbage\n" + json.dumps({**GOOD, "id": "t2"}).encode() + b"\n")
    assert [t.id for t in load_trajectories(path)] == ["t0", "t2"]
    with pytest.raises(TrajectoryError, match=r"record 1 \(line 2\): invalid JSON line"):
        load_trajectories(path, on_error="raise")


def test_unreadable_files_are_clear_errors_even_when_skipping(tmp_path):
    with pytest.raises(TrajectoryError, match="e.json: file is empty"):
        load_trajectories(write_jsonl(tmp_path / "e.json", []))
    (tmp_path / "cut.json").write_text(json.dumps([GOOD, GOOD])[:-30])
    with pytest.raises(TrajectoryError, match="cut.json: not a valid JSON list"):
        load_trajectories(tmp_path / "cut.json")
    with pytest.raises(ValueError, match="on_error"):
        load_trajectories(write_json(tmp_path / "ok.json", [GOOD]), on_error="ignore")


BAD_PAIRS = {
    "chosen == rejected": (pair_record(rejected=[A1, O1, A2]), "rejected: identical to chosen (nothing to prefer)"),
    "chosen starts with human": (pair_record(chosen=[O1, A2]), "chosen[0].from: expected 'gpt' first, got 'human'"),
    "rejected ends with human": (pair_record(rejected=[A2, O1]), "rejected[1].from: must end with 'gpt', got 'human'"),
    "prompt ends with gpt": (pair_record(prompt=INSTRUCTION), "prompt[1].from: must end with 'human', got 'gpt'"),
    "missing rejected": ({"id": "p0", "prompt": INSTRUCTION + [TASK], "chosen": [A1]}, "rejected: missing"),
    "empty chosen": (pair_record(chosen=[]), "chosen: expected a non-empty list of turns, got an empty list"),
    "non-alternating chosen": (pair_record(chosen=[A1, A2]), "chosen[1].from: expected 'human' after 'gpt', got 'gpt'"),
}


@pytest.mark.parametrize("kind", list(BAD_PAIRS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_each_bad_pair_is_named_and_the_rest_of_the_file_kept(kind, suffix, tmp_path, caplog):
    bad, message = BAD_PAIRS[kind]
    records = [pair_record(id="ok"), bad, pair_record(id="ok2")]
    path = (write_json if suffix == ".json" else write_jsonl)(tmp_path / f"pairs{suffix}", records)
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        assert [p.id for p in load_pairs(path)] == ["ok", "ok2"]
    where = "record 1 (id 'p0')" if suffix == ".json" else "record 1 (id 'p0', line 2)"
    assert any(f"{path}: {where}: {message}" in r.getMessage() for r in caplog.records)
    with pytest.raises(TrajectoryError) as raised:
        load_pairs(path, on_error="raise")
    assert str(raised.value) == f"{path}: {where}: {message}"


# --------------------------------------------------------------------------- formats, round trips, atomic writes


def test_json_list_and_jsonl_load_the_same(tmp_path):
    a = load_trajectories(write_json(tmp_path / "a.json", [GOOD, {**GOOD, "id": 7}]))
    b = load_trajectories(write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "id": 7}]))
    assert a == b
    assert [t.id for t in a] == ["t0", "7"]  # integer ids (as in some released files) become strings
    t = a[0]
    assert t.reward == 1.0
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert t.messages[1] == {"role": "assistant", "content": "OK"}
    assert t.messages[-1] == {"role": "assistant", "content": A2["value"]}
    assert load_trajectories(write_json(tmp_path / "one.json", GOOD)) == a[:1]  # a single pretty-printed object


def test_reward_is_optional_and_a_system_turn_may_come_first(tmp_path):
    record = {"id": "s", "conversations": [{"from": "system", "value": "Be brief."}] + GOOD["conversations"]}
    (t,) = load_trajectories(write_json(tmp_path / "s.json", [record]))
    assert t.reward is None
    assert t.messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip_writes_the_official_format(suffix, tmp_path):
    records = [GOOD, {"id": "t1", "conversations": INSTRUCTION + [TASK, A2]}]
    trajectories = load_trajectories(write_json(tmp_path / "in.json", records))
    out = tmp_path / f"out{suffix}"
    save_trajectories(trajectories, out)
    assert load_trajectories(out) == trajectories
    text = out.read_text()
    written = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    assert written == records  # exactly the official fields; no reward key when there is none

    pairs = load_pairs(write_json(tmp_path / "p.json", [pair_record(), pair_record(id="p1", rejected=[A1])]))
    save_pairs(pairs, tmp_path / f"p_out{suffix}")
    assert load_pairs(tmp_path / f"p_out{suffix}") == pairs
    assert pairs[0] == PreferencePair("p0", [{"role": "user", "content": INSTRUCTION[0]["value"]},
                                             {"role": "assistant", "content": "OK"},
                                             {"role": "user", "content": TASK["value"]}],
                                      [{"role": "assistant", "content": A1["value"]},
                                       {"role": "user", "content": O1["value"]},
                                       {"role": "assistant", "content": A2["value"]}],
                                      [{"role": "assistant", "content": A2["value"]}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.json", f"out{suffix}", "p.json", f"p_out{suffix}"])


def test_atomic_write_leaves_the_old_file_and_no_temp_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    save_trajectories([Trajectory("old", [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])], path)
    before = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("eto_ref.jsonl.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_trajectories(load_trajectories(write_json(tmp_path / "in.json", [GOOD])), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.json"]


# --------------------------------------------------------------------------- rendering and the agent mask


def test_hand_written_trajectory_masks_exactly_the_agent_tokens(fake_tok):
    """u = "hi", a1 = "go", o1 = "ok", a2 = "x": the mask is True on "go"+END and "x"+END only."""
    traj = Trajectory("h", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"},
                            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "x"}])
    ex = encode_sft(traj, fake_tok, max_len=100)
    h, i, g, o, k, x = chars("higokx")
    assert ex.input_ids == [U, h, i, END, A, g, o, END, U, o, k, END, A, x, END]
    assert ex.loss_mask == [False, False, False, False, False, True, True, True,
                            False, False, False, False, False, True, True]
    assert not ex.truncated

    # The first scored position is the assistant header (index 4): its logits predict "g", the first agent token.
    targets, scored = next_token_targets(torch.tensor([ex.input_ids]), torch.tensor([ex.loss_mask]))
    first = scored[0].tolist().index(True)
    assert first == 4 and targets[0, first].item() == g
    assert [t for t, s in zip(targets[0].tolist(), scored[0].tolist()) if s] == [g, o, END, x, END]


def test_official_record_masks_the_instruction_task_and_observations(fake_tok, tmp_path):
    """All gpt turns, the instruction's "OK" included (as the official FastChat training does), and nothing else."""
    (traj,) = load_trajectories(write_json(tmp_path / "t.json", [GOOD]))
    ex = encode_sft(traj, fake_tok, max_len=10_000)
    agent = fake_tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert agent == "OK<end>" + A1["value"] + "<end>" + A2["value"] + "<end>"


def test_truncation_cuts_from_the_right_keeps_the_mask_aligned_and_is_flagged(fake_tok, tmp_path):
    (traj,) = load_trajectories(write_json(tmp_path / "t.json", [GOOD]))
    full = encode_sft(traj, fake_tok, 10_000)
    n = len(full.input_ids)
    cut = encode_sft(traj, fake_tok, 50)
    assert cut.truncated and len(cut.input_ids) == len(cut.loss_mask) == 50
    assert cut.input_ids == full.input_ids[:50] and cut.loss_mask == full.loss_mask[:50]
    exact = encode_sft(traj, fake_tok, n)
    assert not exact.truncated and exact == full


def test_pair_prompt_is_masked_on_both_sides_including_its_ok_turn(fake_tok, tmp_path):
    (pair,) = load_pairs(write_json(tmp_path / "p.json", [pair_record()]))
    ex = encode_pair(pair, fake_tok, 10_000)
    prompt_ids, prompt_mask = fake_tok.render(pair.prompt)
    assert any(prompt_mask)  # the tokenizer marks the "OK" turn ...
    assert ex.prompt_len == len(prompt_ids)
    for ids, mask, turns in ((ex.chosen_ids, ex.chosen_mask, pair.chosen),
                             (ex.rejected_ids, ex.rejected_mask, pair.rejected)):
        assert ids[:ex.prompt_len] == prompt_ids
        assert not any(mask[:ex.prompt_len])  # ... but the prompt is never scored
        assert mask[ex.prompt_len:] == fake_tok.render(pair.prompt + turns)[1][ex.prompt_len:]
        agent = fake_tok.decode([i for i, m in zip(ids, mask) if m])
        assert agent == "".join(t["content"] + "<end>" for t in turns if t["role"] == "assistant")
    assert ex.chosen_ids is ex.chosen.input_ids and ex.rejected_mask is ex.rejected.loss_mask
    assert not ex.truncated


def test_pair_truncation_is_flagged(fake_tok, tmp_path):
    (pair,) = load_pairs(write_json(tmp_path / "p.json", [pair_record()]))
    full = encode_pair(pair, fake_tok, 10_000)
    max_len = len(full.rejected_ids) + 5  # rejected fits, chosen is cut
    ex = encode_pair(pair, fake_tok, max_len)
    assert ex.truncated and ex.chosen.truncated and not ex.rejected.truncated
    assert ex.chosen_ids == full.chosen_ids[:max_len] and ex.chosen_mask == full.chosen_mask[:max_len]
    assert ex.rejected == full.rejected


def test_encode_pair_refuses_a_tokenizer_whose_prompt_is_not_a_prefix(tmp_path):
    class EndsWithEos(FakeTokenizer):
        def render(self, messages, add_generation_prompt=False):
            ids, mask = super().render(messages, add_generation_prompt)
            return ids + [self.PAD], mask + [False]

    (pair,) = load_pairs(write_json(tmp_path / "p.json", [pair_record()]))
    with pytest.raises(ValueError, match="not a prefix"):
        encode_pair(pair, EndsWithEos(), 10_000)


# --------------------------------------------------------------------------- collation


def test_collate_sft_right_pads_with_mask_and_attention_false():
    examples = [Example([5, 6, 7], [False, True, True]), Example([8, 9], [False, True])]
    batch = collate_sft(examples, pad_id=0)
    assert batch["input_ids"].dtype == torch.long
    assert batch["loss_mask"].dtype == batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, True, False]]


def test_collate_pairs_puts_chosen_then_rejected_in_one_padded_batch(fake_tok, tmp_path):
    pairs = load_pairs(write_json(tmp_path / "p.json", [pair_record(), pair_record(id="p1", rejected=[A1, O1, A1])]))
    examples = [encode_pair(p, fake_tok, 10_000) for p in pairs]
    batch = collate_pairs(examples, pad_id=fake_tok.pad_id)
    T = max(len(e.chosen_ids) for e in examples)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == batch["attention_mask"].shape == (4, T)
    rows = [examples[0].chosen, examples[1].chosen, examples[0].rejected, examples[1].rejected]
    for row, ex in enumerate(rows):
        n = len(ex.input_ids)
        assert batch["input_ids"][row, :n].tolist() == ex.input_ids
        assert batch["loss_mask"][row, :n].tolist() == ex.loss_mask
        assert batch["attention_mask"][row, :n].all()
        assert (batch["input_ids"][row, n:] == fake_tok.pad_id).all()
        assert not batch["loss_mask"][row, n:].any() and not batch["attention_mask"][row, n:].any()

    chosen, rejected = split_chosen_rejected(batch["input_ids"])
    assert torch.equal(torch.cat([chosen, rejected]), batch["input_ids"])
    assert chosen[0, :len(rows[0].input_ids)].tolist() == rows[0].input_ids
    assert rejected[1, :len(rows[3].input_ids)].tolist() == rows[3].input_ids
    with pytest.raises(ValueError, match="2B rows"):
        split_chosen_rejected(torch.zeros(3, 2))

    # Padding together never changes a row's trajectory log-prob.
    torch.manual_seed(0)
    logits = torch.randn(4, T, fake_tok.vocab_size)
    alone = collate_sft([rows[2]], fake_tok.pad_id)
    n = alone["input_ids"].shape[1]
    ids, mask = batch["input_ids"][2:3], batch["loss_mask"][2:3]
    torch.testing.assert_close(
        sequence_logprobs(agent_token_logprobs(logits[2:3, :n], alone["input_ids"], alone["loss_mask"]),
                          alone["loss_mask"]),
        sequence_logprobs(agent_token_logprobs(logits[2:3], ids, mask), mask))


def test_an_empty_reply_is_allowed_only_on_the_rejected_side(tmp_path):
    """An explored failure may contain an empty reply (the policy stopped at once): kept as a rejected side.
    Expert/chosen data with an empty agent turn is broken data."""
    empty = {"from": "gpt", "value": ""}
    path = write_json(tmp_path / "p.json", [pair_record(rejected=[empty, O1, A2]), pair_record(id="p1", chosen=[empty])])
    (pair,) = load_pairs(path)
    assert pair.id == "p0" and pair.rejected[0] == {"role": "assistant", "content": ""}
    with pytest.raises(TrajectoryError, match=r"record 1 \(id 'p1'\): chosen\[0\]\.value: empty agent turn"):
        load_pairs(path, on_error="raise")


def test_pair_example_is_built_from_two_examples():
    ex = PairExample(Example([1, 2], [False, True]), Example([1, 3], [False, True]), prompt_len=1)
    assert (ex.chosen_ids, ex.chosen_mask, ex.rejected_ids, ex.rejected_mask) == ([1, 2], [False, True],
                                                                                  [1, 3], [False, True])
    assert not ex.truncated


# --------------------------------------------------------------------------- with the real tokenizer


def test_with_the_real_tokenizer(tmp_path):
    """The same masks through eto_ref.tokenizer's chatml template (skipped if that module is absent)."""
    from eto_ref import tokenizer
    texts = [t["value"] for t in GOOD["conversations"]] * 10
    tok = tokenizer.train_bpe_tokenizer(texts, 300, tmp_path / "tok", template="chatml")
    (traj,) = load_trajectories(write_json(tmp_path / "t.json", [GOOD]))
    ex = encode_sft(traj, tok, max_len=10_000)
    agent = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert agent == "OK<|im_end|>" + A1["value"] + "<|im_end|>" + A2["value"] + "<|im_end|>"

    (pair,) = load_pairs(write_json(tmp_path / "p.json", [pair_record()]))
    pex = encode_pair(pair, tok, 10_000)
    for ids, mask, turns in ((pex.chosen_ids, pex.chosen_mask, pair.chosen),
                             (pex.rejected_ids, pex.rejected_mask, pair.rejected)):
        assert not any(mask[:pex.prompt_len])
        agent = tok.decode([i for i, m in zip(ids, mask) if m])
        assert agent == "".join(t["content"] + "<|im_end|>" for t in turns if t["role"] == "assistant")
    batch = collate_pairs([pex], tok.pad_id)
    assert batch["input_ids"].shape[0] == 2 and not batch["loss_mask"][1, len(pex.rejected_ids):].any()


def trajectory(rid, turns=None):
    return {"id": rid, "conversations": INSTRUCTION + (turns or [TASK, A1, O1, A2]), "reward": 1.0}


def pair(rid, **sides):
    return {"id": rid, "prompt": INSTRUCTION + [TASK], "chosen": [A1, O1, A2], "rejected": [A2], **sides}


def jsonl_line(record) -> bytes:
    return record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n"


def load_both_ways(load, path, caplog):
    """(records kept by the lenient load, warnings logged, the strict load's error message)."""
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        kept = load(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(TrajectoryError) as raised:
        load(path, on_error="raise")
    return kept, warnings, str(raised.value)


BAD_TRAJECTORY_LINES = {
    "truncated JSON line": (b'{"id": "bad", "conversations": [{"from": "hum\n',
                            "record 1 (line 2): invalid JSON line"),
    "non-UTF-8 bytes": (b'{"id": "bad", "conversations": "\xff\xfe"}\n', "record 1 (line 2): invalid JSON line"),
    "wrong roles (user/assistant)": (
        trajectory("bad", [{"from": "user", "value": "task"}, {"from": "assistant", "value": "Action: go"}]),
        "record 1 (id 'bad', line 2): conversations[2].from: unknown role 'user' (expected 'human' or 'gpt')"),
    "role/content keys instead of from/value": (
        {"id": "bad", "conversations": [{"role": "user", "content": "hi"}]},
        "record 1 (id 'bad', line 2): conversations[0].from: missing"),
    "non-alternating turns": (trajectory("bad", [TASK, O1, A1]),
                              "record 1 (id 'bad', line 2): conversations[3].from: expected 'gpt' after 'human', "
                              "got 'human'"),
    "an empty action": (trajectory("bad", [TASK, {"from": "gpt", "value": " \n "}]),
                        "record 1 (id 'bad', line 2): conversations[3].value: empty agent turn"),
    "duplicate id": (trajectory("t0"), "record 1 (id 't0', line 2): id: duplicate of record 0 (ids must be unique)"),
}


@pytest.mark.parametrize("case", list(BAD_TRAJECTORY_LINES))
def test_bad_trajectory_is_named_and_the_good_records_are_kept(case, tmp_path, caplog):
    bad, message = BAD_TRAJECTORY_LINES[case]
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl_line(trajectory("t0")) + jsonl_line(bad) + jsonl_line(trajectory("t2")))
    kept, warnings, error = load_both_ways(load_trajectories, path, caplog)
    assert [t.id for t in kept] == ["t0", "t2"]
    assert kept[0].messages[-1]["content"] == A2["value"]  # the first of a duplicate id is the one kept
    assert any(w.startswith(f"skipping bad record: {path}: {message}") for w in warnings), warnings
    assert error.startswith(f"{path}: {message}")


def test_duplicate_id_in_a_json_list_names_both_records_and_integer_ids_count(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([trajectory(7), trajectory("a"), trajectory("7")]))
    assert [t.id for t in load_trajectories(path)] == ["7", "a"]
    with pytest.raises(TrajectoryError, match=re.escape(f"{path}: record 2 (id '7'): id: duplicate of record 0")):
        load_trajectories(path, on_error="raise")


BAD_PAIR_LINES = {
    "chosen equals rejected": (pair("bad", rejected=[A1, O1, A2]),
                               "record 1 (id 'bad', line 2): rejected: identical to chosen (nothing to prefer)"),
    "duplicate pair id": (pair("p0", rejected=[A1]), "record 1 (id 'p0', line 2): id: duplicate of record 0"),
    "wrong roles in chosen": (pair("bad", chosen=[{"from": "assistant", "value": "x"}]),
                              "record 1 (id 'bad', line 2): chosen[0].from: unknown role 'assistant'"),
}


@pytest.mark.parametrize("case", list(BAD_PAIR_LINES))
def test_bad_pair_is_named_and_the_good_pairs_are_kept(case, tmp_path, caplog):
    bad, message = BAD_PAIR_LINES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_line(pair("p0")) + jsonl_line(bad) + jsonl_line(pair("p2")))
    kept, warnings, error = load_both_ways(load_pairs, path, caplog)
    assert [p.id for p in kept] == ["p0", "p2"]
    assert kept[0].rejected == [{"role": "assistant", "content": A2["value"]}]  # the first "p0"
    assert any(f"{path}: {message}" in w for w in warnings), warnings
    assert error.startswith(f"{path}: {message}")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_file_is_an_error_even_when_skipping(content, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for load in (load_trajectories, load_pairs):
        with pytest.raises(TrajectoryError, match=re.escape(f"{path}: file is empty")):
            load(path)


def test_non_utf8_json_list_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "sft.json"
    path.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(TrajectoryError, match=re.escape(f"{path}: not a valid JSON list") + ".*utf-8"):
        load_trajectories(path)


def test_trajectory_longer_than_max_len_is_kept_cut_and_named(tmp_path, caplog, fake_tok):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl_line(trajectory("short", [TASK, {"from": "gpt", "value": "Action: a"}]))
                     + jsonl_line(trajectory("long")))
    short, long = load_trajectories(path)
    full = len(fake_tok.render(long.messages)[0])
    max_len = len(fake_tok.render(short.messages)[0])  # the short one fits exactly, the long one does not
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        assert not encode_sft(short, fake_tok, max_len).truncated
        cut = encode_sft(long, fake_tok, max_len)
    assert cut.truncated and len(cut.input_ids) == max_len
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{path}: record 1 (id 'long', line 2): conversations: {full} tokens, "
                              f"longer than max_len {max_len}; cut to the first {max_len} "
                              f"({sum(cut.loss_mask)} agent tokens kept)")


def test_pair_longer_than_max_len_names_the_side_that_was_cut(tmp_path, caplog, fake_tok):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair("p0")]))
    (p,) = load_pairs(path)
    rejected_len = len(fake_tok.render(p.prompt + p.rejected)[0])
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        ex = encode_pair(p, fake_tok, rejected_len)
    assert ex.chosen.truncated and not ex.rejected.truncated
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{path}: record 0 (id 'p0'): prompt + chosen: ")


def test_records_built_in_code_are_named_by_id_when_cut(caplog, fake_tok):
    from eto_ref.trajectory import Trajectory

    traj = Trajectory("mine", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        encode_sft(traj, fake_tok, 4)
    assert caplog.records[0].getMessage().startswith("trajectory 'mine': conversations: 14 tokens")

"""eto_ref/eto.py: the ETO loop (paper Algorithm 1) on a tiny random model, its valid slice and schedules."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eto_ref.agent import AgentConfig
from eto_ref.checkpoint import save_model
from eto_ref.config import DPOConfig
from eto_ref.eto import LoopConfig, run_eto
from eto_ref.model import ModelConfig, Transformer
from eto_ref.results import curve_table
from eto_ref.run_dir import RunError
from eto_ref.sampler import SamplingConfig
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer


def test_one_iteration_writes_every_phase(tmp_path):
    tok_dir = tmp_path / "tok"
    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=20), 400, tok_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    save_model(model, tmp_path / "sft", tokenizer_dir=tok_dir)
    cfg = LoopConfig(model=str(tmp_path / "sft"), out=str(tmp_path / "eto"), env="household", iterations=2,
                     explore_limit=2, eval_limit=1, beta_schedule=(0.1, 0.5), lr_schedule=(1e-3, 5e-4),
                     agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=6), batch_size=2, max_len=4096,
                                       max_steps=2))
    dpo = DPOConfig(max_steps=1, batch_size=2, micro_batch_size=2, max_len=2048, save_every=0, progress=False,
                    device="cpu")

    rows = run_eto(cfg, dpo)
    assert len(rows) == 2 and rows[0]["pairs"] == 2 and rows[0]["lose"] == 2
    assert [(r["beta"], r["lr"]) for r in rows] == [(0.1, 1e-3), (0.5, 5e-4)]  # the official per-iteration schedule
    assert rows[1]["policy"] == str(tmp_path / "eto" / "iter-1" / "dpo" / "final")  # pi_ref = pi_1 in iteration 2
    state = json.loads((tmp_path / "eto" / "iter-2" / "dpo" / "final" / "trainer_state.json").read_text())
    assert (state["config"]["beta"], state["config"]["lr"]) == (0.5, 5e-4)
    it = tmp_path / "eto" / "iter-1"
    assert (it / "dpo" / "final" / "model.safetensors").is_file()
    for split in ("test_seen", "test_unseen"):
        assert json.loads((it / f"eval-{split}" / "summary.json").read_text())["episodes"] == 1
    assert json.loads((tmp_path / "eto" / "summary.json").read_text()) == rows
    assert set(rows[0]["seconds"]) == {"explore", "dpo", "evaluate"}
    assert all(t >= 0 for t in rows[0]["seconds"].values())
    assert [r["episodes"] for r in rows] == [2, 2]
    curve = curve_table([tmp_path / "eto"]).splitlines()
    assert [line.split(" | ")[1:3] for line in curve[2:]] == [["1", "2"], ["2", "4"]]  # iteration, episodes so far
    # Each exploration and evaluation folder records the policy that made it, so a rerun of the loop from
    # another starting model into the same folder is refused instead of resuming the old model's episodes.
    identity = json.loads((it / "explore" / "run.json").read_text())["identity"]
    assert identity["model"] == str(tmp_path / "sft") and identity["model_fingerprint"] is not None
    assert json.loads((it / "eval-test_seen" / "run.json").read_text())["identity"]["model"] == str(
        it / "dpo" / "final")
    save_model(model, tmp_path / "other-sft", tokenizer_dir=tok_dir)
    with pytest.raises(RunError, match=r"iter-1/explore: made with other settings: model: .*sft' then, .*other-sft"):
        run_eto(replace(cfg, model=str(tmp_path / "other-sft")), dpo)


def test_valid_split_is_the_train_slice_after_start():
    """VALID evaluates train[valid_start : valid_start + valid]; the test splits keep eval_limit."""
    from eto_ref.eto import VALID, eval_config

    cfg = LoopConfig(model="m", env="science", eval_limit=7, valid_start=1000, valid=100)
    valid = eval_config(cfg, VALID, Path("out"), "m")
    assert (valid.split, valid.start, valid.limit, valid.out_dir) == ("train", 1000, 100, "out")
    seen = eval_config(cfg, "test_seen", Path("out"), "m")
    assert (seen.split, seen.start, seen.limit) == ("test_seen", 0, 7)


def test_valid_split_must_not_overlap_the_explored_tasks():
    import pytest

    from eto_ref.eto import VALID, check_valid_is_held_out

    assert LoopConfig(valid=100).eval_splits == (VALID, "test_seen", "test_unseen")
    check_valid_is_held_out(LoopConfig(model="m", explore_limit=160, valid=100))  # train[:160] vs [1000:]
    check_valid_is_held_out(LoopConfig(model="m", explore_limit=None))  # no valid split: nothing to check
    with pytest.raises(ValueError, match=r"overlaps the explored tasks train\[:all\]"):
        check_valid_is_held_out(LoopConfig(model="m", explore_limit=None, valid=100))
    with pytest.raises(ValueError, match=r"train\[1000:1100\] overlaps the explored tasks train\[:1200\]"):
        check_valid_is_held_out(LoopConfig(model="m", explore_limit=1200, valid=100))


def test_iteration_schedule_repeats_its_last_value():
    from eto_ref.eto import iteration_value

    assert [iteration_value((0.1, 0.5), k, 9.0) for k in (1, 2, 3)] == [0.1, 0.5, 0.5]
    assert iteration_value((), 2, 9.0) == 9.0  # no schedule: the DPO config's value


def test_timed_records_the_wall_time_of_a_block_and_duration_reads_it():
    import time

    from eto_ref.metrics import duration, timed

    seconds = {}
    with timed(seconds, "phase"):
        time.sleep(0.05)
    assert 0.05 <= seconds["phase"] < 5
    assert duration(125.4) == "2m05s" and duration(59.6) == "1m00s" and duration(0) == "0m00s"

"""eto_ref/analyses.py: the paper's analyses on a finished run (efficiency and iterations from hand-made runs;
step-level and self-play end to end on the tiny model, slow)."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from eto_ref.analyses import efficiency, iterations, run_config
from eto_ref.eto import LoopConfig
from eto_ref.pipeline import PipelineConfig


def write_run(run: Path, steps_by_method: dict) -> None:
    for folder, episodes in steps_by_method.items():
        path = run / folder / "eval-test_seen"
        path.mkdir(parents=True)
        path.joinpath("trajectories.jsonl").write_text("".join(
            json.dumps({"id": f"t{i}", "reward": r, "steps": s}) + "\n" for i, (r, s) in enumerate(episodes)))


def test_efficiency_is_the_mean_steps_of_solved_episodes(tmp_path):
    write_run(tmp_path / "a", {"sft": [(1.0, 6), (0.5, 20), (1.0, 8)], "eto/iter-1": [(1.0, 5), (1.0, 5)]})
    write_run(tmp_path / "b", {"sft": [(1.0, 10)], "eto/iter-1": [(0.0, 20)]})
    text = efficiency([tmp_path / "a", tmp_path / "b"], tmp_path / "eff.md")
    assert "| SFT | - | 8.00 (3) | - |" in text  # (6 + 8 + 10) / 3; the partial 0.5 run does not count
    assert "| ETO-iter-1 | - | 5.00 (2) | - |" in text
    assert json.loads((tmp_path / "eff.json").read_text())["steps"]["SFT"]["test_seen"] == [6, 8, 10]


def test_iterations_table_reads_the_loop_summary(tmp_path):
    (tmp_path / "eto").mkdir(parents=True)
    (tmp_path / "results.json").write_text(json.dumps({"rows": {"SFT": {"test_seen": 40.0}}}))
    (tmp_path / "eto" / "summary.json").write_text(json.dumps([{"iteration": 1, "test_seen": 45.0},
                                                               {"iteration": 2, "test_seen": 43.5}]))
    assert f"| {tmp_path} | test_seen | 40.0 | 45.0 | 43.5 |" in iterations([tmp_path], None)


def test_iterations_table_gives_each_iterations_paired_difference_and_a_stop(tmp_path):
    """Per-task rewards SFT (0, 1, 0.5, 1), iteration 1 (1, 1, 1, 1): differences x100 (100, 0, 50, 0),
    mean 37.5, sample SD sqrt(6875 / 3) = 47.87, SE 47.87 / 2 = 23.9; iteration 2 found no pairs."""
    write_run(tmp_path, {"sft": [(0.0, 9), (1.0, 3), (0.5, 9), (1.0, 4)], "eto/iter-1": [(1.0, 3)] * 4})
    for folder, average in (("sft", 62.5), ("eto/iter-1", 100.0)):  # finished evaluations have a summary
        (tmp_path / folder / "eval-test_seen" / "summary.json").write_text(json.dumps({"average_reward": average}))
    (tmp_path / "results.json").write_text(json.dumps({"rows": {"SFT": {"test_seen": 62.5}}}))
    (tmp_path / "eto" / "summary.json").write_text(json.dumps([
        {"iteration": 1, "pairs": 2, "beta": 0.1, "lr": 1e-6, "test_seen": 100.0},
        {"iteration": 2, "pairs": 0, "beta": 0.5, "lr": 5e-7, "note": "no pairs: the policy ties the expert"}]))
    text = iterations([tmp_path], None)
    assert f"| {tmp_path} | test_seen | 62.5 | 100.0 (+37.5 ± 23.9) | stopped: no pairs |" in text
    assert "iter 1: 2 pairs, beta 0.1, lr 1e-06; iter 2: 0 pairs, beta 0.5, lr 5e-07" in text
    # a job still running has no results.json yet: SFT's row comes from its evaluation summary
    (tmp_path / "results.json").unlink()
    assert iterations([tmp_path], None) == text


def test_run_config_rebuilds_the_nested_configs(tmp_path):
    cfg = PipelineConfig(model="tiny", loop=LoopConfig(valid=20, beta_schedule=(0.1, 0.5)))
    (tmp_path / "pipeline_config.json").write_text(json.dumps(asdict(cfg)))
    assert run_config(tmp_path) == cfg


@pytest.mark.slow
def test_step_level_and_self_play_on_a_tiny_run(tmp_path):
    import train
    from eto_ref.analyses import self_play, step_level

    run = tmp_path / "run"
    train.main(["--stage", "all", "--model", "tiny", "--out", str(run), "--sft-examples", "24", "--sft-epochs", "2",
                "--explore-limit", "6", "--eval-limit", "2", "--valid", "3", "--max-new-tokens", "24",
                "--best-of-n", "0", "--no-progress"])
    text = step_level(run, 1, tmp_path / "step.md")
    assert "ETO, step-level pairs (expert's first 1 steps forced)" in text
    assert (run / "analyses" / "step-level-1" / "eval-valid" / "summary.json").is_file()
    try:
        text = self_play(run, 2, 1.0, tmp_path / "self.md")
        assert "RFT + ETO on its own pairs (no expert)" in text
    except ValueError as e:  # a tiny policy may succeed nowhere: nothing for RFT to train on, said so
        assert "no trajectory with a trainable" in str(e) or "0 of" in str(e)


def test_turn_shift_is_zero_for_the_same_policy_and_counts_each_agent_turn(tiny_model, tmp_path):
    import torch

    from eto_ref.analyses import turn_changes, turn_shift
    from eto_ref.checkpoint import load_model, save_model
    from eto_ref.ppo import encode_episodes, load_episodes
    from eto_ref.tokenizer import Tokenizer
    from tests.helpers import episode_records

    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in episode_records()))
    other = load_model(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.1 * torch.randn_like(other.lm_head.weight))
    save_model(other, tmp_path / "other", tokenizer_dir=tiny_model)
    tok = Tokenizer.from_dir(tiny_model)
    examples, _, _ = encode_episodes(load_episodes(path), tok, 4096)
    changes = turn_changes([load_model(tiny_model), load_model(tiny_model), other], tok, examples[0])
    assert len(changes[0]) == 1 + 4  # "OK" and the expert's 4 actions of the first task
    assert changes[0] == [0.0] * 5 and all(c != 0.0 for c in changes[1])
    table = turn_shift([tiny_model, tiny_model, tmp_path / "other"], path, str(tmp_path / "shift.md"))
    assert "on 4 successful episodes" in table  # the 4 rewarded ones; the wrong runs scored 0
    data = json.loads((tmp_path / "shift.json").read_text())
    assert data["changes"][str(tiny_model)] == {"ok": 0.0, "first": 0.0, "middle": 0.0, "last": 0.0}

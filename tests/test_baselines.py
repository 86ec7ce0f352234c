"""RFT data, Best-of-N selection, the results table and plot, and the main job's wiring on a tiny model."""

import json

import pytest
import torch

from eto_ref.agent import AgentConfig
from eto_ref.baselines import best_of_n, best_of_n_rewards, rft_records
from eto_ref.exploration import ExploreConfig
from eto_ref.pipeline import results_table, write_reward_plot


def record(task_id, reward, text="Thought: t\nAction: a"):
    return {"id": task_id, "conversations": [{"from": "human", "value": "instr"}, {"from": "gpt", "value": "OK"},
                                             {"from": "human", "value": f"task {task_id}"},
                                             {"from": "gpt", "value": text}], "reward": reward}


def test_rft_keeps_every_expert_trajectory_and_only_full_reward_explorations():
    experts = [record("a", 1.0), record("b", 1.0), record("c", 1.0)]
    explored = [record("a", 1.0, "mine"), record("b", 0.75, "partial"), record("c", 0.0, "failed")]
    data = rft_records(experts, explored)
    assert [r["id"] for r in data] == ["a", "b", "c", "a#explored"]
    assert data[-1]["conversations"][-1]["value"] == "mine"
    ended = record("d", 1.0, "done")
    ended["conversations"].append({"from": "human", "value": "Observation: task completed"})
    last = rft_records([record("d", 1.0)], [ended])[-1]["conversations"]
    assert last[-1] == {"from": "gpt", "value": "done"}  # the final observation is not trained on
    assert len({r["id"] for r in data}) == len(data)  # ids stay unique (the loader rejects duplicates)
    from eto_ref.trajectory import parse_trajectory

    for r in data:
        parse_trajectory(r)  # every record is valid training data


def test_best_of_n_takes_the_highest_reward_per_task_in_task_order():
    run0 = [record("x", 0.2), record("y", 1.0), record("z", 0.0)]
    run1 = [record("x", 0.9), record("y", 0.5)]  # z missing: best of the runs that have it
    run2 = [record("x", 0.4), record("y", 0.0), record("z", 0.3)]
    best = best_of_n_rewards([run0, run1, run2])
    assert [(r["id"], r["reward"]) for r in best] == [("x", 0.9), ("y", 1.0), ("z", 0.3)]


def test_best_of_n_refuses_greedy_decoding():
    with pytest.raises(ValueError, match="temperature > 0"):
        best_of_n(None, None, ExploreConfig(agent=AgentConfig(temperature=0.0)), n=3)


def test_best_of_n_runs_n_seeds_and_scores_the_best(tmp_path, tiny_policy):
    model, tok = tiny_policy
    cfg = ExploreConfig(env="webshop", split="test_seen", out_dir=str(tmp_path / "bon"), limit=3,
                        agent=AgentConfig(max_new_tokens=8, temperature=1.0, seed=0, batch_size=3, max_steps=2))
    summary = best_of_n(model, tok, cfg, n=2, progress=False)
    runs = [[json.loads(line) for line in (tmp_path / "bon" / f"sample-{i}" / "trajectories.jsonl").open()]
            for i in range(2)]
    assert [len(r) for r in runs] == [3, 3]
    assert [a["conversations"] for a in runs[0]] != [b["conversations"] for b in runs[1]]  # different seeds
    expected = 100 * sum(max(a["reward"], b["reward"]) for a, b in zip(*runs)) / 3
    assert summary["average_reward"] == pytest.approx(expected) and summary["n"] == 2


def test_results_table_has_the_papers_shape():
    rows = {"SFT": {"test_seen": 50.0, "test_unseen": 40.25}, "RFT": {"test_seen": 55.5},
            "ETO-iter-1": {"test_seen": 60.0, "test_unseen": 45.0}}
    table = results_table(rows, ("test_seen", "test_unseen"))
    assert table.splitlines() == ["| method | test_seen | test_unseen |", "|---|---:|---:|",
                                  "| SFT | 50.0 | 40.2 |", "| RFT | 55.5 | - |", "| ETO-iter-1 | 60.0 | 45.0 |"]


def test_reward_plot_has_one_point_per_iteration_and_split(tmp_path):
    rows = {"SFT": {"test_seen": 10.0, "test_unseen": 5.0}, "RFT": {"test_seen": 99.0, "test_unseen": 99.0},
            "ETO-iter-1": {"test_seen": 20.0, "test_unseen": 8.0}, "ETO-iter-2": {"test_seen": 30.0}}
    svg = write_reward_plot(rows, ("test_seen", "test_unseen"), tmp_path / "plot.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert svg.count("<circle") == 3 + 2  # SFT + 2 iterations seen, SFT + 1 iteration unseen; RFT not plotted


@pytest.fixture
def tiny_policy(tmp_path):
    from eto_ref.model import ModelConfig, Transformer
    from eto_ref.tiny import environment_texts
    from eto_ref.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(environment_texts(["webshop"], tasks_per_env=10), 400, tmp_path / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return model.eval(), tok


@pytest.mark.slow
def test_main_job_end_to_end_on_reduced_sizes(tmp_path):
    """The README's main command, `python train.py --stage all`, on reduced sizes."""
    import train

    out = tmp_path / "main"
    results = train.main(["--stage", "all", "--env", "science", "--out", str(out), "--sft-examples", "32", "--sft-epochs", "3",
                          "--explore-limit", "8", "--eval-limit", "4", "--iterations", "2", "--best-of-n", "2",
                          "--max-new-tokens", "24", "--valid", "3", "--no-progress"])
    assert set(results["rows"]) == {"SFT", "RFT", "Best-of-2", "ETO-iter-1", "ETO-iter-2"} or \
        "note" in results["iterations"][-1]
    for name, row in results["rows"].items():
        assert 0.0 <= row["test_seen"] <= 100.0, name
        assert ("valid" in row) == (name != "Best-of-2"), name  # Best-of-N: test splits only
    valid = [json.loads(line)["id"] for line in (out / "sft" / "eval-valid" / "trajectories.jsonl").open()]
    assert valid == ["science/train/1000", "science/train/1001", "science/train/1002"]
    assert (out / "results.md").read_text().startswith("**science, seed 0")
    assert "| method | valid | test_seen | test_unseen |" in (out / "results.md").read_text()
    assert (out / "reward_per_iteration.svg").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    seconds = results["seconds"]
    assert list(seconds) == ["base model", "SFT", "SFT evaluation", "ETO", "RFT", "Best-of-2", "total"]
    assert seconds["total"] == pytest.approx(sum(t for name, t in seconds.items() if name != "total"), abs=0.1)


def test_seeds_table_lists_each_seed_and_the_mean():
    from eto_ref.pipeline import seeds_table

    per_seed = {0: {"SFT": {"test_seen": 10.0, "test_unseen": 20.0}, "ETO-iter-1": {"test_seen": 30.0}},
                1: {"SFT": {"test_seen": 20.0, "test_unseen": 40.0}, "ETO-iter-1": {"test_seen": 50.0}}}
    lines = seeds_table(per_seed, ("test_seen", "test_unseen")).splitlines()
    assert lines[0] == ("| method | test_seen s0 | test_seen s1 | **test_seen mean** | test_unseen s0 | "
                        "test_unseen s1 | **test_unseen mean** |")
    assert lines[2] == "| SFT | 10.0 | 20.0 | **15.0** | 20.0 | 40.0 | **30.0** |"
    assert lines[3] == "| ETO-iter-1 | 30.0 | 50.0 | **40.0** | - | - | - |"  # no mean over missing seeds


def _summary(path, reward, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps({"average_reward": reward, **extra}))


def test_report_reads_only_finished_phases(tmp_path):
    """--report: rows come from the summaries on disk; an unfinished phase is absent, its cells '-'."""
    from eto_ref.pipeline import finished_rows, report_seeds

    splits = ("test_seen", "test_unseen")
    full, partial = tmp_path / "seed-0", tmp_path / "seed-1"
    for split, r in zip(splits, (40.0, 20.0)):
        _summary(full / "sft" / f"eval-{split}", r)
        _summary(full / "rft" / f"eval-{split}", r + 1)
        _summary(full / "best-of-n" / split, r + 10, n=4)
    (full / "eto").mkdir()
    (full / "eto" / "summary.json").write_text(json.dumps([{"iteration": 1, "test_seen": 44.0, "test_unseen": 18.0}]))
    _summary(partial / "sft" / "eval-test_seen", 30.0)  # test_unseen still running: no summary yet

    assert finished_rows(full, splits) == {"SFT": {"test_seen": 40.0, "test_unseen": 20.0},
                                           "RFT": {"test_seen": 41.0, "test_unseen": 21.0},
                                           "Best-of-4": {"test_seen": 50.0, "test_unseen": 30.0},
                                           "ETO-iter-1": {"test_seen": 44.0, "test_unseen": 18.0}}
    assert finished_rows(partial, splits) == {"SFT": {"test_seen": 30.0}}

    replies = ["Thought: a\nAction: look around", "no action here", "Action: wait", "Action: wait"]
    turns = [{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": "task"}]
    for reply in replies:
        turns += [{"from": "gpt", "value": reply}, {"from": "human", "value": "Observation: o"}]
    with open(full / "sft" / "eval-test_seen" / "trajectories.jsonl", "w") as f:
        f.write(json.dumps({"id": "science/test_seen/0", "conversations": turns, "reward": 0.4}) + "\n")

    table = report_seeds(tmp_path, [0, 1], splits, "science", tmp_path / "results" / "t.md")
    rewards, formats = table.split("\n\n**science: replies without a parsable action")
    lines = {line.split(" | ")[0].strip("| "): line for line in rewards.splitlines() if line.startswith("| ")}
    assert lines["SFT"] == "| SFT | 40.0 | 30.0 | **35.0** | 20.0 | - | - |"  # a mean needs every seed
    assert lines["ETO-iter-1"] == "| ETO-iter-1 | 44.0 | - | - | 18.0 | - | - |"
    format_lines = [line for line in formats.splitlines() if line.startswith("| SFT")]
    assert format_lines == ["| SFT | 25.0 | - | - | - | - | - |"]  # 1 reply of 4; no trajectories file: "-"
    assert (tmp_path / "results" / "t.md").read_text() == table + "\n"
    assert json.loads((tmp_path / "results" / "t.json").read_text())["rows"]["1"] == {"SFT": {"test_seen": 30.0}}


def test_valid_column_comes_first_and_must_follow_the_sft_tasks(tmp_path):
    from eto_ref.pipeline import PipelineConfig, check_valid, finished_rows, table_splits

    assert table_splits(PipelineConfig()) == ("test_seen", "test_unseen")
    cfg = PipelineConfig(valid=100)
    assert table_splits(cfg) == ("valid", "test_seen", "test_unseen")
    check_valid(cfg)  # train[1000:1100] after the SFT data train[:480]
    with pytest.raises(ValueError, match=r"train\[400:500\] overlaps the SFT data train\[:480\]"):
        check_valid(PipelineConfig(valid=100, valid_start=400))
    _summary(tmp_path / "sft" / "eval-valid", 33.0)
    _summary(tmp_path / "sft" / "eval-test_seen", 40.0)
    assert finished_rows(tmp_path, table_splits(cfg)) == {"SFT": {"valid": 33.0, "test_seen": 40.0}}

"""eto_ref/baselines.py: RFT data and Best-of-N selection (the paper's baselines)."""

import json

import pytest
import torch

from eto_ref.agent import AgentConfig
from eto_ref.baselines import best_of_n, best_of_n_rewards, rft_records
from eto_ref.exploration import ExploreConfig
from eto_ref.sampler import SamplingConfig


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
        best_of_n(None, None, ExploreConfig(agent=AgentConfig(sampling=SamplingConfig(temperature=0.0))), n=3)


def test_best_of_n_runs_n_seeds_and_scores_the_best(tmp_path, tiny_policy):
    model, tok = tiny_policy
    cfg = ExploreConfig(env="webshop", split="test_seen", out_dir=str(tmp_path / "bon"), limit=3,
                        agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), seed=0, batch_size=3, max_steps=2))
    summary = best_of_n(model, tok, cfg, n=2, progress=False)
    runs = [[json.loads(line) for line in (tmp_path / "bon" / f"sample-{i}" / "trajectories.jsonl").open()]
            for i in range(2)]
    assert [len(r) for r in runs] == [3, 3]
    assert [a["conversations"] for a in runs[0]] != [b["conversations"] for b in runs[1]]  # different seeds
    expected = 100 * sum(max(a["reward"], b["reward"]) for a, b in zip(*runs)) / 3
    assert summary["average_reward"] == pytest.approx(expected) and summary["n"] == 2


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

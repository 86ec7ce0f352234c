"""Exploration resumes after being killed: no finished trajectory lost, none repeated."""

import json

import pytest
import torch

import eto_ref.exploration as exploration
from eto_ref.sampler import SamplingConfig
from eto_ref.agent import AgentConfig
from eto_ref.exploration import ExploreConfig, explore, explore_and_pair
from eto_ref.model import ModelConfig, Transformer
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=30), 500, tmp_path_factory.mktemp("t"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    return model, tok


def config(tmp_path, limit=4):
    return ExploreConfig(env="household", split="train", out_dir=str(tmp_path), limit=limit,
                         agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=8), batch_size=1, max_len=4096, max_steps=2))


def test_killed_exploration_resumes_without_loss_or_repeats(agent, tmp_path, monkeypatch):
    model, tok = agent
    uninterrupted = explore(model, tok, config(tmp_path / "full"), progress=False)

    real = exploration.run_episodes

    def killed_after_two(*args, on_episode_end=None, **kw):
        count = [0]

        def callback(episode):
            on_episode_end(episode)
            count[0] += 1
            if count[0] == 2:
                raise KeyboardInterrupt  # the process is killed here
        return real(*args, on_episode_end=callback, **kw)

    monkeypatch.setattr(exploration, "run_episodes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        explore(model, tok, config(tmp_path / "resumed"), progress=False)
    lines = (tmp_path / "resumed" / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 2
    monkeypatch.setattr(exploration, "run_episodes", real)
    resumed = explore(model, tok, config(tmp_path / "resumed"), progress=False)
    lines = (tmp_path / "resumed" / "trajectories.jsonl").read_text().splitlines()
    ids = [json.loads(l)["id"] for l in lines]
    assert len(ids) == len(set(ids)) == 4
    assert resumed == uninterrupted  # greedy decoding: the same trajectories as an uninterrupted run


def test_explore_and_pair_writes_official_pairs(agent, tmp_path):
    model, tok = agent
    path, summary = explore_and_pair(model, tok, config(tmp_path, limit=3), progress=False)
    pairs = json.loads(path.read_text())
    assert summary["episodes"] == 3 and summary["lose"] + summary["win"] + summary["tie"] + summary["dropped"] == 3
    for p in pairs:
        assert set(p) == {"id", "prompt", "chosen", "rejected"}
        assert p["prompt"][1] == {"from": "gpt", "value": "OK"} and p["prompt"][-1]["from"] == "human"
        assert p["chosen"][-1]["from"] == "gpt" and p["rejected"][-1]["from"] == "gpt"
    from eto_ref.trajectory import load_pairs
    assert len(load_pairs(path, on_error="raise")) == len(pairs)


def test_split_slice_start_and_limit():
    ids = [f"t/{i}" for i in range(10)]
    assert exploration.split_slice(ids) == ids
    assert exploration.split_slice(ids, 0, 3) == ["t/0", "t/1", "t/2"]
    assert exploration.split_slice(ids, 7) == ["t/7", "t/8", "t/9"]
    assert exploration.split_slice(ids, 8, 5) == ["t/8", "t/9"]  # a limit past the end stops at the end
    with pytest.raises(ValueError, match="past the end"):
        exploration.split_slice(ids, 10, 1)
    with pytest.raises(ValueError, match=">= 0"):
        exploration.split_slice(ids, -1)


def test_explore_with_start_runs_only_that_slice(agent, tmp_path):
    """--start 5 --limit 2 is train[5:7]: a validation slice, resumable like any run."""
    model, tok = agent
    cfg = config(tmp_path, limit=2)
    cfg.start = 5
    records = explore(model, tok, cfg, progress=False)
    assert [r["id"] for r in records] == ["household/train/5", "household/train/6"]


def test_summary_counts_replies_without_an_action():
    def episode(*replies, reward=0.0):
        turns = [{"from": "human", "value": "instruction"}, {"from": "gpt", "value": "OK"},
                 {"from": "human", "value": "Your task is to boil water."}]
        for reply in replies:
            turns += [{"from": "gpt", "value": reply}, {"from": "human", "value": "Observation: ..."}]
        return {"id": "t", "conversations": turns, "reward": reward, "steps": len(replies), "reason": "max_steps"}

    records = [episode("Thought: go.\nAction: look around", "Thought: plant is in the stove"),
               episode("Action:", reward=1.0)]  # an empty action is no action
    assert exploration.invalid_format_rate(records) == pytest.approx(100 * 2 / 3)  # "OK" is not a reply
    summary = exploration.summarize(records, "science", "test_seen")
    assert summary["invalid_format_rate"] == pytest.approx(66.6667, abs=1e-3)
    assert (summary["average_reward"], summary["success_rate"], summary["mean_steps"]) == (50.0, 50.0, 1.5)
    assert exploration.invalid_format_rate([]) == 0.0

"""eto_ref/online.py: online PPO and GRPO on a tiny random model: the episode budget, the fixed reference, the
phases of each iteration, and the loop's refusals."""

import json
from dataclasses import replace

import pytest
import torch

from eto_ref.agent import AgentConfig
from eto_ref.checkpoint import save_model
from eto_ref.config import GRPOConfig, PPOConfig
from eto_ref.eto import LoopConfig
from eto_ref.model import ModelConfig, Transformer
from eto_ref.online import run_online
from eto_ref.sampler import SamplingConfig
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer

STAGE = dict(max_steps=1, batch_size=4, micro_batch_size=2, max_len=2048, save_every=0, progress=False,
             device="cpu", dtype="float32", lr=1e-3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=20), 400, root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return save_model(model, root / "sft", tokenizer_dir=root / "tok")


def loop(policy, out, temperature=0.0, **kw) -> LoopConfig:
    agent = AgentConfig(sampling=SamplingConfig(max_new_tokens=6, temperature=temperature), batch_size=2,
                        max_len=4096, max_steps=2, seed=0)
    base = dict(model=str(policy), out=str(out), env="household", iterations=2, explore_limit=4, eval_limit=1,
                agent=agent)
    return LoopConfig(**{**base, **kw})


def test_online_ppo_explores_trains_and_evaluates_with_pi0_as_reference(policy, tmp_path):
    rows = run_online(loop(policy, tmp_path / "ppo"), PPOConfig(**STAGE))
    assert [r["episodes"] for r in rows] == [4, 4]  # one ETO exploration's budget per iteration
    it2 = tmp_path / "ppo" / "iter-2"
    state = json.loads((it2 / "ppo" / "final" / "trainer_state.json").read_text())["config"]
    assert state["model"] == str(tmp_path / "ppo" / "iter-1" / "ppo" / "final")  # pi_1 explores and trains
    assert state["reference"] == str(policy)  # the KL reference stays pi_0
    assert json.loads((it2 / "explore" / "run.json").read_text())["identity"]["model"] == state["model"]
    assert set(rows[0]["seconds"]) == {"collect", "ppo", "evaluate"}
    assert "test_seen" in rows[1] and json.loads((tmp_path / "ppo" / "summary.json").read_text()) == rows


def test_online_grpo_samples_groups_within_the_budget_and_evaluates_greedily(policy, tmp_path):
    rows = run_online(loop(policy, tmp_path / "grpo", iterations=1), GRPOConfig(group_size=2, group_temperature=1.0,
                                                                               **STAGE))
    assert rows[0]["episodes"] == 4  # 2 tasks x 2 samples
    samples = tmp_path / "grpo" / "iter-1" / "samples"
    runs = [[json.loads(line)["id"] for line in (samples / f"sample-{i}" / "trajectories.jsonl").open()]
            for i in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 2  # the same 2 tasks, once per sample
    agents = [json.loads((samples / f"sample-{i}" / "run.json").read_text())["identity"]["agent"] for i in range(2)]
    assert [a["seed"] for a in agents] == [0, 1000] and [a["sampling"]["temperature"] for a in agents] == [1.0, 1.0]
    evaluation = json.loads((tmp_path / "grpo" / "iter-1" / "eval-test_seen" / "run.json").read_text())["identity"]
    assert evaluation["agent"]["sampling"]["temperature"] == 0.0  # the policy is judged greedily
    assert (tmp_path / "grpo" / "iter-1" / "grpo" / "final" / "config.json").is_file()


def test_online_grpo_refuses_greedy_groups_and_a_budget_below_two_groups(policy, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit):  # greedy groups would all tie
        train.main(["--stage", "grpo", "--model", str(policy), "--out", str(tmp_path / "a"), "--group-temperature", "0"])
    assert "argument --group-temperature: must be > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2 groups of 4"):
        run_online(replace(loop(policy, tmp_path / "b"), explore_limit=6),
                   GRPOConfig(group_size=4, **STAGE))


def test_the_command_line_runs_the_loop_without_episodes_and_refuses_loop_flags_with_them(policy, tmp_path):
    import train

    rows = train.main(["--stage", "ppo", "--model", str(policy), "--out", str(tmp_path / "ppo"), "--env", "household",
                       "--explore-limit", "2", "--eval-limit", "1", "--max-new-tokens", "6", "--agent-max-steps", "2",
                       "--max-steps", "1", "--device", "cpu", "--no-progress"])
    assert len(rows) == 1 and rows[0]["episodes"] == 2
    with pytest.raises(SystemExit, match="--iterations: online-loop settings, but --trajectories trains one stage"):
        train.main(["--stage", "ppo", "--model", str(policy), "--trajectories", "x.jsonl", "--iterations", "2"])

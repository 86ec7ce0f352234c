"""eto_ref/minimal.py, ETO in one file: its losses, reference log-probs, pairs and episodes are the library's."""

import copy
import json

import pytest
import torch

import envs
from eto_ref import minimal
from eto_ref.agent import AgentConfig, run_episodes
from eto_ref.batches import collate_pairs, collate_sft
from eto_ref.checkpoint import load_model, save_model
from eto_ref.config import DPOConfig, SFTConfig
from eto_ref.dpo import DPOStage, reference_logprobs
from eto_ref.model import ModelConfig, Transformer
from eto_ref.pairs import build_pairs
from eto_ref.sampler import SamplingConfig
from eto_ref.sft import SFTStage
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import Tokenizer, train_bpe_tokenizer
from eto_ref.trajectory import encode_pair, encode_sft, parse_pair, parse_trajectory

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def science_model(tmp_path_factory):
    """A random 2-layer Llama with a BPE tokenizer trained on the science environment's texts."""
    root = tmp_path_factory.mktemp("science-model")
    tok = train_bpe_tokenizer(environment_texts(["science"], tasks_per_env=20), 600, root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


def experts(n: int, env: str = "science") -> list[dict]:
    e = envs.make_env(env)
    return [e.expert_trajectory(t) for t in e.task_ids("train")[:n]]


def test_bc_loss_equals_the_sft_stage_loss_on_the_same_batch(science_model, tmp_path):
    model, tok = load_model(science_model), Tokenizer.from_dir(science_model)
    (tmp_path / "sft.json").write_text(json.dumps(experts(4)))
    stage = SFTStage(SFTConfig(data=str(tmp_path / "sft.json"), max_len=1024, eval_fraction=0.0), tok, CPU)
    examples = [encode_sft(parse_trajectory(r), tok, 1024) for r in experts(4)]
    batch = list(range(len(examples)))
    library, _ = stage.loss(model, batch, batch)
    ours = minimal.sft_loss(model, collate_sft(examples, tok.pad_id))
    assert len({len(ex.input_ids) for ex in examples}) > 1  # padding is exercised
    torch.testing.assert_close(ours, library, atol=1e-6, rtol=1e-6)
    ours.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dpo_loss_and_reference_equal_the_dpo_stage_on_the_same_batch(science_model):
    model, tok = load_model(science_model), Tokenizer.from_dir(science_model)
    pairs, _ = build_pairs(experts(3), [{**r, "reward": 0.0, "conversations": r["conversations"][:6]}
                                        for r in experts(3)])
    examples = [encode_pair(parse_pair(p), tok, 1024) for p in pairs]
    args = type("Args", (), {"batch_size": 2, "device": CPU, "dtype": torch.float32})()
    ref = minimal.reference_logps(model, examples, tok.pad_id, args)  # (N, 2)
    torch.testing.assert_close(ref, reference_logprobs(model, examples, tok.pad_id, 2, CPU, torch.float32))

    policy = copy.deepcopy(model)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = DPOConfig(beta=0.1)
    batch = list(range(len(examples)))
    library, metrics = DPOStage(cfg, examples, ref, tok.pad_id, CPU, {}).loss(policy, batch, batch)
    ours = minimal.dpo_batch_loss(policy, collate_pairs(examples, tok.pad_id), ref, beta=0.1)
    assert abs(ours.loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4
    torch.testing.assert_close(ours.loss, library, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.margin, metrics["margin"], atol=1e-6, rtol=1e-6)


def long_failure(record: dict, extra_turns: int) -> dict:
    """The expert run followed by `extra_turns` more useless (turn, observation) rounds, reward 0."""
    filler = [{"from": "gpt", "value": "Thought: wait.\nAction: look around"},
              {"from": "human", "value": "Observation: nothing new."}] * extra_turns
    return {**record, "reward": 0.0, "conversations": record["conversations"] + filler}


@pytest.mark.parametrize("env", ["science", "household"])
def test_pairs_equal_the_library_pair_rule(env):
    """Ties, wins, losses, a failed run longer than expert + 5 turns (cut in science, whole in household)."""
    truncates = envs.env_class(env).truncate_rejected
    expert = experts(5, env)
    expert[3] = {**expert[3], "reward": 0.5}  # the explored run of task 3 does better than its expert
    explored = [
        dict(expert[0]),  # tie
        {**expert[1], "reward": 0.0, "conversations": expert[1]["conversations"][:5]},  # lose, short
        long_failure(expert[2], 9),  # lose, long
        {**experts(5, env)[3], "reward": 1.0},  # win
        {**expert[4], "reward": 0.0, "conversations": expert[4]["conversations"][:3]},  # no agent turn: dropped
    ]
    library, stats = build_pairs(expert, explored, extra_turns=5 if truncates else None)
    ours = [p for e, r in zip(expert, explored) if (p := minimal.make_pair(e, r, 5 if truncates else None))]
    assert ours == library
    assert (stats.tie, stats.lose, stats.win, stats.dropped) == (1, 2, 1, 1)
    long_pair = next(p for p in ours if p["id"] == str(expert[2]["id"]))
    expert_turns = sum(t["from"] == "gpt" for t in long_pair["chosen"])
    assert sum(t["from"] == "gpt" for t in long_pair["rejected"]) == expert_turns + (5 if truncates else 9)


def test_the_plain_turn_loop_plays_the_library_agents_episodes(science_model):
    """Same greedy replies and observations as the agent with its cross-turn cache and continuous batching."""
    model, tok = load_model(science_model).eval(), Tokenizer.from_dir(science_model)
    tasks = envs.make_env("science").task_ids("train")[:3]
    args = type("Args", (), {"env": "science", "max_steps": 3, "max_new_tokens": 8, "agent_batch": 2,
                             "device": CPU, "dtype": torch.float32})()
    ours = minimal.run_episodes(model, tok, args, tasks)
    config = AgentConfig(sampling=SamplingConfig(temperature=0.0, max_new_tokens=8), batch_size=2, max_steps=3,
                         icl=False)
    library = [e.record() for e in run_episodes(model, tok, lambda: envs.make_env("science"), tasks, config)]
    assert [r["conversations"] for r in ours] == [r["conversations"] for r in library]
    assert [r["reward"] for r in ours] == [r["reward"] for r in library]


def test_runs_end_to_end_and_prints_the_comparison(science_model, capsys):
    out = minimal.main(["--model", str(science_model), "--sft-tasks", "4", "--explore-tasks", "4",
                        "--eval-tasks", "2", "--max-steps", "2", "--max-new-tokens", "8", "--batch-size", "2",
                        "--sft-epochs", "1", "--sft-lr", "1e-3", "--dpo-lr", "1e-3", "--dpo-epochs", "1",
                        "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert "SFT step 2/2" in printed and "DPO step 1/" in printed
    assert len(out["pairs"]) == 4  # a random policy fails every explored task: four lose pairs
    assert "| test_seen |" in printed and "| test_unseen |" in printed
    assert set(out["ETO"]) == {"test_seen", "test_unseen"} and len(out["ETO"]["test_seen"]) == 2

"""eto_ref/ppo.py: offline PPO (the paper's PPO row) on episodes with rewards: its rollout statistics by hand,
gradient accumulation, that it learns, exact resume with the value head, and its refusals."""

import dataclasses
import json

import pytest
import torch

from eto_ref import ppo, run_dir, trainer
from eto_ref.batches import collate_sft
from eto_ref.checkpoint import load_model
from eto_ref.config import PPOConfig
from eto_ref.tokenizer import Tokenizer
from eto_ref.trajectory import parse_trajectory
from tests.helpers import Interrupt, assert_same_params, episode_records, interrupt_at, params_of

LAM = 0.9


@pytest.fixture()
def episodes(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in episode_records()))
    return path


def ppo_config(model, episodes, out, **kw) -> PPOConfig:
    base = dict(model=str(model), trajectories=str(episodes), out=str(out), lr=1e-3, epochs=1, batch_size=4,
                micro_batch_size=2, ppo_epochs=2, lam=LAM, max_len=512, save_every=2, progress=False,
                device="cpu", dtype="float32")
    return PPOConfig(**{**base, **kw})


def make_stage(cfg: PPOConfig, ref_shift: float = 0.0):
    """(model with its value head, PPOStage) as run_ppo builds them; the reference shifted by `ref_shift`."""
    device = torch.device("cpu")
    tok = Tokenizer.from_dir(cfg.model)
    episodes = ppo.load_episodes(cfg.trajectories)
    examples, kept, stats = ppo.encode_episodes(episodes, tok, cfg.max_len)
    rewards = [episodes[i].reward for i in kept]
    model = trainer.load_trainable_model(cfg, device, torch.float32)
    ref = [r + ref_shift for r in ppo.reference_logprobs(model, examples, cfg, tok.pad_id, device, torch.float32)]
    model.value_head = ppo.ValueHead(model.config.hidden_size)
    return model, ppo.PPOStage(cfg, examples, rewards, ref, tok.pad_id, device, torch.float32, stats)


def test_rollout_statistics_by_hand(tiny_model, episodes, tmp_path):
    """At the start V = 0 and the policy is the old one. With the reference 1 nat below it on every token,
    R_k = -kl_coef plus the reward at the last agent token, so G_k = sum_{j >= k} lam^(j-k) R_j; A is G
    whitened over the batch's tokens; the policy loss is -mean(A) = 0 and the value loss 0.5 mean(G^2)."""
    cfg = ppo_config(tiny_model, episodes, tmp_path, kl_coef=0.3)
    model, stage = make_stage(cfg, ref_shift=-1.0)
    batch = list(range(len(stage.examples)))
    stage.begin_batch(model, batch)
    expected_returns = []
    for i in batch:
        K, reward = stage.counts[i], stage.rewards[i].item()
        R = [-0.3] * K
        R[-1] += reward
        G = torch.tensor([sum(LAM ** (j - k) * R[j] for j in range(k, K)) for k in range(K)])
        torch.testing.assert_close(stage.old[i][3], G, atol=1e-5, rtol=0)  # returns
        torch.testing.assert_close(stage.old[i][1], torch.zeros(K))  # V_old = 0: the head starts at zero
        expected_returns.append(G)
    every = torch.cat(expected_returns)
    whitened = (every - every.mean()) / every.std()
    torch.testing.assert_close(torch.cat([stage.old[i][2] for i in batch]), whitened, atol=1e-4, rtol=0)
    with torch.no_grad():
        _, metrics = stage.loss(model, batch, batch)
    assert float(metrics["policy_loss"]) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics["value_loss"]) == pytest.approx(0.5 * (every ** 2).mean().item(), rel=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["kl_ref"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["reward"]) == pytest.approx(0.5)


def test_episodes_lose_their_last_observation_and_keep_their_reward(tiny_model, episodes, tmp_path):
    tok = Tokenizer.from_dir(tiny_model)
    loaded = ppo.load_episodes(episodes)
    examples, kept, stats = ppo.encode_episodes(loaded, tok, 512)
    assert [loaded[i].reward for i in kept] == [1.0, 0.0] * 4 and stats["episodes"] == 8
    for ex, record in zip(examples, episode_records()):
        without = parse_trajectory({**record, "conversations": record["conversations"][:-1]})
        assert ex.input_ids == tok.render(without.messages)[0]  # ends with the agent's last turn


def test_micro_batches_accumulate_to_the_whole_batch(tiny_model, episodes, tmp_path):
    """The loss is a mean over the batch's agent tokens: micro-batches of one episode give the whole batch's
    loss and gradients (policy and value head)."""
    results = []
    for micro in (8, 1):
        cfg = ppo_config(tiny_model, episodes, tmp_path / f"m{micro}", batch_size=8, micro_batch_size=micro, clip=0.0)
        model, stage = make_stage(cfg, ref_shift=-0.5)
        run = trainer.Fit(model, cfg, stage, None, torch.device("cpu"), torch.float32)
        metrics = run.train_step()
        run.log.close()
        results.append((metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, g_whole), (ones, g_ones) = results
    for key in ("loss", "policy_loss", "value_loss", "kl_ref", "reward"):
        assert ones[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    assert g_whole["value_head.linear.weight"].abs().sum() > 0
    for n in g_whole:
        torch.testing.assert_close(g_ones[n], g_whole[n], atol=1e-6, rtol=1e-5, msg=f"grad {n}")


def episode_logprobs(model_dir, cfg) -> torch.Tensor:
    """log pi(episode) of every episode: the sum over its agent tokens."""
    tok = Tokenizer.from_dir(model_dir)
    examples, _, _ = ppo.encode_episodes(ppo.load_episodes(cfg.trajectories), tok, cfg.max_len)
    model = load_model(model_dir)
    with torch.no_grad():
        return torch.stack([trainer.scored_logprobs(model, collate_sft([ex], tok.pad_id)).sum() for ex in examples])


def test_ppo_moves_probability_to_the_rewarded_episodes(tiny_model, episodes, tmp_path):
    """With lam = 1 every agent token of an episode gets its episode's reward as return (A = G - V): the
    rewarded episodes gain log-probability against the others."""
    cfg = ppo_config(tiny_model, episodes, tmp_path, batch_size=8, ppo_epochs=4, epochs=3, save_every=0, lr=3e-3,
                     lam=1.0)
    before = episode_logprobs(tiny_model, cfg)
    after = episode_logprobs(ppo.run_ppo(cfg), cfg)
    gain = after - before  # (8,): good0, bad0, good1, bad1, ...
    assert gain[0::2].mean() > gain[1::2].mean() + 1.0


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_ends_with_the_same_parameters(tiny_model, episodes, tmp_path, lora):
    """Checkpoints fall between rollout batches and keep the value head: a resumed run recomputes the next
    batch's old log-probs and ends where an uninterrupted one does. final/ is a plain model."""
    kw = dict(epochs=2, save_every=2, ppo_epochs=2, lora_rank=lora, lora_dropout=0.1)
    straight = ppo.run_ppo(ppo_config(tiny_model, episodes, tmp_path / "straight", **kw))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        ppo.run_ppo(ppo_config(tiny_model, episodes, interrupted, **kw), callback=interrupt_at(5))
    ckpt = run_dir.checkpoint_dirs(interrupted)[-1]
    assert ckpt.name == "step-000004" and (ckpt / run_dir.VALUE_HEAD_FILE).is_file()
    (ckpt / run_dir.VALUE_HEAD_FILE).rename(tmp_path / "head")
    with pytest.raises(run_dir.RunError, match="value head"):
        ppo.run_ppo(ppo_config(tiny_model, episodes, interrupted, **kw))
    (tmp_path / "head").rename(ckpt / run_dir.VALUE_HEAD_FILE)
    resumed = ppo.run_ppo(ppo_config(tiny_model, episodes, interrupted, **kw))
    assert_same_params(params_of(resumed), params_of(straight))  # load_model: no value head tensor in final/


def test_refuses_checkpoints_inside_a_rollout_batch_and_episodes_without_reward(tiny_model, episodes, tmp_path):
    with pytest.raises(ValueError, match="save_every 3 is not a multiple of ppo_epochs 2"):
        ppo.run_ppo(ppo_config(tiny_model, episodes, tmp_path / "a", save_every=3))
    records = episode_records()
    del records[2]["reward"]
    path = tmp_path / "no-reward.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"no-reward.jsonl: record 2 .*reward: missing"):
        ppo.run_ppo(dataclasses.replace(ppo_config(tiny_model, path, tmp_path / "b")))


def test_the_command_line_stage(tiny_model, episodes, tmp_path):
    import train

    final = train.main(["--stage", "ppo", "--model", str(tiny_model), "--trajectories", str(episodes), "--out",
                        str(tmp_path / "ppo"), "--max-steps", "1", "--device", "cpu", "--no-progress"])
    load_model(final)


def agent_turns(example) -> list[list[int]]:
    """The agent tokens of a rendered trajectory, one list per assistant turn (the loss mask's runs)."""
    turns, previous = [], False
    for token, scored in zip(example.input_ids, example.loss_mask):
        if scored and not previous:
            turns.append([])
        if scored:
            turns[-1].append(token)
        previous = scored
    return turns


@pytest.fixture(scope="module")
def household_agent(tmp_path_factory):
    """(model, tokenizer): a tiny model fitted for a few seconds to household expert trajectories, so that its
    replies read as text the tokenizer renders the same way (an untrained model's token soup does not)."""
    from envs import make_env
    from eto_ref.model import ModelConfig, Transformer
    from eto_ref.trainer import scored_logprobs
    from eto_ref.trajectory import encode_sft
    from tests.helpers import household_tokenizer

    tok = household_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    env = make_env("household")
    batch = collate_sft([encode_sft(parse_trajectory(env.expert_trajectory(t)), tok, 4096)
                         for t in env.task_ids("train")[:4]], tok.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = -scored_logprobs(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_training_forward_scores_the_sampled_tokens_with_the_log_probs_they_were_sampled_with(
        household_agent, temperature):
    """An agent prompting 0-shot records each reply's tokens and log pi while sampling; the training
    forward on the episode's record scores the same tokens, turn by turn, with the same log-probs
    (float32), and nothing between two turns (the observations) is scored. Where the tokenizer renders
    a reply with other tokens than the sampled ones (the agent then re-renders it, `agent_turn`), the two
    agree up to the first differing token."""
    from envs import make_env
    from eto_ref.agent import AgentConfig, common_prefix_length, run_episodes
    from eto_ref.sampler import SamplingConfig
    from eto_ref.trainer import scored_logprobs
    from eto_ref.trajectory import encode_sft

    model, tok = household_agent
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=temperature), seed=0, batch_size=2,
                         max_len=4096, max_steps=3, icl=False)
    tasks = make_env("household").task_ids("train")[:3]
    episodes = run_episodes(model, tok, lambda: make_env("household"), tasks, config, record_logprobs=True)
    whole_turns = compared = 0
    for episode in episodes:
        example = encode_sft(parse_trajectory(episode.record()), tok, 4096)
        with torch.no_grad():
            logps = scored_logprobs(model, collate_sft([example], tok.pad_id))  # (N,): every agent token
        turns = agent_turns(example)
        assert sum(map(len, turns)) == len(logps)  # only the assistant turns are scored
        assert len(turns) == 1 + len(episode.sampled)  # "OK", then one run per reply: observations are not
        start = len(turns[0])
        for tokens, sampled in zip(turns[1:], episode.sampled):
            assert len(sampled.logprobs) == len(sampled.tokens)
            same = common_prefix_length(tokens, sampled.tokens)  # a reply cut at max_new_tokens lacks the
            torch.testing.assert_close(logps[start:start + same],  # end-of-turn token training adds
                                       torch.tensor(sampled.logprobs[:same]), atol=1e-5, rtol=1e-5)
            whole_turns += same == len(sampled.tokens)
            compared += same
            start += len(tokens)
    assert whole_turns >= 6 and compared >= 100  # most turns were compared whole


def test_an_episode_whose_agent_ended_its_turn_at_once_is_trained_on(tmp_path):
    """An explored episode may hold an empty reply (reason "no_output"): it is a choice the reward judges, so RL
    keeps it (its only agent token there is the end of the turn); a bad record is an error, never skipped."""
    from eto_ref.trajectory import TrajectoryError

    path = tmp_path / "trajectories.jsonl"
    turns = [{"from": "human", "value": "Do the task."}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": "Task: boil water."}, {"from": "gpt", "value": ""}]
    path.write_text(json.dumps({"id": "t0", "conversations": turns, "reward": 0.0, "reason": "no_output"}) + "\n")
    assert [(e.id, e.messages[-1]["content"], e.reward) for e in ppo.load_episodes(path)] == [("t0", "", 0.0)]
    with open(path, "a") as f:
        f.write(json.dumps({"id": "t1", "conversations": turns}) + "\n")
    with pytest.raises(TrajectoryError, match=r"record 1 \(id 't1', line 2\): reward: missing"):
        ppo.load_episodes(path)

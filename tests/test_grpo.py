"""eto_ref/grpo.py: GRPO on groups of sampled episodes: group advantages and the first loss by hand, gradient
accumulation, that it learns, exact resume, and its refusals."""

import json
import math

import pytest
import torch

from eto_ref import grpo, trainer
from eto_ref.batches import collate_sft
from eto_ref.checkpoint import load_model
from eto_ref.config import GRPOConfig
from eto_ref.ppo import encode_episodes, reference_logprobs
from eto_ref.tokenizer import Tokenizer
from tests.helpers import TRAINING_TASKS, Interrupt, assert_same_params, conversation, interrupt_at, params_of

WRONG = [["look", "inventory", "look"], ["inventory"]]


def write_samples(root, rewards_of_task0=(1.0, 0.0, 0.0)):
    """Three sampled runs over 4 tasks. Task 0 scores `rewards_of_task0`; on tasks 1-3 sample 0 is the expert's
    run (reward 1) and samples 1, 2 wrong runs (reward 0), except task 3, where every sample succeeds."""
    for s in range(3):
        lines = []
        for i, (task, actions) in enumerate(TRAINING_TASKS[:4]):
            reward = rewards_of_task0[s] if i == 0 else (1.0 if s == 0 or i == 3 else 0.0)
            acts = actions if reward == 1.0 else WRONG[s % 2]
            turns = conversation(task, acts) + [{"from": "human", "value": "Observation: Nothing happened."}]
            lines.append(json.dumps({"id": f"task{i}", "conversations": turns, "reward": reward}) + "\n")
        (root / f"sample-{s}").mkdir(parents=True, exist_ok=True)
        (root / f"sample-{s}" / "trajectories.jsonl").write_text("".join(lines))
    return root


@pytest.fixture()
def samples(tmp_path):
    return write_samples(tmp_path / "samples")


def grpo_config(model, samples, out, **kw) -> GRPOConfig:
    base = dict(model=str(model), samples=str(samples), out=str(out), lr=1e-3, epochs=1, batch_size=4,
                micro_batch_size=2, ppo_epochs=1, max_len=512, save_every=2, progress=False, device="cpu",
                dtype="float32")
    return GRPOConfig(**{**base, **kw})


def test_group_advantages_by_hand(samples):
    """Rewards (1, 0, 0): mean 1/3, unbiased std sqrt(1/3), so A = (2/3) / sqrt(1/3) = 1.1547 and
    -(1/3) / sqrt(1/3) = -0.5774; a group that all succeeded gets 0."""
    episodes, advantages = grpo.load_groups(samples)
    a = {}
    for episode, advantage in zip(episodes, advantages):  # sample 0's episodes, then sample 1's, ...
        a.setdefault(episode.id, []).append(advantage)
    for task in ("task0", "task1", "task2"):
        assert a[task] == pytest.approx([2 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3),
                                         -1 / 3 / math.sqrt(1 / 3)], abs=1e-5)
    assert a["task3"] == [0.0, 0.0, 0.0]


def make_stage(cfg):
    device = torch.device("cpu")
    tok = Tokenizer.from_dir(cfg.model)
    episodes, advantages = grpo.load_groups(cfg.samples)
    examples, kept, stats = encode_episodes(episodes, tok, cfg.max_len)
    model = trainer.load_trainable_model(cfg, device, torch.float32)
    ref = reference_logprobs(model, examples, cfg, tok.pad_id, device, torch.float32)
    stage = grpo.GRPOStage(cfg, examples, [advantages[i] for i in kept], ref, tok.pad_id, device, torch.float32,
                           stats)
    return model, stage


def test_first_loss_is_minus_the_token_weighted_mean_advantage(tiny_model, samples, tmp_path):
    """At the start the policy is the old one and the reference: rho = 1 and k3 = 0, so the loss is
    -sum_i K_i A_i / sum_i K_i over the batch (every token of an episode carries its advantage)."""
    model, stage = make_stage(grpo_config(tiny_model, samples, tmp_path, kl_coef=0.5))
    batch = list(range(len(stage.examples)))
    stage.begin_batch(model, batch)
    with torch.no_grad():
        _, metrics = stage.loss(model, batch, batch)
    K, A = torch.tensor(stage.counts, dtype=torch.float64), stage.advantages.double()
    assert float(metrics["loss"]) == pytest.approx(-(K * A).sum().item() / K.sum().item(), abs=1e-5)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert stage.data_stats["zero_advantage_episodes"] == 3


def test_micro_batches_accumulate_to_the_whole_batch(tiny_model, samples, tmp_path):
    results = []
    for micro in (12, 1):
        cfg = grpo_config(tiny_model, samples, tmp_path / f"m{micro}", batch_size=12, micro_batch_size=micro, clip=0.0)
        model, stage = make_stage(cfg)
        stage.ref = [r - 0.3 for r in stage.ref]  # a nonzero KL term
        run = trainer.Fit(model, cfg, stage, None, torch.device("cpu"), torch.float32)
        metrics = run.train_step()
        run.log.close()
        results.append((metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, g_whole), (ones, g_ones) = results
    for key in ("loss", "policy_loss", "kl"):
        assert ones[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    assert whole["kl"] > 0.01
    for n in g_whole:
        torch.testing.assert_close(g_ones[n], g_whole[n], atol=1e-6, rtol=1e-5, msg=f"grad {n}")


def test_grpo_moves_probability_to_the_better_episodes_of_each_group(tiny_model, samples, tmp_path):
    cfg = grpo_config(tiny_model, samples, tmp_path, batch_size=12, ppo_epochs=2, epochs=4, save_every=0, lr=3e-3)
    tok = Tokenizer.from_dir(tiny_model)
    episodes, advantages = grpo.load_groups(samples)
    examples, _, _ = encode_episodes(episodes, tok, cfg.max_len)

    def logps(model_dir):
        model = load_model(model_dir)
        with torch.no_grad():
            return torch.stack([trainer.scored_logprobs(model, collate_sft([ex], tok.pad_id)).mean() for ex in examples])

    gain = logps(grpo.run_grpo(cfg)) - logps(tiny_model)  # per-token mean log-prob, per episode
    A = torch.tensor(advantages)
    assert gain[A > 0].mean() > gain[A < 0].mean() + 0.5


def test_resume_ends_with_the_same_parameters(tiny_model, samples, tmp_path):
    kw = dict(epochs=2, save_every=2, ppo_epochs=2)
    straight = grpo.run_grpo(grpo_config(tiny_model, samples, tmp_path / "straight", **kw))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        grpo.run_grpo(grpo_config(tiny_model, samples, interrupted, **kw), callback=interrupt_at(3))
    resumed = grpo.run_grpo(grpo_config(tiny_model, samples, interrupted, **kw))
    assert_same_params(params_of(resumed), params_of(straight))


def test_refuses_a_single_sample_and_a_task_without_a_group(tiny_model, tmp_path):
    root = write_samples(tmp_path / "one")
    for s in (1, 2):
        (root / f"sample-{s}" / "trajectories.jsonl").unlink()
        (root / f"sample-{s}").rmdir()
    with pytest.raises(ValueError, match="1 sample-"):
        grpo.run_grpo(grpo_config(tiny_model, root, tmp_path / "a"))
    root = write_samples(tmp_path / "lonely")
    for s in (1, 2):
        path = root / f"sample-{s}" / "trajectories.jsonl"
        path.write_text("".join(line for line in path.read_text().splitlines(keepends=True) if '"task2"' not in line))
    with pytest.raises(ValueError, match="task 'task2' has 1 episode"):
        grpo.run_grpo(grpo_config(tiny_model, root, tmp_path / "b"))


def test_the_command_line_stage(tiny_model, samples, tmp_path):
    import train

    with pytest.raises(SystemExit, match="at least 2 groups of 4"):  # without --samples: the online loop
        train.main(["--stage", "grpo", "--model", str(tiny_model), "--explore-limit", "6", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    final = train.main(["--stage", "grpo", "--model", str(tiny_model), "--samples", str(samples), "--out",
                        str(tmp_path / "grpo"), "--max-steps", "1", "--device", "cpu", "--no-progress"])
    load_model(final)

"""GRPO (Shao et al. 2024; beyond the paper): PPO's clipped surrogate with no critic, on groups of sampled episodes.

    run_grpo(GRPOConfig.for_model("runs/main/sft/final", samples="runs/grpo-samples", out="runs/grpo"))

Every task is run G times with sampling: `samples`/sample-i/trajectories.jsonl, one run
over the tasks per sample (explore.py with --temperature and a seed per sample). Episode i
of a task whose G episodes scored s_1..s_G gets the advantage

    A_i = (s_i - mean s) / (std s + 1e-6)        (std: unbiased, eto_ref/rl.py `group_advantages`)

on every one of its agent tokens; a group whose episodes all scored the same teaches
nothing but the KL term. As in PPO (eto_ref/ppo.py), each rollout batch is scored once
by the policy as it is then (o_k) and trained on for ppo_epochs optimizer steps:

    L = mean_k max(-A rho_k, -A clip(rho_k, 1 - eps, 1 + eps)) + kl_coef * mean_k k3_k
    rho_k = exp(l_k - o_k),   k3_k = exp(r_k - l_k) - (r_k - l_k) - 1

against the reference r: the policy the stage started from, or `reference` (online GRPO
keeps pi_0, eto_ref/online.py). Both means are over all the
agent tokens of the batch (a long episode weighs more than a short one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from eto_ref.config import GRPOConfig
from eto_ref.ppo import RolloutStage, check_rollout_checkpoints, encode_episodes, episode_logprobs, reference_logprobs
from eto_ref.rl import clipped_surrogate, group_advantages, k3_kl
from eto_ref.run_dir import restore_weights
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import fit, load_trainable_model, scored_logprobs, training_run
from eto_ref.trajectory import Trajectory, load_episodes


def load_groups(samples: str | Path) -> tuple[list[Trajectory], list[float]]:
    """The episodes of every sample-*/trajectories.jsonl under `samples`, and each one's group advantage
    (its task's episodes across the samples form its group)."""
    files = sorted(Path(samples).glob("sample-*/trajectories.jsonl"), key=lambda f: int(f.parent.name.split("-")[1]))
    if len(files) < 2:
        raise ValueError(f"{samples}: {len(files)} sample-*/trajectories.jsonl; GRPO compares at least 2 sampled "
                         "runs of each task")
    episodes = [e for f in files for e in load_episodes(f)]
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(e.id, []).append(i)
    advantages = [0.0] * len(episodes)
    for task, members in groups.items():
        if len(members) < 2:
            raise ValueError(f"{samples}: task {task!r} has 1 episode (in {episodes[members[0]].source}); "
                             "every task needs a group of 2 or more")
        group = group_advantages(torch.tensor([episodes[i].reward for i in members], dtype=torch.float64))
        for i, a in zip(members, group.tolist()):
            advantages[i] = a
    return episodes, advantages


class GRPOStage(RolloutStage):
    """The sampled episodes, their group advantages and reference log-probs, and GRPO's loss."""

    name = "grpo"

    def __init__(self, cfg: GRPOConfig, examples: list, advantages: list[float], ref: list[torch.Tensor],
                 pad_id: int, device: torch.device, dtype: torch.dtype, data_stats: dict):
        super().__init__(cfg, examples, ref, pad_id, device, dtype)
        self.advantages = torch.tensor(advantages)  # (E,)
        self.old: dict[int, torch.Tensor] = {}  # episode -> o (K_i,)
        self.data_stats = {**data_stats, "train_episodes": len(self.train_indices),
                           "zero_advantage_episodes": int((self.advantages == 0).sum())}

    def begin_batch(self, model, batch: list[int]) -> None:
        """The old policy's log-probs of the batch's agent tokens (the policy as it is now)."""
        old = episode_logprobs(model, self.examples, batch, self.cfg.micro_batch_size, self.pad_id, self.device,
                               self.dtype)
        self.old = dict(zip(batch, old))

    def loss(self, model, micro: list[int], batch: list[int]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share (its agent tokens / the batch's) of the batch's GRPO loss."""
        logps = scored_logprobs(model, self.micro_batch(micro))  # (N,)
        old_logps = torch.cat([self.old[i] for i in micro]).to(self.device)  # (N,)
        ref = torch.cat([self.ref[i] for i in micro]).to(self.device)  # (N,)
        advantages = torch.cat([self.advantages[i].expand(self.counts[i]) for i in micro]).to(self.device)  # (N,)
        every = torch.ones_like(logps, dtype=torch.bool)  # (N,): all of them are agent tokens
        policy_loss = clipped_surrogate(logps, old_logps, advantages, every, self.cfg.clip_ratio)
        kl = k3_kl(logps, ref, every)
        share = self.share(micro, batch)
        loss = (policy_loss + self.cfg.kl_coef * kl) * share
        ratio = torch.exp(logps.detach() - old_logps)
        return loss, {"loss": loss.detach(), "policy_loss": policy_loss.detach() * share, "kl": kl.detach() * share,
                      "clip_fraction": ((ratio - 1).abs() > self.cfg.clip_ratio).float().mean() * share,
                      "tokens": float(len(logps))}


def run_grpo(cfg: GRPOConfig, callback: Callable | None = None) -> Path:
    """GRPO of cfg.model on the sampled groups under cfg.samples; returns the final model directory.

    A finished run returns its final/ at once; an interrupted one resumes (`training_run`).
    """
    with training_run(cfg) as (done, device, dtype, resume_from):
        if done is not None:
            return done
        check_rollout_checkpoints(cfg)
        tok = Tokenizer.from_dir(cfg.model)
        episodes, advantages = load_groups(cfg.samples)
        examples, kept, stats = encode_episodes(episodes[:cfg.max_examples], tok, cfg.max_len)
        if not examples:
            raise ValueError(f"{cfg.samples}: no episode with an agent token")
        model = load_trainable_model(cfg, device, dtype)  # = the reference until it is trained
        ref = reference_logprobs(model, examples, cfg, tok.pad_id, device, dtype)
        if resume_from is not None:
            restore_weights(model, resume_from, bool(cfg.lora_rank))
        stage = GRPOStage(cfg, examples, [advantages[i] for i in kept], ref, tok.pad_id, device, dtype, stats)
        return fit(model, cfg, stage, resume_from, device, dtype, callback)

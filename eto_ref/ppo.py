"""Offline PPO, the paper's PPO row (Table 2): token-level PPO with a value head on episodes collected beforehand.

    run_ppo(PPOConfig.for_model("runs/main/sft/final", out="runs/ppo",
                                trajectories="runs/main/eto/iter-1/explore/trajectories.jsonl"))

The official code's PPO (fastchat/train/train_ppo.py, a fork of TRL's PPOTrainer) learns
from the episodes ETO's exploration collected, each with its environment reward; no
episode is generated during training. As in TRL's `step`, each rollout batch of
`batch_size` episodes is

  1. scored without gradient (`begin_batch`) by the policy as it is at the batch's start,
     the "old" policy (o_k, V_old), and by the reference (r_k, computed once): the policy
     the stage started from, or `reference` (online PPO keeps pi_0, eto_ref/online.py);
     o_k comes from this training forward, not from the sampler: exploration prompts
     carry the in-context example, the trained 0-shot record does not. On 0-shot
     episodes the two agree token for token (`run_episodes(record_logprobs=True)`,
     tests/test_ppo.py);
  2. turned into per-token rewards R_k = -kl_coef (o_k - r_k), plus the episode's reward
     at its last agent token, then GAE advantages A_k and returns G_k over the agent tokens
     (eto_ref/rl.py), the advantages whitened over the batch;
  3. trained on for `ppo_epochs` optimizer steps (`loss`): the clipped surrogate plus
     vf_coef times the clipped value loss, each a mean over the batch's agent tokens.

The value head V reads the policy's last hidden state at the position that predicts an
agent token (eto_ref/rl.py `ValueHead`). It is trained with the policy, kept in each
checkpoint (value_head.safetensors) and left out of final/, a plain model like every
stage's. A checkpoint falls between rollout batches (save_every is a multiple of
ppo_epochs), so a resumed run recomputes its next batch's old log-probs exactly.

Where this differs from the official code: GAE skips the observation tokens between two
agent turns (TRL runs it over every response position, so there an observation decays
the advantage by (gamma lam)^length); the KL coefficient is fixed (TRL adapts it, by
steps too few here to move it); each optimizer step takes the whole rollout batch
(TRL's default takes one episode per step).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from eto_ref.batches import collate_sft
from eto_ref.checkpoint import load_model
from eto_ref.config import PPOConfig
from eto_ref.distributed import world_size
from eto_ref.lora import disable_adapter, lora_modules
from eto_ref.losses import next_token_targets, scored_positions
from eto_ref.model import head_logprobs
from eto_ref.rl import ValueHead, agent_steps, clipped_surrogate, clipped_value_loss, gae, kl_penalized_rewards, whiten
from eto_ref.run_dir import restore_weights
from eto_ref.runtime import autocast
from eto_ref.sft import scored_targets
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import (chunks, fit, load_trainable_model, scored_logprobs, split_train_eval, to_device,
                             training_run)
from eto_ref.trajectory import Trajectory, encode_sft, load_episodes


def logprobs_and_values(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(agent token) and V at the position predicting it: (N,) each, float32, row-major over the
    batch's scored positions (the trainer's forward, plus the value head on the same hidden states)."""
    targets, scored = next_token_targets(batch["input_ids"], batch["loss_mask"])  # (B, T-1) each
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["shared_prefix"])  # (B, T, D)
    hidden = hidden[scored_positions(batch["loss_mask"])]  # (N, D)
    return head_logprobs(hidden, model.lm_head, targets[scored]), model.value_head(hidden)  # (N,), (N,)


class RolloutStage:
    """What PPO and GRPO share as training stages: episodes (rendered examples) with their reference
    log-probs r_k [(K_i,)], `ppo_epochs` optimizer steps per rollout batch, and no held-out loss."""

    def __init__(self, cfg, examples: list, ref: list[torch.Tensor], pad_id: int, device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.examples, self.ref, self.pad_id = cfg, examples, ref, pad_id
        self.device, self.dtype = device, dtype
        self.repeats = cfg.ppo_epochs  # optimizer steps on each rollout batch
        self.counts = [scored_targets(ex.loss_mask) for ex in examples]  # agent tokens K_i
        self.lengths = [len(ex.input_ids) for ex in examples]
        self.train_indices, _ = split_train_eval(len(examples), cfg.eval_fraction, cfg.seed)

    def micro_batch(self, micro: list[int]) -> dict:
        return to_device(collate_sft([self.examples[i] for i in micro], self.pad_id), self.device)

    def share(self, micro: list[int], batch: list[int]) -> float:
        """The micro-batch's agent tokens / the batch's: its weight in the batch's token mean."""
        return sum(self.counts[i] for i in micro) / sum(self.counts[i] for i in batch)

    def evaluate(self, model) -> dict:
        return {}  # no held-out loss: the policy is judged by its evaluation episodes


class PPOStage(RolloutStage):
    """The episodes, their rewards and reference log-probs, and PPO's loss, as the training loop calls them."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, examples: list, rewards: list[float], ref: list[torch.Tensor], pad_id: int,
                 device: torch.device, dtype: torch.dtype, data_stats: dict):
        super().__init__(cfg, examples, ref, pad_id, device, dtype)
        self.rewards = torch.tensor(rewards)  # (E,)
        self.old: dict[int, tuple[torch.Tensor, ...]] = {}  # episode -> (o, V_old, A, G), each (K_i,)
        self.data_stats = {**data_stats, "train_episodes": len(self.train_indices),
                           "mean_reward": self.rewards.mean().item()}

    def begin_batch(self, model, batch: list[int]) -> None:
        """Steps 1-2: the old policy's log-probs and values of the batch, its rewards, advantages and returns."""
        was_training = model.training
        model.eval()  # no dropout: the old log-probs are the policy's own
        old_logps, old_values = [], []
        with torch.no_grad(), autocast(self.device, self.dtype):
            for micro in chunks(batch, self.cfg.micro_batch_size):
                logps, values = logprobs_and_values(model, self.micro_batch(micro))  # (N,), (N,)
                sizes = [self.counts[i] for i in micro]
                old_logps += [x.cpu() for x in logps.split(sizes)]
                old_values += [x.cpu() for x in values.split(sizes)]
        model.train(was_training)
        old_logps_bk, mask = agent_steps(old_logps)  # (B, K) each
        rewards = kl_penalized_rewards(old_logps_bk, agent_steps([self.ref[i] for i in batch])[0],
                                       self.rewards[batch], mask, self.cfg.kl_coef)  # (B, K)
        advantages, returns = gae(rewards, agent_steps(old_values)[0], mask, self.cfg.gamma, self.cfg.lam)  # (B, K)
        advantages = whiten(advantages, mask)
        self.old = {i: (old_logps[j], old_values[j], advantages[j, :self.counts[i]], returns[j, :self.counts[i]])
                    for j, i in enumerate(batch)}

    def loss(self, model, micro: list[int], batch: list[int]) -> tuple[torch.Tensor, dict]:
        """Step 3 on a micro-batch: its share (its agent tokens / the batch's) of the batch's PPO loss."""
        logps, values = logprobs_and_values(model, self.micro_batch(micro))  # (N,), (N,)
        old_logps, old_values, advantages, returns = (torch.cat([self.old[i][f] for i in micro]).to(self.device)
                                                       for f in range(4))  # (N,) each
        ref = torch.cat([self.ref[i] for i in micro]).to(self.device)  # (N,)
        every = torch.ones_like(logps, dtype=torch.bool)  # (N,): all of them are agent tokens
        policy_loss = clipped_surrogate(logps, old_logps, advantages, every, self.cfg.clip_ratio)
        value_loss = clipped_value_loss(values, old_values, returns, every, self.cfg.value_clip)
        share = self.share(micro, batch)
        loss = (policy_loss + self.cfg.vf_coef * value_loss) * share
        ratio = torch.exp(logps.detach() - old_logps)
        clipped = (ratio - 1).abs() > self.cfg.clip_ratio
        return loss, {"loss": loss.detach(), "policy_loss": policy_loss.detach() * share,
                      "value_loss": value_loss.detach() * share,
                      "clip_fraction": clipped.float().mean() * share,  # tokens whose ratio left 1 +- eps
                      "kl_old": (old_logps - logps.detach()).mean() * share,  # mean of o - l: the step's drift
                      "kl_ref": (logps.detach() - ref).mean() * share,  # mean of l - r: the drift from the start
                      "value": values.detach().mean() * share,
                      "reward": self.rewards[micro].sum() / len(batch),
                      "tokens": float(len(logps))}


# --------------------------------------------------------------------------- the data and the reference


def encode_episodes(episodes: list[Trajectory], tokenizer: Tokenizer, max_len: int) -> tuple[list, list[int], dict]:
    """Render episodes: (examples, the indices of the episodes kept, stats). An episode with no agent token
    left after truncation is dropped; a cut one keeps its reward, given at its last kept agent token."""
    examples, kept, truncated = [], [], 0
    for i, episode in enumerate(episodes):
        ex = encode_sft(episode, tokenizer, max_len)
        truncated += ex.truncated
        if scored_targets(ex.loss_mask):
            examples.append(ex)
            kept.append(i)
    return examples, kept, {"episodes": len(examples), "truncated": truncated,
                            "dropped_empty": len(episodes) - len(examples)}


def episode_logprobs(model, examples: list, indices: list[int], micro_batch_size: int, pad_id: int, device,
                     dtype) -> list[torch.Tensor]:
    """log pi of the agent tokens of episodes `indices` [(K_i,)], float32 on CPU: eval mode (no dropout),
    no_grad, the training dtype."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), autocast(device, dtype):
        for micro in chunks(indices, micro_batch_size):
            logps = scored_logprobs(model, to_device(collate_sft([examples[i] for i in micro], pad_id), device))
            out += [x.cpu() for x in logps.split([scored_targets(examples[i].loss_mask) for i in micro])]
    model.train(was_training)
    return out


def reference_logprobs(model, examples: list, cfg, pad_id: int, device, dtype) -> list[torch.Tensor]:
    """r_k of every episode [(K_i,)]: cfg.reference when given (loaded for this, in float32 like the policy),
    else the starting policy itself; with LoRA, adapters disabled (the base model)."""
    everything = list(range(len(examples)))
    if cfg.reference:
        reference = load_model(cfg.reference, torch.float32, device)
        return episode_logprobs(reference, examples, everything, cfg.micro_batch_size, pad_id, device, dtype)
    adapters = disable_adapter(model) if lora_modules(model) else contextlib.nullcontext()
    with adapters:
        return episode_logprobs(model, examples, everything, cfg.micro_batch_size, pad_id, device, dtype)


def check_rollout_checkpoints(cfg) -> None:
    """A checkpoint must fall between rollout batches, where a resumed run recomputes the old log-probs."""
    if cfg.save_every % cfg.ppo_epochs:
        raise ValueError(f"{cfg.out}: save_every {cfg.save_every} is not a multiple of ppo_epochs {cfg.ppo_epochs}: "
                         "a checkpoint inside a rollout batch could not be resumed exactly")


def run_ppo(cfg: PPOConfig, callback: Callable | None = None) -> Path:
    """Offline PPO of cfg.model on the episodes of cfg.trajectories; returns the final model directory.

    A finished run returns its final/ at once; an interrupted one resumes (`training_run`).
    """
    with training_run(cfg) as (done, device, dtype, resume_from):
        if done is not None:
            return done
        check_rollout_checkpoints(cfg)
        if cfg.fsdp and world_size() > 1:
            raise ValueError(f"{cfg.out}: PPO does not run under FSDP (its value head is not sharded); "
                             "use LoRA replicas (--lora-rank) without --fsdp")
        tok = Tokenizer.from_dir(cfg.model)
        episodes = load_episodes(cfg.trajectories)[:cfg.max_examples]
        examples, kept, stats = encode_episodes(episodes, tok, cfg.max_len)
        if not examples:
            raise ValueError(f"{cfg.trajectories}: no episode with an agent token")
        rewards = [episodes[i].reward for i in kept]
        model = load_trainable_model(cfg, device, dtype)  # = the reference until it is trained
        ref = reference_logprobs(model, examples, cfg, tok.pad_id, device, dtype)
        model.value_head = ValueHead(model.config.hidden_size).to(device)  # float32, V = 0 at the start
        if resume_from is not None:
            restore_weights(model, resume_from, bool(cfg.lora_rank))
        stage = PPOStage(cfg, examples, rewards, ref, tok.pad_id, device, dtype, stats)
        return fit(model, cfg, stage, resume_from, device, dtype, callback)

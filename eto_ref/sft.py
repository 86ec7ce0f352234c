"""Behavioral cloning (SFT), paper Eq. 5: the first stage of ETO, and RFT's training.

    run_sft(SFTConfig.for_model("smollm2", data="data/science_sft.json", out="runs/sft"))  -> runs/sft/final

    L_SFT = -(1/N) sum_t log pi(a_t | history)      N = agent-token targets of the *global* batch

Each expert trajectory is rendered with the chat template into one token sequence
whose loss mask is True on the agent turns (eto_ref/trajectory.py); the loss is the
token mean over the masked-in targets of the whole batch (eto_ref/losses.py). The
training loop (eto_ref/trainer.py `fit`) does the optimisation, checkpoints and resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from eto_ref.batches import collate_sft
from eto_ref.config import SFTConfig
from eto_ref.losses import bc_loss, next_token_targets
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import chunks, fit, scored_logprobs, split_train_eval, start_model, to_device, training_run
from eto_ref.trajectory import encode_sft, load_trajectories


def scored_targets(loss_mask) -> int:
    """Number of scored next-token targets: position t is scored iff target token t+1 is an agent token."""
    mask = torch.as_tensor(loss_mask).bool()[None]  # (1, T)
    return int(next_token_targets(mask, mask)[1].sum())


def encode_sft_data(trajectories, tokenizer, max_len: int) -> tuple[list, dict]:
    """Encode trajectories; drop those with no scored token left after truncation. Returns (examples, stats)."""
    examples, truncated, dropped = [], 0, 0
    for traj in trajectories:
        ex = encode_sft(traj, tokenizer, max_len)
        truncated += bool(ex.truncated)
        if scored_targets(ex.loss_mask) == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, {"examples": len(examples), "truncated": truncated, "dropped_empty": dropped}


class SFTStage:
    """The SFT data and its loss (paper Eq. 5), as the training loop (eto_ref/trainer.py `fit`) calls them."""

    name = "sft"
    repeats = 1  # one optimizer step per global batch

    def __init__(self, cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device):
        trajectories = load_trajectories(cfg.data, on_error="skip")[:cfg.max_examples]
        self.examples, self.data_stats = encode_sft_data(trajectories, tokenizer, cfg.max_len)
        if not self.examples:
            raise ValueError(f"{cfg.data}: no trajectory with a trainable (agent) token")
        self.pad_id, self.device, self.micro_batch_size = tokenizer.pad_id, device, cfg.micro_batch_size
        self.counts = [scored_targets(ex.loss_mask) for ex in self.examples]  # scored tokens per example
        self.lengths = [len(ex.input_ids) for ex in self.examples]
        self.train_indices, self.eval_indices = split_train_eval(len(self.examples), cfg.eval_fraction, cfg.seed)
        self.data_stats.update(train_examples=len(self.train_indices), eval_examples=len(self.eval_indices),
                               train_tokens=sum(self.counts[i] for i in self.train_indices))

    def begin_batch(self, model, batch: list[int]) -> None:
        """Nothing to prepare: a step's loss reads its batch alone."""

    def loss(self, model, micro: list[int], batch: list[int]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the batch loss: its sum of token NLLs / scored tokens of the whole batch."""
        b = to_device(collate_sft([self.examples[i] for i in micro], self.pad_id), self.device)
        logps = scored_logprobs(model, b)  # (N,): only where the loss reads them
        loss = bc_loss(logps, num_tokens=sum(self.counts[i] for i in batch))
        return loss, {"loss": loss.detach(), "tokens": sum(self.counts[i] for i in micro),
                      "truncated": sum(bool(self.examples[i].truncated) for i in micro)}

    def evaluate(self, model) -> dict:
        """Held-out BC loss: the token mean over all held-out trajectories ({} when none is held out)."""
        if not self.eval_indices:
            return {}
        total = sum(float(self.loss(model, micro, self.eval_indices)[0])
                    for micro in chunks(self.eval_indices, self.micro_batch_size))
        return {"eval_loss": total, "eval_tokens": sum(self.counts[i] for i in self.eval_indices)}


def run_sft(cfg: SFTConfig, callback: Callable | None = None) -> Path:
    """Behavioral cloning (paper Eq. 5) of cfg.model on cfg.data; returns the final model directory.

    A finished run returns its final/ at once; an interrupted one resumes (`training_run`).
    """
    with training_run(cfg) as (done, device, dtype, resume_from):
        if done is not None:
            return done
        stage = SFTStage(cfg, Tokenizer.from_dir(cfg.model), device)
        model = start_model(cfg, device, dtype, resume_from)
        return fit(model, cfg, stage, resume_from, device, dtype, callback)

"""Behavioral cloning (SFT), paper Eq. 5: the first stage of ETO, and RFT's training.

    run_sft(SFTConfig.for_model("smollm2", data="data/science_sft.json", out="runs/sft"))  -> runs/sft/final

    L_SFT = -(1/N) sum_t log pi(a_t | history)      N = agent-token targets of the *global* batch

Each expert trajectory is rendered with the chat template into one token sequence
whose loss mask is True on the agent turns (eto_ref/trajectory.py); the loss is the
token mean over the masked-in targets of the whole batch (eto_ref/losses.py). The
shared loop (eto_ref/trainer.py) does the optimisation, checkpoints and resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from eto_ref.config import SFTConfig
from eto_ref.losses import bc_loss, next_token_targets
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import Stage, chunks, fit, run_stage, scored_logprobs, split_train_eval, start_model, to_device
from eto_ref.trajectory import collate_sft, encode_sft, load_trajectories


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


def sft_micro_loss(examples: list, counts: list[int], pad_id: int, device: torch.device) -> Callable:
    """The SFT loss share of a micro-batch: sum of token NLLs / scored tokens of the global batch."""

    def micro_loss(model, micro: list[int], batch: list[int]):
        n_global = sum(counts[i] for i in batch)
        b = to_device(collate_sft([examples[i] for i in micro], pad_id), device)
        logps = scored_logprobs(model, b)  # (N,): only where the loss reads them
        loss = bc_loss(logps, b["input_ids"], b["loss_mask"], num_tokens=n_global)
        return loss, {"loss": loss.detach(), "tokens": sum(counts[i] for i in micro),
                      "truncated": sum(bool(examples[i].truncated) for i in micro)}

    return micro_loss


def sft_evaluate(examples: list, counts: list[int], indices: list[int], pad_id: int, micro_batch_size: int,
                 device: torch.device) -> Callable:
    """Held-out BC loss: token mean over all held-out trajectories."""
    micro_loss = sft_micro_loss(examples, counts, pad_id, device)

    def evaluate(model) -> dict:
        total = sum(float(micro_loss(model, micro, indices)[0]) for micro in chunks(indices, micro_batch_size))
        return {"eval_loss": total, "eval_tokens": sum(counts[i] for i in indices)}

    return evaluate


def sft_stage(cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device) -> Stage:
    """The SFT data as the shared loop's Stage: examples, held-out split, loss and evaluation."""
    pad_id = tokenizer.pad_id
    trajectories = load_trajectories(cfg.data, on_error="skip")[:cfg.max_examples]
    examples, stats = encode_sft_data(trajectories, tokenizer, cfg.max_len)
    if not examples:
        raise ValueError(f"{cfg.data}: no trajectory with a trainable (agent) token")
    counts = [scored_targets(ex.loss_mask) for ex in examples]
    train_idx, eval_idx = split_train_eval(len(examples), cfg.eval_fraction, cfg.seed)
    stats.update(train_examples=len(train_idx), eval_examples=len(eval_idx),
                 train_tokens=sum(counts[i] for i in train_idx))
    evaluate = sft_evaluate(examples, counts, eval_idx, pad_id, cfg.micro_batch_size, device) if eval_idx else None
    return Stage("sft", train_idx, sft_micro_loss(examples, counts, pad_id, device), evaluate,
                 lengths=[len(ex.input_ids) for ex in examples], data_stats=stats)


def run_sft(cfg: SFTConfig, callback: Callable | None = None) -> Path:
    """Behavioral cloning (paper Eq. 5) of cfg.model on cfg.data; returns the final model directory."""
    return run_stage(cfg, train_sft, callback)


def train_sft(cfg: SFTConfig, device, dtype, resume_from: Path | None, callback: Callable | None) -> Path:
    stage = sft_stage(cfg, Tokenizer.from_dir(cfg.model), device)
    model = start_model(cfg, device, dtype, resume_from)
    return fit(model, cfg, stage, resume_from, device, dtype, callback)

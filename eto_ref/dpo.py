"""One DPO stage of ETO, paper Eq. 7: the policy learns to prefer the chosen trajectory of each pair.

    run_dpo(DPOConfig.for_model("runs/sft/final", pairs="runs/explore/pairs.json", out="runs/eto/iter-1"))

    L = -log sigmoid( beta * [ (log pi(e_w) - log ref(e_w)) - (log pi(e_l) - log ref(e_l)) ] ),  mean over pairs

log pi(e) is the SUM of the log-probs of every agent token after the shared prompt
(eto_ref/losses.py). The reference pi_ref is the policy at the start of the stage
(paper Algorithm 1); its log-probs never change, so they are computed once, before
training, and cached in `out/reference_logps.json`, keyed by pair id and a digest of
its tokens (the folder's run.json holds the starting checkpoint and encoding settings).
With LoRA the reference is the same model with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from eto_ref.batches import collate_pairs, split_chosen_rejected
from eto_ref.config import DPOConfig
from eto_ref.distributed import all_gather_dicts, is_main, shard
from eto_ref.jsonl import write_json_atomic
from eto_ref.lora import disable_adapter, lora_modules
from eto_ref.losses import bc_loss, dpo_loss, scored_positions, sequence_logprobs
from eto_ref.run_dir import restore_weights
from eto_ref.runtime import autocast
from eto_ref.sft import scored_targets
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import (chunks, fit, load_trainable_model, scored_logprobs, split_train_eval, to_device,
                             training_run)
from eto_ref.trajectory import encode_pair, load_pairs

REFERENCE_FILE = "reference_logps.json"


# --------------------------------------------------------------------------- trajectory log-probs of a pair batch


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over chosen + rejected rows (2b, T); returns (chosen (b,), rejected (b,), token log-probs (N,)),
    the token log-probs those of the scored positions, chosen rows' first."""
    token_logps = scored_logprobs(model, batch)  # (N,)
    logps = sequence_logprobs(token_logps, batch["loss_mask"])  # (2b,) sums over agent tokens
    chosen, rejected = split_chosen_rejected(logps)
    return chosen, rejected, token_logps


# --------------------------------------------------------------------------- the reference, once


def pair_key(pair_id: str, example_batch: dict) -> str:
    """Cache key of one pair: its id + a digest of its tokens and masks (a changed pair is recomputed)."""
    h = hashlib.sha256()
    for k in ("input_ids", "loss_mask"):
        h.update(example_batch[k].to(torch.int64).numpy().tobytes())
    return f"{pair_id}#{h.hexdigest()[:12]}"


def reference_logprobs(model, examples: list, pad_id: int, micro_batch_size: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """log ref(e_w), log ref(e_l) of every pair -> (N, 2), float32 on CPU.

    The reference is the policy as it is now: eval mode (no dropout), no_grad, the
    training dtype; with LoRA, adapters disabled (the base model).
    """
    was_training = model.training
    model.eval()
    out = []
    adapters = disable_adapter(model) if lora_modules(model) else contextlib.nullcontext()
    with torch.no_grad(), adapters, autocast(device, dtype):
        for micro in chunks(examples, micro_batch_size):
            chosen, rejected, _ = pair_logprobs(model, to_device(collate_pairs(micro, pad_id), device))
            out.append(torch.stack([chosen, rejected], dim=1).float().cpu())  # (b, 2)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def read_reference_cache(path: Path) -> dict:
    """The cached log-probs of `path` ({} when there is none, or it is damaged: it is recomputed)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["logps"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return {}  # a damaged cache is only a cache: recompute it


def cached_reference_logprobs(model, pairs: list, examples: list, cfg: DPOConfig, pad_id: int,
                              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Reference log-probs (N, 2) from out/reference_logps.json, computing only the missing pairs.

    The folder's run.json vouches for the starting model, max_len and dtype the cache
    was made with; a pair whose tokens changed has another key and is recomputed.
    """
    path = Path(cfg.out) / REFERENCE_FILE
    cache = read_reference_cache(path)
    keys = [pair_key(p.id, collate_pairs([ex], pad_id)) for p, ex in zip(pairs, examples)]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        mine = [i for micro in shard(chunks(missing, cfg.micro_batch_size)) for i in micro]  # this rank's share
        ref = reference_logprobs(model, [examples[i] for i in mine], pad_id, cfg.micro_batch_size, device, dtype)
        cache.update(all_gather_dicts({keys[i]: ref[j].tolist() for j, i in enumerate(mine)}))
        if is_main():
            write_json_atomic({"logps": cache}, path, indent=None)
    return torch.tensor([cache[k] for k in keys], dtype=torch.float32)  # (N, 2)


# --------------------------------------------------------------------------- the Eq. 7 loss on a micro-batch


def encode_pair_data(pairs, tokenizer, max_len: int) -> tuple[list, list, dict]:
    """Encode pairs; drop those where a side has no scored token. Returns (pairs, examples, stats)."""
    kept_pairs, examples, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        ex = encode_pair(pair, tokenizer, max_len)
        truncated += bool(getattr(ex, "truncated", False))
        if min(scored_targets(ex.chosen.loss_mask), scored_targets(ex.rejected.loss_mask)) == 0:
            dropped += 1
            continue
        kept_pairs.append(pair)
        examples.append(ex)
    return kept_pairs, examples, {"pairs": len(examples), "truncated": truncated, "dropped_empty": dropped}


def pair_length(example) -> int:
    """Tokens of a pair's longer side: the width its two rows are padded to (the trainer's sort key)."""
    return max(len(example.chosen.input_ids), len(example.rejected.input_ids))


class DPOStage:
    """The pairs, their reference log-probs and the loss (paper Eq. 7), as the training loop calls them."""

    name = "dpo"
    repeats = 1  # one optimizer step per global batch

    def __init__(self, cfg: DPOConfig, examples: list, ref: torch.Tensor, pad_id: int, device: torch.device,
                 data_stats: dict):
        self.examples, self.ref, self.cfg, self.pad_id, self.device = examples, ref, cfg, pad_id, device  # ref (N, 2)
        self.chosen_counts = [scored_targets(ex.chosen.loss_mask) for ex in examples]  # for the chosen-side NLL
        self.lengths = [pair_length(ex) for ex in examples]
        self.train_indices, self.eval_indices = split_train_eval(len(examples), cfg.eval_fraction, cfg.seed)
        self.data_stats = {**data_stats, "train_pairs": len(self.train_indices), "eval_pairs": len(self.eval_indices),
                           "ref_chosen_logp": ref[:, 0].mean().item(), "ref_rejected_logp": ref[:, 1].mean().item()}

    def begin_batch(self, model, batch: list[int]) -> None:
        """Nothing to prepare: a step's loss reads its batch alone."""

    def loss(self, model, micro: list[int], batch: list[int]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the batch loss (its mean over pairs, weighted by b / B), plus the
        optional NLL of the chosen side (a token mean over the whole batch's chosen tokens)."""
        b = to_device(collate_pairs([self.examples[i] for i in micro], self.pad_id), self.device)
        policy_chosen, policy_rejected, token_logps = pair_logprobs(model, b)  # (b,), (b,), (N,)
        ref_chosen, ref_rejected = self.ref[micro, 0].to(self.device), self.ref[micro, 1].to(self.device)  # (b,)
        out = dpo_loss(policy_chosen.float(), policy_rejected.float(), ref_chosen, ref_rejected, self.cfg.beta)
        share = len(micro) / len(batch)
        loss = out.loss * share
        metrics = {"dpo_loss": loss.detach()}
        if self.cfg.sft_weight:
            n = len(micro)
            chosen_logps = token_logps[: int(scored_positions(b["loss_mask"][:n]).sum())]  # chosen rows come first
            nll = bc_loss(chosen_logps, num_tokens=sum(self.chosen_counts[i] for i in batch))
            loss = loss + self.cfg.sft_weight * nll
            metrics["sft_loss"] = nll.detach()
        metrics.update({
            "loss": loss.detach(),
            "chosen_reward": out.chosen_rewards.float().mean() * share,
            "rejected_reward": out.rejected_rewards.float().mean() * share,
            "margin": out.margin.float().mean() * share,
            "accuracy": out.accuracy.float().mean() * share,
            "tokens": float(b["loss_mask"].sum()),
        })
        return loss, metrics

    def evaluate(self, model) -> dict:
        """Held-out DPO loss, rewards, margin and pair accuracy (means over the held-out pairs)."""
        totals: dict[str, float] = {}
        for micro in chunks(self.eval_indices, self.cfg.micro_batch_size):
            for k, v in self.loss(model, micro, self.eval_indices)[1].items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {f"eval_{k}": v for k, v in totals.items() if k != "tokens"}


# --------------------------------------------------------------------------- the stage


def run_dpo(cfg: DPOConfig, callback: Callable | None = None) -> Path:
    """One DPO stage of ETO (paper Eq. 7): pi_ref = cfg.model, trained on cfg.pairs; returns the final dir.

    A finished run returns its final/ at once; an interrupted one resumes (`training_run`).
    """
    with training_run(cfg) as (done, device, dtype, resume_from):
        if done is not None:
            return done
        tok = Tokenizer.from_dir(cfg.model)
        pairs, examples, stats = encode_pair_data(load_pairs(cfg.pairs, on_error="skip")[:cfg.max_examples], tok,
                                                  cfg.max_len)
        if not examples:
            raise ValueError(f"{cfg.pairs}: no preference pair with trainable tokens on both sides")
        model = load_trainable_model(cfg, device, dtype)  # = pi_ref until it is trained
        ref = cached_reference_logprobs(model, pairs, examples, cfg, tok.pad_id, device, dtype)  # (N, 2)
        if resume_from is not None:
            restore_weights(model, resume_from, bool(cfg.lora_rank))
        stage = DPOStage(cfg, examples, ref, tok.pad_id, device, stats)
        return fit(model, cfg, stage, resume_from, device, dtype, callback)

"""The losses of ETO, each a pure function of logits and masks.

Conventions (one place for them, used everywhere):
- `input_ids` (B, T) and `loss_mask` (B, T): True on agent tokens (assistant
  turns and their end-of-turn tokens), False on instruction, observations,
  headers and padding.
- The logits at position t predict token t+1. A position is *scored* iff its
  target token is an agent token. `next_token_targets` is the only place where
  the shift happens; never shift twice.
- Log-probabilities are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def next_token_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and which of them are scored, aligned with logits[:, :-1].  (B, T) -> 2 x (B, T-1)."""
    return input_ids[:, 1:], loss_mask[:, 1:].bool()


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(target_t | tokens <= t) at scored positions, 0 elsewhere.  (B, T, V) -> (B, T-1)."""
    targets, scored = next_token_targets(input_ids, loss_mask)  # (B, T-1) each
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Trajectory log-prob log pi(e) = SUM (not mean) over all agent tokens of all turns.  -> (B,)"""
    return token_logprobs(logits, input_ids, loss_mask).sum(-1)


def bc_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
            num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Behavioral cloning, paper Eq. 5: L_SFT = -sum_t log pi(a_t | history), reported as a token mean.

    The sum of agent-token NLLs is divided by `num_tokens`, the number of scored
    targets; by default those of this batch. With gradient accumulation pass the
    count of the whole global batch, so that the accumulated micro-batch losses add
    up to the token mean of the global batch (not the mean of micro-batch means).
    """
    _, scored = next_token_targets(input_ids, loss_mask)
    if num_tokens is None:
        num_tokens = scored.sum()
    return -token_logprobs(logits, input_ids, loss_mask).sum() / max(int(num_tokens), 1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar: mean over pairs
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi(e_w) - log ref(e_w)), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (log pi(e_l) - log ref(e_l)), detached
    margin: torch.Tensor  # scalar: mean of chosen - rejected rewards
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen reward > rejected reward


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """DPO on trajectory pairs, paper Eq. 7 (sigmoid form), all inputs (B,) sums of log-probs:

        L = -log sigmoid( beta * [ (log pi(e_w) - log ref(e_w)) - (log pi(e_l) - log ref(e_l)) ] )

    Example: policy == reference gives rewards 0 and loss -log sigmoid(0) = log 2.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return DPOOutput(loss=loss, chosen_rewards=chosen, rejected_rewards=rejected,
                     margin=(chosen - rejected).mean(), accuracy=(chosen > rejected).float().mean())

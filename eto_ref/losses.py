"""The losses of ETO (Song et al. 2024), each a pure function of logits and masks.

Notation: B batch rows, T tokens per row, V vocabulary size.

Conventions (one place for them, used everywhere):
- `input_ids` (B, T) and `loss_mask` (B, T): `loss_mask` is True on agent tokens
  (the content of assistant turns and each turn's end-of-turn token), False on
  the instruction, observations, role headers and padding.
- The label shift lives in `next_token_targets` and nowhere else: the logits at
  position t predict token t+1, and position t is *scored* iff its target token
  t+1 is an agent token. Never shift twice.

      position t      0     1     2     3     4
      input_ids       u     u     a     a     o        (u instruction, a agent, o observation)
      loss_mask       F     F     T     T     F
      target          ids[1] ids[2] ids[3] ids[4]  -    (T-1 targets)
      scored          F     T     T     F             (= loss_mask[:, 1:])

  So the logits at position 1 (the last instruction token) predict the first
  agent token, and the logits at the last agent token predict an observation
  token: not scored.
- Log-probabilities are computed in float32, whatever the model's dtype.
- The losses take the log-probs of the scored targets alone, (N,) in row-major order:
  `agent_token_logprobs` makes them from logits; in training the model makes them
  itself, running its LM head at the scored positions only (eto_ref/model.py
  `head_logprobs`, the head in checkpointed chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eto_ref.model import target_logprobs


def next_token_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label shift: targets and which of them are scored, aligned with `logits[:, :-1]`.

    input_ids (B, T), loss_mask (B, T) -> targets (B, T-1) = input_ids[:, 1:],
    scored (B, T-1) bool = loss_mask[:, 1:]  (position t is scored iff token t+1 is an agent token).
    """
    return input_ids[:, 1:], loss_mask[:, 1:].bool()


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits the losses read (position t iff token t+1 is an agent token).

    `Transformer.scored_logprobs` runs the LM head only there (N scored positions, row-major).
    """
    scored = torch.zeros_like(loss_mask, dtype=torch.bool)  # (B, T): the last position predicts nothing
    scored[:, :-1] = next_token_targets(loss_mask, loss_mask)[1]
    return scored


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(token t+1 | tokens <= t) at scored positions, 0 elsewhere: (B, T, V), (B, T), (B, T) -> (B, T-1), float32.

    The per-token view (e.g. to show which tokens a loss reads); the losses take the
    scored ones alone, `agent_token_logprobs`.
    """
    targets, scored = next_token_targets(input_ids, loss_mask)  # (B, T-1) each
    out = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device)  # (B, T-1)
    return out.masked_scatter(scored, target_logprobs(logits[:, :-1][scored], targets[scored]))


def agent_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | history) of every agent token: (B, T, V), (B, T), (B, T) -> (N,), float32, row-major.

    N is the number of scored positions (`scored_positions`). Training gets the same
    values from the model without B x T x V logits: `model.scored_logprobs(..., scored_positions(mask),
    targets)` runs the LM head at those positions alone (eto_ref/trainer.py `scored_logprobs`).
    """
    targets, scored = next_token_targets(input_ids, loss_mask)  # (B, T-1) each
    return target_logprobs(logits[:, :-1][scored], targets[scored])  # (N,)


def sequence_logprobs(agent_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Trajectory log-prob for DPO: log pi(e) = SUM (not mean) over all agent tokens of all turns.

    agent_logps (N,) (see agent_token_logprobs), loss_mask (B, T) -> (B,), float32: each row's sum.
    Padding (loss_mask False) contributes nothing.
    """
    scored = next_token_targets(loss_mask, loss_mask)[1]  # (B, T-1)
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=agent_logps.device)  # (B, T-1)
    return per_token.masked_scatter(scored, agent_logps.float()).sum(-1)  # (B,)


def bc_loss(agent_logps: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Behavioral cloning, paper Eq. 5: L_SFT = -sum_t log pi(a_t | history), reported as a token mean.

    agent_logps (N,): the log-probs of a batch's agent tokens (see agent_token_logprobs) -> scalar.

    The sum of the agent-token NLLs is divided by `num_tokens`, by default N, this
    batch's own count. With gradient accumulation, pass the count of the whole global
    batch to every micro-batch: the sum of the micro-batch losses is then exactly the
    token mean of the global batch (a mean of micro-batch means would weight short
    trajectories up).
    """
    num_tokens = len(agent_logps) if num_tokens is None else num_tokens
    return -agent_logps.float().sum() / torch.as_tensor(num_tokens, dtype=torch.float32).clamp(min=1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar: mean over pairs
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi(e_w) - log ref(e_w)), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (log pi(e_l) - log ref(e_l)), detached
    margin: torch.Tensor  # scalar: mean of chosen - rejected rewards
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen reward > rejected reward (strictly)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """DPO on trajectory pairs, paper Eq. 7 (sigmoid form); all inputs (B,) sums of agent-token log-probs:

        L = -log sigmoid( beta * [ (log pi(e_w) - log ref(e_w)) - (log pi(e_l) - log ref(e_l)) ] ),  mean over pairs.

    e_w is the chosen (winning) trajectory, e_l the rejected one. The implicit
    rewards beta * (log pi - log ref) are returned detached, for logging.
    Example: policy == reference gives rewards 0 and loss -log sigmoid(0) = log 2.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()  # logsigmoid: stable for large |margin|
    chosen, rejected = chosen.detach(), rejected.detach()
    return DPOOutput(loss=loss, chosen_rewards=chosen, rejected_rewards=rejected,
                     margin=(chosen - rejected).mean(), accuracy=(chosen > rejected).float().mean())

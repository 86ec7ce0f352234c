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
- The LM head need not run everywhere: the losses read logits only at the scored
  positions (`scored_positions`), and accept the model's logits there alone, or
  the scored targets' log-probs alone (`head_logprobs`: the head in checkpointed chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def next_token_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label shift: targets and which of them are scored, aligned with `logits[:, :-1]`.

    input_ids (B, T), loss_mask (B, T) -> targets (B, T-1) = input_ids[:, 1:],
    scored (B, T-1) bool = loss_mask[:, 1:]  (position t is scored iff token t+1 is an agent token).
    """
    return input_ids[:, 1:], loss_mask[:, 1:].bool()


def scored_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits the losses read (position t iff token t+1 is an agent token).

    Pass it to the model as `logits_at` to run the LM head only there (its output
    is then (N, V) for the N scored positions, in row-major order).
    """
    scored = torch.zeros_like(loss_mask, dtype=torch.bool)  # (B, T): the last position predicts nothing
    scored[:, :-1] = next_token_targets(loss_mask, loss_mask)[1]
    return scored


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log softmax(logits)[target] per row, in float32: (N, V), (N,) -> (N,).

    Written as logit[target] - logsumexp(logits) over chunks of rows, so a float32
    copy of at most `chunk` x V values exists at a time (bf16 logits are upcast per chunk).
    """
    out = []
    for i in range(0, len(targets), chunk):
        rows = logits[i:i + chunk].float()  # (n, V)
        picked = rows.gather(-1, targets[i:i + chunk, None]).squeeze(-1)  # (n,)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out) if out else logits.float().sum(-1)  # no target: (0,), still part of the graph


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, float32: (N, D), (N,) -> (N,), never N x V logits at once.

    The LM head runs on `chunk` rows at a time. When gradients are recorded, each
    chunk is checkpointed: its logits are freed after the forward pass and rebuilt in
    the backward pass, so at most chunk x V logits (with their softmax and gradient)
    exist at a time. The values and gradients are those of target_logprobs(head(hidden), targets).
    """
    def piece(h, t):  # (n, D), (n,) -> (n,)
        return target_logprobs(head(h), t, chunk=max(len(t), 1))

    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    out = []
    for i in range(0, len(targets), chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        out.append(checkpoint(piece, h, t, use_reentrant=False) if recompute else piece(h, t))
    return torch.cat(out) if out else head(hidden).float().sum(-1)  # no target: (0,), still part of the graph


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log pi(token t+1 | tokens <= t) at scored positions, 0 elsewhere: (B, T-1), float32.

    `logits` are the model's at every position (B, T, V), or only at the scored
    positions (N, V), as the model returns them with `logits_at=scored_positions(loss_mask)`,
    or already the scored targets' log-probs (N,), as it returns them when also given
    the targets (training: `eto_ref/trainer.py` `scored_logprobs`). All three give the
    same result; the second never holds B x T x V values, the third never N x V.
    """
    targets, scored = next_token_targets(input_ids, loss_mask)  # (B, T-1) each
    if logits.dim() == 3:
        logits = logits[:, :-1][scored]  # (N, V): the scored positions, row-major
    picked = logits.float() if logits.dim() == 1 else target_logprobs(logits, targets[scored])  # (N,)
    out = torch.zeros(scored.shape, dtype=torch.float32, device=picked.device)  # (B, T-1)
    return out.masked_scatter(scored, picked)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Trajectory log-prob for DPO: log pi(e) = SUM (not mean) over all agent tokens of all turns.

    logits (B, T, V), (N, V) or (N,) (see token_logprobs), input_ids (B, T), loss_mask (B, T) -> (B,), float32.
    Padding (loss_mask False) contributes nothing.
    """
    return token_logprobs(logits, input_ids, loss_mask).sum(-1)  # (B,)


def bc_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
            num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Behavioral cloning, paper Eq. 5: L_SFT = -sum_t log pi(a_t | history), reported as a token mean.

    logits (B, T, V), (N, V) or (N,) (see token_logprobs), input_ids (B, T), loss_mask (B, T) -> scalar.

    The sum of the agent-token NLLs is divided by `num_tokens`, the number of
    scored targets; by default those of this batch. With gradient accumulation,
    pass the count of the whole global batch to every micro-batch: the sum of the
    micro-batch losses is then exactly the token mean of the global batch (a mean
    of micro-batch means would weight short trajectories up).
    """
    if num_tokens is None:
        num_tokens = next_token_targets(input_ids, loss_mask)[1].sum()
    nll = -token_logprobs(logits, input_ids, loss_mask).sum()  # scalar: summed over the batch
    return nll / torch.as_tensor(num_tokens, dtype=torch.float32).clamp(min=1)


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

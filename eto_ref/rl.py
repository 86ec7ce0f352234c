"""The losses of the online-RL baselines, PPO (the paper's Table 2 row) and GRPO, as losses.py holds ETO's.

Everything works on a trajectory's agent tokens alone, in order: k = 1..K, the scored
targets of its loss mask (eto_ref/losses.py `next_token_targets`). Instruction and
observation tokens are never scored, so an observation between two agent turns is not
a step here: GAE runs straight from a turn's last token to the next turn's first.
A batch of B trajectories is (B, K) with K the longest one's agent tokens and `mask`
(B, K) True on the real ones, left-aligned (`agent_steps` builds both from per-trajectory
values). Notation, as in the official code's `train_ppo.py` (a fork of TRL's PPOTrainer):

    l_k  the policy's log-prob of agent token k        o_k  its log-prob when the rollout was made ("old")
    r_k  the reference (SFT) policy's log-prob          V_k  the value head at the position predicting k

PPO (Schulman et al. 2017) with a per-token KL penalty (Ziegler et al. 2019):
    reward   R_k = -beta * (o_k - r_k), plus the episode's environment reward at k = K
    GAE      d_k = R_k + gamma V_{k+1} - V_k (V_{K+1} = 0);  A_k = d_k + gamma lam A_{k+1};  G_k = A_k + V_k
    policy   mean_k max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)),  rho_k = exp(l_k - o_k)
    value    0.5 mean_k max((V_k - G_k)^2, (clip(V_k, V_old - eps_v, V_old + eps_v) - G_k)^2)
GRPO (Shao et al. 2024): G episodes of one task with rewards s_i; every agent token of
episode i gets A_i = (s_i - mean s) / (std s + 1e-6) (std: the unbiased sample std, as
torch.std); the same clipped surrogate; no critic; a KL term against the reference,
k3 = exp(r_k - l_k) - (r_k - l_k) - 1 per agent token. Every mean here is over all the
agent tokens of the batch (not per trajectory first).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence


class ValueHead(nn.Module):
    """V(s): one number per position from the policy's last hidden state (B, T, D) -> (B, T), float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 values, also in a bf16 forward
            return self.linear(hidden.float()).squeeze(-1)  # (B, T)


def agent_steps(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trajectory values of its agent tokens [(K_i,)] -> (B, K) left-aligned, 0 on padding, and the mask (B, K).

    K is the longest row's count. A row holds only agent tokens (the training forward's
    scored positions, split per trajectory), so an observation is no step.
    """
    mask = pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], batch_first=True)  # (B, K)
    return pad_sequence(rows, batch_first=True), mask


def kl_penalized_rewards(old_logps: torch.Tensor, ref_logps: torch.Tensor, episode_rewards: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> torch.Tensor:
    """R_k = -beta (o_k - r_k), plus the episode's reward (B,) at each row's last agent token: (B, K), 0 on padding."""
    rewards = -beta * (old_logps - ref_logps) * mask  # (B, K)
    last = mask.sum(-1) - 1  # (B,) index of each row's last agent token
    rows = torch.arange(len(mask), device=mask.device)
    rewards[rows, last] += episode_rewards.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over agent tokens: (advantages A, returns G = A + V), each (B, K).

    Runs backwards over k; past a row's last agent token V and A are 0 (the episode has ended).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)  # (B, K)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V_{k+1}
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{k+1}
    for k in reversed(range(rewards.shape[1])):
        delta = rewards[:, k] + gamma * next_value - values[:, k]
        advantages[:, k] = (delta + gamma * lam * next_advantage) * mask[:, k]
        next_value, next_advantage = values[:, k], advantages[:, k]
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance, as TRL); 0 on padding."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      eps: float = 0.2) -> torch.Tensor:
    """PPO's policy loss: mean over agent tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(l - o).

    Equals -mean(A) where the policy is the old one (rho = 1). A token whose ratio left
    the clip range on the side its advantage pushes towards gets no gradient.
    """
    ratio = torch.exp(logps - old_logps)  # (B, K)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    return masked_mean(loss, mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """0.5 mean over agent tokens of max((V - G)^2, (clip(V, V_old - eps, V_old + eps) - G)^2)."""
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(episode_rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: the G rewards of one task's episodes (G,) -> (s - mean) / (std + eps), std unbiased (torch.std)."""
    return (episode_rewards - episode_rewards.mean()) / (episode_rewards.std() + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KL estimate GRPO adds, mean over agent tokens of exp(r - l) - (r - l) - 1 (>= 0, 0 iff l = r)."""
    log_ratio = ref_logps - logps
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)

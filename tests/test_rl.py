"""The PPO and GRPO pieces (eto_ref/rl.py) against values computed by hand."""

import math

import pytest
import torch

from eto_ref.losses import next_token_targets
from eto_ref.rl import (ValueHead, agent_steps, clipped_surrogate, clipped_value_loss, gae, group_advantages, k3_kl,
                        kl_penalized_rewards, whiten)

# One trajectory: instruction, turn 1 (2 agent tokens), an observation, turn 2 (1 agent token), padding.
#            instr  instr  a1    a2    obs    obs   a3    pad
LOSS_MASK = [False, False, True, True, False, False, True, False]


def test_agent_steps_skip_the_observation_between_two_turns():
    """The scored positions (t predicts token t+1) of two turns become steps 1..3, the observation none;
    split per trajectory as the training forward's values are, a shorter row is padded with masked zeros."""
    _, scored = next_token_targets(torch.zeros(2, 8, dtype=torch.long),
                                   torch.tensor([LOSS_MASK, [False, False, True] + [False] * 5]))  # (2, 7)
    values = torch.arange(14.0).view(2, 7)  # (2, 7): the value at each position
    rows = values[scored].split(scored.sum(-1).tolist())  # row-major, as logprobs_and_values gives them
    steps, mask = agent_steps(list(rows))
    assert steps.tolist() == [[1.0, 2.0, 5.0], [8.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_gae_over_two_turns_and_a_shorter_row():
    """d_k = R_k + gamma V_{k+1} - V_k, A_k = d_k + gamma lam A_{k+1}, by hand:
    gamma 1, lam 0.95: A3 = 1 - 0.3 = 0.7; A2 = -0.2 + 0.3 - 0.4 + 0.95 * 0.7 = 0.365;
    A1 = 0.1 + 0.4 - 0.5 + 0.95 * 0.365 = 0.34675. A one-step row: A = 0.5 - 0.2 = 0.3."""
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 9.0, 9.0]])  # padding values are ignored
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.34675, 0.365, 0.7], [0.3, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.84675, 0.765, 1.0], [0.5, 0.0, 0.0]]))


def test_gae_with_discount():
    """gamma 0.9, lam 0.5: A3 = 0.7; A2 = -0.2 + 0.27 - 0.4 + 0.45 * 0.7 = -0.015;
    A1 = 0.1 + 0.36 - 0.5 + 0.45 * -0.015 = -0.04675."""
    advantages, _ = gae(torch.tensor([[0.1, -0.2, 1.0]]), torch.tensor([[0.5, 0.4, 0.3]]),
                        torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-0.04675, -0.015, 0.7]]))


def test_kl_penalty_per_token_and_the_episode_reward_at_the_last_agent_token():
    """R = -0.1 * (old - ref) + [0, 0, 1] = [-0.05, 0, 1.025]; a row of 2 tokens gets its reward at k = 2."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.25], [-1.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = kl_penalized_rewards(old, ref, torch.tensor([1.0, 0.5]), mask, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.025], [0.0, 0.5, 0.0]]))


def test_no_kl_penalty_when_the_policy_is_the_reference():
    logps = torch.tensor([[-0.3, -1.2, -2.0]])
    rewards = kl_penalized_rewards(logps, logps, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), beta=0.5)
    assert rewards.tolist() == [[0.0, 0.0, 1.0]]
    assert k3_kl(logps, logps, torch.ones(1, 3, dtype=torch.bool)).item() == 0.0


def test_surrogate_is_minus_the_mean_advantage_at_the_old_policy():
    """rho = 1: the loss is -mean(A) = -(1 - 2 + 0.5) / 3, padding left out; its gradient is -A / n."""
    logps = torch.tensor([[-1.0, -2.0, -0.5, -9.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 0.5, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss = clipped_surrogate(logps, logps.detach(), advantages, mask)
    assert loss.item() == pytest.approx(0.5 / 3)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1 / 3, 2 / 3, -0.5 / 3, 0.0]]))  # none to padding


@pytest.mark.parametrize("ratio, advantage, loss, flows", [
    (1.5, 1.0, -1.2, False),  # pushed up past 1 + eps: clipped, no gradient
    (0.5, 1.0, -0.5, True),  # below the range but the advantage pushes it back up: unclipped
    (0.5, -1.0, 0.8, False),  # pushed down past 1 - eps: clipped
    (1.5, -1.0, 1.5, True),  # above the range, the advantage pushes it down: unclipped
])
def test_surrogate_clips_at_one_plus_or_minus_epsilon(ratio, advantage, loss, flows):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    value = clipped_surrogate(logps, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1, dtype=torch.bool),
                              eps=0.2)
    assert value.item() == pytest.approx(loss)
    value.backward()
    assert (logps.grad.abs().item() > 0) == flows


@pytest.mark.parametrize("value, old, ret, expected", [
    (1.0, 0.5, 0.0, 0.5),  # (1 - 0)^2 = 1 beats the clipped (0.7 - 0)^2 = 0.49
    (0.6, 0.0, 0.6, 0.08),  # the clipped one is worse: (0.2 - 0.6)^2 = 0.16
    (0.1, 0.0, 0.5, 0.08),  # inside the range: (0.1 - 0.5)^2 = 0.16 either way
])
def test_clipped_value_loss(value, old, ret, expected):
    loss = clipped_value_loss(torch.tensor([[value]]), torch.tensor([[old]]), torch.tensor([[ret]]),
                              torch.ones(1, 1, dtype=torch.bool), eps=0.2)
    assert loss.item() == pytest.approx(expected)


def test_whitening_uses_the_agent_tokens_alone():
    """[1, 2, 3]: mean 2, unbiased variance 1 -> [-1, 0, 1]; the padding's 100 changes nothing and stays 0."""
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_group_advantages_and_the_k3_kl():
    """Rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 sqrt(3); k3 at l = ln 0.5, r = 0:
    exp(ln 2) - ln 2 - 1 = 1 - ln 2."""
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])),
                               torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * math.sqrt(3), rtol=1e-5, atol=1e-5)
    assert group_advantages(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]  # no signal, no NaN
    kl = k3_kl(torch.tensor([[math.log(0.5), 0.0]]), torch.tensor([[0.0, 5.0]]), torch.tensor([[True, False]]))
    assert kl.item() == pytest.approx(1 - math.log(2))


def test_the_value_head_starts_at_zero_and_reads_the_last_hidden_state():
    head = ValueHead(8)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    assert head(hidden).shape == (2, 5) and head(hidden).dtype == torch.float32
    assert head(hidden).abs().max().item() == 0.0
    head.linear.weight.data[0, 3] = 2.0
    torch.testing.assert_close(head(hidden), 2.0 * hidden[..., 3].float())

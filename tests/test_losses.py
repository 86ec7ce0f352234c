"""The loss math of DESIGN.md, checked against hand-computed values and an independent formula."""

import math

import pytest
import torch

from eto_ref.losses import bc_loss, dpo_loss, next_token_targets, sequence_logprobs, token_logprobs


def test_bc_loss_hand_computed():
    """V=2, T=3, one row. logits are 0 everywhere except position 1, which favours token 1 by ln 3.

    ids = [0, 1, 0], mask = [F, T, T]: both targets (ids[1]=1, ids[2]=0) are agent tokens.
    position 0: uniform -> log p(1) = log 1/2
    position 1: logits [0, ln3] -> p = [1/4, 3/4] -> log p(0) = log 1/4
    loss = -(log 1/2 + log 1/4) / 2 = (ln 2 + ln 4) / 2 = 1.5 ln 2
    """
    logits = torch.zeros(1, 3, 2)
    logits[0, 1, 1] = math.log(3)
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    assert bc_loss(logits, ids, mask).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # only the last target scored: -log 1/4
    assert bc_loss(logits, ids, torch.tensor([[False, False, True]])).item() == pytest.approx(math.log(4), abs=1e-6)


def test_first_scored_position_is_the_one_predicting_the_first_agent_token():
    mask = torch.tensor([[False, False, True, True, False]])
    _, scored = next_token_targets(torch.zeros_like(mask, dtype=torch.long), mask)
    assert scored.tolist() == [[False, True, True, False]]  # logits at 1 predict token 2, the first agent token


def test_gradient_flows_only_through_scored_positions():
    logits = torch.randn(2, 6, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]).bool()
    bc_loss(logits, ids, mask).backward()
    _, scored = next_token_targets(ids, mask)
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert has_grad[:, :-1].tolist() == scored.tolist()
    assert not has_grad[:, -1].any()


def test_observation_targets_do_not_change_the_loss_agent_targets_do():
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 7)
    ids = torch.randint(0, 7, (1, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1]]).bool()
    base = bc_loss(logits, ids, mask)
    obs = ids.clone()
    obs[0, 5] = (obs[0, 5] + 1) % 7  # an observation token as a target
    assert torch.equal(bc_loss(logits, obs, mask), base)
    agent = ids.clone()
    agent[0, 4] = (agent[0, 4] + 1) % 7
    assert not torch.equal(bc_loss(logits, agent, mask), base)


def test_grad_accumulation_with_global_count_equals_full_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 6)
    ids = torch.randint(0, 6, (4, 9))
    mask = torch.rand(4, 9) > 0.4
    full = bc_loss(logits, ids, mask)
    n = int(next_token_targets(ids, mask)[1].sum())
    accumulated = sum(bc_loss(logits[i:i + 1], ids[i:i + 1], mask[i:i + 1], num_tokens=n) for i in range(4))
    torch.testing.assert_close(accumulated, full)
    mean_of_means = sum(bc_loss(logits[i:i + 1], ids[i:i + 1], mask[i:i + 1]) for i in range(4)) / 4
    assert not torch.allclose(mean_of_means, full)  # the wrong convention differs


def test_sequence_logprobs_sums_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4)
    ids = torch.randint(0, 4, (1, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0]]).bool()
    expected = token_logprobs(logits, ids, mask).sum()
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(expected.item())
    logp = torch.log_softmax(logits[0, :-1], -1)
    by_hand = logp[0, ids[0, 1]] + logp[1, ids[0, 2]] + logp[2, ids[0, 3]]
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(by_hand.item(), abs=1e-6)
    padded_logits = torch.cat([logits, torch.randn(1, 3, 4)], dim=1)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    assert sequence_logprobs(padded_logits, padded_ids, padded_mask).item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_dpo_equal_policy_and_reference_gives_log_2():
    x = torch.tensor([-5.0, -3.0])
    y = torch.tensor([-7.0, -2.0])
    out = dpo_loss(x, y, x, y, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.chosen_rewards.tolist() == [0, 0] and out.rejected_rewards.tolist() == [0, 0]
    assert out.accuracy.item() == 0.0  # 0 > 0 is false


def test_dpo_hand_computed():
    """beta = 0.5; chosen: pi -1, ref -2 -> reward 0.5; rejected: pi -4, ref -2 -> reward -1.
    loss = -log sigmoid(1.5) = log(1 + e^-1.5)."""
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-1.0)
    assert out.margin.item() == pytest.approx(1.5)
    assert out.accuracy.item() == 1.0


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0])).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_dpo_matches_an_independent_formula():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.1
    logits = beta * ((pc - rc) - (pr - rr))
    independent = torch.tensor([math.log1p(math.exp(-z)) if z > -30 else -z for z in logits.tolist()], dtype=torch.float64).mean()
    assert dpo_loss(pc, pr, rc, rr, beta).loss.item() == pytest.approx(independent.item(), rel=1e-9)

"""The loss math: the label shift, the BC loss (Eq. 5), trajectory log-probs and the DPO loss (Eq. 7).

Every expected value is computed by hand (arithmetic in the docstrings) or by an
independent implementation: torch's cross_entropy with ignore_index, Hugging
Face's own shifted causal-LM loss, a from-formula float64 DPO, and trl's DPO
trainer (skipped when transformers / trl are not installed).
"""

import collections
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eto_ref.losses import (
    DPOOutput,
    agent_token_logprobs,
    bc_loss,
    dpo_loss,
    next_token_targets,
    sequence_logprobs,
    token_logprobs,
)
from eto_ref.model import head_logprobs

LN2, LN3 = math.log(2), math.log(3)


def bc(logits, ids, mask, num_tokens=None):
    """Eq. 5 from (B, T, V) logits: the agent tokens' log-probs, then the loss."""
    return bc_loss(agent_token_logprobs(logits, ids, mask), num_tokens)


def seq(logits, ids, mask):
    """log pi(e) of each row from (B, T, V) logits."""
    return sequence_logprobs(agent_token_logprobs(logits, ids, mask), mask)


def probs_to_logits(*rows):
    """Logits whose softmax is proportional to the given weights: log of the weights."""
    return torch.tensor(rows, dtype=torch.float32).log()


# --------------------------------------------------------------------------- the label shift


def test_next_token_targets_is_the_shift_by_one():
    """ids [10 11 12 13 14], mask [F F T T F]: logits at t predict ids[t+1]; t is scored iff ids[t+1] is agent.

    scored = mask[1:] = [F T T F]: position 1 predicts 12 (first agent token), position 2 predicts 13,
    position 3 predicts 14 (an observation token): not scored.
    """
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    mask = torch.tensor([[False, False, True, True, False]])
    targets, scored = next_token_targets(ids, mask)
    assert targets.tolist() == [[11, 12, 13, 14]]
    assert scored.tolist() == [[False, True, True, False]]
    assert scored.dtype == torch.bool


# --------------------------------------------------------------------------- BC loss (Eq. 5)


def hand_batch():
    """Two rows, V = 3, T = 4 (the last position has no target).

    row 0: ids [0 2 1 0], mask [F T T F] -> scored targets: pos 0 -> 2, pos 1 -> 1 (pos 2 -> 0 is not scored)
        pos 0 weights [1 1 2] -> p = [1/4 1/4 1/2] -> log p(2) = log 1/2
        pos 1 weights [1 3 4] -> p = [1/8 3/8 1/2] -> log p(1) = log 3/8
        pos 2 weights [9 1 1], pos 3 [1 1 1]: never read
        log pi(row 0) = log 1/2 + log 3/8 = ln 3 - 4 ln 2
    row 1: ids [1 0 0 0], mask [F T F F] -> one scored target: pos 0 -> 0
        pos 0 weights [2 1 1] -> p(0) = 1/2 -> log 1/2;  log pi(row 1) = -ln 2
    batch token mean = (4 ln 2 - ln 3 + ln 2) / 3 = (5 ln 2 - ln 3) / 3
    (the mean of the row means would be ((4 ln 2 - ln 3)/2 + ln 2) / 2: a different number)
    """
    logits = torch.stack([probs_to_logits([1, 1, 2], [1, 3, 4], [9, 1, 1], [1, 1, 1]),
                          probs_to_logits([2, 1, 1], [1, 5, 1], [1, 1, 7], [1, 1, 1])])  # (2, 4, 3)
    ids = torch.tensor([[0, 2, 1, 0], [1, 0, 0, 0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    return logits, ids, mask


def test_bc_loss_hand_computed():
    logits, ids, mask = hand_batch()
    assert bc(logits, ids, mask).item() == pytest.approx((5 * LN2 - LN3) / 3, abs=1e-6)
    assert bc(logits[:1], ids[:1], mask[:1]).item() == pytest.approx((4 * LN2 - LN3) / 2, abs=1e-6)
    assert bc(logits[1:], ids[1:], mask[1:]).item() == pytest.approx(LN2, abs=1e-6)
    torch.testing.assert_close(token_logprobs(logits, ids, mask),
                               torch.tensor([[-LN2, LN3 - 3 * LN2, 0.0], [-LN2, 0.0, 0.0]]))


def test_bc_loss_matches_cross_entropy_with_ignore_index():
    """Independent: the Hugging Face convention, labels = ids[1:] with -100 where the target is not an agent token."""
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 17)
    ids = torch.randint(0, 17, (3, 11))
    mask = torch.rand(3, 11) > 0.5
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 17), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(bc(logits, ids, mask), expected)


def test_bc_loss_matches_the_transformers_causal_lm_loss():
    """Hugging Face shifts the labels inside the model: passing unshifted labels (-100 off the agent tokens)
    must give our loss on the same logits -- checks we shift once, the same way."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.rand(2, 12) > 0.5
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids.masked_fill(~mask, -100))
    torch.testing.assert_close(bc(out.logits, ids, mask), out.loss)


def test_gradient_flows_only_through_scored_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]).bool()
    bc(logits, ids, mask).backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert has_grad.tolist() == [[False, True, True, False, True, False],  # = mask shifted left by one
                                 [True, True, False, False, False, False]]


def test_only_agent_targets_change_the_loss():
    """With the logits fixed, change the token at each position t (a target of position t-1):
    the loss changes iff token t is an agent token."""
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 7)
    ids = torch.randint(0, 7, (1, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1]]).bool()
    base = bc(logits, ids, mask)
    for t in range(8):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 7
        assert torch.equal(bc(logits, changed, mask), base) != bool(mask[0, t]), t


def test_observation_tokens_are_never_trained_on_with_a_tiny_model(fake_tok):
    """A bigram model (Embedding + Linear: the logits at t depend only on token t) on a rendered
    trajectory. An observation's content tokens are inputs only of positions that predict other
    observation tokens, and targets only of unscored positions: rewriting them leaves the loss
    unchanged. Rewriting an agent token changes it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(fake_tok.vocab_size, 8), torch.nn.Linear(8, fake_tok.vocab_size))
    messages = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "act"},
                {"role": "user", "content": "seen"}, {"role": "assistant", "content": "done"}]
    ids, mask = fake_tok.render(messages)
    obs = len(fake_tok.render(messages[:2])[0]) + 1  # first content token of the observation "seen"
    ids, mask = torch.tensor([ids]), torch.tensor([mask])

    def loss(x):
        return bc(model(x), x, mask)

    base = loss(ids)
    for t in range(obs, obs + 4):  # the 4 characters of "seen"
        changed = ids.clone()
        changed[0, t] = fake_tok.encode("x")[0]
        assert torch.equal(loss(changed), base)
    changed = ids.clone()
    changed[0, obs - 3] = fake_tok.encode("x")[0]  # the "t" of "act": an agent token
    assert not mask[0, obs].item() and mask[0, obs - 3].item()
    assert not torch.equal(loss(changed), base)


def test_grad_accumulation_with_the_global_token_count_equals_the_full_batch():
    """sum_i bc(micro_i, num_tokens=N_global) == bc(full batch), in value and in gradient."""
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 6, requires_grad=True)
    ids = torch.randint(0, 6, (4, 9))
    mask = torch.rand(4, 9) > 0.4
    mask[0, 1:] = True  # rows with very different token counts
    mask[3, 1:] = False
    mask[3, 2] = True

    full = bc(logits, ids, mask)
    (full_grad,) = torch.autograd.grad(full, logits)

    n = int(next_token_targets(ids, mask)[1].sum())
    accumulated = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):  # uneven micro-batches
        accumulated = accumulated + bc(logits[rows], ids[rows], mask[rows], num_tokens=n)
    (acc_grad,) = torch.autograd.grad(accumulated, logits)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(acc_grad, full_grad)

    mean_of_means = sum(bc(logits[i:i + 1], ids[i:i + 1], mask[i:i + 1]) for i in range(4)) / 4
    assert not torch.allclose(mean_of_means, full)  # the wrong convention gives another number


def test_bc_loss_with_no_scored_token_is_zero_not_nan():
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss = bc(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_log_probs_are_float32_for_low_precision_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = token_logprobs(logits, ids, mask)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- trajectory log-prob


def test_sequence_logprobs_is_the_sum_hand_computed():
    """Row 0 of `hand_batch`: log 1/2 + log 3/8 = ln 3 - 4 ln 2 (a mean would be half of that)."""
    logits, ids, mask = hand_batch()
    torch.testing.assert_close(seq(logits, ids, mask), torch.tensor([LN3 - 4 * LN2, -LN2]))


def test_sequence_logprobs_ignores_padding():
    """Appending pad tokens (mask False) with arbitrary logits leaves log pi(e) unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4)
    ids = torch.randint(0, 4, (1, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1]]).bool()  # ends with an agent token, as a trajectory does
    logp = torch.log_softmax(logits[0, :-1], -1)
    by_hand = sum(logp[t, ids[0, t + 1]] for t in range(4))
    assert seq(logits, ids, mask).item() == pytest.approx(by_hand.item(), abs=1e-6)
    padded_logits = torch.cat([logits, 100 * torch.randn(1, 3, 4)], dim=1)
    padded_ids = torch.cat([ids, torch.full((1, 3), 3)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    assert seq(padded_logits, padded_ids, padded_mask).item() == pytest.approx(by_hand.item(), abs=1e-6)


# --------------------------------------------------------------------------- DPO (Eq. 7)


def test_dpo_policy_equal_to_reference_gives_log_2():
    """Rewards beta * 0 = 0, loss -log sigmoid(0) = log 2; accuracy counts chosen > rejected strictly: 0."""
    x = torch.tensor([-5.0, -3.0])
    y = torch.tensor([-7.0, -2.0])
    out = dpo_loss(x, y, x, y, beta=0.1)
    assert isinstance(out, DPOOutput)
    assert out.loss.item() == pytest.approx(LN2)
    assert out.chosen_rewards.tolist() == [0, 0] and out.rejected_rewards.tolist() == [0, 0]
    assert out.margin.item() == 0.0
    assert out.accuracy.item() == 0.0


def test_dpo_hand_computed():
    """beta = 0.5, two pairs.

    pair 0: chosen pi -1, ref -2 -> reward 0.5 * 1 = 0.5; rejected pi -4, ref -2 -> reward 0.5 * -2 = -1
            z = 0.5 - (-1) = 1.5, loss = -log sigmoid(1.5) = log(1 + e^-1.5)
    pair 1: chosen pi -6, ref -4 -> reward -1;  rejected pi -3, ref -3 -> reward 0
            z = -1, loss = log(1 + e^1)
    loss = mean; margin = (1.5 + -1) / 2 = 0.25; accuracy = 1/2
    d loss / d pi_w(pair i) = -beta * sigmoid(-z_i) / 2,  d loss / d pi_l(pair i) = +beta * sigmoid(-z_i) / 2
    """
    pc = torch.tensor([-1.0, -6.0], requires_grad=True)
    pr = torch.tensor([-4.0, -3.0], requires_grad=True)
    out = dpo_loss(pc, pr, torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -3.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(1.0))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-1.0, 0.0])
    assert out.margin.item() == pytest.approx(0.25)
    assert out.accuracy.item() == 0.5
    out.loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert pc.grad.tolist() == pytest.approx([-0.5 * sig(-1.5) / 2, -0.5 * sig(1.0) / 2], abs=1e-6)
    assert pr.grad.tolist() == pytest.approx([0.5 * sig(-1.5) / 2, 0.5 * sig(1.0) / 2], abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    torch.manual_seed(0)
    pc, pr = (torch.randn(8, requires_grad=True) for _ in range(2))
    out = dpo_loss(pc * 10, pr * 10, torch.randn(8) * 10, torch.randn(8) * 10)
    out.loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def numpy_dpo(pc, pr, rc, rr, beta):
    """From the formula, float64, stable softplus: -log sigmoid(z) = log(1 + e^-z) = logaddexp(0, -z)."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return np.logaddexp(0.0, -(chosen - rejected)).mean(), chosen, rejected


def test_dpo_matches_an_independent_formula_even_for_large_margins():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(size=32) * 300 for _ in range(4))  # |beta z| up to ~100: sigmoid saturates
    for beta in (0.1, 0.5, 2.0):
        loss, chosen, rejected = numpy_dpo(pc, pr, rc, rr, beta)
        out = dpo_loss(*(torch.from_numpy(a) for a in (pc, pr, rc, rr)), beta=beta)
        assert torch.isfinite(out.loss)
        assert out.loss.item() == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(out.chosen_rewards.numpy(), chosen)
        np.testing.assert_allclose(out.rejected_rewards.numpy(), rejected)
        assert out.accuracy.item() == pytest.approx(float((chosen > rejected).mean()))
        assert out.margin.item() == pytest.approx(float((chosen - rejected).mean()))


def test_sequence_logprobs_and_dpo_match_trl():
    """End to end against trl's DPOTrainer (sigmoid loss): a tiny random Llama, one (2B, T) batch of
    chosen rows then rejected rows with agent masks and right padding. trl computes the per-token
    log-probs itself from the model (its own shift and masking) and the loss with precomputed
    reference log-probs; we compute sequence_logprobs on the model's logits and dpo_loss."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    from trl import DPOTrainer
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        pytest.skip("this trl version has no add_fused_lm_head; covered by the from-formula test")
    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this trl version has no DPOTrainer._compute_loss; covered by the from-formula test")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    B, T, beta = 4, 12, 0.1
    ids = torch.randint(1, 40, (2 * B, T))
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    attention = torch.ones(2 * B, T, dtype=torch.bool)
    for row, (start, end) in enumerate([(4, 12), (5, 9), (4, 10), (6, 12), (4, 7), (5, 12), (4, 11), (7, 9)]):
        mask[row, start:end] = True  # agent tokens after a 4-7 token prompt
        ids[row, end:] = 0  # right padding
        attention[row, end:] = False
    mask[0, 8] = mask[5, 9] = False  # an observation inside the trajectory

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention.long()).logits  # (2B, T, V)
    logps = seq(logits, ids, mask)  # (2B,)
    ref = logps + 3 * torch.randn(2 * B)  # a reference that differs from the policy
    ours = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(  # just the attributes _compute_loss reads for the plain sigmoid loss
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": attention.long(), "completion_mask": mask.long(),
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["eval"]

    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert logps[:B].mean().item() == pytest.approx(metrics["logps/chosen"][0], abs=1e-4)
    assert logps[B:].mean().item() == pytest.approx(metrics["logps/rejected"][0], abs=1e-4)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-5)
    assert ours.margin.item() == pytest.approx(metrics["rewards/margins"][0], abs=1e-5)
    assert ours.accuracy.item() == pytest.approx(metrics["rewards/accuracies"][0])


def test_head_logprobs_in_checkpointed_chunks_equal_the_whole_head():
    """The LM head run in chunks of 3 rows, each rebuilt in backward: the same log-probs and gradients
    (of the hidden states and of the head's weight) as the head on all rows at once."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)  # (N, D)
    targets = torch.randint(0, 11, (10,))
    upstream = torch.randn(10)  # an arbitrary loss: sum(upstream * logp)

    def run(fn):
        hidden.grad, head.weight.grad = None, None
        logp = fn()
        (upstream * logp).sum().backward()
        return logp.detach(), hidden.grad.clone(), head.weight.grad.clone()

    whole = run(lambda: F.log_softmax(head(hidden), dim=-1).gather(-1, targets[:, None]).squeeze(-1))
    chunked = run(lambda: head_logprobs(hidden, head, targets, chunk=3))
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(head_logprobs(hidden, head, targets, chunk=4), whole[0], atol=1e-6, rtol=1e-6)
    assert head_logprobs(hidden[:0], head, targets[:0]).shape == (0,)


def test_the_scored_positions_logits_give_the_agent_token_logprobs():
    """The (N, V) logits of the scored positions (what `model.lm_head` gives at `scored_positions`) give the
    (N,) log-probs that the (B, T, V) logits give, and the same loss."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    targets, scored = next_token_targets(ids, mask)
    picked = F.log_softmax(logits[:, :-1][scored], dim=-1).gather(-1, targets[scored][:, None]).squeeze(-1)  # (N,)
    torch.testing.assert_close(agent_token_logprobs(logits, ids, mask), picked)
    torch.testing.assert_close(token_logprobs(logits, ids, mask)[scored], picked)
    torch.testing.assert_close(bc_loss(picked), bc(logits, ids, mask))

"""The task-conditioning check (eto_ref/diagnose.py): its scoring and its reply log-probability."""

import math

import pytest
import torch

from eto_ref.diagnose import (
    distinct_tasks,
    own_task_accuracy,
    reply_logprob,
    task_conditioning,
)
from eto_ref.model import ModelConfig, Transformer


def test_own_task_accuracy_reads_columns():
    # column j = one reply scored after every task; right when its own task (row j) scores highest
    scores = torch.tensor([[-1.0, -5.0, -1.0],
                           [-2.0, -1.0, -9.0],
                           [-4.0, -6.0, -2.0]])
    assert own_task_accuracy(scores) == pytest.approx(2 / 3)  # column 2 is most likely after task 0
    assert own_task_accuracy(torch.full((4, 4), -3.0)) == 0.0  # a model that ignores the task: all ties
    assert own_task_accuracy(torch.eye(4)) == 1.0


def small_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()


def test_reply_logprob_is_the_sum_over_the_reply_tokens(fake_tok):
    model = small_model(fake_tok.vocab_size)
    messages = [{"role": "user", "content": "boil tin"}]
    got = reply_logprob(model, fake_tok, messages, "go")
    # independently, one prefix at a time: ids = <user> b o i l _ t i n <end> <assistant> g o <end>
    ids = fake_tok.render(messages + [{"role": "assistant", "content": "go"}])[0]
    first = len(ids) - 3  # the reply's tokens: g, o and the end of the turn
    expected = 0.0
    with torch.no_grad():
        for t in range(first, len(ids)):
            logits = model(torch.tensor([ids[:t]]))[0, -1]
            expected += torch.log_softmax(logits, -1)[ids[t]].item()
    assert got == pytest.approx(expected, abs=1e-4)


def test_task_conditioning_on_the_science_environment(fake_tok):
    from envs import make_env

    env = make_env("science")
    ids = distinct_tasks(env, 1000, 3)
    texts = [env.expert_trajectory(t)["conversations"][2]["value"] for t in ids]
    assert len(ids) == 3 and len(set(texts)) == 3
    result = task_conditioning(small_model(fake_tok.vocab_size), fake_tok, env, ids)
    assert result["tasks"] == 3 and result["chance"] == pytest.approx(1 / 3)
    assert 0.0 <= result["own_task_accuracy"] <= 1.0 and math.isfinite(result["own_task_gain"])

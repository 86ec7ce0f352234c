"""The KV-cached sampler against a naive reference that recomputes the whole sequence.

The reference (`naive_greedy`) runs the full conversation through the model for
every new token, with no cache and no padding: whatever the session does with
slots, padding, cut-off tokens and dropped rows must give the same tokens.
"""

import pytest
import torch

from eto_ref.model import ModelConfig, Transformer
from eto_ref.sampler import (
    SamplingConfig,
    Session,
    generate,
    logits_to_probs,
    sample_rows,
)

V = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return Transformer(config).eval()


@torch.no_grad()
def naive_greedy(model, sequence, n, stop_ids=()):
    """Greedy decoding that re-encodes the full sequence for every token."""
    sequence, out = list(sequence), []
    for _ in range(n):
        token = model(torch.tensor([sequence]))[0, -1].argmax().item()
        out.append(token)
        sequence.append(token)
        if token in stop_ids:
            break
    return out


def tokens(rng, n):
    return torch.randint(0, V, (n,), generator=rng).tolist()


def decode2(ids):
    """A fake tokenizer: every token is two characters, e.g. 3 -> 'dD'."""
    return "".join(chr(97 + i % 26) + chr(65 + i % 26) for i in ids)


# ----------------------------------------------------------------------------- greedy == recompute


def test_cached_greedy_equals_recompute(model):
    prompt = tokens(torch.Generator().manual_seed(1), 7)
    session = Session(model, batch_size=1, max_len=64)
    session.append([prompt])
    [out] = session.generate(SamplingConfig(20))
    assert out.tokens == naive_greedy(model, prompt, 20)
    assert out.reason == "max_new_tokens"
    assert session.history(0) == prompt + out.tokens


def run_episode(model, prompts, observations, new_tokens, rows=None):
    """Turn after turn: generate, then append the observation; returns each row's replies."""
    session = Session(model, batch_size=len(prompts), max_len=256)
    session.append(prompts)
    replies = [[] for _ in prompts]
    for turn, obs in enumerate(observations):
        for i, out in enumerate(session.generate(SamplingConfig(new_tokens[turn]))):
            replies[i].append(out.tokens)
        session.append(obs)
    return replies, session


def test_five_turn_episode_batched_equals_single_rows_and_recompute(model):
    rng = torch.Generator().manual_seed(2)
    prompts = [tokens(rng, n) for n in (5, 13, 9)]
    lengths = [(3, 8, 1), (6, 2, 4), (1, 1, 9), (7, 3, 5), (2, 6, 2)]  # observation lengths per turn and row
    observations = [[tokens(rng, n) for n in turn] for turn in lengths]
    new_tokens = [6, 4, 7, 5, 3]

    batched, session = run_episode(model, prompts, observations, new_tokens)
    for i, prompt in enumerate(prompts):
        single, _ = run_episode(model, [prompt], [[obs[i]] for obs in observations], new_tokens)
        assert batched[i] == single[0]
        history = list(prompt)  # the naive agent: re-encode the whole history every turn
        for turn, obs in enumerate(observations):
            assert batched[i][turn] == naive_greedy(model, history, new_tokens[turn])
            history += batched[i][turn] + obs[i]
        assert session.history(i) == history


def test_one_shot_generate_rows_of_different_lengths(model):
    rng = torch.Generator().manual_seed(3)
    prompts = [tokens(rng, n) for n in (1, 11, 4)]
    outs = generate(model, prompts, SamplingConfig(9))
    assert [o.tokens for o in outs] == [naive_greedy(model, p, 9) for p in prompts]


def test_subset_of_rows_and_dropped_rows(model):
    rng = torch.Generator().manual_seed(4)
    prompts = [tokens(rng, n) for n in (6, 3, 8)]
    session = Session(model, batch_size=3, max_len=128)
    session.append(prompts)
    first = session.generate(SamplingConfig(5), rows=[0, 2])  # row 1 waits, its prompt stays queued
    assert [o.tokens for o in first] == [naive_greedy(model, prompts[i], 5) for i in (0, 2)]
    session.drop([0])
    assert session.rows == [1, 2]
    obs = tokens(rng, 4)
    session.append([obs], rows=[2])
    second = session.generate(SamplingConfig(6))
    assert second[0].tokens == naive_greedy(model, prompts[1], 6)
    assert second[1].tokens == naive_greedy(model, prompts[2] + first[1].tokens + obs, 6)
    with pytest.raises(KeyError):
        session.append([[1]], rows=[0])


# ----------------------------------------------------------------------------- stopping


def first_new_index(seq, start):
    """An index >= start whose token does not occur before it."""
    return next(i for i in range(start, len(seq)) if seq[i] not in seq[:i])


def test_stop_id_keeps_the_stop_token_and_the_next_turn_continues(model):
    rng = torch.Generator().manual_seed(5)
    prompt, obs = tokens(rng, 6), tokens(rng, 5)
    free = naive_greedy(model, prompt, 15)
    i = first_new_index(free, 2)
    session = Session(model, batch_size=1, max_len=128)
    session.append([prompt])
    [out] = session.generate(SamplingConfig(15), stop_ids=[free[i]], decode=decode2)
    assert out.reason == "eos"
    assert out.tokens == free[: i + 1]  # the stop token ends the assistant turn: kept
    assert out.text == decode2(free[:i])  # ... but it is not text
    session.append([obs])
    [nxt] = session.generate(SamplingConfig(8))
    assert nxt.tokens == naive_greedy(model, prompt + free[: i + 1] + obs, 8)


@pytest.mark.parametrize("straddle", [False, True])
def test_stop_string_cuts_text_and_cache(model, straddle):
    rng = torch.Generator().manual_seed(6)
    prompt, obs = tokens(rng, 6), tokens(rng, 5)
    free = naive_greedy(model, prompt, 16)
    text = decode2(free)
    # the stop string begins at token i (or in the middle of it) and does not occur earlier
    i = next(i for i in range(3, 12) if text.find(text[2 * i + straddle: 2 * i + 3]) == 2 * i + straddle)
    stop = text[2 * i + straddle: 2 * i + 3]
    session = Session(model, batch_size=2, max_len=128)
    session.append([prompt, prompt[:3]])  # a second row keeps the batch running after row 0 stops
    out, other = session.generate(SamplingConfig(16), stop_strings=["zzz", stop], decode=decode2)
    assert out.reason == "stop_string"
    assert out.text == text[: 2 * i + straddle]
    assert out.tokens == free[:i]  # the cut tokens (and a straddling one) are gone ...
    assert session.history(0) == prompt + free[:i]
    session.append([obs, obs])
    nxt, _ = session.generate(SamplingConfig(8))
    assert nxt.tokens == naive_greedy(model, prompt + free[:i] + obs, 8)  # ... from the cache too


def test_stop_strings_need_decode(model):
    session = Session(model, batch_size=1, max_len=16)
    session.append([[1, 2]])
    with pytest.raises(ValueError, match="decode"):
        session.generate(SamplingConfig(4), stop_strings=["x"])


def test_cache_full_stops_rows_and_never_overflows(model):
    prompt = [3, 1, 4, 1, 5]
    session = Session(model, batch_size=2, max_len=8)
    session.append([prompt, prompt[:2]])
    outs = session.generate(SamplingConfig(10))
    # 5 prompt slots + 3 fed tokens fill the cache; the 4th sampled token is kept (queued)
    assert [o.reason for o in outs] == ["cache_full", "cache_full"]
    assert outs[0].tokens == naive_greedy(model, prompt, 4)
    assert session.free_slots == 0
    session.append([[7], [7]])
    assert [(o.tokens, o.reason) for o in session.generate(SamplingConfig(3))] == [([], "cache_full")] * 2
    with pytest.raises(ValueError, match="append"):  # a row whose reply ended on a stop string
        empty = Session(model, batch_size=1, max_len=8)
        empty.generate(SamplingConfig(3))


# ----------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_only_emit_allowed_tokens():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log()[None].repeat(4000, 1)  # (B, V): many independent draws at once
    g = torch.Generator().manual_seed(0)
    cases = [  # (top_k, top_p, allowed)
        (2, None, {1, 3}),
        (None, 0.7, {1, 3}),  # 0.5 < 0.7 <= 0.5 + 0.3
        (None, 0.85, {1, 3, 4}),
        (None, 0.1, {1}),  # always at least the top token
        (3, 0.99, {1, 3, 4}),
    ]
    for top_k, top_p, allowed in cases:
        p = logits_to_probs(logits[:1], 1.0, top_k, top_p)[0]
        assert {i for i in range(6) if p[i] > 0} == allowed
        torch.testing.assert_close(p.sum(), torch.tensor(1.0))
        drawn = set(sample_rows(logits, SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p), [g] * len(logits)).tolist())
        assert drawn == allowed  # never outside, and every allowed token shows up


def test_temperature_scales_and_near_zero_is_greedy():
    logits = torch.tensor([[0.0, 1.0, 0.9, -2.0]])
    assert logits_to_probs(logits, 1e-3)[0, 1] == 1.0  # one-hot at the argmax (in float32)
    hot, cold = logits_to_probs(logits, 2.0)[0], logits_to_probs(logits, 0.5)[0]
    assert hot.max() < cold.max()
    g = torch.Generator().manual_seed(0)
    assert sample_rows(logits.repeat(50, 1), SamplingConfig(temperature=1e-3), [g] * 50).eq(1).all()
    assert sample_rows(logits, SamplingConfig(temperature=0.0)).item() == 1


def test_seeded_sampling_repeats(model):
    prompts = [[1, 2, 3], [4, 5]]

    def run(seed):
        sampling = SamplingConfig(12, temperature=1.0, top_k=20, top_p=0.9)
        return [o.tokens for o in generate(model, prompts, sampling, seed=seed)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    near_zero = [o.tokens for o in generate(model, prompts, SamplingConfig(12, temperature=1e-6), seed=1)]
    assert near_zero == [o.tokens for o in generate(model, prompts, SamplingConfig(12))]


def test_rewind_takes_back_cached_and_queued_tokens():
    """After rewinding k tokens and appending others, decoding equals a fresh session on the new history."""
    torch.manual_seed(0)
    from eto_ref.model import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).eval()
    s = Session(model, batch_size=1, max_len=128)
    s.append([[1, 2, 3, 4, 5]])
    s.generate(SamplingConfig(6))
    history = s.history(0)
    s.rewind(0, 4)  # the queued last token and 3 cached ones
    assert s.history(0) == history[:-4]
    s.append([[7, 8]])
    got = s.generate(SamplingConfig(5))[0].tokens
    fresh = Session(model, batch_size=1, max_len=128)
    fresh.append([history[:-4] + [7, 8]])
    assert got == fresh.generate(SamplingConfig(5))[0].tokens


# ----------------------------------------------------------------------------- shared prefix, rows restarted


def test_shared_prefix_gives_the_tokens_of_the_plain_path(model):
    """Rows that begin with the session's prefix get its keys/values copied in (computed once, at batch 1):
    greedy tokens are those of a session without a prefix, and of recomputing from scratch."""
    rng = torch.Generator().manual_seed(7)
    prefix = tokens(rng, 9)
    prompts = [prefix + tokens(rng, n) for n in (2, 6, 4)]
    shared = Session(model, batch_size=3, max_len=128, prefix=prefix)
    plain = Session(model, batch_size=3, max_len=128)
    for row, prompt in enumerate(prompts):
        shared.start(row, prompt)
        plain.start(row, prompt)
    assert shared._pending[0] == prompts[0][len(prefix):]  # only the rest is queued
    got = [o.tokens for o in shared.generate(SamplingConfig(8))]
    assert got == [o.tokens for o in plain.generate(SamplingConfig(8))]
    assert got == [naive_greedy(model, p, 8) for p in prompts]


def test_a_row_restarted_mid_batch_equals_a_fresh_session(model):
    """Continuous batching at the sampler level: row 0 starts a new conversation while row 1 goes on."""
    rng = torch.Generator().manual_seed(8)
    prefix = tokens(rng, 5)
    a, b, c = (prefix + tokens(rng, n) for n in (3, 7, 2))
    session = Session(model, batch_size=2, max_len=128, prefix=prefix)
    session.start(0, a)
    session.start(1, b)
    first = [o.tokens for o in session.generate(SamplingConfig(6))]
    obs = tokens(rng, 4)
    session.start(0, c)  # row 0's conversation is over; a new one takes the row
    session.append([obs], rows=[1])
    second = [o.tokens for o in session.generate(SamplingConfig(5))]
    assert session.history(0) == c + second[0]
    assert second[0] == naive_greedy(model, c, 5)
    assert second[1] == naive_greedy(model, b + first[1] + obs, 5)


def test_kv_cache_grows_by_need(model):
    session = Session(model, batch_size=2, max_len=1000)
    assert session.cache.capacity == 256  # not max_len slots up front
    long_prompt = tokens(torch.Generator().manual_seed(9), 300)
    session.start(0, long_prompt)
    session.start(1, long_prompt[:4])
    outs = session.generate(SamplingConfig(3))
    assert session.cache.capacity == 512 and outs[0].tokens == naive_greedy(model, long_prompt, 3)


def test_per_row_seeds_do_not_depend_on_the_batch(model):
    """A row samples from its own generator: its tokens are the same alone or beside other rows."""
    sampling = SamplingConfig(10, temperature=1.0)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    together = generate(model, prompts, sampling, seed=11)
    alone = [generate(model, [p], sampling, seed=11 + i)[0] for i, p in enumerate(prompts)]
    assert [o.tokens for o in together] == [o.tokens for o in alone]

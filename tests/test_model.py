"""Our hand-written model against `transformers` as an independent oracle.

Each case builds a small random Hugging Face model, saves it with transformers,
loads the directory with our loader, and compares float32 logits. Then the
reverse: what we save loads in transformers with identical logits.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from eto_ref.checkpoint import CheckpointError, load_model, save_model
from eto_ref.kv_cache import KVCache
from eto_ref.model import ModelConfig, Transformer, padded_causal_mask

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "llama-head-dim": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_hf_model(case, tmp_path):
    config_cls, model_cls, kw = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**BASE, **kw)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # make norms and biases non-trivial so they are really tested
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def hf_logits(hf, ids, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=position_ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf, path = make_hf_model(case, tmp_path)
    ours = load_model(path)
    ids = torch.randint(0, BASE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids)
    assert (got - hf_logits(hf, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["llama-gqa", "llama3-rope-scaling", "qwen2-bias-tied"])
def test_logits_match_with_explicit_position_ids(case, tmp_path):
    hf, path = make_hf_model(case, tmp_path)
    ours = load_model(path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(50, 70).repeat(2, 1)  # far beyond the llama3 original length of 32
    with torch.no_grad():
        causal = padded_causal_mask(torch.ones_like(ids, dtype=torch.bool))  # (B, T, T)
        got = ours.lm_head(ours.decoder(ids, pos, causal))
    assert (got - hf_logits(hf, ids, pos)).abs().max() < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_our_saved_directory_loads_in_transformers(case, tmp_path):
    _, path = make_hf_model(case, tmp_path)
    ours = load_model(path)
    save_model(ours, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids), reloaded(input_ids=ids).logits) or \
            (ours(ids) - reloaded(input_ids=ids).logits).abs().max() < 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    hf, _ = make_hf_model("llama-gqa", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "sharded")
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max() < 1e-4


def test_load_in_bfloat16(tmp_path):
    hf, path = make_hf_model("llama-gqa", tmp_path)
    ours = load_model(path, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(ids).float() - hf_logits(hf, ids)).abs().max() < 0.1


def test_right_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2)).eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], dim=1).bool()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :12], model(ids))


def test_kv_cache_prefill_then_decode_equals_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2)).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 15))
    cache = KVCache(model.config, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(ids)
        every, last = torch.ones(2, 10, dtype=torch.bool), torch.tensor([9, 9])
        steps = [model.next_token_logits(ids[:, :10], every, cache, last)]  # prefill: (B, V) after token 9
        one, first = torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
        steps += [model.next_token_logits(ids[:, t:t + 1], one, cache, first) for t in range(10, 15)]  # decode
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 9:], atol=1e-5, rtol=1e-5)


def test_a_generation_forward_reads_nothing_back_from_the_device():
    """With the model and the cache on the "meta" device (shapes, no data: copying a tensor to the host
    raises), a prefill and decode steps still run when the masks are on the host as the sampler passes
    them: the cache's bookkeeping never waits for the accelerator."""
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2)).to("meta").eval()
    cache = KVCache(model.config, batch_size=2, max_len=32, device="meta")
    with torch.no_grad():
        real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])  # (2, 7) right-padded, on the host
        logits = model.next_token_logits(torch.zeros(2, 7, dtype=torch.long, device="meta"), real, cache,
                                         torch.tensor([6, 3], device="meta"))
        for _ in range(3):
            logits = model.next_token_logits(torch.zeros(2, 1, dtype=torch.long, device="meta"),
                                             torch.ones(2, 1, dtype=torch.bool), cache,
                                             torch.zeros(2, dtype=torch.long, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (2, BASE["vocab_size"])
    assert cache.lengths == [10, 7]
    with pytest.raises(NotImplementedError, match="meta"):  # what a read-back would do here
        logits.cpu()


def test_kv_cache_overflow_is_a_clear_error():
    model = Transformer(ModelConfig(**BASE)).eval()
    cache = KVCache(model.config, batch_size=1, max_len=8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="KV cache overflow"):
        model.next_token_logits(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool), cache,
                                torch.tensor([8]))


# ----------------------------------------------------------------------------- bad checkpoints


def _write_config(path, **overrides):
    cfg = {"architectures": ["LlamaForCausalLM"], **BASE, "num_key_value_heads": 2, **overrides}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_file_and_key(tmp_path):
    _write_config(tmp_path, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match=r"config.json.*GPTNeoXForCausalLM.*architectures"):
        load_model(tmp_path)


def test_missing_config_key_names_file_and_key(tmp_path):
    _write_config(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*'hidden_size'"):
        load_model(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_hf_model("llama-gqa", tmp_path)
    state = load_file(path / "model.safetensors")

    def write(d):
        save_file(d, str(path / "model.safetensors"))

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write(missing)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*\(96, 64\)"):
        load_model(path)
    write({**state, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(path)
    write({**state, "model.norm.weight": torch.zeros(65)})
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(65,\).*expects \(64,\)"):
        load_model(path)


def test_truncated_safetensors_file(tmp_path):
    _, path = make_hf_model("llama-gqa", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_save_is_atomic_and_replaces(tmp_path):
    model = Transformer(ModelConfig(**BASE))
    save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- shared prefix, logits where asked


def test_shared_prefix_forward_equals_the_plain_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2)).eval()
    prefix = torch.randint(0, BASE["vocab_size"], (1, 9))
    rest = torch.randint(0, BASE["vocab_size"], (3, 7))
    ids = torch.cat([prefix.expand(3, -1), rest], dim=1)  # (3, 16): rows share their first 9 tokens
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 12:] = False  # right padding in one row
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        shared = model.lm_head(model.hidden_states(ids, attention_mask=mask, shared_prefix=9))
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-5)


def test_scored_logprobs_and_next_token_logits_equal_the_full_forward():
    """The training entry (log-probs at the scored positions) and the generation entry (logits after each
    row's last token, through a KV cache) give the values of the full (B, T, V) forward."""
    from eto_ref.kv_cache import KVCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE)).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    where = torch.rand(2, 10) > 0.5
    targets = torch.randint(0, BASE["vocab_size"], (int(where.sum()),))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        expected = full[where].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # (N,)
        torch.testing.assert_close(model.scored_logprobs(ids, mask, where, targets), expected)
        cache = KVCache(model.config, batch_size=2, max_len=16)
        torch.testing.assert_close(model.next_token_logits(ids, mask, cache, torch.tensor([3, 9])),
                                   full[[0, 1], [3, 9]])  # (B, V)


def _prefix_batch(B=4, P=12, rest=(9, 5, 11, 7), seed=0):
    """Rows sharing their first P tokens, right-padded, with an agent-token mask that starts inside the prefix."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, BASE["vocab_size"], (P,), generator=g)
    T = P + max(rest)
    ids = torch.zeros(B, T, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.bool)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(rest):
        ids[i, :P] = prefix
        ids[i, P:P + n] = torch.randint(0, BASE["vocab_size"], (n,), generator=g)
        attention[i, :P + n] = True
        loss_mask[i, P - 3:P - 1] = True  # an agent turn inside the shared prefix (the "OK")
        loss_mask[i, P + 1:P + n] = torch.rand(n - 1, generator=g) > 0.3
    return ids, attention, loss_mask


@pytest.mark.parametrize("head", ["logits", "logprobs"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_gradients_equal_the_plain_forward_for_both_losses(checkpointing, head):
    """BC (Eq. 5) and DPO (Eq. 7) gradients through a prefix run once equal those of every row running it,
    with the scored positions' logits or (the trainer's path) only their targets' log-probs."""
    from eto_ref.losses import (agent_token_logprobs, bc_loss, dpo_loss, next_token_targets, scored_positions,
                                sequence_logprobs)
    from eto_ref.model import target_logprobs
    from eto_ref.trainer import scored_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2))
    model.gradient_checkpointing = checkpointing
    ids, attention, loss_mask = _prefix_batch()

    def grads(shared: bool, loss_name: str):
        model.zero_grad()
        if shared and head == "logprobs":
            agent_logps = scored_logprobs(model, {"input_ids": ids, "attention_mask": attention,
                                                  "loss_mask": loss_mask, "shared_prefix": 12})  # (N,)
        elif shared:
            logits = model.lm_head(model.hidden_states(ids, attention, 12)[scored_positions(loss_mask)])  # (N, V)
            targets, scored = next_token_targets(ids, loss_mask)
            agent_logps = target_logprobs(logits, targets[scored])  # from (N, V)
        else:
            logits = model(ids, attention_mask=attention)  # (B, T, V) every row runs everything
            agent_logps = agent_token_logprobs(logits, ids, loss_mask)
        if loss_name == "bc":
            loss = bc_loss(agent_logps)
        else:
            logps = sequence_logprobs(agent_logps, loss_mask)  # rows 0, 1 chosen; 2, 3 rejected
            loss = dpo_loss(logps[:2], logps[2:], torch.tensor([-30.0, -25.0]), torch.tensor([-28.0, -31.0])).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    for loss_name in ("bc", "dpo"):
        plain_loss, plain = grads(False, loss_name)
        shared_loss, shared = grads(True, loss_name)
        torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-5)
        for name in plain:
            torch.testing.assert_close(shared[name], plain[name], atol=1e-5, rtol=1e-4, msg=f"{loss_name}: {name}")


@pytest.mark.parametrize("prefix", [0, 12])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_causal_bias_gives_the_boolean_masks_log_probs_and_gradients(monkeypatch, prefix, checkpointing):
    """On CUDA, right-padded training rows attend through a lower-right causal bias (no explicit mask, so
    SDPA may run FlashAttention). Forced here on CPU: the scored log-probs and every gradient equal the
    boolean mask's, with and without a shared prefix."""
    import eto_ref.model as model_module
    from eto_ref.model import training_mask
    from eto_ref.trainer import scored_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, num_key_value_heads=2))
    model.gradient_checkpointing = checkpointing
    ids, attention, loss_mask = _prefix_batch()
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "shared_prefix": prefix}
    masks = []
    monkeypatch.setattr(model_module, "training_mask",
                        lambda *a, **k: masks.append(training_mask(*a, **k)) or masks[-1])

    def run():
        model.zero_grad(set_to_none=True)
        logps = scored_logprobs(model, batch)  # (N,)
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    boolean = run()
    assert masks and not any(isinstance(m, model_module.CausalBias) for m in masks)
    masks.clear()
    monkeypatch.setattr(model_module, "FUSED_CAUSAL_DEVICES", ("cpu",))
    fused = run()
    assert masks and all(isinstance(m, model_module.CausalBias) for m in masks)
    torch.testing.assert_close(fused[0], boolean[0], atol=1e-5, rtol=1e-5)
    for name in boolean[1]:
        torch.testing.assert_close(fused[1][name], boolean[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_left_padded_rows_keep_the_boolean_mask():
    """A causal bias would let a left-padded row's tokens attend to its padding: the boolean mask stays."""
    from eto_ref.model import CausalBias, training_mask

    left = torch.tensor([[False, True, True], [True, True, True]])
    mask = training_mask(left, 2, fused=True)
    assert not isinstance(mask, CausalBias) and mask.shape == (2, 3, 5)
    assert isinstance(training_mask(left.flip(-1), 2, fused=True), CausalBias)


def test_the_memory_bench_counts_the_cache_the_sampler_allocates():
    """bench/memory.py's KV-cache formula equals the bytes KVCache allocates (bf16, grouped-query heads)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_bench", Path(__file__).parent.parent / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    config = ModelConfig(**{**BASE, "num_key_value_heads": 2})
    cache = KVCache(config, batch_size=3, max_len=64, capacity=64, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    shape = bench.Shape(vocab=config.vocab_size, d=config.hidden_size, f=config.intermediate_size,
                        layers=config.num_hidden_layers, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads)
    assert bench.kv_cache_bytes(shape, rows=3, slots=64) == allocated

"""Tests for eto_ref/lora.py: LoRA layers, merge/disable, PEFT-format adapters.

Most tests run twice: on a tiny stand-in module with the Hugging Face naming
(layers[i].self_attn.q_proj, ...) and on the real eto_ref Transformer. With
`peft` + `transformers` installed, adapters are cross-checked against
peft.PeftModel on a tiny random LlamaForCausalLM built from the same weights.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eto_ref.checkpoint import config_to_hf
from eto_ref.model import ModelConfig, Transformer
from eto_ref.lora import (
    VALID_TARGETS,
    LoRALinear,
    disable_adapter,
    hf_module_name,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

ALL = VALID_TARGETS
VOCAB = 48


# --------------------------------------------------------------------------- models


class ToyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=True) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):  # not real attention: just uses every projection
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class ToyMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyLayer(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.self_attn, self.mlp = ToyAttention(d), ToyMLP(d, h)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class ToyModel(nn.Module):
    """Stand-in with the eto_ref / Hugging Face module names."""

    def __init__(self, d=16, h=24, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(ToyLayer(d, h) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def make_real(attention_bias=False):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=attention_bias)
    return Transformer(cfg)


def make_model(kind):
    torch.manual_seed(0)
    if kind == "toy":
        return ToyModel().eval()
    return make_real(attention_bias=True).eval()


KINDS = ["toy", "real"]


def ids(batch=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, T), generator=g)


def train_a_few_steps(model, steps=3, lr=1e-2):
    """AdamW on the adapters only, so B moves away from zero."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    x = ids(seed=2)
    model.train()
    for _ in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(params=KINDS)
def trained(request):
    """(base model, adapted model with B != 0 after a few steps)."""
    base = make_model(request.param)
    model = copy.deepcopy(base)
    inject_lora(model, rank=4, alpha=8, targets=ALL)
    train_a_few_steps(model)
    return base, model


# --------------------------------------------------------------------------- layer and injection


def test_lora_linear_math():
    """forward == x W^T + b + (alpha/r) x A^T B^T; merge gives the same with one matmul."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=True)
    layer = LoRALinear.from_linear(lin, rank=2, alpha=3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ lin.weight.T + lin.bias + 1.5 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.weight.shape == (2, 6) and layer.lora_B.weight.shape == (5, 2)
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), lin(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_injection_matches_base(kind):
    base = make_model(kind)
    model = copy.deepcopy(base)
    names = inject_lora(model, rank=4, alpha=8, targets=ALL)
    assert len(names) == 2 * 7 and all(n.rsplit(".", 1)[-1] in ALL for n in names)
    assert "lm_head" not in names
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B = 0: exactly the base


@pytest.mark.parametrize("kind", KINDS)
def test_injection_freezes_base_and_keeps_keys(kind):
    base = make_model(kind)
    model = copy.deepcopy(base)
    names = inject_lora(model, rank=2, alpha=4)  # default targets: q, k, v, o
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    sd = model.state_dict()
    base_sd = base.state_dict()
    assert set(base_sd) <= set(sd)  # base keys unchanged: base checkpoints load as they are
    assert set(sd) - set(base_sd) == trainable
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v)
    # a base state_dict loads into the adapted model (strict=False only for the lora keys)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and set(missing) == trainable


def test_injection_keeps_dtype_and_device():
    model = ToyModel().to(torch.bfloat16)
    inject_lora(model, rank=2, alpha=2, targets=("q_proj", "down_proj"))
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
    m = model.layers[0].self_attn.q_proj
    assert isinstance(m, LoRALinear) and m.lora_A.weight.device == m.weight.device
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_bad_target_names():
    with pytest.raises(ValueError, match="valid targets: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        inject_lora(ToyModel(), rank=2, alpha=2, targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="lm_head"):
        inject_lora(ToyModel(), rank=2, alpha=2, targets=("lm_head",))
    model = ToyModel()
    inject_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, rank=2, alpha=2)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = ToyModel()
    inject_lora(model, rank=4, alpha=4, dropout=0.5, targets=ALL)
    for p in lora_parameters(model):
        nn.init.normal_(p)
    x = ids()
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- after training


def test_only_adapters_get_gradients(trained):
    base, model = trained
    model.zero_grad(set_to_none=True)
    model(ids()).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_same_grads():
    """LoRA grads with activation checkpointing (frozen inputs, use_reentrant=False) match plain ones."""
    torch.manual_seed(0)
    model = make_real()
    inject_lora(model, rank=4, alpha=8, targets=ALL)
    train_a_few_steps(model, steps=1)
    model.train()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        model(ids()).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_merge_unmerge(trained):
    base, model = trained
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base(x), atol=1e-4)  # training changed the model
        merge_lora(model)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    base_sd = base.state_dict()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base_sd[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_base(trained, merged):
    base, model = trained
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        if merged:
            merge_lora(model)
        with disable_adapter(model):
            torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
        mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert all(not m.disabled and m.merged == merged for m in mods)  # state restored
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_disable_adapter_restores_on_exception(trained):
    _, model = trained
    merge_lora(model)
    with pytest.raises(KeyError):
        with disable_adapter(model):
            raise KeyError("boom")
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(not m.disabled and m.merged for m in mods)


def test_remove_lora(trained):
    base, model = trained
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        merged_model = copy.deepcopy(model)
        names = remove_lora(merged_model, merge=True)
        assert len(names) == 14
        assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
        assert all(type(merged_model.get_submodule(n)) is nn.Linear for n in names)
        assert set(merged_model.state_dict()) == set(base.state_dict())  # a plain HF-named model again
        torch.testing.assert_close(merged_model(x), adapted, atol=1e-5, rtol=1e-5)
        remove_lora(model, merge=False)
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- save / load


def test_hf_module_name():
    assert hf_module_name("layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert hf_module_name("lm_head") == "lm_head"


def test_save_writes_peft_format(trained, tmp_path):
    """Key pattern and adapter_config.json fields of the PEFT format (no peft needed)."""
    base, model = trained
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="some/base")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"]  # no temp dir left behind
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.0
    assert cfg["target_modules"] == list(ALL)
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["modules_to_save"] is None
    sd = load_file(out / "adapter_model.safetensors")
    assert len(sd) == 2 * 14
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            for ab in "AB":
                assert f"base_model.model.model.layers.{i}.{proj}.lora_{ab}.weight" in sd
    A = sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    B = sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    m = model.layers[1].mlp.down_proj
    assert A.shape == (4, m.in_features) and B.shape == (m.out_features, 4)
    assert torch.equal(B, m.lora_B.weight.detach())


def test_save_load_round_trip(trained, tmp_path):
    base, model = trained
    x = ids()
    save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    names = load_adapter(fresh, tmp_path / "a")  # injects from adapter_config.json
    assert len(names) == 14
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # saving again into the existing directory replaces our files, keeps others
    (tmp_path / "a" / "notes.txt").write_text("keep me")
    save_adapter(fresh, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a"]
    # loading into a model that already has matching (untrained) adapters
    again = copy.deepcopy(base)
    inject_lora(again, rank=4, alpha=8, targets=ALL)
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_bad_adapter_dirs(trained, tmp_path):
    base, model = trained
    good = save_adapter(model, tmp_path / "good")
    weights = load_file(good / "adapter_model.safetensors")
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, cfg=None, tensors=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config if cfg is None else cfg))
        save_file(weights if tensors is None else tensors, d / "adapter_model.safetensors")
        return d

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    d = variant("badjson")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="badjson/adapter_config.json: not valid JSON"):
        load_adapter(copy.deepcopy(base), d)
    with pytest.raises(ValueError, match="'use_dora'"):
        load_adapter(copy.deepcopy(base), variant("dora", {**config, "use_dora": True}))
    with pytest.raises(ValueError, match="'peft_type'"):
        load_adapter(copy.deepcopy(base), variant("ia3", {**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="target_modules.*'qkv'.*valid targets"):
        load_adapter(copy.deepcopy(base), variant("tgt", {**config, "target_modules": ["qkv"]}))

    extra = dict(weights, **{"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"unknown/adapter_model.safetensors: unknown key "
                                         r"'base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight'"):
        load_adapter(copy.deepcopy(base), variant("unknown", tensors=extra))
    gone = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    fewer = {k: v for k, v in weights.items() if k != gone}
    with pytest.raises(ValueError, match=f"missing/adapter_model.safetensors: missing key '{gone}'"):
        load_adapter(copy.deepcopy(base), variant("missing", tensors=fewer))
    wrong = dict(weights, **{gone: torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=f"shape/adapter_model.safetensors: key '{gone}' has shape \\(3, 4\\)"):
        load_adapter(copy.deepcopy(base), variant("shape", tensors=wrong))
    d = variant("pickle")
    os.remove(d / "adapter_model.safetensors")
    (d / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(copy.deepcopy(base), d)
    other = copy.deepcopy(base)
    inject_lora(other, rank=4, alpha=16, targets=ALL)
    with pytest.raises(ValueError, match="scaling"):
        load_adapter(other, good)


# --------------------------------------------------------------------------- PEFT as an oracle


def hf_llama_from(model):
    """A transformers LlamaForCausalLM with exactly the weights of our (un-adapted) Transformer."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**config_to_hf(model.config))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    return hf


@pytest.fixture
def llama_pair():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = make_real().eval()
    hf = hf_llama_from(ours)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)  # same base model
    return ours, hf


def test_peft_loads_our_adapter(llama_pair, tmp_path):
    import peft

    ours, hf = llama_pair
    inject_lora(ours, rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path / "ad")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours(x), atol=1e-5, rtol=1e-5)
        with peft_model.disable_adapter(), disable_adapter(ours):
            torch.testing.assert_close(peft_model(x).logits, ours(x), atol=1e-5, rtol=1e-5)


def test_we_load_peft_adapter(llama_pair, tmp_path):
    import peft

    ours, hf = llama_pair
    cfg = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["k_proj", "gate_proj", "down_proj"])
    peft_model = peft.get_peft_model(hf, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft_model.save_pretrained(str(tmp_path / "peft_ad"))
    names = load_adapter(ours, tmp_path / "peft_ad")
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["down_proj", "gate_proj", "k_proj"]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model.eval()(x).logits, atol=1e-5, rtol=1e-5)

"""A Llama-family decoder-only transformer, written by hand in plain PyTorch.

One file, read bottom-up: config -> RMSNorm -> rotary embeddings -> attention
(grouped-query, optional KV cache) -> SwiGLU MLP -> decoder layer -> model.
It covers the architectures of Llama-2, Llama-3, Mistral and Qwen2, which differ
only in config values (rope theta and scaling, GQA, q/k/v bias, tied embeddings).

Module names follow Hugging Face (`layers.0.self_attn.q_proj`, ...), so a
checkpoint's tensor `model.layers.0.self_attn.q_proj.weight` is our
`layers.0.self_attn.q_proj.weight` (see eto_ref/checkpoint.py).

Notation used in shape comments:
    B  batch size            T  new tokens in this forward
    S  key length (cached + new)   D  hidden size
    nh query heads   nkv key/value heads   hs head dim   V vocabulary size
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
REQUIRED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


# --------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> same as num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    attention_bias: bool = False  # True for Qwen2 (q/k/v projections have a bias)
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build a config from a Hugging Face `config.json` dictionary.

        Raises ValueError naming `source` and the key for an unknown architecture
        or a missing required key.
        """
        archs = d.get("architectures")
        if not archs:
            raise ValueError(f"{source}: missing key 'architectures' (expected one of {SUPPORTED_ARCHITECTURES})")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unknown architecture {arch!r} in key 'architectures'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in REQUIRED_CONFIG_KEYS:
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r} for {arch}")
        # Rope settings: `rope_theta` + `rope_scaling` (Llama checkpoints, transformers 4), or
        # one `rope_parameters` dict (transformers 5).
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling") or rope_params or None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("llama3", "default"):
                raise ValueError(f"{source}: key 'rope_scaling': unsupported rope_type {rope_type!r} (supported: llama3)")
            rope_scaling = None if rope_type == "default" else {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        known = set(cls.__dataclass_fields__) | {"architectures", "rope_parameters", "model_type", "hidden_act"}
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=d.get("attention_bias", arch == "Qwen2ForCausalLM"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model config not found (a model directory needs config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """The Hugging Face `config.json` form of this config (what transformers reads)."""
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k not in ("architecture", "extra")})
        d["architectures"] = [self.architecture]
        d["model_type"] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        d["hidden_act"] = "silu"
        if self.architecture == "Qwen2ForCausalLM":
            d.pop("attention_bias")  # Qwen2 always has q/k/v bias; the key is not part of its config
        return d


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/hs), with Llama-3 frequency scaling when configured.

    Llama-3 scaling keeps high frequencies (short wavelengths), divides low
    frequencies by `factor`, and interpolates smoothly in between.
    """
    hs = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))  # (hs/2,)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # (hs/2,)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, smoothed)  # long wavelengths: divide
    return torch.where(wavelen < old_len / high, inv_freq, scaled)  # short wavelengths: keep


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, in float32.  (B, T) -> 2 x (B, T, hs)."""
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hs): rotate-half layout, as HF checkpoints
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) by the position's angle.  x: (B, nh, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: (B, nkv, S_max, hs) each.

    New tokens are written into the next free *slots* `[length, length + T)`.
    Slots are shared by all rows; a row whose new tokens are fewer than T pads
    them, and `valid` (B, S_max) remembers which slots hold real tokens, so
    padding is never attended to at any later step. Positions (for RoPE) are per
    row and independent of slots: they count the row's real tokens.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch_size, max_len, device=device, dtype=torch.bool),
                             persistent=False)
        self.max_len = max_len
        self.length = 0  # slots used so far (same for all rows)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def next_positions(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Per-row RoPE positions of the new tokens: the row's real tokens so far, counting on.  (B, T)"""
        seen = self.valid[:, : self.length].sum(-1, keepdim=True)  # (B, 1)
        return seen + new_valid.long().cumsum(-1) - 1

    def reserve(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Claim slots for T new tokens, mark the real ones valid; returns the (B, T, S) attention mask."""
        T = new_valid.shape[1]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {self.length} slots used + {T} new tokens > capacity {self.max_len}; "
                "create the cache with a larger max_len"
            )
        self.valid[:, start:end] = new_valid
        self.length = end
        slots = torch.arange(end, device=new_valid.device)
        causal = slots[None, :] <= (start + torch.arange(T, device=new_valid.device))[:, None]  # (T, S)
        mask = causal[None] & self.valid[:, None, :end]  # (B, T, S)
        return mask | (slots[None, None, :] == (start + torch.arange(T, device=new_valid.device))[None, :, None])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values (B, nkv, T, hs) at the reserved slots; return all (B, nkv, S, hs)."""
        end = self.length
        start = end - k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows of the batch (so they stop costing compute): keep `rows` (index tensor)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.valid = self.valid[rows]


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (nkv <= nh) and rotary positions."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.nh * self.hs, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.nkv * self.hs, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.nkv * self.hs, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hs, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs)
        # Grouped-query attention: each key/value head serves nh/nkv consecutive query heads (the
        # repeat_interleave layout), done inside SDPA without copying the cache nh/nkv times.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, nh*hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids -> next-token logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default: counts real tokens per row
        attention_mask: torch.Tensor | None = None,  # (B, T) bool, False on padding
        kv_cache: KVCache | None = None,
        last_only: bool = False,  # logits of the last position only (generation: (B, 1, V))
    ) -> torch.Tensor:  # (B, T, V) logits
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        if kv_cache is not None:
            if position_ids is None:
                position_ids = kv_cache.next_positions(attention_mask)
            mask = kv_cache.reserve(attention_mask)  # (B, T, S)
        else:
            if position_ids is None:
                position_ids = attention_mask.long().cumsum(-1) - 1
            mask = padded_causal_mask(attention_mask)  # (B, T, T)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids.clamp(min=0))
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return self.lm_head(self.norm(x))  # (B, T, V)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask -> (B, T, T): query t sees real keys <= t (and always itself, so pad rows stay finite)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    return (causal[None] & attention_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

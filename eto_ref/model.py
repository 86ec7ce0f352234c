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

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.utils.checkpoint import checkpoint


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


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask -> (B, T, T): query t sees real keys <= t (and always itself, so pad rows stay finite)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    return (causal[None] & attention_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


def training_mask(attention_mask: torch.Tensor, prefix: int, fused: bool) -> torch.Tensor | CausalBias:
    """The attention mask of a training forward: rows (B, T) after `prefix` tokens every row shares.

    Boolean, (B, T, prefix + T): query t sees the prefix and its row's real keys <= t.
    With `fused` (on CUDA: FUSED_CAUSAL_DEVICES) and right-padded rows, the same as a lower-right causal bias
    instead: SDPA takes no explicit mask then, so it may run FlashAttention, where a
    boolean mask leaves only its math kernel (T x T scores per head). The two differ only
    at padding queries, whose outputs no loss reads.
    """
    B, T = attention_mask.shape
    if fused and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):  # right padding only
        return causal_lower_right(T, prefix + T)
    see_prefix = torch.ones(B, T, prefix, dtype=torch.bool, device=attention_mask.device)
    return torch.cat([see_prefix, padded_causal_mask(attention_mask)], dim=-1)  # (B, T, prefix + T)


class SharedPrefixKV:
    """Keys/values of a token prefix that every row of a batch begins with, computed once at batch 1.

    Its forward (batch 1, causal within the prefix) records each layer's keys/values;
    `AttendToPrefix` then lets B rows attend to them. In training the recorded tensors
    keep their autograd history, so gradients flow through the prefix exactly as if
    every row had run it. (Under gradient checkpointing the recomputation re-records.)
    """

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> (1, nkv, P, hs)
        self.v: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer], self.v[layer] = k, v
        return k, v


class AttendToPrefix:
    """Each of B rows attends to [the shared prefix's keys/values, its own]: the prefix expanded to B rows
    is a view, so its gradient is the sum over the rows."""

    def __init__(self, prefix: SharedPrefixKV, rows: int):
        self.prefix, self.rows = prefix, rows

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk = self.prefix.k[layer].expand(self.rows, -1, -1, -1)  # (B, nkv, P, hs)
        pv = self.prefix.v[layer].expand(self.rows, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nkv, P + T, hs)


# --------------------------------------------------------------------------- the LM head's log-probs


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


def head_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
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


# --------------------------------------------------------------------------- attention

FUSED_CAUSAL_DEVICES = ("cuda",)  # where training_mask gives SDPA a causal bias instead of a boolean mask
GROUPED_ATTENTION_MAX_T = 64  # longer inputs (prompt prefills) use SDPA, which never holds all T x S scores


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v with grouped-query heads, as two batched matmuls.

    q (B, nh, T, hs), k and v (B, nkv, S, hs), mask (B, T, S) -> (B, nh, T, hs). Each
    key/value head serves nh/nkv consecutive query heads (the repeat_interleave layout):
    the g = nh/nkv query heads of a group are stacked into one matrix, so every cached
    key and value is read once per step, never copied nh/nkv times. (The same math as
    SDPA with enable_gqa; faster on CPU when T is 1, as in decoding.)

    k is a slice of the cache's buffers (S of its capacity's slots), which the matmul
    would copy itself, slowly, into a transposed layout; a plain contiguous copy first
    is faster on CPU and gives the same scores bit for bit.
    """
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    scores = q.reshape(B, nkv, g * T, hs) @ k.contiguous().transpose(-1, -2)  # (B, nkv, g*T, S)
    scores = scores.view(B, nkv, g, T, -1) * hs ** -0.5
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))  # (B, nkv, g, T, S)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs.view(B, nkv, g * T, -1) @ v).view(B, nh, T, hs)


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

    def forward(self, x, cos, sin, mask, kv_cache=None):  # kv_cache: anything with update(layer, k, v)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs)
        causal_bias = isinstance(mask, CausalBias)  # (training_mask on CUDA)
        if kv_cache is not None and T <= GROUPED_ATTENTION_MAX_T and not causal_bias:  # decoding: few queries
            y = grouped_attention(q, k, v, mask)  # (B, nh, T, hs)
        else:  # training and full forwards: SDPA's fused kernel, memory-lean for long T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if causal_bias else mask[:, None],
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

    # The model's four entry points: one input form and one output form each.

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits at every position: ids (B, T), mask (B, T) bool (False on padding) -> (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))  # (B, T, V)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      shared_prefix: int = 0) -> torch.Tensor:
        """The normed last hidden states (B, T, D) of right-padded rows (B, T).

        shared_prefix P > 0: the first P tokens are the same in every row; they run once
        (hidden_states_shared_prefix), with the same result.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        if shared_prefix > 0:
            return self.hidden_states_shared_prefix(input_ids, attention_mask, shared_prefix)
        position_ids = attention_mask.long().cumsum(-1) - 1  # (B, T)
        mask = training_mask(attention_mask, 0, fused=input_ids.device.type in FUSED_CAUSAL_DEVICES)
        return self.decoder(input_ids, position_ids, mask)

    def scored_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
                        targets: torch.Tensor, shared_prefix: int = 0) -> torch.Tensor:
        """The training forward: log pi(target) (N,), float32, at the N positions where `scored` (B, T) is True.

        The LM head (V x D: for SmolLM2 a sixth of the model) and its float32 output
        (V = 49k values per position) are the costliest part of a small model, so it runs
        at the scored positions alone, in checkpointed chunks (head_logprobs).
        """
        hidden = self.hidden_states(input_ids, attention_mask, shared_prefix)  # (B, T, D)
        return head_logprobs(hidden[scored], self.lm_head, targets)  # (N,)

    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kv_cache,
                          last: torch.Tensor) -> torch.Tensor:
        """Generation: feed ids (B, T) after the tokens already in `kv_cache` (eto_ref/kv_cache.py, right
        padding, mask (B, T) bool, best on the host: see KVCache.begin); returns the logits (B, V) after each
        row's token `last` (B,) long."""
        position_ids, mask = kv_cache.begin(attention_mask.bool())  # (B, T), (B, T, S)
        x = self.decoder(input_ids, position_ids, mask, kv_cache)  # (B, T, D)
        return self.lm_head(x[torch.arange(len(x), device=x.device), last])  # (B, V)

    def decoder(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                kv_cache=None) -> torch.Tensor:
        """The decoder stack: ids (B, T) at positions (B, T), attention mask (B, T, S) -> normed states (B, T, D).
        kv_cache: anything with update(layer, k, v) (KVCache, SharedPrefixKV, AttendToPrefix)."""
        cos, sin = rope_cos_sin(self.inv_freq, position_ids.clamp(min=0))
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        return self.norm(x)

    def hidden_states_shared_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                    P: int) -> torch.Tensor:
        """Hidden states (B, T, D) of rows that all begin with the same P tokens, running those tokens once.

        The prefix (say the instruction, identical in every trajectory of an environment)
        goes through the model at batch 1, its keys/values recorded per layer; then the
        rest of every row runs with attention to [prefix keys/values, own keys/values].
        A prefix token's state does not depend on what follows it, so the result equals
        the plain forward; autograd sums the rows' gradients into the one prefix pass,
        so training gradients are exact too. Saves (B - 1) x P tokens of compute.
        """
        B, T = input_ids.shape
        fused = input_ids.device.type in FUSED_CAUSAL_DEVICES
        prefix = SharedPrefixKV()
        positions = torch.arange(P, device=input_ids.device)[None]  # (1, P)
        causal = training_mask(torch.ones(1, P, dtype=torch.bool, device=input_ids.device), 0, fused)  # (1, P, P)
        h_prefix = self.decoder(input_ids[:1, :P], positions, causal, prefix)  # (1, P, D)
        rest = attention_mask[:, P:]  # (B, T - P)
        mask = training_mask(rest, P, fused)  # (B, T - P, T)
        h_rest = self.decoder(input_ids[:, P:], P + rest.long().cumsum(-1) - 1, mask,
                              AttendToPrefix(prefix, B))  # (B, T - P, D)
        return torch.cat([h_prefix.expand(B, -1, -1), h_rest], dim=1)  # (B, T, D)

    def prefill_prefix(self, prefix_ids: list[int]) -> SharedPrefixKV:
        """Run a token prefix once (batch 1) and keep its keys/values (for KVCache.set_prefix)."""
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.inv_freq.device)  # (1, P)
        prefix = SharedPrefixKV()
        P = ids.shape[1]
        causal = padded_causal_mask(torch.ones(1, P, dtype=torch.bool, device=ids.device))
        self.decoder(ids, torch.arange(P, device=ids.device)[None], causal, prefix)
        return prefix


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

"""How much memory does fine-tuning a 7B model take? An analytic table, checked on a GPU where there is one.

    python bench/memory.py                       # Llama-2-7B shapes, 8 GPUs, micro-batch 4 x 4096 tokens
    python bench/memory.py --gpus 1 --tokens 8192

What this trainer holds per GPU (P = all parameters, p = adapter parameters, N = GPUs):

    setting                               weights          grads   AdamW m, v   compute-dtype copy
    full, replicas (fp32 + bf16 autocast)  4 P             4 P     8 P          2 P (autocast's cached casts)
    full, --fsdp (FSDP2 mixed precision)   4 P / N         4 P / N 8 P / N      2 x (2 layers + root) gathered
    LoRA, bf16 base + fp32 adapters        2 P + 4 p       4 p     8 p          -

Replicas: autocast caches the bf16 cast of every float32 weight for the whole forward
(2 bytes per parameter, 12.6 GiB at 7B). Under --fsdp the weights are all-gathered in
bf16 one decoder layer at a time (the next one prefetched), and the root (embeddings,
final norm, LM head) for the whole step; gradients are reduce-scattered in float32
after every micro-batch, so no rank holds the whole model's gradients.

Activations kept for backward, per token and decoder layer, in bf16 (2 bytes/element),
counting the tensors a Llama layer saves (attention by a fused SDPA kernel: no T x T
scores kept):

    norm inputs/outputs 4d, q k v (d + 2 d_kv), rotated q k (d + d_kv), attention out d, o_proj out d
    MLP: gate, up, silu(gate), silu(gate)*up  4f                    ~ (8 d + 3 d_kv + 4 f) x 2 bytes

With activation checkpointing (--gradient-checkpointing) a layer keeps only its input
(d x 2 bytes) and one layer's activations are rebuilt at a time. The LM head runs at the
scored positions only, in checkpointed chunks of 256 rows (eto_ref/model.py head_logprobs):
a few chunks of 256 x V float32 values at a time, not V x 8 bytes per token.
Attention with a boolean mask (on CPU, or on CUDA for left-padded rows) runs SDPA's math
kernel, which holds heads x T x T scores of one layer at a time; on CUDA right-padded
training rows use a causal bias instead, and FlashAttention holds none.
These are estimates (allocator slack, kernels' workspaces and the CUDA context, ~1-2 GB, not counted).
Where CUDA is available the script also measures the peak allocated memory of one
training step of a smaller model and prints it beside the formula.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

GB = 1024 ** 3


@dataclass
class Shape:
    """The numbers that set the memory of a Llama-style decoder."""

    vocab: int = 32000
    d: int = 4096  # hidden size
    f: int = 11008  # MLP intermediate size
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    tied: bool = False

    @property
    def d_kv(self) -> int:
        return self.d // self.heads * self.kv_heads

    def parameters(self) -> int:
        attn = 2 * self.d * self.d + 2 * self.d * self.d_kv  # q, o: d x d; k, v: d x d_kv
        layer = attn + 3 * self.d * self.f + 2 * self.d  # + MLP + two RMSNorm weights
        head = 0 if self.tied else self.vocab * self.d
        return self.vocab * self.d + self.layers * layer + self.d + head

    def lora_parameters(self, rank: int = 16, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
        """A (r x in) + B (out x r) per targeted projection per layer."""
        shape = {"q_proj": (self.d, self.d), "k_proj": (self.d, self.d_kv), "v_proj": (self.d, self.d_kv),
                 "o_proj": (self.d, self.d), "gate_proj": (self.d, self.f), "up_proj": (self.d, self.f),
                 "down_proj": (self.f, self.d)}
        return self.layers * sum(rank * (shape[t][0] + shape[t][1]) for t in targets)

    def layer_parameters(self) -> int:
        return 2 * self.d * self.d + 2 * self.d * self.d_kv + 3 * self.d * self.f + 2 * self.d

    def activation_bytes_per_token(self, checkpointing: bool) -> int:
        """Saved activations of the whole model for one token (bf16)."""
        layer = (8 * self.d + 3 * self.d_kv + 4 * self.f) * 2
        if checkpointing:
            return self.layers * self.d * 2 + layer  # layer inputs + one layer rebuilt at a time
        return self.layers * layer

    def head_bytes(self, chunk: int = 256, chunks: int = 2) -> int:
        """The LM head's float32 logits and log-softmax of the chunks in flight (head_logprobs)."""
        return chunks * chunk * self.vocab * 8

    def math_attention_bytes(self, tokens_per_row: int, rows: int) -> int:
        """SDPA's math kernel (a boolean mask): one layer's bf16 scores and probabilities for every head."""
        return rows * self.heads * tokens_per_row ** 2 * 2 * 2


LLAMA2_7B = Shape()

SETTINGS = ("full, replicas (fp32 + bf16 autocast)", "full, --fsdp (FSDP2 mixed precision)",
            "LoRA, bf16 base + fp32 adapters")


def static_bytes(shape: Shape, setting: str, gpus: int, lora_rank: int = 16) -> dict[str, float]:
    """Weights, grads, optimizer states and the compute-dtype copy held by one GPU, in bytes."""
    P = shape.parameters()
    if setting.startswith("LoRA"):
        p = shape.lora_parameters(lora_rank)
        return {"weights": 2 * P + 4 * p, "grads": 4 * p, "optimizer": 8 * p, "copy": 0}
    if setting.startswith("full, replicas"):
        return {"weights": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "copy": 2 * P}
    root = P - shape.layers * shape.layer_parameters()  # embeddings, final norm, LM head
    return {"weights": 4 * P / gpus, "grads": 4 * P / gpus, "optimizer": 8 * P / gpus,
            "copy": 2 * (2 * shape.layer_parameters() + root)}


def table(shape: Shape, gpus: int, tokens: int, lora_rank: int) -> str:
    """Per-GPU memory (GiB) over `gpus` GPUs, a micro-batch of `tokens` tokens per GPU."""
    transient = shape.head_bytes() / GB
    act = {c: shape.activation_bytes_per_token(c) * tokens / GB + transient for c in (False, True)}
    rows = [f"Llama-2-7B shapes: {shape.parameters() / 1e9:.2f} B parameters, LoRA r={lora_rank} on q,k,v,o: "
            f"{shape.lora_parameters(lora_rank) / 1e6:.1f} M; {gpus} GPU(s); {tokens} tokens per "
            "micro-batch per GPU. GiB per GPU:",
            "",
            "| setting | weights | grads | AdamW | compute-dtype copy | static total | + activations "
            "| + activations (checkpointing) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        s = {k: v / GB for k, v in static_bytes(shape, setting, gpus, lora_rank).items()}
        total = sum(s.values())
        rows.append(f"| {setting} | {s['weights']:.1f} | {s['grads']:.2f} | {s['optimizer']:.2f} | {s['copy']:.2f} | "
                    f"{total:.1f} | {total + act[False]:.1f} | {total + act[True]:.1f} |")
    rows.append("")
    rows.append(f"activations per token: {shape.activation_bytes_per_token(False) / 2**20:.2f} MiB without, "
                f"{shape.activation_bytes_per_token(True) / 2**20:.2f} MiB with activation checkpointing; "
                f"the LM head's chunks in flight: {transient:.2f} GiB")
    per_row = 4096
    rows.append(f"with a boolean mask (SDPA's math kernel), one layer's attention scores at {tokens // per_row} x "
                f"{per_row} tokens: {shape.math_attention_bytes(per_row, max(1, tokens // per_row)) / GB:.1f} GiB "
                "more (on CUDA right-padded rows take a causal bias and FlashAttention instead)")
    return "\n".join(rows)


def kv_cache_bytes(shape: Shape, rows: int, slots: int) -> int:
    """The exploration KV cache (eto_ref/kv_cache.py): keys and values of every layer, bf16, rows x slots."""
    return 2 * shape.layers * rows * shape.kv_heads * (shape.d // shape.heads) * slots * 2


def exploration_table(shape: Shape, rows: int, max_len: int) -> str:
    """Per-GPU memory (GiB) of exploration: bf16 weights and the KV cache as its capacity doubles to max_len."""
    weights = 2 * shape.parameters() / GB
    lines = [f"Exploration, one policy copy per GPU in bf16 ({weights:.1f} GiB), {rows} episodes at once. The cache "
             "holds one capacity for every row: the longest conversation sets it (it doubles by need, up to "
             f"max_len = min(--max-len, the model's positions) = {max_len}).", "",
             "| cache capacity (tokens per row) | KV cache | + weights | + one layer's copy while rows are dropped |",
             "|---:|---:|---:|---:|"]
    slots = 256
    while slots <= max_len:
        cache = kv_cache_bytes(shape, rows, slots) / GB
        lines.append(f"| {slots} | {cache:.1f} | {weights + cache:.1f} | {weights + cache * (1 + 1 / shape.layers):.1f} |")
        slots *= 2
    return "\n".join(lines)


def measure_on_cuda(tokens: int = 2048) -> str:
    """Peak allocated memory of one full fine-tuning step (fp32 weights, bf16 autocast, AdamW) vs the formula."""
    from eto_ref.model import ModelConfig, Transformer

    shape = Shape(vocab=32000, d=1024, f=2816, layers=8, heads=16, kv_heads=16)
    lines = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.f,
                                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                        num_key_value_heads=shape.kv_heads)).cuda().train()
        model.gradient_checkpointing = checkpointing
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, shape.vocab, (1, tokens), device="cuda")  # (B, T)
        for _ in range(2):  # the second step has the AdamW states allocated
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids)  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        peak = torch.cuda.max_memory_allocated() / GB
        static = sum(static_bytes(shape, SETTINGS[0], 1).values()) / GB
        act = (shape.activation_bytes_per_token(checkpointing) * tokens + shape.vocab * 8 * tokens) / GB
        lines.append(f"| {shape.parameters() / 1e6:.0f} M params, {tokens} tokens, checkpointing={checkpointing} | "
                     f"{static + act:.2f} | {peak:.2f} |")
        del model, opt, logits, loss
        torch.cuda.empty_cache()
    return "\n".join(["measured on " + torch.cuda.get_device_name(), "",
                      "| model | formula (GiB) | peak allocated (GiB) |", "|---|---:|---:|", *lines])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="FSDP ranks sharing weights, grads, states (default 8)")
    p.add_argument("--tokens", type=int, default=4 * 4096, help="tokens per micro-batch per GPU (default 4x4096)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=16, help="episodes explored at once per GPU (default 16, "
                   "explore.py --batch-size)")
    args = p.parse_args(argv)
    print(table(LLAMA2_7B, args.gpus, args.tokens, args.lora_rank))
    print()
    print(exploration_table(LLAMA2_7B, args.rows, 4096))
    print()
    if torch.cuda.is_available():
        print(measure_on_cuda())
    else:
        print("no CUDA device: the formula is not checked against a measurement here")


if __name__ == "__main__":
    main()

"""Where the time of one SFT step goes, against the floor of its matrix products.

    python bench/train_step.py [--batch 8] [--tokens 640] [--threads 2]

The main job's behavioral cloning runs the built-in tiny model (4 layers, hidden 256,
vocabulary 2048) on batches of 8 science trajectories, padded to about 640 tokens.
This times one optimizer step's forward + backward of that model with the BC loss,
then the same shapes' pieces alone, in the same run:

* matrix products: every Linear's forward product and its two backward products
  (grad of input, grad of weight), lm_head included. This is the floor: no change
  that keeps float32 and the model's shapes can make a step cheaper than these.
* attention: scaled_dot_product_attention forward + backward with the padded
  causal mask, for every layer.

Rows: time per step (best of --repeats), share of the full step, and for the
products their arithmetic rate (GFLOP/s). "rest" is the full step minus both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eto_ref.losses import agent_token_logprobs, bc_loss  # noqa: E402
from eto_ref.model import ModelConfig, Transformer, count_parameters, padded_causal_mask  # noqa: E402
from eto_ref.tiny import TINY  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def full_step(model, ids: torch.Tensor, mask: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask)  # (B, T, V)
        bc_loss(agent_token_logprobs(logits, ids, mask)).backward()
    return step


def matmul_products(model, n_tokens: int):
    """The step's matrix products alone: per Linear, x @ W^T, g @ W and g^T @ x. Returns (fn, flops)."""
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tensors = [(torch.randn(n_tokens, i), torch.randn(o, i), torch.randn(n_tokens, o)) for i, o in shapes]
    flops = sum(3 * 2 * n_tokens * i * o for i, o in shapes)

    def products():
        for x, w, g in tensors:
            x @ w.T  # forward          (N, out)
            g @ w  # grad of the input  (N, in)
            g.T @ x  # grad of the weight (out, in)
    return products, flops


def attention_alone(config: ModelConfig, batch: int, tokens: int, mask: torch.Tensor):
    """SDPA forward + backward for every layer, with the model's mask and grouped-query heads."""
    nh, nkv, hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(batch, nh, tokens, hs, requires_grad=True)  # (B, nh, T, hs)
    k = torch.randn(batch, nkv, tokens, hs, requires_grad=True)  # (B, nkv, T, hs)
    v = torch.randn(batch, nkv, tokens, hs, requires_grad=True)
    attn_mask = padded_causal_mask(mask)[:, None]  # (B, 1, T, T)

    def attention():
        for _ in range(config.num_hidden_layers):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=nkv != nh)
            y.sum().backward()
    return attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (the tiny SFT preset: 8)")
    parser.add_argument("--tokens", type=int, default=640, help="padded length (science trajectories: ~590 mean)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (the built-in tokenizer: 2048)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, **TINY)
    model = Transformer(config)
    B, T = args.batch, args.tokens
    ids = torch.randint(3, args.vocab, (B, T))  # (B, T)
    mask = torch.ones(B, T, dtype=torch.bool)  # (B, T)

    t_step = best_time(full_step(model, ids, mask), args.repeats)
    products, flops = matmul_products(model, B * T)
    t_mm = best_time(products, args.repeats)
    t_attn = best_time(attention_alone(config, B, T, mask), args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU. "
          f"Tiny model {count_parameters(model) / 1e6:.2f}M parameters, batch {B} x {T} tokens, "
          f"forward + backward, best of {args.repeats}.\n")
    print(f"| {'part':<38} | {'ms':>8} | {'share of step':>13} | {'GFLOP/s':>8} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 14}:|{'-' * 9}:|")
    rows = [("full SFT step (model + BC loss)", t_step, ""),
            ("matrix products alone (the floor)", t_mm, f"{flops / t_mm / 1e9:.1f}"),
            ("attention alone (SDPA, padded mask)", t_attn, ""),
            ("rest (norms, RoPE, SwiGLU, loss, ...)", max(t_step - t_mm - t_attn, 0.0), "")]
    for name, t, rate in rows:
        print(f"| {name:<38} | {1000 * t:>8.1f} | {100 * t / t_step:>12.0f}% | {rate:>8} |")
    print(f"\nThe step takes {t_step / t_mm:.2f}x the time of its matrix products alone: with the same "
          f"shapes in float32, no change elsewhere can make it more than {t_step / t_mm:.2f}x faster.")


if __name__ == "__main__":
    main()

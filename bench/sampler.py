"""Speed of the KV-cached sampler: against `transformers` generate, and across agent turns.

    python bench/sampler.py [--quick]

For a tiny (~5M) and a ~50M-parameter Llama config with random weights:

* decode: greedy tokens/s of `eto_ref.sampler.generate` vs `LlamaForCausalLM.generate`
  with the SAME weights (ours saved with `save_model`, loaded by transformers), a
  fixed number of new tokens (no early stop), batch 1 and 16, float32 on CPU.
  Tokens/s = batch * new tokens / wall time of the whole call (prefill included).
* episode: a multi-turn agent episode (prompt, then every turn: generate a reply,
  append an observation) with the cache kept across turns (`Session`) vs what a
  naive agent does: a new cache and a prefill of the whole history every turn.

Both sides of each comparison must produce the same tokens (checked, "same" column).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from eto_ref.checkpoint import save_model  # noqa: E402
from eto_ref.model import ModelConfig, Transformer, count_parameters  # noqa: E402
from eto_ref.sampler import Session, generate  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    "50M": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
}


def best_times(fn_a, fn_b, repeats: int):
    """Best wall times of two functions, timed alternately (a, b, a, b, ...) so that
    a noisy neighbour slows both alike; returns (time_a, time_b, result_a, result_b)."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result_a = fn_a()
        best_a = min(best_a, time.perf_counter() - start)
        start = time.perf_counter()
        result_b = fn_b()
        best_b = min(best_b, time.perf_counter() - start)
    return best_a, best_b, result_a, result_b


@torch.inference_mode()
def matmul_floor(model, repeats: int = 20) -> float:
    """Tokens/s at batch 1 if a decode step cost only its matrix products (every weight read once)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, 1, m.in_features) for m in linears}

    def step():
        for m in linears:
            m(inputs[m.in_features])

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats / (time.perf_counter() - start)


def bench_decode(model, hf, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Greedy tokens/s of our sampler and of transformers' generate on the same prompts."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g)  # (B, T)

    def ours():
        return [o.tokens for o in generate(model, prompts.tolist(), new_tokens)]

    def theirs():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        return out[:, prompt_len:].tolist()

    ours(), theirs()  # warm-up
    t_ours, t_hf, ours_tokens, hf_tokens = best_times(ours, theirs, repeats)
    n = batch * new_tokens
    return {"ours": n / t_ours, "hf": n / t_hf, "same": ours_tokens == hf_tokens}


def bench_episode(model, batch: int, prompt_len: int, turns: int, reply_len: int, obs_len: int,
                  repeats: int) -> dict:
    """Seconds per episode: cache kept across turns vs re-prefilling the whole history each turn."""
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = torch.randint(3, V, (batch, prompt_len), generator=g).tolist()
    observations = [torch.randint(3, V, (batch, obs_len), generator=g).tolist() for _ in range(turns)]
    max_len = prompt_len + turns * (reply_len + obs_len)

    def kept_cache():
        session = Session(model, batch_size=batch, max_len=max_len)
        session.append(prompts)
        replies = []
        for obs in observations:
            replies.append([o.tokens for o in session.generate(reply_len)])
            session.append(obs)
        return replies

    def re_prefill():
        histories, replies = [list(p) for p in prompts], []
        for obs in observations:
            outs = [o.tokens for o in generate(model, histories, reply_len)]
            replies.append(outs)
            histories = [h + r + o for h, r, o in zip(histories, outs, obs)]
        return replies

    t_kept, t_naive, a, b = best_times(kept_cache, re_prefill, repeats)
    return {"kept": t_kept, "naive": t_naive, "same": a == b}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, turns and repeats (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    new_tokens, repeats, turns = (32, 1, 4) if args.quick else (64, 3, 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU. decode: prompt 32, "
          f"{new_tokens} new tokens. episode: prompt 300, {turns} turns x (30 generated + 40 observation "
          f"tokens). Best of {repeats} (episode b=16: 1).\n")
    header = (f"{'config':<6} {'params':>6} | {'measure':<22} | {'ours':>8} {'baseline':>8} {'':<14} "
              f"{'speedup':>7} {'same':>5}")
    print(header)
    print("-" * len(header))
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**kw, max_position_embeddings=4096)).eval()
        params = f"{count_parameters(model) / 1e6:.1f}M"
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # a fixed number of new tokens: no early stop

        def row(measure, ours, base, label, speedup, same):
            print(f"{name:<6} {params:>6} | {measure:<22} | {ours:>8.3g} {base:>8.3g} {label:<14} "
                  f"{speedup:>6.2f}x {str(same):>5}")

        for batch in (1, 16):
            r = bench_decode(model, hf, batch, 32, new_tokens, repeats)
            row(f"decode b={batch} tok/s", r["ours"], r["hf"], "transformers", r["ours"] / r["hf"], r["same"])
        for batch in (1, 16):
            r = bench_episode(model, batch, 300, turns, 30, 40, repeats if batch == 1 else 1)
            row(f"episode b={batch} seconds", r["kept"], r["naive"], "re-prefill", r["naive"] / r["kept"], r["same"])
        print(f"{name:<6} {params:>6} | {'matmul floor b=1 tok/s':<22} | {matmul_floor(model):>8.3g}")
    print("\nspeedup: ours over transformers' generate (decode); kept cache over re-prefilling the history "
          "each turn (episode).\nmatmul floor: tokens/s at batch 1 if a step cost only its weight matrix "
          "products (an upper bound for any sampler in float32).")


if __name__ == "__main__":
    main()

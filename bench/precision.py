"""Float32 against bfloat16 on this CPU, same run: a SmolLM2 training step and an evaluation.

    python bench/precision.py [--threads N] [--policy DIR] [--episodes N] [--repeats R]

`--dtype auto` (eto_ref/runtime.py) picks bfloat16 where the hardware computes it
natively (CUDA; CPUs with AVX512-BF16 or AMX instructions) and float32 elsewhere.
This bench shows what that choice buys on the machine it runs on, against float32
as the baseline, both timed alternately (a, b, a, b, ...), best time kept:

1. Training: one SFT optimizer step (forward, backward, AdamW) on 8 science expert
   trajectories, as the small preset runs it (activation checkpointing, shared
   prefix, LM head at the scored positions): float32, then bfloat16 autocast over
   the same float32 weights and AdamW states (mixed precision), each with freed
   memory returned to the OS as train.py's default `--return-memory` does
   (eto_ref/runtime.py `training_memory`) and with glibc's default heaps
   (`--no-return-memory`). The loss of each. Baseline: float32, memory returned.
2. Evaluation: N science test_seen episodes with the small preset's agent (greedy,
   batch 16, at most 128 new tokens per reply): the policy's weights in float32,
   then cast to bfloat16. The average reward of each, and how many episodes the two
   precisions played identically (greedy decoding follows the argmax, which a
   rounding difference can flip).

The policy is SmolLM2-135M-Instruct by default; pass a trained one (`--policy
runs/main/sft/final`) to see rewards that mean something.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # bench/throughput.py; after the root (bench/envs.py)

import torch  # noqa: E402

import envs  # noqa: E402
from eto_ref.agent import AgentConfig, run_episodes  # noqa: E402
from eto_ref.checkpoint import load_model  # noqa: E402
from eto_ref import runtime  # noqa: E402
from eto_ref.runtime import cpu_has_bf16, set_threads  # noqa: E402
from eto_ref.sampler import SamplingConfig  # noqa: E402
from eto_ref.tokenizer import Tokenizer  # noqa: E402
from throughput import our_step, race, science_batch  # noqa: E402


def in_precision(fn, dtype: torch.dtype, return_memory: bool):
    """fn run under bfloat16 autocast (float32: as it is), with or without freed memory returned to the OS."""
    def run():
        runtime.set_return_memory(return_memory)  # what train.py's --return-memory sets
        with runtime.training_memory(), runtime.autocast(torch.device("cpu"), dtype):
            return fn()
    return run


def bench_training(path: Path, tok: Tokenizer, repeats: int) -> list:
    batch = science_batch(tok, 8)
    tokens = int(batch["attention_mask"].sum())
    model = load_model(path).train()
    model.gradient_checkpointing = True  # as the small preset trains
    step = our_step(model, torch.optim.AdamW(model.parameters(), lr=0.0), batch, True, True)  # lr 0: same step
    cases = {"float32, memory returned": in_precision(step, torch.float32, True),
             "float32, glibc's heaps": in_precision(step, torch.float32, False),
             "bfloat16 autocast, memory returned": in_precision(step, torch.bfloat16, True),
             "bfloat16 autocast, glibc's heaps": in_precision(step, torch.bfloat16, False)}
    results = race(cases, repeats)
    base = results["float32, memory returned"][0]
    print(f"training: one SFT step, 8 science trajectories, {tokens} tokens", flush=True)
    return [(name, f"{tokens / t:.1f} tokens/s", f"loss {loss:.4f}", f"{mem:.0f}", base / t)
            for name, (t, mem, loss) in results.items()]


def bench_evaluation(path: Path, tok: Tokenizer, episodes: int, repeats: int) -> list:
    tasks = envs.make_env("science").task_ids("test_seen")[:episodes]
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=128), batch_size=16, icl=False)
    policies = {"float32": load_model(path).eval(), "bfloat16 weights": load_model(path, dtype=torch.bfloat16).eval()}
    results = race({name: (lambda m=m: run_episodes(m, tok, lambda: envs.make_env("science"), tasks, config))
                    for name, m in policies.items()}, repeats)
    base = results["float32"][0]
    float32_records = [e.record() for e in results["float32"][2]]
    rows = []
    for name, (t, mem, played) in results.items():
        same = sum(e.record() == r for e, r in zip(played, float32_records))
        reward = 100 * sum(e.reward for e in played) / len(played)
        rows.append((name, f"{60 * episodes / t:.2f} episodes/min", f"reward {reward:.1f}, same as float32 "
                     f"{same}/{episodes}", f"{mem:.0f}", base / t))
    turns = sum(e.steps for e in results["float32"][2])
    print(f"evaluation: {episodes} science test_seen episodes, {turns} agent turns in float32, batch 16", flush=True)
    return rows


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}\n")
    print("| precision | speed | result | peak memory above start, MB | speed vs float32 |")
    print("|---|---:|---|---:|---:|")
    for name, rate, result, mem, ratio in rows:
        print(f"| {name} | {rate} | {result} | {mem} | {ratio:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--policy", default="models/smollm2-135m-instruct", help="model directory (Hugging Face format)")
    p.add_argument("--episodes", type=int, default=32, help="evaluation episodes per precision (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats, best kept (default 2)")
    args = p.parse_args(argv)
    path = Path(args.policy)
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path}: no model directory (convert SmolLM2 with `python -m eto_ref.gguf`)")
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, CPU; native bfloat16 (AVX512-BF16 or AMX): "
          f"{'yes, dtype auto is bfloat16' if cpu_has_bf16() else 'no, dtype auto is float32'}; policy {path}",
          flush=True)
    tok = Tokenizer.from_dir(path)
    train_rows = bench_training(path, tok, args.repeats)
    eval_rows = bench_evaluation(path, tok, args.episodes, args.repeats)
    print_table("training step", train_rows)
    print_table("evaluation", eval_rows)
    print(f"\nbfloat16 vs float32: training {train_rows[2][4]:.2f}x (memory returned), "
          f"{train_rows[3][4] / train_rows[1][4]:.2f}x (glibc's heaps); evaluation {eval_rows[1][4]:.2f}x")


if __name__ == "__main__":
    main()

"""The GPU path: bf16 logits agree with float32 ones, and how fast sampling and training run.

    python bench/gpu.py            # needs CUDA; on a CPU-only machine it says so and exits 0

On a random ~50M-parameter Llama config:

* parity: logits of the float32 model on the CPU vs the same weights on CUDA under
  bf16 autocast (the trainer's default there): max |diff|, and how often the argmax
  (greedy token) agrees.
* sampling: greedy tokens/s of `eto_ref.sampler.generate` (KV cache), batch 1 and 16.
* training: tokens/s of a full step (forward, backward, AdamW) under bf16 autocast with
  TF32 matmuls, with and without activation checkpointing, and with torch.compile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from eto_ref.model import ModelConfig, Transformer, count_parameters  # noqa: E402
from eto_ref.sampler import SamplingConfig, generate  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8)


def random_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIG)).eval()


def logits_parity(model: Transformer, T: int = 256) -> str:
    ids = torch.randint(0, CONFIG["vocab_size"], (2, T))  # (B, T)
    with torch.no_grad():
        ref = model(ids)  # (B, T, V) float32 on CPU
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(ids.cuda()).float().cpu()
    model.cpu()
    diff = (out - ref).abs().max().item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return f"logits CPU fp32 vs CUDA bf16: max |diff| {diff:.3g} (logit scale {ref.abs().max():.3g}), " \
           f"argmax agreement {100 * agree:.1f}%"


def sampling_speed(model: Transformer, batch: int, new_tokens: int = 128) -> str:
    """Greedy decoding of a fixed number of tokens (no stop ids given, so no early stop)."""
    prompts = [list(range(1, 65)) for _ in range(batch)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, prompts, SamplingConfig(8))  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, prompts, SamplingConfig(new_tokens))
        torch.cuda.synchronize()
    return f"sampling, batch {batch}: {batch * new_tokens / (time.perf_counter() - t0):.0f} tokens/s"


def training_speed(checkpointing: bool, compile: bool, B: int = 4, T: int = 1024, steps: int = 5) -> str:
    model = random_model().cuda().train()
    model.gradient_checkpointing = checkpointing
    if compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, CONFIG["vocab_size"], (B, T), device="cuda")  # (B, T)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * B * T / (time.perf_counter() - t0)
    return (f"training, checkpointing={checkpointing}, compile={compile}: {rate:.0f} tokens/s, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none here, nothing to measure.")
        return
    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer does on CUDA
    model = random_model()
    print(f"{torch.cuda.get_device_name()}, model {count_parameters(model) / 1e6:.0f} M parameters")
    print(logits_parity(model))
    model = model.cuda()
    for batch in (1, 16):
        print(sampling_speed(model, batch))
    del model
    for checkpointing, compile in ((False, False), (True, False), (False, True)):
        print(training_speed(checkpointing, compile))


if __name__ == "__main__":
    main()

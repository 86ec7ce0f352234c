"""The built-in default model directory goes through the same loading code as a real checkpoint."""

import torch

from eto_ref.checkpoint import load_model
from eto_ref.model import count_parameters
from eto_ref.tiny import create_tiny_model, environment_texts
from eto_ref.tokenizer import Tokenizer


def test_tiny_model_directory_loads_and_scores(tmp_path):
    texts = list(environment_texts(["household"], tasks_per_env=20))
    path = create_tiny_model(tmp_path / "tiny", texts, vocab_size=600)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary directory left behind
    model, tok = load_model(path), Tokenizer.from_dir(path)
    assert tok.template == "chatml" and model.config.vocab_size == tok.vocab_size
    assert 1e6 < count_parameters(model) < 10e6
    ids, _ = tok.render([{"role": "user", "content": texts[1]}], add_generation_prompt=True)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), tok.vocab_size) and torch.isfinite(logits).all()


def test_tiny_model_loads_in_transformers(tmp_path):
    import pytest
    transformers = pytest.importorskip("transformers")
    path = create_tiny_model(tmp_path / "tiny", list(environment_texts(["webshop"], tasks_per_env=10)), vocab_size=500)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = load_model(path)
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() < 1e-4

"""eto_ref/config.py: presets by model name or size, field defaults (the paper values), overrides."""

import json

import pytest

from eto_ref import config
from eto_ref.checkpoint import load_model
from eto_ref.config import DPOConfig, SFTConfig


def test_preset_by_model_name_or_size(tiny_model, tmp_path):
    """tiny: the built-in from-scratch model (or any model this small); small: pretrained models under 1B
    parameters (SmolLM2-135M must not get the 7B recipe); 7b above. Presets hold only overrides."""
    assert config.preset_for(tiny_model) == "tiny"
    assert config.preset_for("smollm2") == "small" and config.preset_for("tiny") == "tiny"
    cfg_json = json.loads((tiny_model / "config.json").read_text())
    assert config.estimate_parameters(cfg_json) == sum(p.numel() for p in load_model(tiny_model).parameters())
    smollm2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "tie_word_embeddings": True}
    llama7b = {**smollm2, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
               "tie_word_embeddings": False}
    for name, c in (("small", smollm2), ("7b", llama7b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(c))
        assert config.preset_for(tmp_path / name) == name
    marked = {**llama7b, config.PRESET_KEY: "tiny"}  # the key eto_ref/tiny.py writes wins over the size
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "config.json").write_text(json.dumps(marked))
    assert config.preset_for(tmp_path / "marked") == "tiny"
    assert SFTConfig().lr == 2e-5 and DPOConfig().lr == 1e-6  # the field defaults are the paper's 7B values
    assert "lr" not in config.preset_values("7b", "sft")  # ... so the 7b preset leaves them
    cfg = DPOConfig.for_model(tiny_model, pairs="p.json", out="runs/x", beta=0.5)
    assert (cfg.lr, cfg.beta, cfg.schedule, cfg.model) == (config.PRESETS["tiny"]["dpo"]["lr"], 0.5, "constant",
                                                           str(tiny_model))
    assert SFTConfig.for_model(tiny_model, preset="7b").lr == 2e-5
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        SFTConfig.for_model(tiny_model, preset="huge")

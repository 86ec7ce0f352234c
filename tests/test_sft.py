"""eto_ref/sft.py: behavioral cloning (paper Eq. 5) runs end to end: data limits, LoRA merged, final/ loads in transformers."""


import pytest
import torch

from eto_ref import run_dir
from eto_ref.checkpoint import load_model
from eto_ref.metrics import read_metrics
from eto_ref.sft import run_sft
from tests.helpers import params_of, sft_config


def test_max_examples_uses_the_first_records(tiny_model, data_files, tmp_path):
    run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=1, max_examples=4))
    start = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert (start["event"], start["examples"], start["total_steps"]) == ("start", 4, 2)


def test_lora_sft_final_is_a_merged_plain_model(tiny_model, data_files, tmp_path):
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, lora_rank=4, lr=1e-2, epochs=1))
    ckpt = run_dir.checkpoint_dirs(tmp_path)[-1]
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    merged = params_of(final)
    assert not any("lora" in k for k in merged)
    base = params_of(tiny_model)
    assert not torch.allclose(merged["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(merged["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])


def test_final_dir_loads_in_transformers(tiny_model, data_files, tmp_path):
    transformers = pytest.importorskip("transformers")
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=1))
    ours = load_model(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)



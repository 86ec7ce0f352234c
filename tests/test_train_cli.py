"""End-to-end smoke test of the training CLI: `train.py --stage sft`, then `--stage eto` on its output.

A tiny hand-made model directory and data (from tests/test_trainer.py), so it runs in
seconds and does not depend on the environments or the default tiny model.
"""

import json
import subprocess
import sys
from pathlib import Path

from eto_ref.checkpoint import load_model
from eto_ref.metrics import read_metrics
from tests.test_trainer import data_files, tiny_model  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[1]


def train(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"train.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def test_help_lists_the_flags():
    out = train("--help").stdout
    for flag in ("--stage", "--model", "--data", "--pairs", "--lr", "--batch-size", "--micro-batch-size",
                 "--lora-rank", "--beta", "--sft-weight", "--iterations", "--eval-fraction", "--save-every",
                 "--keep-checkpoints", "--max-len", "--device", "--dtype", "--preset"):
        assert flag in out, flag
    assert "2e-5" in out and "1e-6" in out  # the 7B defaults are documented


def test_sft_then_eto_end_to_end(tiny_model, data_files, tmp_path):  # noqa: F811
    sft_out, eto_out = tmp_path / "sft", tmp_path / "eto"
    common = ["--max-len", "256", "--batch-size", "2", "--micro-batch-size", "1", "--save-every", "1",
              "--keep-checkpoints", "2", "--device", "cpu", "--no-progress"]
    result = train("--stage", "sft", "--model", str(tiny_model), "--data", data_files["sft"], "--out", str(sft_out),
                   "--epochs", "1", "--eval-fraction", "0.34", "--lr", "3e-3", *common)
    assert "final model:" in result.stdout

    final = sft_out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (final / name).is_file(), name
    load_model(final)
    assert [p.name for p in sorted((sft_out / "checkpoints").iterdir())] == ["step-000001"]  # 4 train / 2 = 2 steps
    ckpt = sft_out / "checkpoints" / "step-000001"
    for name in ("config.json", "model.safetensors", "trainer_state.json", "optimizer.safetensors", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    records = read_metrics(sft_out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert {"epoch", "lr", "loss", "tokens", "grad_norm"} <= steps[0].keys()
    assert any("eval_loss" in r for r in records)

    result = train("--stage", "eto", "--model", str(final), "--pairs", data_files["pairs"], "--out", str(eto_out),
                   "--epochs", "1", "--lr", "1e-3", "--lora-rank", "4", *common)
    assert (eto_out / "final" / "model.safetensors").is_file()
    assert (eto_out / "reference_logps.json").is_file()
    ref = json.loads((eto_out / "reference_logps.json").read_text())
    assert len(ref["logps"]) == 6
    assert (eto_out / "checkpoints" / "step-000002" / "adapter_model.safetensors").is_file()
    steps = [r for r in read_metrics(eto_out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all("margin" in r and "accuracy" in r for r in steps)
    load_model(eto_out / "final")

    # Rerunning a finished run does nothing and returns the same final directory.
    again = train("--stage", "eto", "--model", str(final), "--pairs", data_files["pairs"], "--out", str(eto_out),
                  "--epochs", "1", "--lr", "1e-3", "--lora-rank", "4", *common)
    assert f"final model: {eto_out / 'final'}" in again.stdout


def test_dpo_chosen_nll_weight_comes_from_the_preset_unless_given(tiny_model, data_files):  # noqa: F811
    import train as cli

    def dpo_config(*extra):
        args = cli.parse_args(["--stage", "eto", "--model", str(tiny_model), "--pairs", data_files["pairs"], *extra])
        return cli.build_config(args)[0]

    assert dpo_config().sft_weight == 1.0  # tiny preset
    assert dpo_config("--preset", "7b").sft_weight == 0.0  # the paper's pure DPO objective
    assert dpo_config("--sft-weight", "0").sft_weight == 0.0


def test_stage_all_refuses_per_stage_flags():
    import pytest

    import train as cli

    with pytest.raises(SystemExit, match="--lr: set per stage"):
        cli.main(["--stage", "all", "--lr", "1e-3"])


def test_stage_all_passes_its_flags_to_the_pipeline(monkeypatch):
    """--sft-epochs / --sft-examples / --dpo-epochs reach PipelineConfig; unset, the pipeline's defaults hold."""
    import eto_ref.pipeline as pipeline
    import train as cli

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: seen.append(cfg))
    cli.main(["--stage", "all", "--sft-epochs", "2", "--sft-examples", "16", "--dpo-epochs", "1", "--no-progress"])
    cli.main(["--stage", "all", "--no-progress"])
    assert (seen[0].sft_epochs, seen[0].sft_examples, seen[0].dpo_epochs) == (2, 16, 1)
    assert (seen[1].sft_epochs, seen[1].sft_examples) == (pipeline.PipelineConfig.sft_epochs, 480)
    assert seen[1].dpo_epochs == pipeline.PipelineConfig.dpo_epochs == 3
    assert seen[1].sft_epochs == 6

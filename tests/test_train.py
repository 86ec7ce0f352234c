"""train.py: `--stage sft`, then `--stage eto` on its output, end to end; the flags of each stage; settings out
of range. A tiny hand-made model directory and data (tests/helpers.py), so it runs in seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eto_ref import config
from eto_ref.checkpoint import load_model
from eto_ref.metrics import read_metrics
from tests.helpers import tiny_model  # noqa: F401  (pytest fixtures

ROOT = Path(__file__).resolve().parents[1]


def train(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"train.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def test_help_lists_each_stages_flags_with_their_defaults_and_presets():
    out = train("--stage", "sft", "--help").stdout
    for flag in ("--model", "--data", "--lr", "--batch-size", "--micro-batch-size", "--lora-rank", "--eval-fraction",
                 "--save-every", "--keep-checkpoints", "--max-len", "--device", "--dtype", "--preset", "--threads"):
        assert flag in out, flag
    small_lr = config.PRESETS["small"]["sft"]["lr"]
    assert f"default 2e-05; presets: tiny 0.002, small {small_lr}" in " ".join(out.split())  # --lr, one source
    out = " ".join(train("--stage", "eto", "--help").stdout.split())
    for flag in ("--pairs", "--beta", "--sft-weight", "--iterations", "--explore-limit", "--beta-schedule",
                 "--temperature", "--agent-batch-size", "--icl"):
        assert flag in out, flag
    assert "default 1e-06" in out  # the paper's DPO learning rate
    out = " ".join(train("--stage", "all", "--help").stdout.split())
    for flag in ("--sft-lr", "--dpo-lr", "--sft-epochs", "--dpo-epochs", "--lr", "--sft-examples", "--best-of-n",
                 "--seeds", "--report", "--valid"):
        assert flag in out, flag


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
    from eto_ref.config import DPOConfig

    def dpo_config(*extra):
        args = cli.parse_args(["--stage", "eto", "--model", str(tiny_model), "--pairs", data_files["pairs"], *extra])
        return cli.stage_config(DPOConfig, args, cli.model_preset(str(tiny_model), args))

    assert dpo_config().sft_weight == 1.0  # tiny preset
    assert dpo_config("--preset", "7b").sft_weight == 0.0  # the paper's pure DPO objective
    assert dpo_config("--sft-weight", "0").sft_weight == 0.0


def test_stage_all_flags_reach_the_nested_configs(monkeypatch, tiny_model):  # noqa: F811
    """Unprefixed stage flags set both stages, --sft-X / --dpo-X one of them (and win); job, loop and agent
    flags reach their configs; unset values come from the model's preset."""
    import train as cli
    from eto_ref.config import PRESETS

    seen = []
    monkeypatch.setattr(cli, "run_pipeline", lambda cfg: seen.append(cfg))
    cli.main(["--stage", "all", "--model", str(tiny_model), "--lr", "1e-3", "--sft-lr", "2e-3", "--epochs", "2",
              "--dpo-beta", "0.3", "--sft-examples", "16", "--iterations", "2", "--temperature", "0.5",
              "--agent-batch-size", "3", "--no-progress", "--no-baselines", "--rejected-extra-turns", "3"])
    cli.main(["--stage", "all", "--model", str(tiny_model), "--no-progress"])
    cli.main(["--stage", "all", "--model", str(tiny_model), "--no-progress", "--rejected-extra-turns", "none"])
    given, default, whole = seen
    assert (given.loop.rejected_extra_turns, default.loop.rejected_extra_turns, whole.loop.rejected_extra_turns) \
        == (3, "auto", None)
    assert (given.sft.lr, given.dpo.lr, given.sft.epochs, given.dpo.epochs) == (2e-3, 1e-3, 2, 2)
    assert (given.dpo.beta, given.sft_examples, given.loop.iterations, given.baselines) == (0.3, 16, 2, False)
    assert (given.loop.agent.sampling.temperature, given.loop.agent.batch_size) == (0.5, 3)
    assert given.sft.progress is False and given.dpo.progress is False
    tiny = PRESETS["tiny"]
    assert (default.sft.lr, default.sft.epochs, default.dpo.lr) == (tiny["sft"]["lr"], tiny["sft"]["epochs"],
                                                                     tiny["dpo"]["lr"])
    assert default.loop.explore_limit == tiny["loop"]["explore_limit"] and default.loop.agent.icl is False
    assert default.sft_examples == 480 and default.dpo.epochs == 3


@pytest.mark.parametrize("flags, message", [
    (["--stage", "sft", "--batch-size", "-4"], "--batch-size: must be >= 1, got -4"),
    (["--stage", "sft", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--stage", "sft", "--max-len", "-5"], "--max-len: must be >= 1, got -5"),
    (["--stage", "eto", "--beta", "-0.5"], "--beta: must be > 0, got -0.5"),
    (["--stage", "sft", "--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["--stage", "sft", "--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--stage", "sft", "--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--stage", "sft", "--max-steps", "many"], "--max-steps: expected a whole number or none, got 'many'"),
    (["--stage", "all", "--explore-limit", "0"], "--explore-limit: must be >= 1, got 0"),
    (["--stage", "all", "--agent-batch-size", "0"], "--agent-batch-size: must be >= 1, got 0"),
    (["--stage", "sft", "--warmup-ratio", "1.5"], "--warmup-ratio: must be >= 0 and <= 1, got 1.5"),
    (["--stage", "all", "--rejected-extra-turns", "-1"], "--rejected-extra-turns: must be >= 0, got -1"),
    (["--stage", "eto", "--rejected-extra-turns", "five"],
     "--rejected-extra-turns: expected a whole number, none or auto, got 'five'"),
])
def test_out_of_range_settings_are_one_line_errors(flags, message):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_every_numeric_setting_declares_its_range():
    """Range checks live on the field (eto_ref/config.py `setting`): no number is parsed unchecked."""
    from dataclasses import fields

    from eto_ref.agent import AgentConfig
    from eto_ref.config import DPOConfig, SFTConfig
    from eto_ref.eto import LoopConfig
    from eto_ref.exploration import ExploreConfig
    from eto_ref.pipeline import PipelineConfig
    from eto_ref.sampler import SamplingConfig

    unchecked = [f"{cls.__name__}.{f.name}"
                 for cls in (SFTConfig, DPOConfig, LoopConfig, AgentConfig, SamplingConfig, PipelineConfig, ExploreConfig)
                 for f in fields(cls) if f.type.split(" |")[0] in ("int", "float")
                 and f.metadata.get("low") is None and f.metadata.get("high") is None]
    assert unchecked == []

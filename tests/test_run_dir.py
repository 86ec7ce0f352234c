"""eto_ref/run_dir.py: checkpoints, exact resume, fallbacks from damaged checkpoints, finished runs.

A real kill: SFT and DPO run in a subprocess, which gets SIGKILL after its first
checkpoint is on disk (wherever it is then: mid-step or mid-write). Rerunning the
same config resumes from the last complete checkpoint (taking over the dead
process's lock) and ends with the weights of an uninterrupted run with the same seed.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eto_ref import run_dir
from eto_ref.checkpoint import load_model
from eto_ref.dpo import run_dpo
from eto_ref.metrics import read_metrics
from eto_ref.sft import run_sft
from tests.helpers import (
    Interrupt,
    assert_same_params,
    dpo_config,
    interrupt_at,
    params_of,
    sft_config,
)


@pytest.mark.parametrize("stage, lora", [("sft", 0), ("dpo", 4)])
def test_resume_ends_with_the_same_parameters(tiny_model, data_files, tmp_path, stage, lora):
    run, make = (run_sft, sft_config) if stage == "sft" else (run_dpo, dpo_config)
    kw = dict(epochs=2, save_every=2, lora_rank=lora, lora_dropout=0.1)
    straight = run(make(tiny_model, data_files, tmp_path / "straight", **kw))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run(make(tiny_model, data_files, interrupted, **kw), callback=interrupt_at(3))
    assert [p.name for p in run_dir.checkpoint_dirs(interrupted)] == ["step-000002"]
    resumed = run(make(tiny_model, data_files, interrupted, **kw))
    assert_same_params(params_of(resumed), params_of(straight))
    records = [r for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # step 3 logged once


def test_resume_refuses_other_settings(tiny_model, data_files, tmp_path):
    with pytest.raises(Interrupt):
        run_sft(sft_config(tiny_model, data_files, tmp_path, save_every=1), callback=interrupt_at(1))
    with pytest.raises(ValueError, match="other settings"):
        run_sft(sft_config(tiny_model, data_files, tmp_path, save_every=1, lr=1e-4))


def test_resume_refuses_to_continue_in_another_compute_dtype(tiny_model, data_files, tmp_path, monkeypatch):
    """`--dtype auto` resolves per machine: a run trained so far in float32 is not continued in bfloat16
    (a resume on a machine with bfloat16 instructions); with the dtype named it continues exactly."""
    from eto_ref import runtime

    straight = run_sft(sft_config(tiny_model, data_files, tmp_path / "straight", epochs=2, save_every=2))
    cfg = sft_config(tiny_model, data_files, tmp_path / "run", epochs=2, save_every=2)  # dtype="float32"
    with pytest.raises(Interrupt):
        run_sft(cfg, callback=interrupt_at(3))
    ckpt = run_dir.checkpoint_dirs(cfg.out)[-1]
    assert json.loads((Path(cfg.out) / "run.json").read_text())["identity"]["compute_dtype"] == "float32"

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)  # auto now means bfloat16
    for dtype in ("auto", "bfloat16"):
        with pytest.raises(run_dir.RunError, match=r"compute_dtype: 'float32' then, 'bfloat16' now"):
            run_sft(dataclasses.replace(cfg, dtype=dtype))
    assert run_dir.checkpoint_dirs(cfg.out)[-1] == ckpt  # nothing was trained or removed
    assert_same_params(params_of(run_sft(cfg)), params_of(straight))  # float32 named: continues exactly


def test_checkpoints_hold_no_pickle_and_final_loads(tiny_model, data_files, tmp_path):
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=3, save_every=1, keep_checkpoints=2,
                               eval_fraction=0.34))
    ckpts = run_dir.checkpoint_dirs(tmp_path)
    assert [p.name for p in ckpts] == ["step-000004", "step-000005"]  # 4 train examples / 2 = 2 steps x 3 epochs
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".jsonl", ".safetensors"), f"unexpected file {path}"
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["config"]["lr"] == 3e-3
    from safetensors import safe_open
    with safe_open(str(ckpts[-1] / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight.exp_avg" in keys and "lm_head.weight.exp_avg_sq" in keys
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    load_model(final)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sum("loss" in r for r in records) == 6
    assert records[-2].get("eval_loss", 0) > 0  # evaluation at the end
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp dirs left behind


ROOT = Path(__file__).resolve().parents[1]


# The child trains with the parent's thread count (same float reductions), slowly enough to be killed mid-run.
CHILD = """
import json, sys, time, torch
from eto_ref.config import DPOConfig, SFTConfig
from eto_ref.dpo import run_dpo
from eto_ref.sft import run_sft
stage, config, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
run, Config = (run_sft, SFTConfig) if stage == "sft" else (run_dpo, DPOConfig)
run(Config(**config), callback=lambda step, metrics: time.sleep(0.3))
"""


def train_until_killed(stage: str, cfg) -> str:
    """Run `cfg` in a subprocess; SIGKILL it as soon as its first checkpoint exists. Returns its stderr."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, stage, json.dumps(dataclasses.asdict(cfg)),
                              str(torch.get_num_threads())], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not run_dir.checkpoint_dirs(cfg.out):
            if child.poll() is not None:
                pytest.fail(f"the training subprocess ended before its first checkpoint:\n{child.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 120 s")
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    return child.stderr.read().decode()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_killed_run_resumes_from_the_last_checkpoint_to_the_same_weights(stage, tiny_model, data_files, tmp_path):
    run, make = (run_sft, sft_config) if stage == "sft" else (run_dpo, dpo_config)
    kw = dict(epochs=2, save_every=2, seed=3)  # 6 examples / batch 2 = 3 steps per epoch, 6 steps
    straight = run(make(tiny_model, data_files, tmp_path / "straight", **kw))

    cfg = make(tiny_model, data_files, tmp_path / "killed", **kw)
    train_until_killed(stage, cfg)
    out = Path(cfg.out)
    assert not (out / "final").exists()
    survivors = run_dir.checkpoint_dirs(out)
    assert survivors and all((c / "model.safetensors").is_file() for c in survivors)

    resumed = run(cfg)  # the same config again
    records = read_metrics(out / "metrics.jsonl")
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == str(survivors[-1])
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7))  # each step logged once: the killed one is redone, none repeated
    assert_same_params(params_of(resumed), params_of(straight), atol=1e-6)


def test_half_written_checkpoints_are_never_picked_up_on_resume(tiny_model, data_files, tmp_path):
    """What a kill in the middle of save_checkpoint leaves behind is ignored; the last complete one is used."""
    kw = dict(epochs=2, save_every=2)
    straight = run_sft(sft_config(tiny_model, data_files, tmp_path / "straight", **kw))
    cfg = sft_config(tiny_model, data_files, tmp_path / "run", **kw)
    with pytest.raises(Interrupt):
        run_sft(cfg, callback=interrupt_at(3))
    root = Path(cfg.out) / "checkpoints"
    complete = root / "step-000002"
    torch_bytes = (complete / "model.safetensors").read_bytes()
    # A kill while writing step 4: its temp dir holds a torn weight file and no trainer_state.json.
    (root / ".step-000004.tmp").mkdir()
    (root / ".step-000004.tmp" / "model.safetensors").write_bytes(torch_bytes[: len(torch_bytes) // 3])
    (root / ".step-000004.tmp-x1y2").mkdir()  # save_model's own temp dir
    # A directory with a step name but without trainer_state.json (written by something else) is not complete.
    (root / "step-000005").mkdir()
    (root / "step-000005" / "model.safetensors").write_bytes(b"garbage")
    assert run_dir.checkpoint_dirs(cfg.out) == [complete]
    assert run_dir.find_resume_checkpoint(cfg) == complete

    resumed = run_sft(cfg)
    assert_same_params(params_of(resumed), params_of(straight))
    assert [p.name for p in run_dir.checkpoint_dirs(cfg.out)] == ["step-000002", "step-000004"]


def test_a_failing_checkpoint_write_leaves_no_directory_and_keeps_the_previous_one(
        tiny_model, data_files, tmp_path, monkeypatch):
    """Checkpoints are written to a temp dir and renamed: a write that fails halfway never shows up."""
    cfg = sft_config(tiny_model, data_files, tmp_path, epochs=2, save_every=2)
    real = run_dir.save_optimizer_state
    calls = []

    def disk_full_on_the_second_save(*args):
        calls.append(1)
        if len(calls) == 2:  # the model files of step 4 are written by now
            raise OSError("No space left on device")
        return real(*args)

    monkeypatch.setattr(run_dir, "save_optimizer_state", disk_full_on_the_second_save)
    with pytest.raises(OSError, match="No space left"):
        run_sft(cfg)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no step-000004, no temp dir
    assert json.loads((root / "step-000002" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("damage", ["truncated trainer_state.json", "truncated optimizer.safetensors",
                                    "NaN weights"])
def test_resume_falls_back_from_a_damaged_checkpoint_to_the_one_before(damage, tiny_model, data_files, tmp_path,
                                                                      caplog):
    straight = run_sft(sft_config(tiny_model, data_files, tmp_path / "straight", epochs=2, save_every=2))
    cfg = sft_config(tiny_model, data_files, tmp_path / "run", epochs=2, save_every=2, keep_checkpoints=3)
    with pytest.raises(Interrupt):
        run_sft(cfg, callback=interrupt_at(5))
    newest = run_dir.checkpoint_dirs(cfg.out)[-1]
    assert newest.name == "step-000004"
    if damage == "NaN weights":
        from safetensors.torch import load_file, save_file

        tensors = load_file(newest / "model.safetensors")
        tensors[next(iter(tensors))][0] = float("nan")
        save_file(tensors, str(newest / "model.safetensors"))
    else:
        target = newest / damage.split()[1]
        target.write_bytes(target.read_bytes()[: 20])
    with caplog.at_level("WARNING", logger="eto_ref.run_dir"):
        assert run_dir.find_resume_checkpoint(cfg).name == "step-000002"
    assert any("step-000004: not resumable" in r.getMessage() and "falling back" in r.getMessage()
               for r in caplog.records)
    assert_same_params(params_of(run_sft(cfg)), params_of(straight))  # replays steps 3-4: the same weights


def test_a_truncated_final_state_is_an_error_naming_the_file(tiny_model, data_files, tmp_path):
    cfg = sft_config(tiny_model, data_files, tmp_path, epochs=1)
    run_sft(cfg)
    state = tmp_path / "final" / "trainer_state.json"
    state.write_text(state.read_text()[:30])
    with pytest.raises(run_dir.RunError, match=f"{state}: cannot read .*is it truncated"):
        run_sft(cfg)


def test_only_rank_0_copies_the_optimizer_moments_to_the_cpu(monkeypatch):
    """Rank 0 alone writes checkpoints, so the other ranks keep no host copy of the AdamW moments."""
    from eto_ref import run_dir

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    named = list(layer.named_parameters())
    tensors, steps = run_dir.optimizer_moments(optimizer, named)
    assert sorted(tensors) == ["bias.exp_avg", "bias.exp_avg_sq", "weight.exp_avg", "weight.exp_avg_sq"]
    torch.testing.assert_close(tensors["weight.exp_avg"], optimizer.state[layer.weight]["exp_avg"])
    monkeypatch.setattr(run_dir, "is_main", lambda: False)
    assert run_dir.optimizer_moments(optimizer, named) == ({}, steps)

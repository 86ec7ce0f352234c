"""eto_ref/runtime.py: glibc gives memory back to the OS once torch frees it; the compute dtype."""

import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eto_ref import runtime

ROOT = Path(__file__).resolve().parents[1]

# freed_mb(): frees a 16 MB tensor (glibc's default then serves blocks up to 16 MB from its
# heaps), allocates 21 blocks of 8 MB, frees every other one (80 MB, none at the heap's end)
# and returns how many MB of resident memory that gave back.
FRAGMENTING_PROGRAM = """
import sys
import torch
from eto_ref import runtime

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def freed_mb():
    del_me = torch.ones(4 * 2**20)  # 16 MB
    del del_me
    blocks = [torch.ones(2 * 2**20) for _ in range(21)]  # 8 MB each, every page touched
    before = rss_mb()
    for i in range(0, 20, 2):  # free 10 blocks, each between two that stay
        blocks[i] = None
    return before - rss_mb()

runtime.set_return_memory(True)  # as setup_cpu does under --return-memory
if sys.argv[1] == "on":
    assert runtime.return_freed_memory()
if sys.argv[1] == "training":
    with runtime.training_memory():
        print(freed_mb())
else:
    if sys.argv[1] == "after training":
        with runtime.training_memory():
            pass
    print(freed_mb())
"""


def glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallopt
        return Path("/proc/self/status").is_file()
    except (OSError, AttributeError):
        return False


def freed_mb(setting: str, env: dict | None = None) -> float:
    out = subprocess.run([sys.executable, "-c", FRAGMENTING_PROGRAM, setting], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not glibc(), reason="glibc (Linux) only")
def test_return_freed_memory_gives_freed_blocks_back_to_the_os():
    assert freed_mb("off") < 20  # glibc's default keeps the 80 MB resident: the test can fail
    assert freed_mb("on") > 70


@pytest.mark.skipif(not glibc(), reason="glibc (Linux) only")
def test_training_memory_returns_freed_blocks_inside_only():
    assert freed_mb("training") > 70
    assert freed_mb("after training") < 20  # generation gets glibc's heaps back


@pytest.mark.skipif(not glibc(), reason="glibc (Linux) only")
def test_return_freed_memory_leaves_a_user_setting_alone():
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "33554432"}
    with pytest.raises(subprocess.CalledProcessError):  # return_freed_memory() says it did not apply
        freed_mb("on", env)


def test_command_lines_take_return_memory_on_by_default():
    import argparse

    from eto_ref.runtime import add_threads_flag

    p = argparse.ArgumentParser()
    add_threads_flag(p)
    assert p.parse_args([]).return_memory is True
    assert p.parse_args(["--no-return-memory"]).return_memory is False


@pytest.mark.parametrize("device, native, expected", [
    ("cpu", True, torch.bfloat16),  # AVX512-BF16 or AMX: bfloat16 matmuls run natively
    ("cpu", False, torch.float32),  # emulated bfloat16 would be slower than float32
    ("cuda", True, torch.bfloat16),  # Ampere and later
    ("cuda", False, torch.float32),  # V100, T4: no bfloat16, and float16 training would need loss scaling
])
def test_auto_dtype_is_bfloat16_where_it_is_native(monkeypatch, device, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert runtime.compute_dtype("auto", torch.device(device)) == expected


@pytest.mark.parametrize("name, local_rank, expected", [
    ("auto", "1", "cuda:1"),  # torchrun's rank 1: its own GPU, also before the process group exists
    ("cuda", "3", "cuda:3"),
    ("cuda:0", "3", "cuda:3"),  # under torchrun every rank takes its own GPU, whatever the flag names
    ("auto", None, "cuda"),  # one process
    ("cpu", "1", "cpu"),
])
def test_a_rank_resolves_to_its_own_gpu(monkeypatch, name, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert runtime.resolve_device(name) == torch.device(expected)


def test_threads_default_to_omp_num_threads_where_set(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 for each rank: without --threads a rank keeps to it."""
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.set_threads(None) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runtime.set_threads(None) == runtime.available_cores()
        assert runtime.set_threads(2) == 2
    finally:
        torch.set_num_threads(threads)


def test_training_in_float16_is_refused(tmp_path, capsys):
    """float16 gradients underflow without loss scaling, which the trainer leaves out."""
    import train as cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--stage", "sft", "--dtype", "float16"])
    assert "float16" in capsys.readouterr().err
    from eto_ref.config import SFTConfig
    from eto_ref.trainer import setup_runtime

    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        setup_runtime(SFTConfig(out=str(tmp_path), dtype="float16", device="cpu"))


def test_a_named_dtype_is_used_everywhere_and_an_unknown_one_is_refused(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.compute_dtype("float32", torch.device("cpu")) == torch.float32
    assert runtime.compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; known: auto, float32, bfloat16"):
        runtime.compute_dtype("fp8", torch.device("cpu"))


def test_the_policy_is_loaded_in_the_dtype_asked_for(monkeypatch, tiny_model):
    from eto_ref.exploration import load_policy

    assert next(load_policy(tiny_model, "cpu", "bfloat16")[0].parameters()).dtype == torch.bfloat16
    assert next(load_policy(tiny_model, "cpu")[0].parameters()).dtype == torch.float32  # conftest: no bf16 CPU
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert next(load_policy(tiny_model, "cpu")[0].parameters()).dtype == torch.bfloat16


def run_a_phase_in_a_subprocess(tmp_path, clock_args: str, setup: str = "", seconds_in: float = 0.5):
    """Start a process that runs the phase 'explore' for 60 s; return it `seconds_in` seconds into the phase."""
    clock, started = tmp_path / "phase_seconds.json", tmp_path / "started"
    script = ("import pathlib, time\n"
              "from eto_ref.metrics import PhaseClock\n"
              f"{setup}"
              f"with PhaseClock({str(clock)!r}{clock_args}).phase('explore'):\n"
              f"    pathlib.Path({str(started)!r}).touch()\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(seconds_in)
    return proc, clock


def test_a_terminated_job_still_records_the_time_of_its_phase(tmp_path):
    """`kill` (SIGTERM) ends a command like Ctrl-C: the phase it stopped in adds its time to phase_seconds.json
    (the heartbeat, every 30 s, has not written yet: this is the `finally` block's write)."""
    setup = "from eto_ref.runtime import stop_on_terminate\nstop_on_terminate()\n"
    proc, clock = run_a_phase_in_a_subprocess(tmp_path, clock_args="", setup=setup, seconds_in=0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert json.loads(clock.read_text())["explore"] >= 0.5


def test_a_killed_job_keeps_the_time_of_its_phase_up_to_the_last_heartbeat(tmp_path):
    """SIGKILL runs no `finally`: the heartbeat's last write (every 0.2 s here) is what remains."""
    proc, clock = run_a_phase_in_a_subprocess(tmp_path, clock_args=", heartbeat_s=0.2", seconds_in=1.5)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert json.loads(clock.read_text())["explore"] >= 1.0

"""eto_ref/runtime.py: glibc gives memory back to the OS once torch frees it."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Frees a 16 MB tensor (glibc's default then serves blocks up to 16 MB from its heaps),
# allocates 20 blocks of 8 MB with a small tensor after each (so no block ends the heap),
# frees the blocks and prints how many MB of resident memory that gave back.
FRAGMENTING_PROGRAM = """
import sys
import torch
from eto_ref.runtime import return_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "on":
    assert return_freed_memory()
del_me = torch.ones(4 * 2**20)  # 16 MB
del del_me
blocks, pins = [], []
for _ in range(20):
    blocks.append(torch.ones(2 * 2**20))  # 8 MB, every page touched
    pins.append(torch.ones(2**14))  # 64 KB, from the heap after the block
before = rss_mb()
del blocks
print(before - rss_mb())
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
    assert freed_mb("off") < 40  # glibc's default keeps the 160 MB resident: the test can fail
    assert freed_mb("on") > 140


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

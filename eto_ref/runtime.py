"""Where and how the math runs: device, compute dtype (mixed precision) and CPU threads.

    device = resolve_device("auto")          # cuda if present, else cpu
    dtype = compute_dtype("auto", device)    # bfloat16 on CUDA and on CPUs with bf16 instructions, else float32
    with autocast(device, dtype): ...        # weights stay float32, matmuls run in dtype
    set_threads(None)                        # the cores this process may use
    setup_cpu(args)                          # --threads, and --return-memory for training:
    with training_memory(): ...              #   freed activations go back to the OS (glibc)

Threads matter on a small CPU: torch's default is one thread per core, and two
processes that each take every core run far slower together than one after the
other (a SmolLM2 forward measured 48 ms alone, 1534 ms beside a second such
process). Every command line has `--threads N`; give each process its share.

Precision: training keeps float32 weights and AdamW states and runs its matmuls in
bfloat16 under autocast (mixed precision); the agent's policy is cast to bfloat16.
`auto` chooses that wherever bfloat16 is computed natively: CUDA, and CPUs with
AVX512-BF16 or AMX instructions, where a SmolLM2 SFT step measured 2.5x and an
evaluation 1.7x faster than float32 (bench/precision.py). Elsewhere bfloat16 is emulated,
slower than float32, and `auto` keeps float32. `--dtype float32` forces it anywhere.

Memory matters too: by default glibc serves blocks up to 32 MB from heaps that it
rarely gives back, so a training step's activations, freed and reallocated in a
different order each step, left a SmolLM2 SFT step at 4.9 GB resident against 2.7 GB
with large blocks mapped and unmapped one by one (bench/train_memory.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import threading

import torch


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads for torch's math; returns the number set. None: OMP_NUM_THREADS where set
    (torchrun sets 1 per rank, so N ranks do not each take every core), else available_cores()."""
    n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS") or available_cores())
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 256 * 1024  # training: every block over 256 KB mapped on its own, returned on free
HEAP_CEILING_BYTES = 32 * 2**20  # generation: what glibc's own moving threshold rises to (its maximum)
_return_memory = False  # set_return_memory (by setup_cpu); a library call of fit() keeps glibc's default


def set_return_memory(on: bool) -> None:
    """Whether training_memory() gives freed blocks back to the OS (what --return-memory sets)."""
    global _return_memory
    _return_memory = on


def set_mmap_threshold(threshold: int) -> bool:
    """glibc maps blocks of at least `threshold` bytes on their own and unmaps them on free.

    glibc's default raises that threshold (up to 32 MB) each time such a block is freed,
    after which activations and gradients come from heaps that keep freed space resident.
    Returns whether it applied: not off glibc, nor when the user set MALLOC_MMAP_THRESHOLD_
    (glibc's own environment variable).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not Linux/glibc (macOS, Windows, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


def return_freed_memory() -> bool:
    """From now on, large blocks torch frees go back to the OS at once (see set_mmap_threshold)."""
    return set_mmap_threshold(MMAP_THRESHOLD_BYTES)


@contextlib.contextmanager
def training_memory():
    """Inside (a training run, under --return-memory): freed blocks go back to the OS, which keeps a
    SmolLM2 SFT step at 2.7 GB instead of 4.9 GB for ~30% more time. After: blocks up to 32 MB come
    from glibc's heaps again, which generation prefers (13% faster, 0.2 GB more; docs/throughput.md)."""
    applied = _return_memory and return_freed_memory()
    try:
        yield
    finally:
        if applied:
            set_mmap_threshold(HEAP_CEILING_BYTES)


def thread_count(text: str) -> int:
    """--threads: a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads and --return-memory: how a command line uses the CPU (applied by setup_cpu)."""
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="CPU threads for torch (default: the cores this process may use, "
                             f"here {available_cores()}); give each of several processes its share")
    parser.add_argument("--return-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="while training, glibc gives freed blocks over 256 KB back to the OS: a SmolLM2 "
                             "SFT step peaks at 2.7 GB instead of 4.9 GB but takes ~30%% longer "
                             "(docs/throughput.md)")


def setup_cpu(args: argparse.Namespace) -> int:
    """Apply --threads and --return-memory (for training_memory); returns the thread count."""
    set_return_memory(args.return_memory)
    return set_threads(args.threads)


def stop_on_terminate() -> None:
    """Let SIGTERM (`kill`, a scheduler stopping the job) end the process as Ctrl-C does: by an exception,
    so `finally` blocks still run: a phase's wall time is added to phase_seconds.json, locks are released,
    trajectory files are closed. Without it the process dies at once and the phase's time is lost."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": cuda if present, else cpu. Under torchrun (LOCAL_RANK set) any cuda device is this rank's GPU,
    cuda:LOCAL_RANK, whatever loads first: a policy loaded before the process group exists lands there too."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX tiles), as oneDNN uses them."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `name` names; "auto": bfloat16 on GPUs and CPUs that compute it natively, else float32."""
    if name == "auto":
        native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how run files record a dtype."""
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes: weights stay float32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

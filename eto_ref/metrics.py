"""Measuring a run: a JSONL metrics log (one flushed line per record), a tqdm progress bar, phase times.

`out/metrics.jsonl` holds one JSON object per line, e.g.

    {"stage": "sft", "step": 12, "epoch": 0.4, "lr": 0.001, "loss": 1.83, "tokens": 5210, ...}
    {"stage": "sft", "step": 12, "eval_loss": 1.91, "eval_tokens": 2210, ...}

Each line is flushed and fsynced as it is written (eto_ref/jsonl.py), so a killed run
keeps every record it logged. A resumed run first drops the records of the steps
after its checkpoint (they are about to be redone), so the file reads as one run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from eto_ref.jsonl import JsonlWriter, read_jsonl_records, write_json_atomic


class MetricsLog:
    """Append metric records to a JSONL file.

    resume_step=None starts a fresh file; an int keeps only the records of steps <= it.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, **fields):
        self.path = Path(path)
        self.fields = fields  # added to every record (e.g. stage="sft")
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in read_jsonl_records(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".resume")
            tmp.write_text("".join(_dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._writer = JsonlWriter(self.path)

    def log(self, **record) -> dict:
        record = {**self.fields, **{k: _plain(v) for k, v in record.items()}, "time": round(time.time(), 3)}
        self._writer.write(record)
        return record

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(v):
    """Tensors and numpy scalars -> Python numbers, floats rounded for a readable log."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return read_jsonl_records(path)


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A tqdm bar over optimizer steps: rate (steps/s) and ETA; `show` puts the loss on it."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, smoothing=0.1)


def show(bar: tqdm, **values) -> None:
    """Put the current numbers on the bar, e.g. show(bar, loss=1.23, lr=1e-3)."""
    bar.set_postfix({k: f"{_plain(v):.4g}" if isinstance(_plain(v), float) else v for k, v in values.items()},
                    refresh=False)


@contextmanager
def timed(seconds: dict, name: str):
    """Write the wall time of the block, in seconds, to `seconds[name]`.

    A phase that resumes from disk counts only the work it had left.
    """
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)


class PhaseClock:
    """Wall time per phase of a resumable job, summed over all its invocations, kept in a JSON file.

    A rerun that finds a phase finished adds only the little time it took to see that,
    so the recorded time of each phase stays the time its work took. While a phase runs, a
    background thread rewrites its time every `heartbeat_s` seconds: a process killed without
    warning (SIGKILL, out of memory, a machine taken back) loses at most that much of it.
    SIGTERM and Ctrl-C lose nothing (eto_ref/runtime.py `stop_on_terminate`).
    """

    def __init__(self, path: str | Path, heartbeat_s: float = 30.0):
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self.lock = threading.Lock()  # the heartbeat and the main thread both write the file
        self.seconds: dict[str, float] = read_json_object(self.path)
        # beside it, <name>_peak_rss_mb.json: the most resident memory each phase reached (Linux only)
        self.memory_path = self.path.with_name(self.path.stem.replace("seconds", "peak_rss_mb") + ".json")
        self.peak_rss_mb: dict[str, float] = read_json_object(self.memory_path)

    def record(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] = round(seconds, 1)
            write_json_atomic(self.seconds, self.path)

    def keep_recording(self, name: str, elapsed: Callable[[], float], done: threading.Event) -> None:
        """The heartbeat: record the running phase's time every heartbeat_s seconds until it ends."""
        while not done.wait(self.heartbeat_s):
            self.record(name, elapsed())

    @contextmanager
    def phase(self, name: str):
        start, before = time.perf_counter(), self.seconds.get(name, 0.0)

        def elapsed() -> float:  # this phase's time over all invocations, this one included
            return before + time.perf_counter() - start

        done = threading.Event()
        heartbeat = threading.Thread(target=self.keep_recording, args=(name, elapsed, done), daemon=True)
        fold_peak_into_open_phases()  # the kernel's peak is about to be reset: keep it for the enclosing phases
        reset_peak_rss()
        open_phase_peaks.append(0.0)
        heartbeat.start()
        try:
            yield
        finally:
            done.set()
            heartbeat.join()
            self.record(name, elapsed())
            peak = max(open_phase_peaks.pop(), fold_peak_into_open_phases())
            if peak > 0:
                self.peak_rss_mb[name] = max(peak, self.peak_rss_mb.get(name, 0.0))
                write_json_atomic(self.peak_rss_mb, self.memory_path)


# The peak memory of each phase now running, outermost first. Starting a phase resets the kernel's
# peak, so the peak reached so far is first folded into the phases that contain it.
open_phase_peaks: list[float] = []


def fold_peak_into_open_phases() -> float:
    """Fold the current peak into every open phase's peak; returns it (0 where unknown)."""
    peak = peak_rss_mb() or 0.0
    open_phase_peaks[:] = [max(p, peak) for p in open_phase_peaks]
    return peak


def peak_rss_mb() -> float | None:
    """The most resident memory (MB) this process has held since its start or the last reset (Linux's VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # the kernel reports kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Start a new peak-memory window: writing 5 to clear_refs resets VmHWM to the current RSS (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def read_json_object(path: Path) -> dict:
    """A JSON object file's content ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e}); is it truncated?") from None


def duration(seconds: float) -> str:
    """125.4 -> '2m05s'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


__all__ = ["MetricsLog", "PhaseClock", "peak_rss_mb", "read_metrics", "progress_bar", "show", "timed", "duration",
           "write_json_atomic"]

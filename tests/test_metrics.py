"""The phase clock: seconds summed over resumed invocations, and each phase's own peak memory."""

import json
import mmap
import sys
import time

import pytest

from eto_ref.metrics import PhaseClock, peak_rss_mb

MB = 1024 * 1024


def touch_64_mb() -> None:
    """Make 64 MB resident, then give it back (fresh anonymous pages: no reuse of freed heap)."""
    block = mmap.mmap(-1, 64 * MB)
    for offset in range(0, 64 * MB, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_phase_seconds_add_up_over_invocations(tmp_path):
    path = tmp_path / "phase_seconds.json"
    path.write_text(json.dumps({"sft": 10.0}))  # an earlier, interrupted invocation spent 10 s
    clock = PhaseClock(path)
    with clock.phase("sft"):
        pass
    with clock.phase("explore"):
        pass
    seconds = json.loads(path.read_text())
    assert 10.0 <= seconds["sft"] < 11.0 and 0.0 <= seconds["explore"] < 1.0


def test_a_running_phase_records_its_time_before_it_ends(tmp_path):
    """The heartbeat rewrites the running phase's time, on top of the earlier invocations' 10 s."""
    path = tmp_path / "phase_seconds.json"
    path.write_text(json.dumps({"explore": 10.0}))
    clock = PhaseClock(path, heartbeat_s=0.05)
    with clock.phase("explore"):
        deadline = time.perf_counter() + 30
        while json.loads(path.read_text())["explore"] < 10.2 and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["explore"] >= 10.2  # written while the phase still runs
    assert json.loads(path.read_text())["explore"] >= 10.2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_each_phase_reports_its_own_peak_memory(tmp_path):
    clock = PhaseClock(tmp_path / "phase_seconds.json")
    with clock.phase("big"):
        touch_64_mb()
    with clock.phase("small"):
        pass
    peaks = json.loads((tmp_path / "phase_peak_rss_mb.json").read_text())
    assert peaks["big"] >= peaks["small"] + 50  # the second phase does not inherit the first one's peak
    assert peaks["small"] <= peak_rss_mb() + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_a_phase_keeps_the_peak_of_the_phases_inside_it(tmp_path):
    outer, inner = PhaseClock(tmp_path / "phase_seconds.json"), PhaseClock(tmp_path / "inner_seconds.json")
    with outer.phase("ETO"):
        with inner.phase("dpo"):
            touch_64_mb()
        with inner.phase("eval"):
            pass
    outer_peak = json.loads((tmp_path / "phase_peak_rss_mb.json").read_text())["ETO"]
    inner_peaks = json.loads((tmp_path / "inner_peak_rss_mb.json").read_text())
    assert outer_peak >= inner_peaks["dpo"] >= inner_peaks["eval"] + 50

"""Kill the main job at random moments and rerun it: it must end as an uninterrupted run does, byte for byte.

    python bench/resume_soak.py [--kills 20] [--seed 0] [--threads 2]

The main job on the tiny model at reduced sizes, in float32 (JOB below), runs once
without interruption into one folder. Then the same command runs into a second
folder and is killed with SIGKILL at `--kills` random moments, each time started
again, until it finishes. Both folders are then compared file by file:

    results.json                 the table's numbers and settings (its phase times and folder aside)
    */final/model.safetensors    every trained model (SFT, DPO), by sha256
    */trajectories.jsonl         every exploration and evaluation, episode by episode (by task id:
                                 a resumed run appends its episodes in the order they end)
    */pairs.json                 every set of preference pairs

It prints one row per file and exits with status 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ["train.py", "--stage", "all", "--model", "tiny", "--dtype", "float32", "--sft-examples", "32",
       "--explore-limit", "16", "--eval-limit", "12", "--agent-max-steps", "4", "--max-new-tokens", "32",
       "--sft-save-every", "2", "--dpo-save-every", "1", "--no-progress"]


def start(out: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, *JOB, "--threads", str(threads), "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def run_to_end(out: Path, threads: int) -> float:
    t0 = time.perf_counter()
    if start(out, threads).wait() != 0:
        sys.exit(f"the job into {out} failed; run it by hand: python {' '.join(JOB)} --out {out}")
    return time.perf_counter() - t0


def run_with_kills(out: Path, threads: int, kills: int, longest: float, rng: random.Random) -> list[float]:
    """Start the job, SIGKILL it after a random delay, again and again; then let it finish. Returns the delays."""
    delays = []
    while len(delays) < kills:
        delay = rng.uniform(0.5, longest)
        proc = start(out, threads)
        try:
            proc.wait(timeout=delay)
            break  # it finished before the kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            delays.append(delay)
    run_to_end(out, threads)
    return delays


def without_seconds(d):
    """results.json without its phase times (wall-clock, never the same twice)."""
    if isinstance(d, dict):
        return {k: without_seconds(v) for k, v in d.items() if k != "seconds"}
    return [without_seconds(v) for v in d] if isinstance(d, list) else d


def digest(path: Path, folder: Path) -> str:
    """sha256 of a file. results.json: without its phase times, its own folder's path replaced by OUT."""
    if path.name == "results.json":
        results = without_seconds(json.loads(path.read_text().replace(str(folder), "OUT")))
        return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()[:16]
    if path.suffix == ".jsonl":  # episodes by task id: a resumed run appends them in the order they end
        records = {json.loads(line)["id"]: line for line in path.read_text().splitlines()}
        text = "\n".join(records[k] for k in sorted(records))
        return hashlib.sha256(text.encode()).hexdigest()[:16] + f" ({len(records)} episodes)"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def compared_files(out: Path) -> list[Path]:
    names = ["results.json", *(p.relative_to(out).as_posix() for pattern in
                               ("**/final/model.safetensors", "**/trajectories.jsonl", "**/pairs.json")
                               for p in sorted(out.glob(pattern)))]
    return [Path(n) for n in names]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run may finish (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run (default 2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        straight, killed = Path(tmp) / "straight", Path(tmp) / "killed"
        seconds = run_to_end(straight, args.threads)
        print(f"uninterrupted: {seconds:.0f} s ({args.threads} threads)", flush=True)
        # Each restart loads the model again, so kills within a sixth of the run leave room for all of them.
        delays = run_with_kills(killed, args.threads, args.kills, seconds / 6, random.Random(args.seed))
        print(f"killed {len(delays)} times, after {', '.join(f'{d:.1f}' for d in delays)} s, then finished\n")
        files = compared_files(straight)
        if compared_files(killed) != files:
            print(f"the folders hold other files:\n{files}\n{compared_files(killed)}")
            return 1
        print("| file | uninterrupted | killed and resumed | same |\n|---|---|---|---|")
        differ = 0
        for name in files:
            a, b = digest(straight / name, straight), digest(killed / name, killed)
            differ += a != b
            print(f"| {name} | {a} | {b} | {'yes' if a == b else 'NO'} |")
        print(f"\n{len(files) - differ} of {len(files)} files identical")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and episode statistics of the built-in environments at their default sizes.

    python bench/envs.py [--tasks 1000]

Columns: steps/s replaying the expert's actions (reset + step), steps/s of the random
baseline (its action choice included), the mean expert episode length (agent turns),
the random baseline's mean reward, and expert trajectories written per second.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs import make_env  # noqa: E402


def actions_of(trajectory: dict) -> list[str]:
    return [t["value"].split("\nAction: ", 1)[1] for t in trajectory["conversations"][3::2]]


def bench_env(name: str, n_tasks: int, seed: int = 0) -> dict:
    env = make_env(name, seed=seed)
    task_ids = env.task_ids("train")[:n_tasks]

    start = time.perf_counter()
    plans = [(t, actions_of(env.expert_trajectory(t))) for t in task_ids]
    traj_per_s = len(plans) / (time.perf_counter() - start)

    steps, start = 0, time.perf_counter()
    for task_id, actions in plans:
        env.reset(task_id)
        for action in actions:
            env.step(action)
        steps += len(actions)
    expert_sps = steps / (time.perf_counter() - start)

    rng, rewards, random_steps, start = random.Random(seed), [], 0, time.perf_counter()
    for task_id in task_ids:
        env.reset(task_id)
        done = False
        while not done:
            _, reward, done, _ = env.step(env.random_action(rng))
            random_steps += 1
        rewards.append(reward)
    random_sps = random_steps / (time.perf_counter() - start)

    return {"env": name, "expert steps/s": expert_sps, "random steps/s": random_sps,
            "expert length": steps / len(plans), "random reward": sum(rewards) / len(rewards),
            "trajectories/s": traj_per_s, "max_steps": env.max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="train tasks per environment")
    args = parser.parse_args()
    rows = [bench_env(name, args.tasks) for name in ("webshop", "household", "science")]
    header = f"{'env':<10} {'expert steps/s':>15} {'random steps/s':>15} {'expert length':>14} " \
             f"{'max_steps':>9} {'random reward':>14} {'trajectories/s':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['env']:<10} {r['expert steps/s']:>15,.0f} {r['random steps/s']:>15,.0f} {r['expert length']:>14.2f} "
              f"{r['max_steps']:>9} {r['random reward']:>14.3f} {r['trajectories/s']:>15,.0f}")


if __name__ == "__main__":
    main()

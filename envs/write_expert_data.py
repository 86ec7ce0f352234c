"""Write expert trajectories of an environment split as ETO SFT data (a JSON list).

    python -m envs.write_expert_data --env household --split train --out data/household_sft.json
    python -m envs.write_expert_data --env webshop --split train --limit 500 --out data/webshop_sft.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from envs import ENV_NAMES, SPLITS, make_env


def write_expert_data(env_name: str, split: str, out: str | Path, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Expert trajectories of the first `limit` tasks (all when None) of a split, saved to `out`."""
    env = make_env(env_name, seed=seed)
    task_ids = env.task_ids(split)[:limit]
    data = [env.expert_trajectory(task_id) for task_id in task_ids]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, choices=ENV_NAMES)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--seed", type=int, default=0, help="environment seed (task generation)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks of the split")
    args = parser.parse_args()
    data = write_expert_data(args.env, args.split, args.out, seed=args.seed, limit=args.limit)
    turns = [sum(t["from"] == "gpt" for t in d["conversations"]) - 1 for d in data]
    mean_reward = sum(d["reward"] for d in data) / max(1, len(data))
    print(f"wrote {len(data)} trajectories to {args.out}: mean reward {mean_reward:.3f}, "
          f"mean agent turns {sum(turns) / max(1, len(turns)):.1f}")


if __name__ == "__main__":
    main()

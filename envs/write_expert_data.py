"""Write expert trajectories of an environment split as ETO SFT data (a JSON list, or JSONL for *.jsonl).

    python -m envs.write_expert_data --env household --split train --out data/household_sft.json
    python -m envs.write_expert_data --env webshop --split train --limit 500 --out data/webshop_sft.json
    python -m envs.write_expert_data --env scienceworld            # the real ScienceWorld's gold paths

The built-in environments' experts write ReAct turns with real thoughts. For the real
ScienceWorld the expert is its gold action sequence, each action with a templated
thought (`envs/scienceworld.py` `gold_thought`: "I need to go to the kitchen.", "The
red paint is the object of the task, so I focus on it.", ...), since the package has
no thoughts. Gold paths take seconds each there, so every trajectory is appended to
`<out>.partial.jsonl` as it is made: an interrupted run resumes where it stopped, and
the output file appears (atomically) when all are done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from envs import ENV_NAMES, SPLITS, make_env
from eto_ref.jsonl import JsonlWriter, read_jsonl_records
from eto_ref.trajectory import write_records


def write_expert_data(env_name: str, split: str, out: str | Path, seed: int = 0, limit: int | None = None,
                      task_types: list[str] | None = None, progress: bool = False) -> list[dict]:
    """Expert trajectories of the first `limit` tasks (all when None) of a split, saved to `out`."""
    env = make_env(env_name, seed=seed, **({"task_names": task_types} if task_types else {}))
    task_ids = env.task_ids(split)[:limit]
    out = Path(out)
    partial = out.with_name(out.name + ".partial.jsonl")
    done = {r["id"]: r for r in read_jsonl_records(partial)}
    with JsonlWriter(partial) as writer:
        for task_id in tqdm([t for t in task_ids if t not in done], desc=f"{env_name}/{split} experts",
                            disable=not progress):
            done[task_id] = env.expert_trajectory(task_id)
            writer.write(done[task_id])
    if hasattr(env, "close"):
        env.close()
    data = [done[t] for t in task_ids]
    write_records(data, out)
    partial.unlink()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, choices=ENV_NAMES)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--out", default=None, help="output file (default data/<env>_sft.json)")
    parser.add_argument("--seed", type=int, default=0, help="environment seed (task generation)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks of the split")
    parser.add_argument("--task-types", default=None,
                        help="scienceworld: comma-separated task types (default: the official 24)")
    args = parser.parse_args()
    out = args.out or f"data/{args.env}_sft.json"
    types = [t.strip() for t in args.task_types.split(",")] if args.task_types else None
    data = write_expert_data(args.env, args.split, out, seed=args.seed, limit=args.limit, task_types=types,
                             progress=True)
    turns = [sum(t["from"] == "gpt" for t in d["conversations"]) - 1 for d in data]
    mean_reward = sum(d["reward"] for d in data) / max(1, len(data))
    print(f"wrote {len(data)} trajectories to {out}: mean reward {mean_reward:.3f}, "
          f"mean agent turns {sum(turns) / max(1, len(turns)):.1f}")


if __name__ == "__main__":
    main()

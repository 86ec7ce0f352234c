"""Exploration and evaluation: run the policy on a split's tasks, durably, and summarise.

ETO step 1 (paper Sec. 3.2, Algorithm 1): the current policy explores every
training task once (greedy by default); its trajectories, with their rewards,
are paired with the expert's (`eto_ref.pairs`). Evaluation is the same run on
a test split, summarised as the paper reports it: average reward x 100.

Each finished episode is appended to `trajectories.jsonl` at once (flushed and
fsynced), so an interrupted run resumes where it stopped: finished tasks are
never lost and never repeated.

Under torchrun (N ranks, eto_ref/distributed.py) the tasks still to do are dealt
out over the ranks (task j to rank j % N); rank R appends to its own
`trajectories.rank-R.jsonl`, and after a barrier rank 0 merges every file into
`trajectories.jsonl` in task order and deletes the rank files. A rerun, with any
number of ranks, counts the records of all these files as done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from eto_ref.agent import AgentConfig, parse_action, run_episodes
from eto_ref.distributed import barrier, init_distributed, is_main, rank, shard, world_size
from eto_ref.jsonl import JsonlWriter, read_jsonl_records, write_json_atomic
from eto_ref.pairs import EXTRA_REJECTED_TURNS, build_pairs

TRAJECTORIES = "trajectories.jsonl"
SUMMARY = "summary.json"


@dataclass
class ExploreConfig:
    env: str = "science"
    split: str = "train"
    out_dir: str = "runs/explore"
    limit: int | None = None  # first N tasks of the split (after `start`)
    start: int = 0  # skip the first `start` tasks: e.g. train[1000:1100] as a validation slice never trained on
    env_seed: int = 0
    agent: AgentConfig = field(default_factory=AgentConfig)


def split_slice(task_ids: list[str], start: int = 0, limit: int | None = None) -> list[str]:
    """task_ids[start : start + limit] (all from `start` when limit is None)."""
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError(f"start and limit must be >= 0, got start={start}, limit={limit}")
    if start >= len(task_ids) and task_ids:
        raise ValueError(f"start={start} is past the end of the split ({len(task_ids)} tasks)")
    return task_ids[start:None if limit is None else start + limit]


def rank_files(out_dir: Path) -> list[Path]:
    """The per-rank trajectory files left in `out_dir` (by an unmerged or interrupted distributed run)."""
    return sorted(out_dir.glob("trajectories.rank-*.jsonl"))


def finished_records(out_dir: Path) -> dict[str, dict]:
    """Every finished episode of `out_dir`, by task id: the merged file, then the rank files."""
    done = {}
    for path in [out_dir / TRAJECTORIES, *rank_files(out_dir)]:
        done.update({r["id"]: r for r in read_jsonl_records(path)})
    return done


def merge_rank_files(out_dir: Path, task_ids: list[str]) -> None:
    """Rank 0, after every rank finished: one trajectories.jsonl in task order (records of other
    tasks, from earlier runs, after them), written atomically; then the rank files go."""
    done = finished_records(out_dir)
    order = [t for t in task_ids if t in done] + [t for t in done if t not in set(task_ids)]
    tmp = out_dir / f".{TRAJECTORIES}.merge"
    tmp.unlink(missing_ok=True)
    with JsonlWriter(tmp) as writer:
        for t in order:
            writer.write(done[t])
    tmp.replace(out_dir / TRAJECTORIES)
    for path in rank_files(out_dir):
        path.unlink()


def explore(model, tokenizer, cfg: ExploreConfig, progress: bool = True) -> list[dict]:
    """Run one episode per task of the split (resuming), return all trajectory records in task order.

    Under torchrun every rank runs its share of the tasks and returns all the records.
    """
    from envs import make_env

    init_distributed(next(model.parameters()).device)  # under torchrun: join the ranks (once)
    env = make_env(cfg.env, seed=cfg.env_seed)
    task_ids = split_slice(env.task_ids(cfg.split), cfg.start, cfg.limit)
    out_dir = Path(cfg.out_dir)
    path = out_dir / (TRAJECTORIES if world_size() == 1 else f"trajectories.rank-{rank()}.jsonl")
    done = finished_records(out_dir)
    barrier()  # every rank has read what is done before anyone writes
    todo_all = [t for t in task_ids if t not in done]
    todo = shard(todo_all)  # this rank's tasks: todo_all[rank::N]
    bar = tqdm(total=len(task_ids) - len(todo_all) + len(todo), initial=len(task_ids) - len(todo_all),
               desc=f"{cfg.env}/{cfg.split}", unit="ep", disable=not progress or not is_main(), dynamic_ncols=True)
    with JsonlWriter(path) as writer:
        def finished(episode):
            record = episode.record()
            writer.write(record)
            done[record["id"]] = record
            bar.update(1)
            rewards = [r["reward"] for r in done.values()]
            bar.set_postfix(reward=f"{100 * sum(rewards) / len(rewards):.1f}")

        run_episodes(model, tokenizer, lambda: make_env(cfg.env, seed=cfg.env_seed), todo, cfg.agent,
                     on_episode_end=finished)
    bar.close()
    barrier()  # every rank has finished its tasks
    if is_main() and rank_files(out_dir):
        merge_rank_files(out_dir, task_ids)
    barrier()
    if world_size() > 1:
        done = finished_records(out_dir)
    return [done[t] for t in task_ids if t in done]


def agent_replies(record: dict) -> list[str]:
    """The policy's replies of one episode (the turns after the task; not the "OK" to the instruction)."""
    return [t["value"] for t in record["conversations"][3:] if t["from"] == "gpt"]


def invalid_format_rate(records: list[dict]) -> float:
    """Percent of agent replies with no parsable `Action:` (each got the "Invalid format" observation).

    A policy that has learned the ReAct format keeps this near 0; a jump after
    training means the model was pushed off the format, not just off the task.
    """
    replies = [reply for r in records for reply in agent_replies(r)]
    return 100 * sum(parse_action(reply) is None for reply in replies) / max(len(replies), 1)


def summarize(records: list[dict], env: str, split: str) -> dict:
    """Average reward x100 (the paper's metric), success rate, how episodes ended, malformed replies."""
    n = len(records)
    rewards = [float(r["reward"]) for r in records]
    reasons: dict[str, int] = {}
    for r in records:
        key = str(r.get("reason", "")).split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "env": env, "split": split, "episodes": n,
        "average_reward": 100 * sum(rewards) / max(n, 1),
        "success_rate": 100 * sum(x >= 1.0 for x in rewards) / max(n, 1),
        "mean_steps": sum(r.get("steps", 0) for r in records) / max(n, 1),
        "end_reasons": reasons,
        "invalid_format_rate": invalid_format_rate(records),
    }


def expert_records(env_name: str, task_ids: list[str], env_seed: int = 0) -> list[dict]:
    from envs import make_env

    env = make_env(env_name, seed=env_seed)
    return [env.expert_trajectory(t) for t in task_ids]


def explore_and_pair(model, tokenizer, cfg: ExploreConfig, progress: bool = True,
                     extra_turns: int | None = EXTRA_REJECTED_TURNS) -> tuple[Path, dict]:
    """Explore the train split, pair failures (and wins) with the expert, write `pairs.json`.

    A rerun on a finished directory explores nothing and rebuilds the pairs (e.g. with
    another `extra_turns`: the rejected side is cut to expert length + extra_turns agent turns,
    None keeps it whole).
    """
    from eto_ref.trajectory import load_pairs  # noqa: F401  (the file we write is what load_pairs reads)

    records = explore(model, tokenizer, cfg, progress)
    experts = expert_records(cfg.env, [r["id"] for r in records], cfg.env_seed)
    pairs, stats = build_pairs(experts, records, extra_turns)
    out = Path(cfg.out_dir)
    summary = {**summarize(records, cfg.env, cfg.split), "pairs": len(pairs), **stats.as_dict()}
    if is_main():
        write_json_atomic(pairs, out / "pairs.json", indent=1)
        write_json_atomic(summary, out / SUMMARY)
    barrier()
    return out / "pairs.json", summary


def evaluate(model, tokenizer, cfg: ExploreConfig, progress: bool = True) -> dict:
    records = explore(model, tokenizer, cfg, progress)
    summary = summarize(records, cfg.env, cfg.split)
    if is_main():
        write_json_atomic(summary, Path(cfg.out_dir) / SUMMARY)
    barrier()
    return summary

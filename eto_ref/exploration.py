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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import envs
from eto_ref.agent import AgentConfig, parse_action, run_episodes
from eto_ref.checkpoint import load_model, model_fingerprint
from eto_ref.config import setting
from eto_ref.distributed import barrier, init_distributed, is_main, rank, shard, world_size
from eto_ref.jsonl import JsonlWriter, read_jsonl_records, write_json_atomic
from eto_ref.pairs import AUTO, PROMPT_TURNS, build_pairs, rejected_turns
from eto_ref.run_dir import RunLock, claim_run
from eto_ref.runtime import compute_dtype, dtype_name, resolve_device
from eto_ref.tokenizer import Tokenizer

TRAJECTORIES = "trajectories.jsonl"
SUMMARY = "summary.json"
PAIRS = "pairs.json"


@dataclass
class ExploreConfig:
    """One exploration or evaluation run: the policy on a slice of a split, into `out_dir`."""

    model: str = setting("runs/sft/final", "policy model directory (Hugging Face format)")
    env: str = setting("science", "environment: webshop | household | science | scienceworld")
    split: str = setting("train", "train (explore, then pair with the expert) | test_seen | test_unseen")
    out_dir: str = setting("runs/explore", "output directory: trajectories.jsonl, summary.json (+ pairs.json)")
    limit: int | None = setting(None, "only the first N tasks of the split (after `start`)", low=1)
    start: int = setting(0, "skip the first N tasks: e.g. train[1000:1100] is a validation slice nothing "
                            "trains on", low=0)
    env_seed: int = setting(0, "seed of the environment's task generator (which tasks exist)", low=0)
    forced_steps: int = setting(0, "the step-level contrast: the expert's first N steps are played for the "
                                   "policy, which acts from step N + 1 (0: the paper's trajectory-level runs)",
                                low=0)
    resume: bool = setting(True, "continue the run in out_dir, if it was made with the same settings "
                                 "(False: start over)")
    agent: AgentConfig = field(default_factory=AgentConfig)


def run_identity(cfg: ExploreConfig, dtype: torch.dtype = torch.float32) -> dict:
    """What determines the episodes of a run: a rerun into the same directory must have the same.

    Not in it: the task slice (tasks are recorded by id, so a larger limit extends a run)
    and the batch size (continuous batching gives every episode its one-at-a-time result).
    The policy's dtype is in it: greedy replies differ between precisions.
    """
    agent = asdict(cfg.agent)
    agent.pop("batch_size")
    model = Path(cfg.model)
    fingerprint = model_fingerprint(model) if (model / "config.json").is_file() else None
    identity = {"model": str(cfg.model), "model_fingerprint": fingerprint, "env": cfg.env, "env_seed": cfg.env_seed,
                "split": cfg.split, "forced_steps": cfg.forced_steps, "agent": json.loads(json.dumps(agent)),
                "dtype": dtype_name(dtype)}
    options = envs.env_options(cfg.env, seed=cfg.env_seed)
    if options:  # e.g. the real ScienceWorld's task types
        identity["env_options"] = options
    return identity


def load_policy(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """A policy for exploration and evaluation: (model, tokenizer), its weights in `dtype` (runtime.compute_dtype:
    auto is bfloat16 on CUDA and on CPUs with bfloat16 instructions, else float32)."""
    dev = resolve_device(device)
    return load_model(path, dtype=compute_dtype(dtype, dev), device=dev), Tokenizer.from_dir(path)


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

    The output directory is locked while the run writes there, and remembers the
    settings it was made with (run.json): a rerun with other settings is refused.
    Under torchrun every rank runs its share of the tasks and returns all the records.
    """
    init_distributed(next(model.parameters()).device)  # under torchrun: join the ranks (once)
    with RunLock(cfg.out_dir):
        claim_run(cfg.out_dir, run_identity(cfg, next(model.parameters()).dtype), cfg.resume,
                  outputs=(TRAJECTORIES, SUMMARY, PAIRS))
        return run_tasks(model, tokenizer, cfg, progress)


def run_tasks(model, tokenizer, cfg: ExploreConfig, progress: bool) -> list[dict]:
    """The episodes of the tasks not done yet, each appended to the trajectory file as it ends."""
    with envs.opened(cfg.env, seed=cfg.env_seed) as env:
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

        run_episodes(model, tokenizer, lambda: envs.make_env(cfg.env, seed=cfg.env_seed), todo, cfg.agent,
                     on_episode_end=finished, forced=forced_replies(cfg, todo))
    bar.close()
    barrier()  # every rank has finished its tasks
    if is_main() and rank_files(out_dir):
        merge_rank_files(out_dir, task_ids)
    barrier()
    if world_size() > 1:
        done = finished_records(out_dir)
    return [done[t] for t in task_ids if t in done]


def forced_replies(cfg: ExploreConfig, task_ids: list[str]) -> dict[str, list[str]] | None:
    """The expert's first `cfg.forced_steps` replies of each task (None without teacher forcing)."""
    if not cfg.forced_steps:
        return None
    return {r["id"]: [t["value"] for t in r["conversations"][PROMPT_TURNS:] if t["from"] == "gpt"][: cfg.forced_steps]
            for r in expert_records(cfg.env, task_ids, cfg.env_seed)}


def agent_replies(record: dict) -> list[str]:
    """The policy's replies of one episode (the turns after the task; not the "OK" to the instruction)."""
    return [t["value"] for t in record["conversations"][PROMPT_TURNS:] if t["from"] == "gpt"]


def invalid_format_rate(records: list[dict]) -> float:
    """Percent of agent replies with no parsable `Action:` (each got the "Invalid format" observation).

    A policy that has learned the ReAct format keeps this near 0; a jump after
    training means the model was pushed off the format, not just off the task.
    """
    replies = [reply for r in records for reply in agent_replies(r)]
    return 100 * sum(parse_action(reply) is None for reply in replies) / max(len(replies), 1)


def action_outcomes(record: dict) -> list[tuple[str, str]]:
    """(action, the observation it got) for each parsable reply of one episode."""
    turns = record["conversations"][PROMPT_TURNS:]
    return [(action, turns[i + 1]["value"]) for i, t in enumerate(turns[:-1])
            if t["from"] == "gpt" and (action := parse_action(t["value"])) is not None]


def unmatched_action_rate(records: list[dict], marker: str) -> float:
    """Percent of well-formed actions the environment could not carry out (its reply contains `marker`).

    Where the format is right but the action names an object that is not there, or a
    state the agent never created, the environment answers e.g. "No known action matches
    that input": the policy acts on things it did not read from its observations.
    """
    outcomes = [obs for r in records for _, obs in action_outcomes(r)]
    return 100 * sum(marker in obs for obs in outcomes) / max(len(outcomes), 1) if marker else 0.0


def action_key(action: str) -> str:
    """An action as compared for a repeat: case and surrounding spaces aside."""
    return action.strip().lower()


def repeated_action_rate(records: list[dict]) -> float:
    """Percent of actions identical to the same episode's previous action (a policy stuck in a loop)."""
    actions = [[action_key(a) for a, _ in action_outcomes(r)] for r in records]
    repeats = sum(a == b for acts in actions for a, b in zip(acts[1:], acts))
    return 100 * repeats / max(sum(len(acts) - 1 for acts in actions if acts), 1)


def summarize(records: list[dict], env: str, split: str) -> dict:
    """Average reward x100 (the paper's metric), success rate, how episodes ended, malformed, unmatched and
    repeated actions."""
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
        "unmatched_action_rate": unmatched_action_rate(records, envs.env_class(env).unmatched_action),
        "repeated_action_rate": repeated_action_rate(records),
    }


def expert_records(env_name: str, task_ids: list[str], env_seed: int = 0) -> list[dict]:
    with envs.opened(env_name, seed=env_seed) as env:
        return [env.expert_trajectory(t) for t in task_ids]


def explore_and_pair(model, tokenizer, cfg: ExploreConfig, progress: bool = True,
                     extra_turns: int | str | None = AUTO) -> tuple[Path, dict]:
    """Explore the train split, pair failures (and wins) with the expert, write `pairs.json`.

    The rejected side is cut to expert length + extra_turns agent turns (None keeps it
    whole; AUTO, the default, is the environment's official rule: household, mirroring
    ALFWorld, keeps it whole, the others cut at +5; `pairs.rejected_turns`). A rerun on a
    finished directory explores nothing and rebuilds the pairs, e.g. with another `extra_turns`.
    """
    extra_turns = rejected_turns(extra_turns, envs.env_class(cfg.env).truncate_rejected)
    records = explore(model, tokenizer, cfg, progress)
    experts = expert_records(cfg.env, [r["id"] for r in records], cfg.env_seed)
    pairs, stats = build_pairs(experts, records, extra_turns, cfg.forced_steps)
    out = Path(cfg.out_dir)
    summary = {**summarize(records, cfg.env, cfg.split), "pairs": len(pairs), **stats.as_dict(),
               "rejected_extra_turns": extra_turns}
    if is_main():
        write_json_atomic(pairs, out / PAIRS, indent=1)
        write_json_atomic(summary, out / SUMMARY)
    barrier()
    return out / PAIRS, summary


def evaluate(model, tokenizer, cfg: ExploreConfig, progress: bool = True) -> dict:
    """Run the policy on the split's tasks; write and return the summary (average reward x100, ...)."""
    records = explore(model, tokenizer, cfg, progress)
    summary = summarize(records, cfg.env, cfg.split)
    if is_main():
        write_json_atomic(summary, Path(cfg.out_dir) / SUMMARY)
    barrier()
    return summary

"""The paper's baselines, so the comparison with ETO is the paper's (Song et al. 2024, Sec. 4.2).

RFT (rejection-sampling fine-tuning): the SFT policy explores the training
tasks; its *successful* trajectories are added to the expert trajectories and
the model is fine-tuned on the union with the behavioral-cloning loss (Eq. 5).
It learns from its own successes only, where ETO also learns from failures.

Best-of-N: on each test task the policy runs N episodes sampled at a
temperature, and the task scores the best of the N rewards. It spends N times
the inference of the other rows and peeks at the reward to pick, so it bounds
what sampling alone can reach.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from eto_ref.exploration import ExploreConfig, explore, summarize
from eto_ref.jsonl import write_json_atomic
from eto_ref.pairs import strip_trailing_observation

SUCCESS = 1.0  # a trajectory is "successful" when it reaches full reward


def rft_records(expert: list[dict], explored: list[dict], success: float = SUCCESS) -> list[dict]:
    """Expert trajectories + the explored trajectories whose reward is at least `success`.

    Explored records keep their task id with a suffix, so both versions of a
    solved task stay in the data, and lose the environment's last observation
    (a training sequence ends with the agent's turn).
    """
    kept = [{"id": f"{r['id']}#explored", "conversations": strip_trailing_observation(r["conversations"]),
             "reward": r["reward"]} for r in explored if float(r["reward"]) >= success]
    return [{"id": r["id"], "conversations": r["conversations"], "reward": r.get("reward", 1.0)}
            for r in expert] + kept


def best_of_n_rewards(samples: list[list[dict]]) -> list[dict]:
    """Per task, the sample with the highest reward; `samples[i]` = the i-th run over all tasks.

    Tasks are matched by id; a task missing from some runs takes the best of the runs that have it.
    """
    best: dict[str, dict] = {}
    for run in samples:
        for record in run:
            current = best.get(record["id"])
            if current is None or float(record["reward"]) > float(current["reward"]):
                best[record["id"]] = record
    order = [r["id"] for r in samples[0]] if samples else []
    order += [t for t in best if t not in set(order)]
    return [best[t] for t in order]


def best_of_n(model, tokenizer, cfg: ExploreConfig, n: int, progress: bool = True) -> dict:
    """Run `n` sampled episodes per task of `cfg.split` (seeds seed, seed+1, ...), score the best of each.

    `cfg.agent.sampling.temperature` must be > 0 (greedy samples would all be equal).
    Each run goes to `cfg.out_dir/sample-i/` and resumes like any exploration;
    the summary of the best-of-n records is written to `cfg.out_dir/summary.json`.
    """
    if cfg.agent.sampling.greedy:
        raise ValueError(f"best-of-n needs a sampling temperature > 0, got {cfg.agent.sampling.temperature}")
    seed = cfg.agent.seed or 0
    runs = []
    for i in range(n):
        agent = replace(cfg.agent, seed=seed + 1000 * i)
        runs.append(explore(model, tokenizer, replace(cfg, out_dir=str(Path(cfg.out_dir) / f"sample-{i}"),
                                                      agent=agent), progress))
    summary = {**summarize(best_of_n_rewards(runs), cfg.env, cfg.split), "n": n,
               "temperature": cfg.agent.sampling.temperature,
               "mean_sample_reward": 100 * sum(float(r["reward"]) for run in runs for r in run)
               / max(sum(len(run) for run in runs), 1)}
    write_json_atomic(summary, Path(cfg.out_dir) / "summary.json")
    return summary

"""Online RL: the policy collects episodes, is trained on them with PPO or GRPO, and collects again.

    rows = run_online(LoopConfig(model="runs/main/sft/final", out="runs/ppo-online", iterations=2, explore_limit=192),
                      PPOConfig.for_model("runs/main/sft/final"))

Iteration k spends one ETO iteration's budget of environment episodes, `explore_limit`:

    PPO   pi_{k-1} runs train[:explore_limit] once, greedily, as ETO explores; PPO trains on the episodes
    GRPO  pi_{k-1} runs train[:explore_limit // group_size] group_size times, sampled at the stage's
          group_temperature (seeds seed, seed + 1000, ...); GRPO trains on the groups

then pi_k is evaluated on the loop's evaluation splits with the agent's own sampling (greedy by
default). The KL reference stays pi_0, the policy the loop starts from, as in online PPO (ETO
instead resets its DPO reference every iteration).
Every phase resumes on its own, as in the ETO loop (eto_ref/eto.py):

    OUT/iter-k/explore/ (PPO) or OUT/iter-k/samples/sample-i/ (GRPO)   the episodes collected
    OUT/iter-k/ppo/ or OUT/iter-k/grpo/                                the stage (final/ = pi_k)
    OUT/iter-k/eval-<split>/                                           pi_k's evaluation
    OUT/summary.json                                                   one row per iteration
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from eto_ref.config import GRPOConfig, PPOConfig
from eto_ref.eto import LoopConfig, check_valid_is_held_out, evaluate_policy
from eto_ref.exploration import TRAJECTORIES, ExploreConfig, explore, load_policy
from eto_ref.grpo import run_grpo
from eto_ref.jsonl import write_json_atomic
from eto_ref.metrics import PhaseClock
from eto_ref.ppo import run_ppo


def check_budget(cfg: LoopConfig, stage: PPOConfig | GRPOConfig) -> None:
    if isinstance(stage, GRPOConfig):
        if cfg.explore_limit is None or cfg.explore_limit < 2 * stage.group_size:
            raise ValueError(f"GRPO: explore limit {cfg.explore_limit}: give the episodes per iteration, at least "
                             f"2 groups of {stage.group_size} (--explore-limit)")


def collect(policy: Path, it: Path, cfg: LoopConfig, stage: PPOConfig | GRPOConfig) -> tuple[Path, list[dict]]:
    """The iteration's episodes: (what the stage trains on, the episode records)."""
    model, tokenizer = load_policy(policy, stage.device, stage.dtype)
    run = ExploreConfig(model=str(policy), env=cfg.env, split="train", out_dir=str(it / "explore"),
                        limit=cfg.explore_limit, env_seed=cfg.env_seed, agent=cfg.agent)
    if isinstance(stage, PPOConfig):
        return it / "explore" / TRAJECTORIES, explore(model, tokenizer, run, stage.progress)
    records = []
    sampling = replace(cfg.agent.sampling, temperature=stage.group_temperature)
    for i in range(stage.group_size):
        agent = replace(cfg.agent, sampling=sampling, seed=(cfg.agent.seed or 0) + 1000 * i)
        sample = replace(run, out_dir=str(it / "samples" / f"sample-{i}"), limit=cfg.explore_limit // stage.group_size,
                         agent=agent)
        records += explore(model, tokenizer, sample, stage.progress)
    return it / "samples", records


def run_online(cfg: LoopConfig, stage: PPOConfig | GRPOConfig) -> list[dict]:
    """`cfg.iterations` rounds of collect -> train -> evaluate from cfg.model; `stage` holds the PPO or GRPO
    settings (its model, episodes, out and reference are each iteration's)."""
    check_valid_is_held_out(cfg)
    check_budget(cfg, stage)
    train, episodes = (run_ppo, "trajectories") if isinstance(stage, PPOConfig) else (run_grpo, "samples")
    out, policy, rows = Path(cfg.out), Path(cfg.model), []
    for k in range(1, cfg.iterations + 1):
        it = out / f"iter-{k}"
        clock = PhaseClock(it / "phase_seconds.json")  # summed over interrupted and resumed invocations
        with clock.phase("collect"):
            data, records = collect(policy, it, cfg, stage)
        with clock.phase(stage.STAGE):
            policy = train(replace(stage, model=str(policy), reference=str(cfg.model), out=str(it / stage.STAGE),
                                   **{episodes: str(data)}))
        with clock.phase("evaluate"):
            row = {"iteration": k, "model": str(policy), "episodes": len(records),
                   "train_reward": 100 * sum(float(r["reward"]) for r in records) / len(records),
                   **evaluate_policy(policy, it, cfg, stage.device, stage.progress, stage.dtype)}
        rows.append({**row, "seconds": clock.seconds})
        write_json_atomic(rows, out / "summary.json")
    return rows

"""The ETO loop (paper Algorithm 1): explore -> pair with the expert -> DPO, repeated.

    pi_0 = SFT policy
    for k = 1..N:
        explore the training tasks with pi_{k-1}           (exploration phase)
        pair each failure (or win) with the expert         (eto_ref.pairs)
        pi_ref = pi_{k-1}; train pi_k with DPO on the pairs  (training phase)
        evaluate pi_k on test_seen and test_unseen

Every phase writes into its own folder of the run directory and resumes on
its own (exploration per episode, DPO per checkpoint), so rerunning the same
command after an interruption continues where it stopped:

    OUT/iter-1/explore/   trajectories.jsonl, pairs.json, summary.json
    OUT/iter-1/dpo/       the DPO run (final/ = pi_1)
    OUT/iter-1/eval-test_seen/, eval-test_unseen/   trajectories + summary.json
    OUT/summary.json      one row per iteration (with the seconds each phase took)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eto_ref.agent import AgentConfig
from eto_ref.checkpoint import load_model
from eto_ref.exploration import ExploreConfig, evaluate, explore_and_pair
from eto_ref.jsonl import write_json_atomic
from eto_ref.metrics import timed
from eto_ref.pairs import EXTRA_REJECTED_TURNS
from eto_ref.tokenizer import Tokenizer


@dataclass
class LoopConfig:
    model: str  # the SFT policy pi_0
    out: str = "runs/eto"
    env: str = "science"
    iterations: int = 1
    explore_limit: int | None = None  # training tasks explored per iteration (None: all)
    eval_limit: int | None = None  # tasks per test split (None: all)
    eval_splits: tuple[str, ...] = ("test_seen", "test_unseen")  # may include VALID
    valid_start: int = 1000  # VALID = train[valid_start : valid_start + valid_limit]
    valid_limit: int = 100
    env_seed: int = 0
    rejected_extra_turns: int | None = EXTRA_REJECTED_TURNS  # rejected side: at most expert length + this many
    # agent turns (None: the whole failed run)
    agent: AgentConfig = field(default_factory=AgentConfig)
    device: str = "auto"
    progress: bool = True


VALID = "valid"  # not an environment split: a slice of train that nothing trains on, for choosing settings


def eval_config(cfg: LoopConfig, split: str, out_dir: Path) -> ExploreConfig:
    """The evaluation run of one split; VALID is train[valid_start : valid_start + valid_limit]."""
    if split == VALID:
        return ExploreConfig(env=cfg.env, split="train", out_dir=str(out_dir), start=cfg.valid_start,
                             limit=cfg.valid_limit, env_seed=cfg.env_seed, agent=cfg.agent)
    return ExploreConfig(env=cfg.env, split=split, out_dir=str(out_dir), limit=cfg.eval_limit,
                         env_seed=cfg.env_seed, agent=cfg.agent)


def check_valid_is_held_out(cfg: LoopConfig) -> None:
    """VALID must not overlap the explored tasks, whose expert trajectories DPO trains on."""
    explored = cfg.explore_limit  # the loop explores train[:explore_limit] (None: all of train)
    if VALID in cfg.eval_splits and (explored is None or explored > cfg.valid_start):
        raise ValueError(f"the valid split train[{cfg.valid_start}:{cfg.valid_start + cfg.valid_limit}] overlaps "
                         f"the explored tasks train[:{'all' if explored is None else explored}]; "
                         f"set an explore limit <= {cfg.valid_start}")


def load_policy(path: str | Path, device: str = "auto"):
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return load_model(path, dtype=dtype, device=dev), Tokenizer.from_dir(path)


def evaluate_policy(model_dir: str | Path, out: Path, cfg: LoopConfig, model=None, tokenizer=None) -> dict:
    """Average reward x100 per evaluation split, written to out/eval-<split>/summary.json."""
    if model is None:
        model, tokenizer = load_policy(model_dir, cfg.device)
    results = {}
    for split in cfg.eval_splits:
        results[split] = evaluate(model, tokenizer, eval_config(cfg, split, out / f"eval-{split}"),
                                  progress=cfg.progress)["average_reward"]
    return results


def run_eto(cfg: LoopConfig, dpo_config) -> list[dict]:
    """Run `cfg.iterations` ETO iterations from `cfg.model`. `dpo_config(model, pairs, out)` -> DPOConfig."""
    from eto_ref.trainer import run_dpo

    check_valid_is_held_out(cfg)
    out, policy, rows = Path(cfg.out), Path(cfg.model), []
    for k in range(1, cfg.iterations + 1):
        it, seconds = out / f"iter-{k}", {}
        with timed(seconds, "explore"):
            model, tokenizer = load_policy(policy, cfg.device)
            ecfg = ExploreConfig(env=cfg.env, split="train", out_dir=str(it / "explore"), limit=cfg.explore_limit,
                                 env_seed=cfg.env_seed, agent=cfg.agent)
            pairs, explore_summary = explore_and_pair(model, tokenizer, ecfg, cfg.progress, cfg.rejected_extra_turns)
            del model
        row = {"iteration": k, "policy": str(policy), "train_reward": explore_summary["average_reward"],
               "pairs": explore_summary["pairs"], "win": explore_summary["win"],
               "tie": explore_summary["tie"], "lose": explore_summary["lose"], "seconds": seconds}
        if explore_summary["pairs"] == 0:
            row["note"] = "no pairs: the policy ties the expert on every task; stopping"
            rows.append(row)
            break
        with timed(seconds, "dpo"):
            policy = run_dpo(dpo_config(str(policy), str(pairs), str(it / "dpo")))  # pi_ref = the policy we start from
        with timed(seconds, "evaluate"):
            row.update({"model": str(policy), **evaluate_policy(policy, it, cfg)})
        rows.append(row)
        write_json_atomic(rows, out / "summary.json")
    write_json_atomic(rows, out / "summary.json")
    return rows


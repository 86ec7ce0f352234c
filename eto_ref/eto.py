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

from dataclasses import dataclass, field, replace
from pathlib import Path

from eto_ref.agent import AgentConfig
from eto_ref.config import DPOConfig, setting
from eto_ref.dpo import run_dpo
from eto_ref.exploration import ExploreConfig, evaluate, explore_and_pair, load_policy
from eto_ref.jsonl import write_json_atomic
from eto_ref.metrics import PhaseClock
from eto_ref.pairs import AUTO


@dataclass
class LoopConfig:
    """The ETO loop around the DPO stage: what is explored, how pairs are cut, where each policy is evaluated."""

    model: str = setting("runs/sft/final", "the SFT policy pi_0 the loop starts from")
    out: str = setting("runs/eto", "loop directory: iter-k/explore, iter-k/dpo, iter-k/eval-<split>, summary.json")
    env: str = setting("science", "environment: webshop | household | science | scienceworld")
    env_seed: int = setting(0, "seed of the environment's task generator (which tasks exist)", low=0)
    iterations: int = setting(1, "iterations of explore -> pairs -> DPO -> evaluate (the online RL loop: "
                                 "collect -> PPO or GRPO -> evaluate); a rerun may raise it", low=1)
    explore_limit: int | None = setting(None, "training tasks explored per iteration, the first of the split "
                                              "(None: all)", low=1)
    eval_limit: int | None = setting(None, "tasks per test split in evaluations (None: all); a rerun may "
                                           "raise it: evaluations extend", low=1)
    valid: int = setting(0, "also evaluate on N training tasks nothing trains on, train[valid_start:][:N]: "
                            "the column settings are chosen by (0 = off)", low=0)
    valid_start: int = setting(1000, "first task of the valid slice (after every task trained on or explored)", low=0)
    rejected_extra_turns: int | str | None = setting(AUTO, "pairs: the rejected side keeps at most expert length "
                                                     "+ N agent turns (none: the whole failed run; auto: the "
                                                     "environment's official rule, 5, and household, like "
                                                     "ALFWorld, none)", low=0)
    beta_schedule: tuple[float, ...] = setting((), "DPO beta per iteration, e.g. 0.1,0.5 (the last repeats; "
                                                   "empty: the DPO beta every iteration)")
    lr_schedule: tuple[float, ...] = setting((), "DPO learning rate per iteration, e.g. 1e-6,5e-7 (the last "
                                                 "repeats; empty: the DPO lr every iteration)")
    agent: AgentConfig = field(default_factory=AgentConfig)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The evaluation columns: VALID first when asked for (settings are chosen there), then the test splits."""
        return ((VALID,) if self.valid > 0 else ()) + TEST_SPLITS


VALID = "valid"  # not an environment split: a slice of train that nothing trains on, for choosing settings
TEST_SPLITS = ("test_seen", "test_unseen")


def iteration_value(schedule: tuple[float, ...], iteration: int, default: float) -> float:
    """schedule[k-1] for iteration k (the last entry repeats); `default` for an empty schedule."""
    return schedule[min(iteration, len(schedule)) - 1] if schedule else default


def eval_config(cfg: LoopConfig, split: str, out_dir: Path, model: str | Path) -> ExploreConfig:
    """The evaluation run of policy `model` on one split (the folder's identity records it);
    VALID is train[valid_start : valid_start + valid_limit]."""
    if split == VALID:
        return ExploreConfig(model=str(model), env=cfg.env, split="train", out_dir=str(out_dir),
                             start=cfg.valid_start, limit=cfg.valid, env_seed=cfg.env_seed, agent=cfg.agent)
    return ExploreConfig(model=str(model), env=cfg.env, split=split, out_dir=str(out_dir), limit=cfg.eval_limit,
                         env_seed=cfg.env_seed, agent=cfg.agent)


def check_valid_is_held_out(cfg: LoopConfig) -> None:
    """VALID must not overlap the explored tasks, whose expert trajectories DPO trains on."""
    explored = cfg.explore_limit  # the loop explores train[:explore_limit] (None: all of train)
    if VALID in cfg.eval_splits and (explored is None or explored > cfg.valid_start):
        raise ValueError(f"the valid split train[{cfg.valid_start}:{cfg.valid_start + cfg.valid}] overlaps "
                         f"the explored tasks train[:{'all' if explored is None else explored}]; "
                         f"set an explore limit <= {cfg.valid_start}")


def evaluate_policy(model_dir: str | Path, out: Path, cfg: LoopConfig, device: str = "auto",
                    progress: bool = True, dtype: str = "auto") -> dict:
    """Average reward x100 per evaluation split, written to out/eval-<split>/summary.json."""
    model, tokenizer = load_policy(model_dir, device, dtype)
    return {split: evaluate(model, tokenizer, eval_config(cfg, split, out / f"eval-{split}", model_dir),
                            progress=progress)["average_reward"] for split in cfg.eval_splits}


def explore_iteration(policy: Path, it: Path, cfg: LoopConfig, dpo: DPOConfig) -> tuple[Path, dict]:
    """Steps 1-2 of an iteration: the policy explores the training tasks; failures are paired with the expert."""
    model, tokenizer = load_policy(policy, dpo.device, dpo.dtype)
    ecfg = ExploreConfig(model=str(policy), env=cfg.env, split="train", out_dir=str(it / "explore"),
                         limit=cfg.explore_limit, env_seed=cfg.env_seed, agent=cfg.agent)
    return explore_and_pair(model, tokenizer, ecfg, dpo.progress, cfg.rejected_extra_turns)


def run_eto(cfg: LoopConfig, dpo: DPOConfig) -> list[dict]:
    """Run `cfg.iterations` ETO iterations from `cfg.model`; `dpo` holds the DPO settings (its model,
    pairs and out are each iteration's; its beta and lr those of the iteration's schedule)."""
    check_valid_is_held_out(cfg)
    out, policy, rows = Path(cfg.out), Path(cfg.model), []
    for k in range(1, cfg.iterations + 1):
        it = out / f"iter-{k}"
        clock = PhaseClock(it / "phase_seconds.json")  # summed over interrupted and resumed invocations
        seconds = clock.seconds
        with clock.phase("explore"):
            pairs, explored = explore_iteration(policy, it, cfg, dpo)
        stage = replace(dpo, model=str(policy), pairs=str(pairs), out=str(it / "dpo"),
                        beta=iteration_value(cfg.beta_schedule, k, dpo.beta),
                        lr=iteration_value(cfg.lr_schedule, k, dpo.lr))
        row = {"iteration": k, "policy": str(policy), "episodes": explored["episodes"],
               "train_reward": explored["average_reward"],
               "pairs": explored["pairs"], "win": explored["win"], "tie": explored["tie"],
               "lose": explored["lose"], "beta": stage.beta, "lr": stage.lr, "seconds": seconds}
        rows.append(row)
        if explored["pairs"] == 0:
            row["note"] = "no pairs: the policy ties the expert on every task; stopping"
            write_json_atomic(rows, out / "summary.json")
            break
        with clock.phase("dpo"):
            policy = run_dpo(stage)  # pi_ref = the policy this iteration starts from
        with clock.phase("evaluate"):
            row.update({"model": str(policy), **evaluate_policy(policy, it, cfg, dpo.device, dpo.progress,
                                                                       dpo.dtype)})
        write_json_atomic(rows, out / "summary.json")
    return rows

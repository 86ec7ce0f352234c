"""The whole main job in one call: SFT, the ETO iterations, the paper's baselines (with `baselines`), the table.

    python train.py --stage all                      # SmolLM2 on science, seed 0, into runs/main

    OUT/data/sft.json         the expert trajectories trained on (ETO format), train[:sft_examples]
    OUT/sft/                  behavioral cloning (final/ = pi_0), eval-<split>/ its evaluation
    OUT/eto/iter-k/           explore/ (trajectories, pairs), dpo/ (final/ = pi_k), eval-<split>/
    OUT/rft/                  RFT: pi_0 fine-tuned on expert + its successful explorations of iteration 1
    OUT/ppo/                  PPO (offline, the paper's row): pi_0 trained with PPO on the iteration-1 episodes
    OUT/ppo-online/iter-k/    online PPO, one iteration per ETO iteration (with 2 or more: its first is OUT/ppo)
    OUT/grpo/iter-k/          online GRPO, one iteration per ETO iteration, each one exploration's budget
    OUT/best-of-n/<split>/    N sampled runs of pi_0 per test task, best reward kept
    OUT/results.json, results.md, reward_per_iteration.svg   (results.md: the paired differences from SFT;
                                                              results.json: also the seconds per phase)
    OUT/report.html           what happened, to look at (eto_ref/report.py)

Every phase resumes on its own, so rerunning the same command after an
interruption continues where it stopped and skips what is finished; a rerun with
other settings is refused (run.json), naming them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import envs
from eto_ref.baselines import best_of_n, rft_records
from eto_ref.config import DPOConfig, GRPOConfig, PPOConfig, SFTConfig, setting
from eto_ref.eto import LoopConfig, evaluate_policy, run_eto
from eto_ref.exploration import TRAJECTORIES, ExploreConfig, load_policy
from eto_ref.jsonl import read_jsonl_records, write_json_atomic
from eto_ref.metrics import PhaseClock, duration
from eto_ref.models import default_model, resolve_model
from eto_ref.pairs import rejected_turns
from eto_ref.online import run_online
from eto_ref.ppo import run_ppo
from eto_ref.report import build_report
from eto_ref.results import (differences_from_sft, differences_table, per_task_rewards, report_seeds, results_table,
                             verdict, write_reward_plot)
from eto_ref.run_dir import RunLock, claim_run
from eto_ref.sft import run_sft
from eto_ref.tiny import ensure_tiny_model


@dataclass
class PipelineConfig:
    """The main job. Stage settings live in the nested SFT, DPO and loop configs."""

    out: str = setting("runs/main", "run directory of the whole job")
    seed: int = setting(0, "data order and sampling (and the tiny model's initialisation)", low=0)
    model: str = setting("auto", "starting model: a Hugging Face directory, or smollm2 | tiny "
                                 "(auto: smollm2 when its package is installed, else tiny)")
    sft_examples: int = setting(480, "expert trajectories trained on: the first N tasks of the train split", low=1)
    rft_epochs: int = setting(1, "RFT: epochs of fine-tuning pi_0 on expert + its successful explorations", low=1)
    rft_lr_scale: float = setting(0.25, "RFT: its learning rate as a fraction of the SFT one", low=0, above=True)
    best_of_n: int = setting(4, "N of the Best-of-N baseline (0 = skip it)", low=0)
    bon_temperature: float = setting(0.7, "Best-of-N sampling temperature", low=0)
    baselines: bool = setting(False, "also run the RFT, PPO (offline and online), GRPO and Best-of-N baselines")
    resume: bool = setting(True, "continue a job in `out` made with the same settings (False: start over)")
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def identity(self) -> dict:
        """The settings that determine the job's results (run.json): all but where it runs and whether it
        resumes; of the stages, their own identities (`TrainConfig.identity`); of the agent, all but its batch
        size (continuous batching gives each episode its one-at-a-time result); the pair rule applied; and the
        environment's options (`TextEnv.options`)."""
        d = json.loads(json.dumps(asdict(self)))
        for key in ("out", "resume"):
            d.pop(key)
        for stage in ("sft", "dpo", "ppo", "grpo"):
            d[stage] = getattr(self, stage).identity()
        d["grpo"].update(group_size=self.grpo.group_size, group_temperature=self.grpo.group_temperature)
        d["loop"].pop("out")
        d["loop"]["agent"].pop("batch_size")
        d["loop"]["rejected_cut"] = rejected_turns(d["loop"].pop("rejected_extra_turns"),  # the rule applied
                                                   envs.env_class(self.loop.env).truncate_rejected)
        options = envs.env_options(self.loop.env, seed=self.loop.env_seed)
        if options:  # e.g. the real ScienceWorld's task types
            d["env_options"] = options
        return d


# What a rerun may raise, keeping what was done: more test tasks (each evaluation extends, keeping its episodes)
# and more iterations (iteration k's phases depend on k, not on how many follow; the finished ones resume as done).
GROWABLE = ("loop.eval_limit", "loop.iterations")


def log(message: str) -> None:
    print(f"[eto] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- phases


def check_valid(cfg: PipelineConfig) -> None:
    """The valid slice must come after the SFT tasks (and LoopConfig checks the explored ones)."""
    loop = cfg.loop
    if loop.valid > 0 and loop.valid_start < cfg.sft_examples:
        raise ValueError(f"valid split train[{loop.valid_start}:{loop.valid_start + loop.valid}] overlaps the SFT "
                         f"data train[:{cfg.sft_examples}]; set valid_start >= {cfg.sft_examples}")


def prepare_base_model(cfg: PipelineConfig) -> Path:
    """The model SFT starts from: SmolLM2 (converted once), a directory, or a fresh tiny model seeded by cfg.seed."""
    if cfg.model == "tiny":
        return ensure_tiny_model(Path(cfg.out) / "base", seed=cfg.seed)
    return resolve_model(cfg.model)


def prepare_sft_data(cfg: PipelineConfig) -> Path:
    """The first `sft_examples` expert trajectories of the train split, as an ETO-format JSON file."""
    path = Path(cfg.out) / "data" / "sft.json"
    if not path.is_file():
        with envs.opened(cfg.loop.env, seed=cfg.loop.env_seed) as env:
            records = [env.expert_trajectory(t) for t in env.task_ids("train")[: cfg.sft_examples]]
        write_json_atomic(records, path, indent=1)
    return path


def evaluate_once(model_dir: Path, out: Path, cfg: PipelineConfig) -> dict:
    """Evaluate a policy on the job's evaluation splits (reusing finished episodes)."""
    return evaluate_policy(model_dir, out, cfg.loop, cfg.sft.device, cfg.sft.progress, cfg.sft.dtype)


def run_rft(cfg: PipelineConfig, sft_final: Path, sft_data: Path) -> dict:
    """RFT: fine-tune pi_0 on expert + its successful trajectories from the ETO iteration-1 exploration."""
    out = Path(cfg.out) / "rft"
    data = out / "data.json"
    if not data.is_file():
        explored = read_jsonl_records(Path(cfg.out) / "eto" / "iter-1" / "explore" / TRAJECTORIES)
        write_json_atomic(rft_records(json.loads(sft_data.read_text()), explored), data, indent=1)
    successes = len(json.loads(data.read_text())) - cfg.sft_examples
    final = run_sft(replace(cfg.sft, model=str(sft_final), data=str(data), out=str(out), epochs=cfg.rft_epochs,
                            lr=cfg.sft.lr * cfg.rft_lr_scale))
    return {"successes_added": successes, **evaluate_once(final, out, cfg)}


def run_ppo_baseline(cfg: PipelineConfig, sft_final: Path) -> dict:
    """PPO as the paper ran it (offline): pi_0 trained with PPO on the episodes of ETO's first exploration."""
    out = Path(cfg.out) / "ppo"
    episodes = Path(cfg.out) / "eto" / "iter-1" / "explore" / TRAJECTORIES
    final = run_ppo(replace(cfg.ppo, model=str(sft_final), trajectories=str(episodes), out=str(out)))
    return evaluate_once(final, out, cfg)


def run_online_baselines(cfg: PipelineConfig, sft_final: Path) -> dict[str, dict]:
    """Online PPO (with 2 or more iterations: its first equals the offline row) and online GRPO, from pi_0,
    one iteration per ETO iteration, each spending one ETO exploration's budget of episodes."""
    loop = replace(cfg.loop, model=str(sft_final))
    methods = [("PPO-online", "ppo-online", cfg.ppo)] if cfg.loop.iterations >= 2 else []
    methods.append(("GRPO", "grpo", cfg.grpo))
    rows = {}
    for name, folder, stage in methods:
        for it in run_online(replace(loop, out=str(Path(cfg.out) / folder)), stage):
            rows[f"{name}-iter-{it['iteration']}"] = {s: it[s] for s in cfg.loop.eval_splits}
    return rows


def run_best_of_n(cfg: PipelineConfig, sft_final: Path) -> dict:
    """Best-of-N of pi_0 on each test split (not on valid: Best-of-N is a baseline, not a setting to choose)."""
    model, tokenizer = load_policy(sft_final, cfg.sft.device, cfg.sft.dtype)
    agent = cfg.loop.agent
    agent = replace(agent, sampling=replace(agent.sampling, temperature=cfg.bon_temperature), seed=cfg.seed)
    results = {}
    for split in cfg.loop.eval_splits:
        if split == "valid":
            continue
        ecfg = ExploreConfig(model=str(sft_final), env=cfg.loop.env, split=split, limit=cfg.loop.eval_limit,
                             out_dir=str(Path(cfg.out) / "best-of-n" / split), env_seed=cfg.loop.env_seed, agent=agent)
        results[split] = best_of_n(model, tokenizer, ecfg, cfg.best_of_n, cfg.sft.progress)["average_reward"]
    return results


# --------------------------------------------------------------------------- the job


def resolved(cfg: PipelineConfig) -> PipelineConfig:
    """The config with the job's own settings filled in: the model chosen, the seed passed to every stage."""
    model = default_model() if cfg.model == "auto" else cfg.model
    return replace(cfg, model=model, sft=replace(cfg.sft, seed=cfg.seed), dpo=replace(cfg.dpo, seed=cfg.seed),
                   ppo=replace(cfg.ppo, seed=cfg.seed), grpo=replace(cfg.grpo, seed=cfg.seed))


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT -> evaluate -> ETO iterations (each evaluated) -> RFT, PPO, Best-of-N (with cfg.baselines) -> the table."""
    cfg = resolved(cfg)
    check_valid(cfg)
    out = Path(cfg.out)
    with RunLock(out):
        claim_run(out, cfg.identity(), cfg.resume,
                  outputs=("data", "sft", "eto", "rft", "ppo", "ppo-online", "grpo", "best-of-n", "results.json",
                           "results.md", "phase_seconds.json", "phase_peak_rss_mb.json", "reward_per_iteration.svg",
                           "report.html"), growable=GROWABLE)
        write_json_atomic(asdict(cfg), out / "pipeline_config.json")
        return run_phases(cfg, out)


def run_phases(cfg: PipelineConfig, out: Path) -> dict:
    clock = PhaseClock(out / "phase_seconds.json")  # summed over interrupted and resumed invocations
    with clock.phase("base model"):
        base = prepare_base_model(cfg)
    data = prepare_sft_data(cfg)
    log(f"SFT of {base} on {data}")
    with clock.phase("SFT"):
        sft_final = run_sft(replace(cfg.sft, model=str(base), data=str(data), out=str(out / "sft")))
    with clock.phase("SFT evaluation"):
        rows = {"SFT": evaluate_once(sft_final, out / "sft", cfg)}
    log(f"SFT: {rows['SFT']}")
    log(f"ETO: {cfg.loop.iterations} iteration(s)")
    with clock.phase("ETO"):
        iterations = run_eto(replace(cfg.loop, model=str(sft_final), out=str(out / "eto")), cfg.dpo)
    if cfg.baselines and cfg.loop.iterations >= 1:
        log("RFT")
        with clock.phase("RFT"):
            rows["RFT"] = run_rft(cfg, sft_final, data)
        log("PPO (offline)")
        with clock.phase("PPO"):
            rows["PPO"] = run_ppo_baseline(cfg, sft_final)
        log("online PPO and GRPO")
        with clock.phase("online RL"):
            rows.update(run_online_baselines(cfg, sft_final))
    if cfg.baselines and cfg.best_of_n > 0:
        log(f"Best-of-{cfg.best_of_n}")
        with clock.phase(f"Best-of-{cfg.best_of_n}"):
            rows[f"Best-of-{cfg.best_of_n}"] = run_best_of_n(cfg, sft_final)
    splits = cfg.loop.eval_splits
    for it in iterations:
        rows[f"ETO-iter-{it['iteration']}"] = {s: it[s] for s in splits if s in it}
    diffs = differences_from_sft({cfg.seed: per_task_rewards(out, splits)}, splits)
    seconds = {**clock.seconds, "total": round(sum(clock.seconds.values()), 1)}
    log("time per phase: " + ", ".join(f"{name} {duration(t)}" for name, t in seconds.items()))
    results = {"env": cfg.loop.env, "seed": cfg.seed, "model": cfg.model, "rows": rows, "iterations": iterations,
               "difference_from_sft": diffs, "seconds": seconds}
    write_json_atomic(results, out / "results.json")
    table = results_table(rows, splits, title=f"{cfg.loop.env}, {cfg.model}, seed {cfg.seed}: average reward x100")
    if diffs:
        table += "\n\n" + differences_table(diffs, splits, title="difference from SFT, paired over tasks") + \
                 "\n\n" + verdict(diffs, splits)
    (out / "results.md").write_text(table + "\n")
    write_reward_plot(rows, splits, out / "reward_per_iteration.svg")
    log(f"report: {build_report(out)}")
    print(table)
    return results


def run_seeds(cfg: PipelineConfig, seeds: list[int], results_path: str | Path | None = None) -> str:
    """The main job once per seed (OUT/seed-K), then the seeds report (eto_ref/results.py)."""
    for s in seeds:
        run_pipeline(replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed-{s}")))
    table = report_seeds(cfg.out, seeds, cfg.loop.eval_splits, cfg.loop.env, results_path)
    print(table)
    return table

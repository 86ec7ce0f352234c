"""The paper's analyses, each one command on a finished main job (`train.py --stage all --valid N`).

    python -m eto_ref.analyses step-level --run runs/main --forced-steps 2 --results results/step-level.md
    python -m eto_ref.analyses self-play  --run runs/main --samples 4 --results results/self-play.md
    python -m eto_ref.analyses efficiency --runs runs/science/seed-0 runs/science/seed-1 --results results/efficiency.md
    python -m eto_ref.analyses iterations --runs runs/iter3/seed-0 --results results/iterations.md
    python -m eto_ref.analyses turn-shift --policies runs/main/sft/final runs/ppo/final \
        --episodes runs/main/eto/iter-1/explore/trajectories.jsonl

- step-level: the step-level contrast. The SFT policy explores the training tasks with
  the expert's first k steps played for it (`--forced-steps k`), its continuations are
  paired with the expert's, and DPO runs on those pairs; compared on the valid slice with
  the run's trajectory-level ETO iteration 1.
- self-play: ETO without expert trajectories. The SFT policy samples N runs of each
  training task; RFT on its own successes only, then DPO from the RFT policy on pairs of
  its best and worst run of each task (`eto_ref.pairs.self_play_pairs`); compared on valid
  with SFT and the run's ETO.
- efficiency: the mean number of steps of the successful episodes of each method.
- iterations: average reward after each ETO iteration (0 = SFT).
- turn-shift: where training moved probability within an episode. On successful explored
  episodes, the mean change of an agent token's log-prob from the first policy to each
  other one, turn by turn: the "OK" reply, the first action, the middle ones, the last.

Settings (environment, agent, DPO, valid slice) are the run's own (its pipeline_config.json);
every phase writes into RUN/analyses/<name>/ and resumes like the main job's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from itertools import accumulate
from pathlib import Path

import torch

from eto_ref.agent import AgentConfig
from eto_ref.baselines import SUCCESS, rft_records
from eto_ref.batches import collate_sft
from eto_ref.checkpoint import load_model
from eto_ref.config import DPOConfig, GRPOConfig, PPOConfig, SFTConfig
from eto_ref.dpo import run_dpo
from eto_ref.eto import TEST_SPLITS, VALID, LoopConfig, eval_config
from eto_ref.exploration import TRAJECTORIES, ExploreConfig, evaluate, explore, explore_and_pair, load_policy
from eto_ref.jsonl import read_jsonl_records, write_json_atomic, write_text_atomic
from eto_ref.losses import next_token_targets
from eto_ref.pairs import self_play_pairs
from eto_ref.pipeline import PipelineConfig
from eto_ref.ppo import encode_episodes
from eto_ref.results import paired_difference, per_task_rewards, phase_folders, task_rewards
from eto_ref.run_dir import RunError, recorded_identity
from eto_ref.runtime import add_threads_flag, setup_cpu, stop_on_terminate
from eto_ref.sampler import SamplingConfig
from eto_ref.sft import run_sft
from eto_ref.tokenizer import Tokenizer
from eto_ref.trainer import scored_logprobs
from eto_ref.trajectory import load_episodes


def run_config(run: Path) -> PipelineConfig:
    """The PipelineConfig a main job was run with (nested configs rebuilt from pipeline_config.json)."""
    recorded_identity(run)  # refuses a job folder written by an earlier version
    d = json.loads((run / "pipeline_config.json").read_text())
    agent = d["loop"].pop("agent")
    agent = AgentConfig(sampling=SamplingConfig(**agent.pop("sampling")), **agent)
    loop = LoopConfig(agent=agent, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("loop").items()})
    if "grpo" not in d:
        raise RunError(f"{run / 'pipeline_config.json'}: no grpo settings: written by an earlier version of eto_ref; "
                       "rerun the main job into another folder")
    stages = {key: cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop(key).items()})
              for key, cls in (("sft", SFTConfig), ("dpo", DPOConfig), ("ppo", PPOConfig), ("grpo", GRPOConfig))}
    return PipelineConfig(loop=loop, **stages, **d)


def valid_rewards(model_dir: Path, out: Path, cfg: PipelineConfig) -> dict[str, float]:
    """task -> reward of a policy on the run's valid slice (resuming)."""
    if cfg.loop.valid <= 0:
        raise ValueError(f"{cfg.out}: this run has no valid slice; run the main job with --valid N")
    ecfg = eval_config(cfg.loop, VALID, out, model_dir)
    model, tokenizer = load_policy(model_dir, cfg.sft.device, cfg.sft.dtype)
    evaluate(model, tokenizer, ecfg, progress=cfg.sft.progress)
    return task_rewards(out)


def comparison_table(title: str, rows: dict[str, dict[str, float]], notes: dict[str, str]) -> str:
    """Rows: method -> task -> reward; columns: mean x100, the paired difference from SFT, notes."""
    sft = {t: [r] for t, r in rows["SFT"].items()}
    lines = [f"**{title}**", "", "| method | valid | difference from SFT (± SE, tasks) | |", "|---|---:|---:|---|"]
    for name, rewards in rows.items():
        mean = 100 * sum(rewards.values()) / max(len(rewards), 1)
        diff = paired_difference({t: [r] for t, r in rewards.items()}, sft) if name != "SFT" else None
        cell = "-" if diff is None else f"{diff['mean']:+.1f} ± {diff['se']:.1f} ({diff['tasks']})"
        lines.append(f"| {name} | {mean:.1f} | {cell} | {notes.get(name, '')} |")
    return "\n".join(lines)


def write_results(text: str, data: dict, path: str | Path | None) -> str:
    if path is not None:
        write_text_atomic(text + "\n", path)
        write_json_atomic(data, Path(path).with_suffix(".json"))
    print(text)
    return text


# --------------------------------------------------------------------------- step-level contrast


def step_level(run: Path, forced_steps: int, results: str | None) -> str:
    cfg = run_config(run)
    sft, out = run / "sft" / "final", run / "analyses" / f"step-level-{forced_steps}"
    model, tokenizer = load_policy(sft, cfg.sft.device, cfg.sft.dtype)
    ecfg = ExploreConfig(model=str(sft), env=cfg.loop.env, split="train", limit=cfg.loop.explore_limit,
                         env_seed=cfg.loop.env_seed, forced_steps=forced_steps, out_dir=str(out / "explore"),
                         agent=cfg.loop.agent)
    pairs, summary = explore_and_pair(model, tokenizer, ecfg, cfg.sft.progress, cfg.loop.rejected_extra_turns)
    policy = run_dpo(replace(cfg.dpo, model=str(sft), pairs=str(pairs), out=str(out / "dpo")))
    rows = {"SFT": valid_rewards(sft, run / "sft" / "eval-valid", cfg),
            "ETO, trajectory-level pairs": valid_rewards(run / "eto" / "iter-1" / "dpo" / "final",
                                                         run / "eto" / "iter-1" / "eval-valid", cfg),
            f"ETO, step-level pairs (expert's first {forced_steps} steps forced)":
                valid_rewards(policy, out / "eval-valid", cfg)}
    trajectory_pairs = json.loads((run / "eto" / "iter-1" / "explore" / "summary.json").read_text())["pairs"]
    notes = {"ETO, trajectory-level pairs": f"{trajectory_pairs} pairs",
             list(rows)[2]: f"{summary['pairs']} pairs"}
    text = comparison_table(f"{cfg.loop.env}: step-level vs trajectory-level contrast, valid "
                            f"train[{cfg.loop.valid_start}:+{cfg.loop.valid}], seed {cfg.seed}", rows, notes)
    return write_results(text, {"rows": rows, "notes": notes, "run": str(run)}, results)


# --------------------------------------------------------------------------- self-play (RFT then ETO, no expert)


def sampled_runs(policy: Path, cfg: PipelineConfig, out: Path, samples: int, temperature: float) -> list:
    """`samples` runs of the training tasks at `temperature`, each its own resumable exploration."""
    model, tokenizer = load_policy(policy, cfg.sft.device, cfg.sft.dtype)
    agent = replace(cfg.loop.agent, sampling=replace(cfg.loop.agent.sampling, temperature=temperature))
    runs = []
    for i in range(samples):
        ecfg = ExploreConfig(model=str(policy), env=cfg.loop.env, split="train", limit=cfg.loop.explore_limit,
                             env_seed=cfg.loop.env_seed, out_dir=str(out / f"sample-{i}"),
                             agent=replace(agent, seed=cfg.seed + 1000 * i))
        runs.append(explore(model, tokenizer, ecfg, cfg.sft.progress))
    return runs


def self_play(run: Path, samples: int, temperature: float, results: str | None) -> str:
    cfg = run_config(run)
    sft, out = run / "sft" / "final", run / "analyses" / "self-play"
    runs = sampled_runs(sft, cfg, out, samples, temperature)
    data = out / "rft-data.json"
    if not data.is_file():
        write_json_atomic(rft_records([], [r for run_ in runs for r in run_]), data, indent=1)  # no expert data
    rft = run_sft(replace(cfg.sft, model=str(sft), data=str(data), out=str(out / "rft"), epochs=cfg.rft_epochs,
                          lr=cfg.sft.lr * cfg.rft_lr_scale))
    pairs, stats = self_play_pairs(runs)
    write_json_atomic(pairs, out / "pairs.json", indent=1)
    eto = run_dpo(replace(cfg.dpo, model=str(rft), pairs=str(out / "pairs.json"), out=str(out / "dpo")))
    rows = {"SFT": valid_rewards(sft, run / "sft" / "eval-valid", cfg),
            "RFT on its own successes": valid_rewards(rft, out / "rft" / "eval-valid", cfg),
            "RFT + ETO on its own pairs (no expert)": valid_rewards(eto, out / "eval-valid", cfg),
            "ETO (expert pairs)": valid_rewards(run / "eto" / "iter-1" / "dpo" / "final",
                                                run / "eto" / "iter-1" / "eval-valid", cfg)}
    successes = len(json.loads(data.read_text()))
    notes = {"RFT on its own successes": f"{successes} successful runs of {samples} x {len(runs[0])}",
             "RFT + ETO on its own pairs (no expert)": f"{len(pairs)} pairs ({stats.tie} tasks tied)"}
    text = comparison_table(f"{cfg.loop.env}: self-play without expert trajectories, {samples} samples at "
                            f"temperature {temperature}, valid, seed {cfg.seed}", rows, notes)
    return write_results(text, {"rows": rows, "notes": notes, "run": str(run)}, results)


# --------------------------------------------------------------------------- efficiency and iterations


def steps_to_success(folder: Path) -> list[int]:
    return [r["steps"] for r in read_jsonl_records(folder / TRAJECTORIES) if float(r["reward"]) >= 1.0]


def efficiency(runs: list[Path], results: str | None) -> str:
    splits = ("valid", "test_seen", "test_unseen")
    found: dict[str, dict[str, list[int]]] = {}
    for run in runs:
        for method, folder in phase_folders(run).items():
            for split in splits:
                if (folder / f"eval-{split}" / TRAJECTORIES).is_file():
                    found.setdefault(method, {}).setdefault(split, []).extend(
                        steps_to_success(folder / f"eval-{split}"))
    lines = ["**Steps to success: the mean number of steps of the fully solved episodes (count)**", "",
             "| method | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for method, by_split in found.items():
        cells = [f"{sum(v) / len(v):.2f} ({len(v)})" if v else "-" for v in (by_split.get(s, []) for s in splits)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return write_results("\n".join(lines), {"steps": found, "runs": [str(r) for r in runs]}, results)


def iteration_cell(iteration: dict, split: str, tasks: dict) -> str:
    """One iteration's reward on a split and its paired difference from SFT (± SE); `tasks` is the run's
    method -> split -> task -> reward (results.per_task_rewards)."""
    if split not in iteration:
        return "stopped: no pairs" if "no pairs" in iteration.get("note", "") else "-"
    eto = tasks.get(f"ETO-iter-{iteration['iteration']}", {}).get(split, {})
    sft = tasks.get("SFT", {}).get(split, {})
    diff = paired_difference({t: [r] for t, r in eto.items()}, {t: [r] for t, r in sft.items()})
    return f"{iteration[split]:.1f}" + ("" if diff is None else f" ({diff['mean']:+.1f} ± {diff['se']:.1f})")


def sft_averages(run: Path) -> dict[str, float]:
    """split -> SFT average reward: the job's results.json, or (a job still running) its evaluation summaries."""
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())["rows"]["SFT"]
    paths = {split: run / "sft" / f"eval-{split}" / "summary.json" for split in (VALID, *TEST_SPLITS)}
    return {split: json.loads(p.read_text())["average_reward"] for split, p in paths.items() if p.is_file()}


def iterations(runs: list[Path], results: str | None) -> str:
    """Reward after each ETO iteration, with each iteration's paired difference from SFT and its pairs."""
    rows = []
    for run in runs:
        sft = sft_averages(run)
        rows.append((run, sft, json.loads((run / "eto" / "summary.json").read_text())))
    width = max(len(its) for _, _, its in rows)
    lines = ["**Average reward x100 after each ETO iteration (0 = SFT); in brackets the paired difference "
             "from SFT ± its standard error over tasks**", "",
             "| run | split | " + " | ".join(f"iter {k}" for k in range(width + 1)) + " |",
             "|---|---|" + "---:|" * (width + 1)]
    for run, sft, its in rows:
        tasks = per_task_rewards(run, list(sft))
        for split in sft:
            cells = [f"{sft[split]:.1f}"] + [iteration_cell(it, split, tasks) for it in its]
            lines.append(f"| {run} | {split} | " + " | ".join(cells + ["-"] * (width - len(its))) + " |")
        settings = "; ".join(f"iter {it['iteration']}: {it['pairs']} pairs, beta {it.get('beta')}, lr {it.get('lr')}"
                             for it in its if "pairs" in it)
        if settings:
            lines.append(f"| {run} | pairs, DPO | {settings} |" + " |" * width)
    return write_results("\n".join(lines), {"runs": [str(r) for r, _, _ in rows]}, results)


# --------------------------------------------------------------------------- where training moved probability


def turn_changes(models: list, tokenizer: Tokenizer, example) -> list[list[float]]:
    """Per model after the first: the mean change of an agent token's log-prob in each agent turn (nats)."""
    batch = collate_sft([example], tokenizer.pad_id)
    with torch.no_grad():
        logps = [scored_logprobs(m, batch) for m in models]  # each (N,)
    scored = next_token_targets(batch["input_ids"], batch["loss_mask"])[1][0].tolist()  # (T-1,)
    turn = torch.tensor(list(accumulate(int(s and not p) for s, p in zip(scored, [False] + scored))))[torch.tensor(scored)]
    return [[(lp - logps[0])[turn == k].mean().item() for k in turn.unique().tolist()] for lp in logps[1:]]


def turn_shift(policies: list[Path], episodes: Path, results: str | None, limit: int = 48) -> str:
    """The turn-shift table: the first `limit` successful episodes of `episodes` with at least two actions."""
    tokenizer = Tokenizer.from_dir(policies[0])
    models = [load_model(p) for p in policies]
    loaded = load_episodes(episodes)
    examples, kept, _ = encode_episodes(loaded, tokenizer, 4096)
    successes = [ex for ex, i in zip(examples, kept) if loaded[i].reward >= SUCCESS]
    columns = {str(p): {"ok": [], "first": [], "middle": [], "last": []} for p in policies[1:]}
    n = 0
    for ex in successes:
        changes = turn_changes(models, tokenizer, ex)
        if len(changes[0]) < 3:  # "OK", a first and a last action
            continue
        for p, per_turn in zip(policies[1:], changes):
            col = columns[str(p)]
            col["ok"].append(per_turn[0])
            col["first"].append(per_turn[1])
            col["middle"] += per_turn[2:-1]
            col["last"].append(per_turn[-1])
        n += 1
        if n == limit:
            break
    means = {p: {k: sum(v) / len(v) if v else None for k, v in col.items()} for p, col in columns.items()}
    lines = [f"Mean change of an agent token's log-prob from {policies[0]} (nats), on {n} successful episodes "
             f"of {episodes}", "", "| policy | \"OK\" | first action | middle actions | last action |",
             "|---|---:|---:|---:|---:|"]
    for p, m in means.items():
        lines.append(f"| {p} | " + " | ".join("-" if m[k] is None else f"{m[k]:+.4f}" for k in m) + " |")
    return write_results("\n".join(lines), {"episodes": n, "base": str(policies[0]), "changes": means}, results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="analysis", required=True)
    a = sub.add_parser("step-level")
    a.add_argument("--run", required=True)
    a.add_argument("--forced-steps", type=int, default=2)
    a = sub.add_parser("self-play")
    a.add_argument("--run", required=True)
    a.add_argument("--samples", type=int, default=4)
    a.add_argument("--temperature", type=float, default=0.7)
    for name in ("efficiency", "iterations"):
        sub.add_parser(name).add_argument("--runs", nargs="+", required=True)
    a = sub.add_parser("turn-shift")
    a.add_argument("--policies", nargs="+", required=True, type=Path, help="the base policy, then the others")
    a.add_argument("--episodes", required=True, type=Path, help="explored episodes (trajectories.jsonl)")
    for action in sub.choices.values():
        action.add_argument("--results", default=None, help="write the table here (Markdown, + .json)")
        add_threads_flag(action)
    args = p.parse_args(argv)
    setup_cpu(args)
    stop_on_terminate()
    if args.analysis == "step-level":
        return step_level(Path(args.run), args.forced_steps, args.results)
    if args.analysis == "self-play":
        return self_play(Path(args.run), args.samples, args.temperature, args.results)
    if args.analysis == "turn-shift":
        return turn_shift(args.policies, args.episodes, args.results)
    return (efficiency if args.analysis == "efficiency" else iterations)([Path(r) for r in args.runs], args.results)


if __name__ == "__main__":
    main()

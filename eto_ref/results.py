"""The paper's results table, from the finished phases of run directories.

    rows = finished_rows("runs/main", splits)            # method -> split -> average reward x100
    table = results_table(rows, splits)                   # one run, the paper's shape
    report_seeds("runs/science", [0, 1, 2], splits, "science", "results/science-smollm2.md")

    python -m eto_ref.results compare runs/valid-sft runs/valid-dpo                   # settings, on valid
    python -m eto_ref.results purchases runs/valid-sft runs/valid-dpo                 # webshop: what each buy missed
    python -m eto_ref.results pairs runs/explore-1/pairs.json                         # where failed sides part
    python -m eto_ref.results seeds --base runs/sft-0 runs/sft-1 --other runs/dpo-0 runs/dpo-1  # over seeds
    python -m eto_ref.results costs runs/main/sft runs/rl/grpo                        # steps, tokens, minutes
    python -m eto_ref.results curve runs/main/eto runs/rl/grpo-online                 # reward against episodes

A seeds report gives each method's per-seed averages and their mean, the share of
agent replies without a parsable action, and each ETO iteration's difference from
SFT paired task by task: for every task, the ETO-minus-SFT reward averaged over the
seeds that evaluated both (a seed still running adds nothing), then the mean of those
differences and its standard error over the tasks (sd / sqrt(n)). The paired
difference removes the task-to-task variation that both methods share, which is most
of the noise in an average reward.

Nothing here runs a model: a phase that has not finished (no summary.json yet) is
absent, and shows as "-".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import envs
from eto_ref.behaviour import pairs_table, purchases_table
from eto_ref.exploration import TRAJECTORIES, invalid_format_rate, summarize, unmatched_action_rate
from eto_ref.jsonl import read_jsonl_records, write_json_atomic, write_text_atomic
from eto_ref.metrics import read_metrics
from eto_ref.run_dir import RUN_FILE, recorded_identity
from eto_ref.svg import point_chart


def phase_folders(out: str | Path) -> dict[str, Path]:
    """Run folders of one run directory's evaluated methods, by table row (those that exist).

    Each holds `eval-<split>/` (Best-of-N: `<split>/`) with trajectories.jsonl and summary.json.
    """
    out = Path(out)
    folders = {"SFT": out / "sft", "RFT": out / "rft", "PPO": out / "ppo"}
    for row, loop in (("ETO", "eto"), ("PPO-online", "ppo-online"), ("GRPO", "grpo")):
        iterations = sorted(out.glob(f"{loop}/iter-*"), key=lambda p: int(p.name.split("-")[1]))
        folders.update({f"{row}-iter-{p.name.split('-')[1]}": p for p in iterations})
    return {name: folder for name, folder in folders.items() if folder.is_dir()}


def eval_dir(folder: Path, split: str) -> Path:
    return folder / f"eval-{split}"


def task_rewards(run: Path) -> dict[str, float]:
    """task id -> reward of one evaluation folder (Best-of-N: the best of its samples per task)."""
    files = [run / TRAJECTORIES] if (run / TRAJECTORIES).is_file() else sorted(run.glob(f"sample-*/{TRAJECTORIES}"))
    best: dict[str, float] = {}
    for path in files:
        for record in read_jsonl_records(path):
            best[record["id"]] = max(best.get(record["id"], -math.inf), float(record["reward"]))
    return best


def per_task_rewards(out: str | Path, splits) -> dict[str, dict[str, dict[str, float]]]:
    """method -> split -> task -> reward of one run directory (finished evaluations only)."""
    out = Path(out)
    found: dict[str, dict] = {}
    folders = {name: {s: eval_dir(f, s) for s in splits} for name, f in phase_folders(out).items()}
    bon = out / "best-of-n"
    if bon.is_dir():
        n = len(list(next(bon.iterdir()).glob("sample-*"))) if any(bon.iterdir()) else 0
        folders[f"Best-of-{n}"] = {s: bon / s for s in splits}
    for name, runs in folders.items():
        for split, run in runs.items():
            if (run / "summary.json").is_file():
                found.setdefault(name, {})[split] = task_rewards(run)
    return found


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict | None:
    """Mean of (a - b) over the tasks both have, x100, with its standard error over tasks.

    a and b map a task to its rewards over seeds (averaged per task first, so seeds
    that share a task are not counted as independent). None with fewer than 2 tasks.
    """
    tasks = sorted(set(a) & set(b))
    diffs = [100 * (sum(a[t]) / len(a[t]) - sum(b[t]) / len(b[t])) for t in tasks]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return {"mean": mean, "se": sd / math.sqrt(len(diffs)), "tasks": len(diffs)}


def differences_from_sft(per_seed_tasks: dict[int, dict], splits) -> dict[str, dict[str, dict]]:
    """method -> split -> paired difference from SFT (see paired_difference), with the seeds it used.

    A (seed, task) counts only where that seed evaluated both the method and SFT on the task,
    so a seed whose ETO phase has not finished adds nothing to either side (its SFT rewards
    alone would shift the SFT mean away from the seeds the method is measured on).
    """
    methods = dict.fromkeys(m for rows in per_seed_tasks.values() for m in rows if m != "SFT")
    out: dict[str, dict] = {}
    for method in methods:
        for split in splits:
            ours: dict[str, list[float]] = {}
            sft: dict[str, list[float]] = {}
            seeds = set()
            for seed, rewards in per_seed_tasks.items():
                a, b = rewards.get(method, {}).get(split, {}), rewards.get("SFT", {}).get(split, {})
                for task in sorted(a.keys() & b.keys()):
                    ours.setdefault(task, []).append(a[task])
                    sft.setdefault(task, []).append(b[task])
                    seeds.add(seed)
            diff = paired_difference(ours, sft)
            if diff is not None:
                out.setdefault(method, {})[split] = {**diff, "seeds": sorted(seeds)}
    return out


def differences_table(diffs: dict[str, dict[str, dict]], splits, title: str = "",
                      all_seeds: list[int] | None = None) -> str:
    """Rows = methods; per split, `mean ± SE (n)` of the paired difference from SFT, and whether it
    exceeds twice its standard error; the seeds it used when fewer than all_seeds."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method - SFT | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for method, by_split in diffs.items():
        cells = []
        for split in splits:
            d = by_split.get(split)
            if d is None:
                cells.append("-")
                continue
            seeds = "" if all_seeds is None or d["seeds"] == all_seeds else f", seeds {','.join(map(str, d['seeds']))}"
            cells.append(f"{d['mean']:+.1f} ± {d['se']:.1f} ({d['tasks']}{seeds})"
                         + (" *" if abs(d["mean"]) > 2 * d["se"] else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(paired over tasks, each task's difference averaged over the seeds that evaluated both methods; "
                 "± one standard error; * beyond twice it)")
    return "\n".join(lines)


def verdict(diffs: dict[str, dict[str, dict]], splits) -> str:
    """One plain line per method: is its paired difference from SFT beyond two standard errors, per split?"""
    lines = []
    for method, by_split in diffs.items():
        parts = []
        for split in splits:
            d = by_split.get(split)
            if d is None:
                continue
            if abs(d["mean"]) > 2 * d["se"]:
                said = f"{'above' if d['mean'] > 0 else 'below'} SFT by more than two standard errors"
            else:
                said = "within two standard errors of SFT (no clear difference)"
            parts.append(f"{split} {d['mean']:+.1f} ± {d['se']:.1f}, {said}")
        if parts:
            lines.append(f"{method}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def write_seeds_results(per_seed: dict[int, dict], splits, env: str, results_path: str | Path | None,
                        config: dict | None, rates: dict[int, dict] | None = None,
                        diffs: dict[str, dict] | None = None, unmatched: dict[int, dict] | None = None) -> str:
    """The seeds table (and, given them, the paired differences from SFT, the invalid-format and the
    unmatched-action tables); with a path, written there (Markdown) and beside it as .json with the config."""
    seeds = list(per_seed)
    names = ", ".join(map(str, seeds))
    table = seeds_table(per_seed, splits, title=f"{env}: average reward x100, seeds {names}")
    if diffs:
        table += "\n\n" + differences_table(diffs, splits, title=f"{env}: difference from SFT, reward x100, "
                                                                 f"seeds {names}", all_seeds=sorted(seeds))
    if rates is not None:
        table += "\n\n" + seeds_table(rates, splits, title=f"{env}: replies without a parsable action, "
                                                          f"% of agent replies, seeds {names}")
    if unmatched is not None:
        table += "\n\n" + seeds_table(unmatched, splits, title=f"{env}: actions the environment could not "
                                                              f"match, % of well-formed actions, seeds {names}")
    if results_path is not None:
        write_text_atomic(table + "\n", results_path)
        extra = {} if rates is None else {"invalid_format_rate": rates}
        extra.update({} if unmatched is None else {"unmatched_action_rate": unmatched})
        extra.update({} if diffs is None else {"difference_from_sft": diffs})
        write_json_atomic({"env": env, "seeds": seeds, "rows": per_seed, **extra, "config": config},
                          Path(results_path).with_suffix(".json"))
    return table


def finished_rows(out: str | Path, splits) -> dict[str, dict]:
    """The results rows of one run directory, read from the summaries of its finished phases.

    Unlike `run_pipeline` this runs nothing: an evaluation that has not finished
    (no summary.json yet) is simply absent, and shows as "-" in the tables.
    """
    out = Path(out)

    def averages(folder: Path, pattern: str) -> dict:
        found = {}
        for split in splits:
            summary = folder / pattern.format(split=split) / "summary.json"
            if summary.is_file():
                found[split] = json.loads(summary.read_text())["average_reward"]
        return found

    rows = {"SFT": averages(out / "sft", "eval-{split}")}
    for name, folder in (("RFT", "rft"), ("PPO", "ppo")):
        if (found := averages(out / folder, "eval-{split}")):
            rows[name] = found
    bon_summaries = sorted((out / "best-of-n").glob("*/summary.json"))
    if bon_summaries:
        n = json.loads(bon_summaries[0].read_text())["n"]
        rows[f"Best-of-{n}"] = averages(out / "best-of-n", "{split}")
    for row, loop in (("PPO-online", "ppo-online"), ("GRPO", "grpo"), ("ETO", "eto")):
        summary = out / loop / "summary.json"
        for it in json.loads(summary.read_text()) if summary.is_file() else []:
            rows[f"{row}-iter-{it['iteration']}"] = {s: it[s] for s in splits if s in it}
    return rows


def behaviour_rates(out: str | Path, splits, env: str) -> dict[str, dict[str, dict]]:
    """Per row and split, from the finished evaluations: % of agent replies with no parsable action
    ("invalid_format_rate") and % of well-formed actions the environment could not match
    ("unmatched_action_rate")."""
    marker = envs.env_class(env).unmatched_action
    rates: dict[str, dict[str, dict]] = {"invalid_format_rate": {}, "unmatched_action_rate": {}}
    for name, folder in phase_folders(out).items():
        for split in splits:
            run = folder / f"eval-{split}"
            if (run / "summary.json").is_file() and (run / TRAJECTORIES).is_file():
                records = read_jsonl_records(run / TRAJECTORIES)
                rates["invalid_format_rate"].setdefault(name, {})[split] = invalid_format_rate(records)
                rates["unmatched_action_rate"].setdefault(name, {})[split] = unmatched_action_rate(records, marker)
    return rates


def report_seeds(out: str | Path, seeds: list[int], splits, env: str,
                 results_path: str | Path | None = None) -> str:
    """The seeds tables from what OUT/seed-K holds now (finished phases only), optionally written out."""
    per_seed = {s: finished_rows(Path(out) / f"seed-{s}", splits) for s in seeds}
    by_seed = {s: behaviour_rates(Path(out) / f"seed-{s}", splits, env) for s in seeds}
    rates = {s: by_seed[s]["invalid_format_rate"] for s in seeds}
    unmatched = {s: by_seed[s]["unmatched_action_rate"] for s in seeds}
    diffs = differences_from_sft({s: per_task_rewards(Path(out) / f"seed-{s}", splits) for s in seeds}, splits)
    config = Path(out) / f"seed-{seeds[0]}" / "pipeline_config.json"
    return write_seeds_results(per_seed, splits, env, results_path,
                               json.loads(config.read_text()) if config.is_file() else None, rates, diffs,
                               unmatched)


def seeds_table(per_seed: dict[int, dict[str, dict]], splits, title: str = "") -> str:
    """Rows = methods; per split, one column per seed then the mean over seeds."""
    seeds = list(per_seed)
    methods = list(dict.fromkeys(m for rows in per_seed.values() for m in rows))
    header, rule = ["method"], ["---"]
    for split in splits:
        header += [f"{split} s{s}" for s in seeds] + [f"**{split} mean**"]
        rule += ["---:"] * (len(seeds) + 1)
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for m in methods:
        cells = [m]
        for split in splits:
            values = [per_seed[s].get(m, {}).get(split) for s in seeds]
            cells += [f"{v:.1f}" if v is not None else "-" for v in values]
            known = [v for v in values if v is not None]
            cells.append(f"**{sum(known) / len(known):.1f}**" if len(known) == len(values) and known else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def results_table(rows: dict[str, dict], splits, title: str = "") -> str:
    """A Markdown table in the paper's shape: one row per method, one column per test split."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for name, values in rows.items():
        cells = [f"{values[s]:.1f}" if isinstance(values.get(s), (int, float)) else "-" for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reward_plot(rows: dict[str, dict], splits, path: Path) -> Path:
    """An SVG of average reward per ETO iteration (0 = SFT) per split, the baselines as dashed lines."""
    iterations = ["SFT"] + [k for k in rows if k.startswith("ETO-iter-")]
    series = {s: [(i, rows[m][s], None) for i, m in enumerate(iterations) if isinstance(rows[m].get(s), (int, float))]
              for s in splits}
    references = {f"{m}, {s}": (v[s], None) for m, v in rows.items() if m not in iterations for s in splits
                  if isinstance(v.get(s), (int, float))}
    svg = point_chart(series, references, [str(i) for i in range(len(iterations))], "ETO iteration (0 = SFT)",
                      "average reward x100")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg + "\n")
    return path


# --------------------------------------------------------------------------- comparing evaluation folders


def recorded_env(folder: Path) -> str | None:
    """The environment an evaluation folder ran, as its run.json records it (None: no run.json)."""
    identity = recorded_identity(folder)
    if identity is None:
        return None
    if not isinstance(identity.get("env"), str):
        raise ValueError(f"{folder / RUN_FILE}: no identity.env naming the environment the folder ran")
    return identity["env"]


def folders_env(folders: list[Path], env: str | None) -> str:
    """The one environment the folders ran: `env` when given (refused if a folder's run.json names another),
    else the one their run.json files name. Its rules count the unmatched actions, so a guess would
    print a wrong rate without a word."""
    recorded = {folder: recorded_env(folder) for folder in folders}
    if env is not None:
        other = [f"{folder} ({e})" for folder, e in recorded.items() if e is not None and e != env]
        if other:
            raise ValueError(f"--env {env}, but these folders ran another environment: {', '.join(other)}")
        return env
    unknown = [str(folder) for folder, e in recorded.items() if e is None]
    if unknown:
        raise ValueError(f"no run.json names the environment of {', '.join(unknown)}: give --env")
    named = sorted(set(recorded.values()))
    if len(named) > 1:
        raise ValueError(f"the folders ran different environments ({', '.join(named)}): compare one at a time")
    return named[0]


def compare_runs(folders: list[Path], env: str | None = None) -> str:
    """One row per evaluation folder (explore.py --out): reward, behaviour, and the paired difference
    from the first folder over the tasks both ran (how settings are compared on the valid slice).
    `env`: the environment they ran (None: the one their run.json files record)."""
    env = folders_env(folders, env)
    runs = {folder: read_jsonl_records(folder / TRAJECTORIES) for folder in folders}  # each file read once
    rewards = {folder: {r["id"]: [float(r["reward"])] for r in records} for folder, records in runs.items()}
    lines = ["| run | tasks | reward x100 | difference from the first (± SE) | success % | no action % | "
             "unmatched actions % | repeated actions % | ended at the step limit % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for folder, records in runs.items():
        s = summarize(records, env, "")
        d = paired_difference(rewards[folder], rewards[folders[0]]) if folder != folders[0] else None
        diff = "-" if d is None else f"{d['mean']:+.1f} ± {d['se']:.1f}"
        limit = 100 * s["end_reasons"].get("max_steps", 0) / max(s["episodes"], 1)
        lines.append(f"| {folder} | {s['episodes']} | {s['average_reward']:.1f} | {diff} | {s['success_rate']:.1f} | "
                     f"{s['invalid_format_rate']:.1f} | {s['unmatched_action_rate']:.1f} | "
                     f"{s['repeated_action_rate']:.1f} | {limit:.1f} |")
    return "\n".join(lines)


TRAINED_ON = {"train_examples": "examples", "train_pairs": "pairs", "train_episodes": "episodes"}


def stage_cost(folder: Path) -> dict:
    """What one finished training stage (a folder with metrics.jsonl) cost: the examples it trained on, its
    optimizer steps, the loss tokens of those steps (PPO's ppo_epochs steps on a batch each count its tokens)
    and its minutes: from the start record to the last, each resumed run from its resume record on (rollout
    scoring, steps, checkpoints; loading the model and scoring the reference come before the start record)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{folder}: no metrics.jsonl (not a training stage's folder)")
    records = read_metrics(path)
    start = next((r for r in records if r.get("event") == "start"), None)
    if start is None or not any(r.get("event") == "done" for r in records):
        raise ValueError(f"{path}: the stage has not finished (no start or no done record)")
    steps = [r for r in records if "step_time" in r]
    if len(steps) != start["total_steps"]:
        raise ValueError(f"{path}: {len(steps)} step records for total_steps {start['total_steps']}")
    key = next((k for k in TRAINED_ON if k in start), None)
    if key is None:
        raise ValueError(f"{path}: the start record names none of {', '.join(TRAINED_ON)}")
    seconds, begun, last = 0.0, start["time"], start["time"]
    for r in records:
        if r.get("event") == "resume":  # the killed run's time after its last kept record is not counted
            seconds, begun = seconds + last - begun, r["time"]
        last = r["time"]
    seconds += last - begun
    return {"stage": start["stage"], "trained_on": f"{start[key]} {TRAINED_ON[key]}", "steps": len(steps),
            "tokens": int(sum(r["tokens"] for r in steps)), "minutes": seconds / 60}


def costs_table(folders: list[Path]) -> str:
    """One row per training stage: what it trained on, its optimizer steps, loss tokens and minutes (stage_cost)."""
    lines = ["| stage folder | stage | trained on | optimizer steps | loss tokens | minutes |",
             "|---|---|---:|---:|---:|---:|"]
    for folder in folders:
        c = stage_cost(folder)
        lines.append(f"| {folder} | {c['stage']} | {c['trained_on']} | {c['steps']} | {c['tokens']:,} | "
                     f"{c['minutes']:.1f} |")
    return "\n".join(lines)


CURVE_SPLITS = ("valid", "test_seen", "test_unseen")


def curve_table(loops: list[Path]) -> str:
    """Reward against environment episodes: one row per iteration of each loop folder (ETO's, eto_ref/eto.py, or
    an online PPO or GRPO loop's, eto_ref/online.py; their summary.json), with the episodes and minutes spent
    so far (collecting, training and evaluating), the reward of the iteration's own episodes and the
    evaluation of the policy it ends with."""
    lines = ["| loop | iteration | episodes so far | minutes so far | reward of its episodes | "
             + " | ".join(CURVE_SPLITS) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(CURVE_SPLITS)]
    for loop in loops:
        path = loop / "summary.json"
        if not path.is_file():
            raise ValueError(f"{loop}: no summary.json (not an ETO or online RL loop's folder)")
        episodes = minutes = 0.0
        for i, row in enumerate(json.loads(path.read_text())):
            missing = [k for k in ("iteration", "episodes", "train_reward", "seconds") if k not in row]
            if missing:
                raise ValueError(f"{path}: row {i} has no {', '.join(missing)} (written by an older version: rerun)")
            episodes += row["episodes"]
            minutes += sum(row["seconds"].values()) / 60
            rewards = " | ".join(f"{row[s]:.1f}" if s in row else "-" for s in CURVE_SPLITS)
            lines.append(f"| {loop} | {row['iteration']} | {episodes:.0f} | {minutes:.0f} | "
                         f"{row['train_reward']:.1f} | {rewards} |")
    return "\n".join(lines)


def compare_seeds(bases: list[Path], others: list[Path]) -> str:
    """A setting against its baseline over seeds, by hand (explore.py --out folders, seed i's baseline
    bases[i], its setting others[i]): one row per pair of folders, numbered from 1 in the order given
    (the folders' names say which seed each is), with its paired difference, then the pooled
    difference as the seeds report computes it (each task's difference averaged over the seeds, the
    standard error over the tasks)."""
    if len(bases) != len(others):
        raise ValueError(f"{len(bases)} baseline folders but {len(others)} others: give one of each per seed")
    rewards = {f: task_rewards(f) for f in dict.fromkeys(bases + others)}
    per_seed = {i: {"SFT": {"valid": rewards[b]}, "other": {"valid": rewards[o]}}
                for i, (b, o) in enumerate(zip(bases, others))}
    lines = ["| pair | baseline | other | baseline reward x100 | other reward x100 | difference (± SE) | tasks |",
             "|---|---|---|---:|---:|---:|---:|"]

    def mean(r: dict) -> float:
        return 100 * sum(r.values()) / max(len(r), 1)

    for i, (b, o) in enumerate(zip(bases, others)):
        d = differences_from_sft({i: per_seed[i]}, ("valid",)).get("other", {}).get("valid")
        diff = "-" if d is None else f"{d['mean']:+.1f} ± {d['se']:.1f}"
        lines.append(f"| {i + 1} | {b} | {o} | {mean(rewards[b]):.1f} | {mean(rewards[o]):.1f} | {diff} | "
                     f"{0 if d is None else d['tasks']} |")
    d = differences_from_sft(per_seed, ("valid",)).get("other", {}).get("valid")
    beyond = d is not None and abs(d["mean"]) > 2 * d["se"]
    pooled = "-" if d is None else f"**{d['mean']:+.1f} ± {d['se']:.1f}**" + (" *" if beyond else "")
    base_mean = sum(mean(rewards[b]) for b in bases) / len(bases)
    other_mean = sum(mean(rewards[o]) for o in others) / len(others)
    lines.append(f"| mean of {len(bases)} | | | {base_mean:.1f} | {other_mean:.1f} | {pooled} | "
                 f"{0 if d is None else d['tasks']} |")
    lines += ["", "(paired over tasks; the mean's difference averages each task's over the seeds that ran it in "
              "both folders; ± one standard error over the tasks; * beyond twice it)"]
    return "\n".join(lines)


def main(argv=None) -> str:
    """python -m eto_ref.results compare BASE OTHER... [--env ENV] | purchases FOLDER... | pairs FILE...
    | seeds --base BASE0 BASE1... --other OTHER0 OTHER1... | costs STAGE... | curve LOOP..."""
    p = argparse.ArgumentParser(description="Compare evaluation folders (explore.py --out) task by task.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="rows: reward, paired difference from the first folder, behaviour")
    c.add_argument("folders", nargs="+", type=Path)
    c.add_argument("--env", default=None,
                   help="the environment the folders ran (default: the one their run.json files record)")
    b = sub.add_parser("purchases", help="webshop: %% of episodes whose purchase missed the price, an option, ...")
    b.add_argument("folders", nargs="+", type=Path)
    e = sub.add_parser("seeds", help="a setting against its baseline over seeds: per-seed and pooled paired difference")
    e.add_argument("--base", nargs="+", type=Path, required=True, help="each seed's baseline folder, in seed order")
    e.add_argument("--other", nargs="+", type=Path, required=True, help="each seed's setting folder, same order")
    k = sub.add_parser("costs", help="training stages (folders with metrics.jsonl): examples, steps, loss tokens, minutes")
    k.add_argument("folders", nargs="+", type=Path)
    r = sub.add_parser("curve", help="loops (ETO, online PPO or GRPO): reward against episodes and minutes")
    r.add_argument("folders", nargs="+", type=Path)
    q = sub.add_parser("pairs", help="preference pairs files: where the failed side parts from the expert's")
    q.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.command == "pairs":
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            p.error(f"no such pairs file: {', '.join(missing)}")
    elif args.command not in ("costs", "curve"):  # stage_cost and curve_table check their own folders
        if args.command == "seeds":
            args.folders = args.base + args.other
        missing = [str(f) for f in args.folders if not (f / TRAJECTORIES).is_file()]
        if missing:
            p.error(f"no {TRAJECTORIES} in: {', '.join(missing)}")
    tables = {"compare": lambda: compare_runs(args.folders, args.env),
              "purchases": lambda: purchases_table(args.folders), "pairs": lambda: pairs_table(args.files),
              "seeds": lambda: compare_seeds(args.base, args.other),
              "costs": lambda: costs_table(args.folders), "curve": lambda: curve_table(args.folders)}
    try:
        table = tables[args.command]()
    except ValueError as e:
        p.error(str(e))
    print(table)
    return table


if __name__ == "__main__":
    main()

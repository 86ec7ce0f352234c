"""The whole main job in one call: SFT, the baselines, ETO iterations, and the paper's results table.

    python train.py --stage all --env webshop --seed 0 --out runs/main

    OUT/base/                 the starting model (a fresh tiny model unless --model is given)
    OUT/data/sft.json         the expert trajectories trained on (ETO format)
    OUT/sft/                  behavioral cloning (final/ = pi_0), eval-<split>/ its evaluation
    OUT/eto/iter-k/           explore/ (trajectories, pairs), dpo/ (final/ = pi_k), eval-<split>/
    OUT/rft/                  RFT: fine-tuned on expert + pi_0's successful explorations of iter-1
    OUT/best-of-n/<split>/    N sampled runs of pi_0 per test task, best reward kept
    OUT/results.json, results.md, reward_per_iteration.svg   (results.json: also the seconds per phase)

Every phase resumes on its own, so rerunning the same command after an
interruption continues where it stopped and skips what is finished.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from eto_ref.agent import AgentConfig
from eto_ref.baselines import best_of_n, rft_records
from eto_ref.eto import VALID, LoopConfig, evaluate_policy, load_policy, run_eto
from eto_ref.exploration import ExploreConfig, TRAJECTORIES, invalid_format_rate
from eto_ref.jsonl import read_jsonl_records, write_json_atomic
from eto_ref.metrics import duration, timed
from eto_ref.pairs import EXTRA_REJECTED_TURNS
from eto_ref.trainer import DPOConfig, SFTConfig, preset_name, run_dpo, run_sft


@dataclass
class PipelineConfig:
    """Defaults: the built-in tiny model on the science environment, about 20 minutes on 2 CPU cores."""

    env: str = "science"
    out: str = "runs/main"
    seed: int = 0  # model init, data order, sampling
    model: str | None = None  # starting model directory; None: a fresh tiny model in OUT/base
    env_seed: int = 0  # which tasks the environment generates (kept fixed across seeds)
    # behavioral cloning
    sft_examples: int = 480  # expert trajectories of the train split
    sft_epochs: int = 6
    sft_lr: float = 2e-3
    # ETO
    iterations: int = 1
    explore_limit: int = 160  # training tasks explored per iteration (the first of the SFT tasks)
    dpo_lr: float = 5e-5
    dpo_epochs: int = 3
    beta: float = 0.1
    rejected_extra_turns: int = EXTRA_REJECTED_TURNS  # rejected side: at most expert length + this many agent turns
    dpo_sft_weight: float | None = None  # + weight * chosen NLL; None: the preset's (tiny 1.0, 7b 0 = the paper)
    # baselines
    rft_epochs: int = 1  # RFT continues from pi_0 on expert + successes ...
    rft_lr_scale: float = 0.25  # ... at this fraction of the SFT learning rate
    best_of_n: int = 4  # 0 = skip the baseline
    bon_temperature: float = 0.7
    baselines: bool = True
    # evaluation
    eval_limit: int = 50  # tasks per test split
    eval_splits: tuple[str, ...] = ("test_seen", "test_unseen")
    valid: int = 0  # > 0: also evaluate on this many training tasks never trained on (column "valid")
    valid_start: int = 1000  # ... train[valid_start : valid_start + valid]; must come after the SFT tasks
    # The official prompts add one in-context example; a tiny model trained from scratch on 0-shot
    # sequences has never seen one and is thrown off by it, so None = 0-shot for tiny models only.
    icl_example: bool | None = None
    agent: AgentConfig = field(default_factory=lambda: AgentConfig(max_new_tokens=96))
    device: str = "auto"
    progress: bool = True


def log(message: str) -> None:
    print(f"[eto] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- phases


def table_splits(cfg: PipelineConfig) -> tuple[str, ...]:
    """The evaluation columns: "valid" first when asked for (settings are chosen there), then the test splits."""
    return ((VALID,) if cfg.valid > 0 else ()) + tuple(cfg.eval_splits)


def check_valid(cfg: PipelineConfig) -> None:
    if cfg.valid > 0 and cfg.valid_start < cfg.sft_examples:
        raise ValueError(f"valid split train[{cfg.valid_start}:{cfg.valid_start + cfg.valid}] overlaps the SFT "
                         f"data train[:{cfg.sft_examples}]; set valid_start >= {cfg.sft_examples}")


def prepare_base_model(cfg: PipelineConfig) -> Path:
    """The model SFT starts from: the given directory, or a fresh tiny model seeded with cfg.seed."""
    if cfg.model:
        return Path(cfg.model)
    from eto_ref.tiny import ensure_tiny_model

    return ensure_tiny_model(Path(cfg.out) / "base", seed=cfg.seed)


def prepare_sft_data(cfg: PipelineConfig) -> Path:
    """The first `sft_examples` expert trajectories of the train split, as an ETO-format JSON file."""
    path = Path(cfg.out) / "data" / "sft.json"
    if not path.is_file():
        from envs import make_env

        env = make_env(cfg.env, seed=cfg.env_seed)
        records = [env.expert_trajectory(t) for t in env.task_ids("train")[: cfg.sft_examples]]
        write_json_atomic(records, path, indent=1)
    return path


def sft_config(cfg: PipelineConfig, model: Path, data: Path, out: Path, epochs: int, lr: float) -> SFTConfig:
    return SFTConfig.for_model(model, data=str(data), out=str(out), lr=lr, epochs=epochs, seed=cfg.seed,
                               device=cfg.device, progress=cfg.progress, save_every=50)


def dpo_config_fn(cfg: PipelineConfig):
    def make(model: str, pairs: str, out: str) -> DPOConfig:
        weight = {} if cfg.dpo_sft_weight is None else {"sft_weight": cfg.dpo_sft_weight}
        return DPOConfig.for_model(model, pairs=pairs, out=out, lr=cfg.dpo_lr, epochs=cfg.dpo_epochs,
                                   beta=cfg.beta, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                                   save_every=50, **weight)
    return make


def loop_config(cfg: PipelineConfig, policy: Path) -> LoopConfig:
    return LoopConfig(model=str(policy), out=str(Path(cfg.out) / "eto"), env=cfg.env, iterations=cfg.iterations,
                      explore_limit=cfg.explore_limit, eval_limit=cfg.eval_limit, eval_splits=table_splits(cfg),
                      valid_start=cfg.valid_start, valid_limit=cfg.valid,
                      rejected_extra_turns=cfg.rejected_extra_turns, env_seed=cfg.env_seed, agent=cfg.agent,
                      device=cfg.device, progress=cfg.progress)


def evaluate_once(model_dir: Path, out: Path, cfg: PipelineConfig) -> dict:
    """Evaluate a policy on the test splits (reusing finished summaries)."""
    return evaluate_policy(model_dir, out, loop_config(cfg, model_dir))


def run_rft(cfg: PipelineConfig, sft_final: Path, sft_data: Path) -> dict:
    """RFT: fine-tune pi_0 on expert + its successful trajectories from the ETO iteration-1 exploration."""
    out = Path(cfg.out) / "rft"
    explored = read_jsonl_records(Path(cfg.out) / "eto" / "iter-1" / "explore" / TRAJECTORIES)
    data = out / "data.json"
    if not data.is_file():
        records = rft_records(json.loads(sft_data.read_text()), explored)
        write_json_atomic(records, data, indent=1)
    successes = len(json.loads(data.read_text())) - cfg.sft_examples
    final = run_sft(sft_config(cfg, sft_final, data, out, cfg.rft_epochs, cfg.sft_lr * cfg.rft_lr_scale))
    return {"successes_added": successes, **evaluate_once(final, out, cfg)}


def run_best_of_n(cfg: PipelineConfig, sft_final: Path) -> dict:
    """Best-of-N of pi_0 on each test split (not on valid: Best-of-N is a baseline, not a setting to choose)."""
    model, tokenizer = load_policy(sft_final, cfg.device)
    agent = replace(cfg.agent, temperature=cfg.bon_temperature, seed=cfg.seed)
    results = {}
    for split in cfg.eval_splits:
        ecfg = ExploreConfig(env=cfg.env, split=split, out_dir=str(Path(cfg.out) / "best-of-n" / split),
                             limit=cfg.eval_limit, env_seed=cfg.env_seed, agent=agent)
        results[split] = best_of_n(model, tokenizer, ecfg, cfg.best_of_n, cfg.progress)["average_reward"]
    return results


# --------------------------------------------------------------------------- the job


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT -> evaluate -> ETO iterations (each evaluated) -> RFT, Best-of-N -> results table."""
    out = Path(cfg.out)
    check_valid(cfg)
    seconds = {}  # wall time of each phase in this invocation
    with timed(seconds, "base model"):
        base = prepare_base_model(cfg)
    if cfg.icl_example is None:
        cfg = replace(cfg, icl_example=preset_name(base) != "tiny")
    cfg = replace(cfg, agent=replace(cfg.agent, icl_example=cfg.icl_example))
    write_json_atomic(asdict(cfg), out / "pipeline_config.json")
    data = prepare_sft_data(cfg)
    log(f"SFT of {base} on {data}")
    with timed(seconds, "SFT"):
        sft_final = run_sft(sft_config(cfg, base, data, out / "sft", cfg.sft_epochs, cfg.sft_lr))
    with timed(seconds, "SFT evaluation"):
        rows = {"SFT": evaluate_once(sft_final, out / "sft", cfg)}
    splits = table_splits(cfg)
    log(f"SFT: {rows['SFT']}")
    log(f"ETO: {cfg.iterations} iteration(s)")
    with timed(seconds, "ETO"):
        iterations = run_eto(loop_config(cfg, sft_final), dpo_config_fn(cfg))
    if cfg.baselines:
        if cfg.iterations >= 1:
            log("RFT")
            with timed(seconds, "RFT"):
                rows["RFT"] = run_rft(cfg, sft_final, data)
        if cfg.best_of_n > 0:
            log(f"Best-of-{cfg.best_of_n}")
            with timed(seconds, f"Best-of-{cfg.best_of_n}"):
                rows[f"Best-of-{cfg.best_of_n}"] = run_best_of_n(cfg, sft_final)
    for it in iterations:
        rows[f"ETO-iter-{it['iteration']}"] = {s: it[s] for s in splits if s in it}
    seconds["total"] = round(sum(seconds.values()), 1)
    log("time per phase: " + ", ".join(f"{name} {duration(t)}" for name, t in seconds.items()))
    results = {"env": cfg.env, "seed": cfg.seed, "rows": rows, "iterations": iterations, "seconds": seconds}
    write_json_atomic(results, out / "results.json")
    table = results_table(rows, splits, title=f"{cfg.env}, seed {cfg.seed}: average reward x100")
    (out / "results.md").write_text(table + "\n")
    write_reward_plot(rows, splits, out / "reward_per_iteration.svg")
    print(table)
    return results


def run_seeds(cfg: PipelineConfig, seeds: list[int], results_path: str | Path | None = None) -> str:
    """The main job once per seed (OUT/seed-K), then one table with per-seed numbers and their mean."""
    per_seed = {s: run_pipeline(replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed-{s}")))["rows"] for s in seeds}
    splits = table_splits(cfg)
    rates = {s: format_rates(Path(cfg.out) / f"seed-{s}", splits) for s in seeds}
    table = write_seeds_results(per_seed, splits, cfg.env, results_path, asdict(cfg), rates)
    print(table)
    return table


def write_seeds_results(per_seed: dict[int, dict], splits, env: str, results_path: str | Path | None,
                        config: dict | None, rates: dict[int, dict] | None = None) -> str:
    """The seeds table (and, given `rates`, the invalid-format table); with a path, written there
    (Markdown) and beside it as .json with the config."""
    seeds = list(per_seed)
    names = ", ".join(map(str, seeds))
    table = seeds_table(per_seed, splits, title=f"{env}: average reward x100, seeds {names}")
    if rates is not None:
        table += "\n\n" + seeds_table(rates, splits, title=f"{env}: replies without a parsable action, "
                                                          f"% of agent replies, seeds {names}")
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(table + "\n")
        extra = {} if rates is None else {"invalid_format_rate": rates}
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
    if (rft := averages(out / "rft", "eval-{split}")):
        rows["RFT"] = rft
    bon_summaries = sorted((out / "best-of-n").glob("*/summary.json"))
    if bon_summaries:
        n = json.loads(bon_summaries[0].read_text())["n"]
        rows[f"Best-of-{n}"] = averages(out / "best-of-n", "{split}")
    eto_summary = out / "eto" / "summary.json"
    for it in json.loads(eto_summary.read_text()) if eto_summary.is_file() else []:
        rows[f"ETO-iter-{it['iteration']}"] = {s: it[s] for s in splits if s in it}
    return rows


def policy_folders(out: str | Path) -> dict[str, Path]:
    """Run folders of the trained policies of one run directory, by table row (those that exist)."""
    out = Path(out)
    folders = {"SFT": out / "sft", "RFT": out / "rft"}
    iterations = sorted(out.glob("eto/iter-*"), key=lambda p: int(p.name.split("-")[1]))
    folders.update({f"ETO-iter-{p.name.split('-')[1]}": p for p in iterations})
    return {name: folder for name, folder in folders.items() if folder.is_dir()}


def format_rates(out: str | Path, splits) -> dict[str, dict]:
    """Per row and split: % of agent replies with no parsable action, from the finished evaluations."""
    rates = {}
    for name, folder in policy_folders(out).items():
        for split in splits:
            run = folder / f"eval-{split}"
            if (run / "summary.json").is_file() and (run / TRAJECTORIES).is_file():
                records = read_jsonl_records(run / TRAJECTORIES)
                rates.setdefault(name, {})[split] = invalid_format_rate(records)
    return rates


def report_seeds(out: str | Path, seeds: list[int], splits, env: str,
                 results_path: str | Path | None = None) -> str:
    """The seeds tables from what OUT/seed-K holds now (finished phases only), optionally written out."""
    per_seed = {s: finished_rows(Path(out) / f"seed-{s}", splits) for s in seeds}
    rates = {s: format_rates(Path(out) / f"seed-{s}", splits) for s in seeds}
    config = Path(out) / f"seed-{seeds[0]}" / "pipeline_config.json"
    return write_seeds_results(per_seed, splits, env, results_path,
                               json.loads(config.read_text()) if config.is_file() else None, rates)


# --------------------------------------------------------------------------- reporting


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


def write_reward_plot(rows: dict[str, dict], splits, path: Path, width: int = 420, height: int = 260) -> Path:
    """A small SVG line chart of test reward per ETO iteration (iteration 0 = SFT); no plotting library."""
    points = [rows["SFT"]] + [rows[k] for k in rows if k.startswith("ETO-iter-")]
    values = [v[s] for v in points for s in splits if isinstance(v.get(s), (int, float))]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = max(0.0, lo - 5), min(100.0, hi + 5) if hi > lo else hi + 10
    left, right, top, bottom = 50, 20, 30, 40

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(len(points) - 1, 1))
        y = top + (height - top - bottom) * (1 - (v - lo) / max(hi - lo, 1e-9))
        return x, y

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18">average reward x100 per ETO iteration (0 = SFT)</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for tick in (lo, (lo + hi) / 2, hi):
        _, y = xy(0, tick)
        svg.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.0f}</text>')
    for i in range(len(points)):
        x, _ = xy(i, lo)
        svg.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{i}</text>')
    for k, split in enumerate(splits):
        series = [(i, p[split]) for i, p in enumerate(points) if isinstance(p.get(split), (int, float))]
        color = colors[k % len(colors)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in series))
        svg.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, v in series:
            x, y = xy(i, v)
            svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        svg.append(f'<text x="{width - right - 90}" y="{top + 14 * (k + 1)}" fill="{color}">{split}</text>')
    svg.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")
    return path

"""Train an ETO agent: behavioral cloning, then DPO on explored-vs-expert pairs.

    python train.py --stage all                                   # the main job: SmolLM2, science, seed 0
    python train.py --stage sft                                   # SmolLM2 on the science expert trajectories
    python train.py --stage sft --model path/to/Llama-2-7b-chat-hf --data data/alfworld_sft.json --lora-rank 16
    python train.py --stage eto --model runs/sft/final --env science --iterations 2 --out runs/eto
    python train.py --stage eto --model runs/sft/final --pairs runs/explore-1/pairs.json --out runs/eto-dpo
    python train.py --stage ppo --model runs/main/sft/final --out runs/ppo \
        --trajectories runs/main/eto/iter-1/explore/trajectories.jsonl
    python train.py --stage grpo --model runs/main/sft/final --samples runs/samples --out runs/grpo
    python train.py --stage grpo --model runs/main/sft/final --explore-limit 192 --out runs/grpo-online

--stage sft   behavioral cloning on expert trajectories (paper Eq. 5, eto_ref/sft.py).
--stage eto   the ETO loop (paper Algorithm 1, eto_ref/eto.py) from --model: per iteration, explore
              the training tasks, pair failures with the expert, DPO (paper Eq. 7, eto_ref/dpo.py) with
              the reference reset to the current policy, evaluate. With --pairs: one DPO stage.
--stage ppo   PPO (eto_ref/ppo.py): token-level PPO with a value head. With --trajectories: offline,
              as the paper's row, on explored episodes and their rewards. Without: online
              (eto_ref/online.py), per iteration explore greedily, train, evaluate.
--stage grpo  GRPO (eto_ref/grpo.py): the clipped surrogate with group-normalised rewards, no critic.
              With --samples: on sampled runs of the same tasks (SAMPLES/sample-*/trajectories.jsonl).
              Without: online, per iteration --group-size sampled runs of each task, train, evaluate.
--stage all   the main job (eto_ref/pipeline.py): SFT, its evaluation, the ETO iterations, the results
              table with the paired difference from SFT (--baselines adds RFT, PPO and Best-of-N).

Each stage's flags: python train.py --stage STAGE --help. Every flag is a config field
(eto_ref/config.py, eto_ref/eto.py, eto_ref/agent.py, eto_ref/pipeline.py); an unset flag
takes the preset of the model (--preset auto: tiny for the built-in tiny model, small for
pretrained models under 1B parameters such as SmolLM2, 7b above), else the field default
(the official ETO values for Llama-2-7B-Chat).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from envs.write_expert_data import write_expert_data
from eto_ref.agent import AgentConfig
from eto_ref.cli import add_config_flags, given_values
from eto_ref.config import (PRESET_NAMES, PRESETS, DPOConfig, GRPOConfig, PPOConfig, SFTConfig, TrainConfig,
                             preset_for, preset_values)
from eto_ref.distributed import is_main
from eto_ref.dpo import run_dpo
from eto_ref.eto import LoopConfig, run_eto
from eto_ref.models import default_model, resolve_model
from eto_ref.online import run_online
from eto_ref.pipeline import PipelineConfig, run_pipeline, run_seeds
from eto_ref.grpo import run_grpo
from eto_ref.ppo import run_ppo
from eto_ref.results import report_seeds
from eto_ref.runtime import add_threads_flag, setup_cpu, stop_on_terminate
from eto_ref.sampler import SamplingConfig
from eto_ref.sft import run_sft

STAGES = ("sft", "eto", "ppo", "grpo", "all")
# Agent fields whose names a training stage already uses: on train.py they take an "agent-" prefix.
AGENT_CLASHES = ("batch_size", "max_len", "max_steps")
# TrainConfig fields that --stage all sets itself (per phase) or holds at the job level.
JOB_LEVEL = ("model", "out", "seed", "resume", "data", "pairs", "trajectories", "samples")


def presets_of(key: str) -> dict:
    return {name: PRESETS[name].get(key, {}) for name in PRESET_NAMES}


def add_agent_flags(parser) -> None:
    g = parser.add_argument_group("agent (exploration and evaluation)")
    add_config_flags(g, SamplingConfig, presets=presets_of("sampling"))
    add_config_flags(g, AgentConfig, skip=("seed", *AGENT_CLASHES), presets=presets_of("agent"))
    add_config_flags(g, AgentConfig, prefix="agent-", skip=tuple(f.name for f in fields(AgentConfig)
                                                                 if f.name not in AGENT_CLASHES),
                     presets=presets_of("agent"))


# LoopConfig fields that only the ETO loop reads (its pairs and DPO schedule): not flags of the online RL loop.
DPO_LOOP = ("rejected_extra_turns", "beta_schedule", "lr_schedule")


def add_loop_flags(parser, title: str = "ETO loop (eto_ref/eto.py)", skip=()) -> None:
    g = parser.add_argument_group(title)
    add_config_flags(g, LoopConfig, skip=("model", "out", *skip), presets=presets_of("loop"))


def build_parser(stage: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--preset", default="auto", choices=("auto", *PRESET_NAMES),
                   help="defaults by model (auto: the model's own; see eto_ref/config.py)")
    add_threads_flag(p)
    if stage == "sft":
        p.add_argument("--env", default="science",
                       help="environment whose train-split expert trajectories are the default --data "
                            "(data/<env>_sft.json, written if missing)")
        add_config_flags(p.add_argument_group("SFT (eto_ref/config.py SFTConfig)"), SFTConfig,
                         presets=presets_of("sft"))
    elif stage == "eto":
        p.add_argument("--model", default="runs/sft/final", help="the policy to start from (default runs/sft/final)")
        p.add_argument("--out", default="runs/eto", help="run directory (default runs/eto)")
        p.add_argument("--pairs", default=None, help="preference pairs: run one DPO stage on them (no loop)")
        add_config_flags(p.add_argument_group("DPO (eto_ref/config.py DPOConfig)"), DPOConfig,
                         skip=("model", "out", "pairs"), presets=presets_of("dpo"))
        add_loop_flags(p)
        add_agent_flags(p)
    elif stage in ("ppo", "grpo"):
        p.add_argument("--model", default="runs/main/sft/final", help="the policy to start from, also the KL "
                                                                      "reference (default runs/main/sft/final)")
        cls = RL_STAGES[stage][0]
        add_config_flags(p.add_argument_group(f"{stage.upper()} (eto_ref/config.py {cls.__name__})"), cls,
                         skip=("model",), presets=presets_of(stage))
        add_loop_flags(p, "online loop, without --trajectories / --samples (eto_ref/online.py)", skip=DPO_LOOP)
        add_agent_flags(p)
    elif stage == "all":
        g = p.add_argument_group("the main job (eto_ref/pipeline.py)")
        add_config_flags(g, PipelineConfig, presets=presets_of("pipeline"))
        g.add_argument("--seeds", default=None, help="comma-separated seeds: the job once per seed into "
                                                     "OUT/seed-K, then the seeds report (see --results)")
        g.add_argument("--results", default=None, help="with --seeds: write the report here (Markdown, + .json)")
        g.add_argument("--report", action="store_true",
                       help="with --seeds: run nothing, only write the report from the phases finished so far")
        add_loop_flags(p)
        add_agent_flags(p)
        both = p.add_argument_group("the training stages (--sft-X, --dpo-X, --ppo-X or --grpo-X sets one of them)")
        add_config_flags(both, TrainConfig, skip=JOB_LEVEL, note=" [SFT, DPO, PPO and GRPO]")
        add_config_flags(both, DPOConfig, skip=tuple(f.name for f in fields(TrainConfig)), note=" [DPO]")
        for prefix, cls in (("sft-", SFTConfig), ("dpo-", DPOConfig), ("ppo-", PPOConfig), ("grpo-", GRPOConfig)):
            add_config_flags(p.add_argument_group(f"{prefix[:-1].upper()} only"), cls, prefix=prefix,
                             skip=JOB_LEVEL, presets=presets_of(prefix[:-1]))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--stage", choices=STAGES)
    known, _ = peek.parse_known_args(argv)
    return build_parser(known.stage).parse_args(argv)


# --------------------------------------------------------------------------- configs from flags


def agent_config(args, preset: str) -> AgentConfig:
    sampling = SamplingConfig(**{**preset_values(preset, "sampling"), **given_values(args, SamplingConfig)})
    given = {**given_values(args, AgentConfig, skip=("sampling", "seed", *AGENT_CLASHES)),
             **given_values(args, AgentConfig, prefix="agent-", skip=("sampling", "seed"))}
    seed = getattr(args, "seed", 0) if not sampling.greedy else None
    return AgentConfig(sampling=sampling, seed=seed, **{**preset_values(preset, "agent"), **given})


def loop_config(args, preset: str, **fixed) -> LoopConfig:
    given = given_values(args, LoopConfig, skip=("model", "out", "agent"))
    return LoopConfig(agent=agent_config(args, preset), **{**preset_values(preset, "loop"), **given, **fixed})


def stage_config(cls, args, preset: str, prefix: str = "", skip=(), **fixed):
    """A stage config: field defaults < the preset < unprefixed flags < this stage's --prefix flags < `fixed`."""
    shared = given_values(args, cls, skip=skip)
    own = given_values(args, cls, prefix=prefix, skip=skip) if prefix else {}
    return cls(**{**preset_values(preset, cls.STAGE), **shared, **own, **fixed})


def model_preset(model: str, args) -> str:
    return preset_for(model) if args.preset == "auto" else args.preset


def ensure_sft_data(env: str, path: Path) -> Path:
    """Write the env's train-split expert trajectories to `path` unless it exists."""
    if not path.is_file():
        data = write_expert_data(env, "train", path)
        print(f"wrote {len(data)} expert trajectories of {env}/train to {path}", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- the stages


def run_sft_stage(args):
    model = str(resolve_model(getattr(args, "model", None) or default_model()))
    data = getattr(args, "data", None) or str(ensure_sft_data(args.env, Path(f"data/{args.env}_sft.json")))
    preset = model_preset(model, args)
    cfg = stage_config(SFTConfig, args, preset, model=model, data=data)
    announce(cfg, preset)
    final = run_sft(cfg)
    if is_main():
        print(f"final model: {final}")
    return final


def run_eto_stage(args):
    model = str(resolve_model(args.model))
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model directory (no config.json); run --stage sft first")
    preset = model_preset(model, args)
    if args.pairs:
        loop_flags = [f"--{k.replace('_', '-')}" for k in given_values(args, LoopConfig, skip=("model", "out"))]
        if loop_flags:
            raise SystemExit(f"{', '.join(loop_flags)}: loop settings, but --pairs runs one DPO stage on fixed "
                             "pairs; leave out --pairs to explore and pair at every iteration")
        cfg = stage_config(DPOConfig, args, preset, model=model, pairs=args.pairs, out=args.out)
        announce(cfg, preset)
        final = run_dpo(cfg)
        if is_main():
            print(f"final model: {final}")
        return final
    rows = run_eto(loop_config(args, preset, model=model, out=args.out),
                   stage_config(DPOConfig, args, preset, skip=("model", "out", "pairs")))
    for row in rows:
        print(json.dumps(row))
    return rows


RL_STAGES = {"ppo": (PPOConfig, run_ppo, "trajectories"), "grpo": (GRPOConfig, run_grpo, "samples")}


def run_rl_stage(args):
    """--stage ppo | grpo: one RL stage from --model on episodes collected beforehand (--trajectories,
    --samples), or without them the online loop: collect, train, evaluate, `--iterations` times."""
    cls, run, episodes = RL_STAGES[args.stage]
    model = str(resolve_model(args.model))
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model directory (no config.json); run --stage sft first")
    preset = model_preset(model, args)
    cfg = stage_config(cls, args, preset, model=model)
    announce(cfg, preset)
    if not getattr(args, episodes, None):
        rows = run_online(loop_config(args, preset, model=model, out=cfg.out), cfg)
        for row in rows:
            print(json.dumps(row))
        return rows
    loop_flags = [f"--{k.replace('_', '-')}" for k in given_values(args, LoopConfig, skip=("model", "out"))]
    if loop_flags:
        raise SystemExit(f"{', '.join(loop_flags)}: online-loop settings, but --{episodes} trains one stage on "
                         f"episodes collected beforehand; leave out --{episodes} to run the loop")
    final = run(cfg)
    if is_main():
        print(f"final model: {final}")
    return final


def announce(cfg, preset: str) -> None:
    """The stage's settings, on stderr (under torchrun rank 0 alone prints)."""
    if is_main():
        print(f"stage {cfg.STAGE}, preset {preset}: " + ", ".join(
            f"{k}={v}" for k, v in asdict(cfg).items() if k != "progress"), file=sys.stderr)


def pipeline_config(args):
    given = given_values(args, PipelineConfig, skip=("sft", "dpo", "ppo", "grpo", "loop"))
    model = given.get("model", "auto")
    preset = model_preset(default_model() if model == "auto" else model, args)
    return PipelineConfig(sft=stage_config(SFTConfig, args, preset, prefix="sft-", skip=JOB_LEVEL),
                          dpo=stage_config(DPOConfig, args, preset, prefix="dpo-", skip=JOB_LEVEL),
                          ppo=stage_config(PPOConfig, args, preset, prefix="ppo-", skip=JOB_LEVEL),
                          grpo=stage_config(GRPOConfig, args, preset, prefix="grpo-", skip=JOB_LEVEL),
                          loop=loop_config(args, preset),
                          **{**preset_values(preset, "pipeline"), **given})


def run_all(args):
    cfg = pipeline_config(args)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.report:
        if not seeds:
            raise SystemExit("--report: give the seeds to report with --seeds")
        table = report_seeds(cfg.out, seeds, cfg.loop.eval_splits, cfg.loop.env, args.results)
        print(table)
        return table
    if seeds:
        return run_seeds(cfg, seeds, args.results)
    return run_pipeline(cfg)


def main(argv=None):
    args = parse_args(argv)
    setup_cpu(args)
    stop_on_terminate()
    try:
        if args.stage == "all":
            return run_all(args)
        if args.stage == "eto":
            return run_eto_stage(args)
        if args.stage in RL_STAGES:
            return run_rl_stage(args)
        return run_sft_stage(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad settings, data, run dirs, NaN: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

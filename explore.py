"""Exploration, pair building and evaluation (a thin CLI over eto_ref.exploration).

    # ETO step 1+2: explore the training tasks with the current policy, pair with the expert
    python explore.py --model runs/sft/final --env science --split train --limit 96 --out runs/explore-1

    # validation: training tasks the main job never trains on
    python explore.py --model runs/main/sft/final --env science --split train --start 1000 --limit 100 --out runs/valid-sft

    # evaluation: average reward x100 and success rate on a test split
    python explore.py --model runs/sft/final --env science --split test_unseen --out runs/eval-sft-unseen

Every finished episode is appended to OUT/trajectories.jsonl at once; rerunning
the same command resumes where an interrupted run stopped. OUT/run.json records the
settings: a rerun with another model or other agent settings is refused (--no-resume
starts over). Unset agent flags take the model's preset (eto_ref/config.py).

    # the tasks split over 8 GPUs (one policy copy per GPU); rank 0 merges the trajectories
    torchrun --nproc_per_node=8 explore.py --model runs/sft/final --env science --split train --out runs/explore-1
"""

from __future__ import annotations

import argparse
import json

from eto_ref.agent import AgentConfig
from eto_ref.cli import add_config_flags, field_of, given_values, value_parser
from eto_ref.config import PRESET_NAMES, PRESETS, preset_for, preset_values
from eto_ref.distributed import init_distributed, is_main
from eto_ref.eto import LoopConfig
from eto_ref.exploration import ExploreConfig, evaluate, explore_and_pair, load_policy
from eto_ref.models import resolve_model
from eto_ref.pairs import AUTO, EXTRA_REJECTED_TURNS
from eto_ref.runtime import DTYPES, add_threads_flag, resolve_device, setup_cpu, stop_on_terminate
from eto_ref.sampler import SamplingConfig
from eto_ref.tokenizer import Tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, ExploreConfig, skip=("out_dir",))
    p.add_argument("--out", default=None, help="output directory (default runs/explore-<env>-<split>)")
    p.add_argument("--template", default=None, help="chat template (default: detected from the tokenizer)")
    p.add_argument("--rejected-extra-turns", type=value_parser(field_of(LoopConfig, "rejected_extra_turns")),
                   default=AUTO,
                   help="pairs (train split): the rejected side keeps at most expert length + N agent turns; "
                        f"none keeps the whole failed run (default {AUTO}: the environment's official rule, "
                        f"{EXTRA_REJECTED_TURNS}, and household, like ALFWorld, none)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="the policy's weights: auto (bfloat16 on CUDA and on CPUs with bfloat16 instructions, "
                        "else float32)")
    p.add_argument("--preset", default="auto", choices=("auto", *PRESET_NAMES),
                   help="agent defaults by model (auto: the model's own)")
    p.add_argument("--no-progress", action="store_true")
    add_threads_flag(p)
    g = p.add_argument_group("agent")
    add_config_flags(g, SamplingConfig, presets={n: PRESETS[n].get("sampling", {}) for n in PRESET_NAMES})
    add_config_flags(g, AgentConfig, skip=("seed",), presets={n: PRESETS[n].get("agent", {}) for n in PRESET_NAMES})
    return p.parse_args(argv)


def explore_config(args) -> ExploreConfig:
    model = str(resolve_model(getattr(args, "model", ExploreConfig.model)))
    preset = preset_for(model) if args.preset == "auto" else args.preset
    sampling = SamplingConfig(**{**preset_values(preset, "sampling"), **given_values(args, SamplingConfig)})
    agent = AgentConfig(sampling=sampling, seed=None if sampling.greedy else args.seed,
                        **{**preset_values(preset, "agent"), **given_values(args, AgentConfig, skip=("sampling", "seed"))})
    given = given_values(args, ExploreConfig, skip=("agent", "out_dir", "model"))
    env, split = given.get("env", ExploreConfig.env), given.get("split", ExploreConfig.split)
    return ExploreConfig(model=model, out_dir=args.out or f"runs/explore-{env}-{split}", agent=agent, **given)


def main(argv=None):
    args = parse_args(argv)
    setup_cpu(args)
    stop_on_terminate()
    try:
        cfg = explore_config(args)
        device = init_distributed(resolve_device(args.device))  # under torchrun: join the ranks, take a GPU
        model, tokenizer = load_policy(cfg.model, str(device), args.dtype)
        if args.template is not None:
            tokenizer = Tokenizer.from_dir(cfg.model, args.template)
        if cfg.split == "train":
            path, summary = explore_and_pair(model, tokenizer, cfg, progress=not args.no_progress,
                                             extra_turns=args.rejected_extra_turns)
            if is_main():
                print(f"wrote {path}")
        else:
            summary = evaluate(model, tokenizer, cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if is_main():
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Exploration, pair building and evaluation (a thin CLI over eto_ref.exploration).

    # ETO step 1+2: explore the training tasks with the current policy, pair with the expert
    python explore.py --model runs/sft/final --env household --split train --out runs/explore-1

    # validation: training tasks the main job never trains on (it uses train[:480])
    python explore.py --model runs/main/sft/final --env science --split train --start 1000 --limit 100 --out runs/valid-sft --no-icl

    # evaluation: average reward x100 and success rate on a test split
    python explore.py --model runs/sft/final --env household --split test_unseen --out runs/eval-sft-unseen

Every finished episode is appended to OUT/trajectories.jsonl at once; rerunning
the same command resumes where an interrupted run stopped.

    # the tasks split over 8 GPUs (one policy copy per GPU); rank 0 merges the trajectories
    torchrun --nproc_per_node=8 explore.py --model runs/sft/final --env household --split train --out runs/explore-1
"""

from __future__ import annotations

import argparse
import json

import torch

from eto_ref.agent import AgentConfig
from eto_ref.checkpoint import load_model
from eto_ref.distributed import init_distributed, is_main
from eto_ref.exploration import ExploreConfig, evaluate, explore_and_pair
from eto_ref.pairs import EXTRA_REJECTED_TURNS
from eto_ref.tokenizer import Tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/sft/final", help="policy model directory (Hugging Face format)")
    p.add_argument("--template", default=None, help="chat template (default: detected from the tokenizer)")
    p.add_argument("--env", default="science", help="webshop | household | science | scienceworld")
    p.add_argument("--split", default="train", choices=["train", "test_seen", "test_unseen"])
    p.add_argument("--out", default=None, help="output directory (default runs/explore-<env>-<split>)")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks of the split (after --start)")
    p.add_argument("--start", type=int, default=0,
                   help="skip the first N tasks of the split; e.g. --split train --start 1000 --limit 100 is a "
                        "validation slice the main job never trains on (it uses train[:480])")
    p.add_argument("--env-seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's exploration)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per agent turn")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps (default: the environment's)")
    p.add_argument("--batch-size", type=int, default=16, help="episodes run in lockstep")
    p.add_argument("--max-len", type=int, default=8192, help="KV-cache slots per batch")
    p.add_argument("--no-truncate-rejected", action="store_true",
                   help="keep the whole failed trajectory (default: cut to expert length + 5 agent turns)")
    p.add_argument("--rejected-extra-turns", type=int, default=EXTRA_REJECTED_TURNS,
                   help="the rejected side keeps at most expert length + N agent turns (default 5, the official rule)")
    p.add_argument("--icl", action=argparse.BooleanOptionalAction, default=True,
                   help="one in-context example in the prompt, as the official code (default on; "
                        "--no-icl for a model trained from scratch on 0-shot data, e.g. the tiny default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    device = init_distributed(device)  # under torchrun: join the ranks, take GPU LOCAL_RANK
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(args.model, args.template)
    agent = AgentConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed if args.temperature > 0 else None, batch_size=args.batch_size,
                        max_len=args.max_len, max_steps=args.max_steps,
                        icl_example=args.icl)
    cfg = ExploreConfig(env=args.env, split=args.split, out_dir=args.out or f"runs/explore-{args.env}-{args.split}",
                        limit=args.limit, start=args.start, env_seed=args.env_seed, agent=agent)
    if args.split == "train":
        extra_turns = None if args.no_truncate_rejected else args.rejected_extra_turns
        path, summary = explore_and_pair(model, tokenizer, cfg, progress=not args.no_progress, extra_turns=extra_turns)
        if is_main():
            print(f"wrote {path}")
    else:
        summary = evaluate(model, tokenizer, cfg, progress=not args.no_progress)
    if is_main():
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

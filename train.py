"""Train an ETO agent: behavioral cloning, then DPO on explored-vs-expert pairs.

    python train.py --stage sft                                   # tiny default model, science expert data
    python train.py --stage sft --model path/to/Llama-2-7b-chat-hf --data data/alfworld_sft.json --lora-rank 16
    python train.py --stage eto --model runs/sft/final --env science --iterations 2 --no-icl --out runs/eto
    python train.py --stage eto --model runs/sft/final --pairs runs/explore-1/pairs.json --out runs/eto-dpo
    python train.py --stage all                                   # the whole main job (science, seed 0)

--stage sft   behavioral cloning on expert trajectories (paper Eq. 5), cosine schedule, 3% warmup.
--stage eto   the ETO loop (paper Algorithm 1) from --model: per iteration, explore the training
              tasks -> pair failures with the expert -> DPO (paper Eq. 7) with the reference reset
              to the current policy -> evaluate. With --pairs: one DPO stage on those pairs.
--stage all   the main job on the built-in default: a fresh tiny model, SFT, evaluation, ETO
              iterations, the RFT and Best-of-N baselines, and the results table
              (eto_ref/pipeline.py; the sizes below under "--stage all").

Unset hyperparameters come from a preset chosen by model size (--preset auto:
'tiny' below 100M parameters, else '7b' = the official ETO scripts' values):

    preset  stage  lr     epochs  batch  micro  max-len  warmup
    tiny    sft    2e-3   3       8      8      2048     0.03
    tiny    eto    5e-5   3       16     4      2048     0.10   (+ chosen NLL, --sft-weight 1)
    7b      sft    2e-5   3       64     4      4096     0.03   (+ gradient checkpointing)
    7b      eto    1e-6   3       32     2      4096     0.10   (+ gradient checkpointing)

Run directory (--out): metrics.jsonl, checkpoints/step-NNNNNN/ (model or LoRA adapter,
trainer_state.json, optimizer.safetensors), final/ (a plain Hugging Face model
directory with the tokenizer), and for DPO reference_logps.json. Rerunning the same
command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path

from eto_ref.distributed import is_main
from eto_ref.pairs import EXTRA_REJECTED_TURNS
from eto_ref.trainer import DPOConfig, SFTConfig, preset_name, preset_values, run_dpo, run_sft

DEFAULT_MODEL = "models/tiny"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=("sft", "eto", "all"))
    p.add_argument("--model", default=None,
                   help=f"model directory to start from (sft: {DEFAULT_MODEL}, created if missing; "
                        "eto: runs/sft/final)")
    p.add_argument("--out", default=None, help="run directory (default: runs/sft or runs/eto)")
    p.add_argument("--preset", default="auto", choices=("auto", "tiny", "7b"),
                   help="defaults by model size (auto: tiny below 100M parameters, else 7b)")

    g = p.add_argument_group("data")
    g.add_argument("--env", default="science", help="environment: the default --data (sft) and the tasks explored (eto, all); webshop | household | science")
    g.add_argument("--data", default=None,
                   help="sft: ETO-format SFT JSON/JSONL (default data/<env>_sft.json, written from the env's "
                        "train-split expert trajectories if missing)")
    g.add_argument("--pairs", default=None, help="eto: ETO-format preference pairs JSON/JSONL")
    g.add_argument("--max-len", type=int, default=None, help="max tokens per sequence (tiny 2048, 7b 4096)")
    g.add_argument("--max-examples", type=int, default=None,
                   help="use only the first N trajectories/pairs of the data file (quick runs; default all)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (sft: tiny 2e-3, 7b 2e-5; "
                                                          "eto: tiny 5e-5, 7b 1e-6)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0, as ETO)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 3)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch: sequences (sft) or pairs (eto) per optimizer step (sft: tiny 8, 7b 64; "
                        "eto: tiny 16, 7b 32)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences/pairs per forward; gradients accumulate to --batch-size "
                        "(sft: tiny 8, 7b 4; eto: tiny 4, 7b 2)")
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--schedule", default=None, choices=("cosine", "constant"),
                   help="lr schedule after warmup (sft: cosine, eto: constant)")
    g.add_argument("--warmup-ratio", type=float, default=None, help="warmup fraction (sft 0.03, eto 0.1)")
    g.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (schedule laid out over it)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="adapter rank; 0 = full fine-tuning (default)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha (default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="adapter input dropout (default 0.05)")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names (default q_proj,k_proj,v_proj,o_proj)")

    g = p.add_argument_group("DPO (--stage eto)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    g.add_argument("--sft-weight", type=float, default=None,
                   help="add this times the chosen side's token-mean NLL to the DPO loss; 0 = the paper's "
                        "objective (7b default); tiny default 1.0 (pure DPO degrades the tiny model)")

    g = p.add_argument_group("ETO loop (--stage eto without --pairs, and --stage all)")
    g.add_argument("--iterations", type=int, default=None,
                   help="ETO iterations: explore -> pairs -> DPO -> evaluate (default 1)")
    g.add_argument("--explore-limit", type=int, default=None,
                   help="training tasks explored per iteration (default: all; --stage all: 160)")
    g.add_argument("--eval-limit", type=int, default=None,
                   help="tasks per test split in evaluations (default: all; --stage all: 50)")
    g.add_argument("--valid", type=int, default=0,
                   help="also evaluate on N training tasks nothing trains on, train[--valid-start:][:N], "
                        "the column to choose settings by (default 0 = off)")
    g.add_argument("--valid-start", type=int, default=1000,
                   help="first task of the valid slice (default 1000; after the SFT and explored tasks)")
    g.add_argument("--rejected-extra-turns", type=int, default=EXTRA_REJECTED_TURNS,
                   help="pairs: the rejected side keeps at most expert length + N agent turns (default 5, official)")
    g.add_argument("--explore-temperature", type=float, default=0.0, help="0 = greedy, the paper's (default)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="per agent turn (default 128; --stage all: 96)")
    g.add_argument("--env-seed", type=int, default=0, help="seed of the environment's task generator")
    g.add_argument("--icl", action=argparse.BooleanOptionalAction, default=None,
                   help="one in-context example in agent prompts, as the official code (default: on; "
                        "--stage all: off for the tiny model, which is trained 0-shot from scratch)")

    g = p.add_argument_group("--stage all: the main job (eto_ref/pipeline.py)")
    g.add_argument("--sft-examples", type=int, default=480, help="expert trajectories trained on (default 480)")
    g.add_argument("--sft-epochs", type=int, default=6, help="SFT epochs (default 6; 3 leaves the tiny model "
                                                              "ignoring the task text)")
    g.add_argument("--sft-lr", type=float, default=2e-3, help="SFT learning rate (default 2e-3)")
    g.add_argument("--dpo-lr", type=float, default=5e-5, help="DPO learning rate (default 5e-5)")
    g.add_argument("--dpo-epochs", type=int, default=3, help="DPO epochs per ETO iteration (default 3, the paper's)")
    g.add_argument("--best-of-n", type=int, default=4, help="N of the Best-of-N baseline (default 4, 0 = skip)")
    g.add_argument("--bon-temperature", type=float, default=0.7, help="Best-of-N sampling temperature (default 0.7)")
    g.add_argument("--no-baselines", action="store_true", help="skip RFT and Best-of-N")
    g.add_argument("--seeds", default=None,
                   help="comma-separated seeds: run the main job once per seed into OUT/seed-K and write "
                        "a table with per-seed numbers and their mean (see --results)")
    g.add_argument("--results", default=None, help="with --seeds: write the table here (Markdown, + .json)")
    g.add_argument("--report", action="store_true",
                   help="with --seeds: run nothing, only write the table from the phases finished so far "
                        "in OUT/seed-K (unfinished cells '-')")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-fraction", type=float, default=None,
                   help="held-out fraction of the data (sft 0.05, eto 0)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0 = at the end)")
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100, 0 = none)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--no-resume", action="store_true", help="delete the run's checkpoints and start over")

    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype (auto: float32 on CPU, bfloat16 autocast on CUDA)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for 7b, off for tiny)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, grads and AdamW states over the ranks (FSDP2) instead of DDP")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; slow start, faster steps)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def ensure_sft_data(env: str, path: Path) -> Path:
    """Write the env's train-split expert trajectories to `path` unless it exists."""
    if not path.is_file():
        from envs.write_expert_data import write_expert_data

        data = write_expert_data(env, "train", path)
        print(f"wrote {len(data)} expert trajectories of {env}/train to {path}", file=sys.stderr)
    return path


def build_config(args: argparse.Namespace):
    """Wire the parsed flags into an SFTConfig / DPOConfig, filling unset values from the preset."""
    stage = "sft" if args.stage == "sft" else "dpo"
    model = args.model or (DEFAULT_MODEL if stage == "sft" else "runs/sft/final")
    if stage == "sft" and model == DEFAULT_MODEL:
        from eto_ref.tiny import ensure_tiny_model

        ensure_tiny_model(model)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model directory (no config.json)")
    preset = preset_name(model) if args.preset == "auto" else args.preset
    values = preset_values(stage, preset)
    given = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                 max_len=args.max_len, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
                 eval_fraction=args.eval_fraction, gradient_checkpointing=args.gradient_checkpointing)
    if stage == "dpo":
        given["sft_weight"] = args.sft_weight
    values.update({k: v for k, v in given.items() if v is not None})
    common = dict(model=str(model), weight_decay=args.weight_decay, clip=args.clip, max_steps=args.max_steps,
                  max_examples=args.max_examples,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                  eval_every=args.eval_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
                  seed=args.seed, device=args.device, dtype=args.dtype, resume=not args.no_resume,
                  progress=not args.no_progress, fsdp=args.fsdp, compile=args.compile, **values)
    if stage == "sft":
        data = Path(args.data) if args.data else ensure_sft_data(args.env, Path(f"data/{args.env}_sft.json"))
        return SFTConfig(out=args.out or "runs/sft", data=str(data), **common), preset
    if not args.pairs:
        raise SystemExit("--stage eto needs --pairs (a preference-pair JSON/JSONL file)")
    return DPOConfig(out=args.out or "runs/eto", pairs=args.pairs, beta=args.beta, **common), preset


def agent_config(args: argparse.Namespace, base):
    """`base` (an AgentConfig) with the agent flags given on the command line applied."""
    return replace(base, max_new_tokens=args.max_new_tokens or base.max_new_tokens,
                   temperature=args.explore_temperature, icl_example=args.icl is not False,
                   seed=args.seed if args.explore_temperature > 0 else None)


def run_loop(args: argparse.Namespace):
    """--stage eto without --pairs: the ETO iterations from --model (default runs/sft/final)."""
    from eto_ref.agent import AgentConfig
    from eto_ref.eto import VALID, LoopConfig, run_eto

    model = args.model or "runs/sft/final"
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model directory (no config.json); run --stage sft first")
    cfg = LoopConfig(model=model, out=args.out or "runs/eto", env=args.env, iterations=args.iterations or 1,
                     explore_limit=args.explore_limit, eval_limit=args.eval_limit, env_seed=args.env_seed,
                     eval_splits=((VALID,) if args.valid else ()) + LoopConfig.eval_splits,
                     valid_start=args.valid_start, valid_limit=args.valid,
                     rejected_extra_turns=args.rejected_extra_turns,
                     agent=agent_config(args, AgentConfig(max_new_tokens=128)), device=args.device,
                     progress=not args.no_progress)

    def dpo_config(policy: str, pairs: str, out: str):
        args.model, args.pairs, args.out = policy, pairs, out
        return build_config(args)[0]

    rows = run_eto(cfg, dpo_config)
    for row in rows:
        print(json.dumps(row))
    return rows


STAGE_FLAGS = ("lr", "epochs", "batch_size", "micro_batch_size", "warmup_ratio", "schedule", "max_steps", "data",
               "pairs", "max_examples")


def run_all(args: argparse.Namespace):
    """--stage all: the main job (eto_ref/pipeline.py)."""
    from eto_ref.pipeline import PipelineConfig, report_seeds, run_pipeline, run_seeds, table_splits

    given = [f"--{k.replace('_', '-')}" for k in STAGE_FLAGS if getattr(args, k) is not None]
    if given:
        raise SystemExit(f"{', '.join(given)}: set per stage; with --stage all use --sft-lr, --dpo-lr, "
                         "--sft-examples, --sft-epochs, --dpo-epochs, --explore-limit, --eval-limit, --iterations")
    defaults = PipelineConfig()
    cfg = PipelineConfig(
        env=args.env, out=args.out or "runs/main", seed=args.seed, model=args.model, env_seed=args.env_seed,
        sft_examples=args.sft_examples, sft_epochs=args.sft_epochs, sft_lr=args.sft_lr, dpo_lr=args.dpo_lr,
        dpo_epochs=args.dpo_epochs, beta=args.beta, dpo_sft_weight=args.sft_weight,
        iterations=defaults.iterations if args.iterations is None else args.iterations,
        explore_limit=args.explore_limit or defaults.explore_limit,
        eval_limit=args.eval_limit or defaults.eval_limit, best_of_n=args.best_of_n,
        bon_temperature=args.bon_temperature, baselines=not args.no_baselines, icl_example=args.icl,
        valid=args.valid, valid_start=args.valid_start,
        rejected_extra_turns=args.rejected_extra_turns,
        agent=agent_config(args, defaults.agent),  # run_pipeline sets its icl_example from icl_example above
        device=args.device, progress=not args.no_progress)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.report:
        if not seeds:
            raise SystemExit("--report: give the seeds to report with --seeds")
        table = report_seeds(cfg.out, seeds, table_splits(cfg), cfg.env, args.results)
        print(table)
        return table
    if seeds:
        return run_seeds(cfg, seeds, args.results)
    return run_pipeline(cfg)


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "all":
        return run_all(args)
    if args.stage == "eto" and not args.pairs:
        return run_loop(args)
    if args.iterations not in (None, 1):
        raise SystemExit("--iterations with --pairs: the pairs are fixed, so only one DPO stage can run; "
                         "leave out --pairs to explore and pair at every iteration")
    cfg, preset = build_config(args)
    if is_main():  # under torchrun only rank 0 prints
        print(f"stage {args.stage}, preset {preset}: " + ", ".join(
            f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)), file=sys.stderr)
    final = run_sft(cfg) if args.stage == "sft" else run_dpo(cfg)
    if is_main():
        print(f"final model: {final}")
    return final


if __name__ == "__main__":
    main()

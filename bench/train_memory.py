"""Where the resident memory of training goes: SmolLM2-135M, float32, CPU, the main job's batches.

    python bench/train_memory.py [--stage dpo|sft] [--threads 2] [--model DIR] [--pairs FILE] [--batch N]
                                 [--only micro]

Two optimizer steps of the trainer's own loss (eto_ref/dpo.py `DPOStage.loss` or
eto_ref/sft.py `SFTStage.loss`, accumulated as eto_ref/trainer.py does), each setting in a
fresh process so that every high-water mark is its own. The resident set is sampled
every 5 ms and its peak reported for each part of the steps:

    loaded      the weights (135M x 4 bytes = 0.54 GB) and the process (torch, tokenizer)
    reference   DPO only: the reference log-probs of the pairs (no_grad forwards)
    fwd+bwd     the micro-batches' forward and backward passes: activations, the scored
                positions' logits and their gradient, the weights' gradients (0.54 GB)
    optimizer   AdamW's step: its two moments (1.08 GB) and what the update allocates
    step 2      a second step on the same batch: the steady state of a training run, where
                AdamW's moments stay resident while the activations and gradients are made

Baseline (first row): micro-batches of 4 pairs or 8 trajectories, activation
checkpointing, the LM head in checkpointed chunks, torch's default AdamW, glibc told to
give freed blocks back for the whole process (eto_ref/runtime.py `return_freed_memory`;
train.py does it for the training steps only, `training_memory`, so its DPO reference
pass runs on glibc's heaps). Each other row changes one thing (the `small` preset trains
DPO in micro-batches of 4 pairs). DPO pairs are the expert trajectory (chosen) against the
same task's expert trajectory with every action replaced by the first one (rejected, same
length), unless --pairs names a pairs file (e.g. a run's iter-1/pairs.json). As in the trainer,
a step's examples are sorted by length before they are cut into micro-batches. `--only micro`
runs the micro-batch rows alone (with and without glibc's default heap), e.g. on a run's
real pairs with the preset's batch of 8:

    python bench/train_memory.py --stage dpo --pairs RUN/eto/iter-1/explore/pairs.json --batch 8 --only micro
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import envs  # noqa: E402
from bench.throughput import PeakMemory, rss_mb  # noqa: E402  (the resident set sampled every 5 ms)
from eto_ref.runtime import return_freed_memory, set_threads  # noqa: E402

SMOLLM2_DIR = "models/smollm2-135m-instruct"


# --------------------------------------------------------------------------- the data


def science_trajectories(n: int) -> list:
    from eto_ref.trajectory import parse_trajectory

    env = envs.make_env("science")
    return [parse_trajectory(env.expert_trajectory(t)) for t in env.task_ids("train")[:n]]


def synthetic_pairs(n: int) -> list:
    """(chosen = expert, rejected = the expert's turns with every action the first one): real shapes."""
    from eto_ref.trajectory import PreferencePair

    pairs = []
    for traj in science_trajectories(n):
        msgs = traj.messages
        first_agent = next(i for i in range(3, len(msgs)) if msgs[i]["role"] == "assistant")
        prompt, chosen = msgs[:first_agent], msgs[first_agent:]
        if chosen[-1]["role"] != "assistant":
            chosen = chosen[:-1]
        rejected = [m if m["role"] != "assistant" else {**m, "content": chosen[0]["content"]} for m in chosen]
        pairs.append(PreferencePair(traj.id, prompt, chosen, rejected))
    return pairs


# --------------------------------------------------------------------------- one setting, in its own process


def stage_of(stage: str, model_dir: str, pairs_file: str | None, batch: int, micro: int, device):
    """The trainer's stage for `batch` examples (eto_ref/sft.py SFTStage or, once given the reference
    log-probs, eto_ref/dpo.py DPOStage) and the reference pass DPO needs first."""
    from eto_ref.config import DPOConfig, SFTConfig
    from eto_ref.dpo import DPOStage, encode_pair_data, reference_logprobs
    from eto_ref.sft import SFTStage
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_pairs

    tok = Tokenizer.from_dir(model_dir)
    if stage == "sft":
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "sft.json"
            env = envs.make_env("science")
            data.write_text(json.dumps([env.expert_trajectory(t) for t in env.task_ids("train")[:batch]]))
            sft_stage = SFTStage(SFTConfig(model=model_dir, data=str(data), max_len=2048, eval_fraction=0.0), tok,
                                 device)
        return (lambda ref: sft_stage), None
    pairs = load_pairs(pairs_file)[:batch] if pairs_file else synthetic_pairs(batch)
    _, examples, stats = encode_pair_data(pairs, tok, 2048)
    if len(examples) < batch:
        sys.exit(f"{pairs_file}: {len(examples)} trainable pairs, fewer than --batch {batch}")
    cfg = DPOConfig(model=model_dir, micro_batch_size=micro, beta=0.1, sft_weight=0.0, eval_fraction=0.0)

    def reference(model):
        return reference_logprobs(model, examples, tok.pad_id, micro, device, torch.float32)

    return (lambda ref: DPOStage(cfg, examples, ref, tok.pad_id, device, stats)), reference


def whole_head_logprobs(model, batch: dict) -> torch.Tensor:
    """The scored targets' log-probs through (N, V) logits made at once and kept for the backward
    (the LM head run whole, not in `model.head_logprobs` chunks): the baseline of its chunking."""
    from eto_ref.losses import next_token_targets, scored_positions
    from eto_ref.model import target_logprobs

    targets, scored = next_token_targets(batch["input_ids"], batch["loss_mask"])
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["shared_prefix"])  # (B, T, D)
    logits = model.lm_head(hidden[scored_positions(batch["loss_mask"])])  # (N, V)
    return target_logprobs(logits, targets[scored])  # (N,)


def measure_one(args) -> dict:
    """Peak RSS of each part of two optimizer steps at one setting (runs in a fresh process)."""
    import eto_ref.dpo
    import eto_ref.sft
    from eto_ref.checkpoint import load_model
    from eto_ref.trainer import chunks

    set_threads(args.threads)
    if not args.glibc_default:
        return_freed_memory()
    if args.whole_head:
        eto_ref.dpo.scored_logprobs = eto_ref.sft.scored_logprobs = whole_head_logprobs
    device = torch.device("cpu")
    marks = {"start": rss_mb()}
    make_stage, reference = stage_of(args.stage, args.model, args.pairs, args.batch, args.micro, device)
    with PeakMemory() as m:
        model = load_model(args.model, torch.float32, device).train()
        model.gradient_checkpointing = args.checkpointing
    marks["loaded"] = m.peak
    if reference is None:
        stage = make_stage(None)
    else:
        with PeakMemory() as m:
            stage = make_stage(reference(model).clone())
        model.train()
        marks["reference"] = m.peak
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=args.fused or None)
    batch = sorted(range(args.batch), key=lambda i: stage.lengths[i])  # as eto_ref/trainer.py Fit.train_step does
    for step in (1, 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with PeakMemory() as m:
            metrics = {"loss": 0.0}
            for micro in chunks(batch, args.micro):  # Fit.train_step's loop in one process
                loss, shares = stage.loss(model, micro, batch)
                loss.backward()
                metrics["loss"] += float(shares["loss"])
        marks["fwd+bwd" if step == 1 else "step 2"] = m.peak
        with PeakMemory() as m:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if args.trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: give the heaps' free pages back
        marks["optimizer" if step == 1 else "step 2"] = max(m.peak, marks.get("step 2", 0.0))
        marks[f"seconds {step}"] = time.perf_counter() - start
        marks.setdefault("loss", float(metrics["loss"]))
    return marks


# --------------------------------------------------------------------------- the table


def micro_rows(n: str, sizes: tuple[int, ...], unit: str) -> list[tuple[str, list[str]]]:
    """The micro-batch rows: each size with the baseline's heap, then the extremes with glibc's default heap."""
    rows = [(f"micro-batch {m} {unit}" + (", the small preset" if i == 0 else ""), ["--batch", n, "--micro", str(m)])
            for i, m in enumerate(sizes)]
    return rows + [(f"{name}, glibc's default heap", flags + ["--glibc-default"])
                   for name, flags in (rows[0], rows[-1])]


def settings(stage: str, batch: int | None, only: str | None) -> list[tuple[str, list[str]]]:
    """(row name, flags): the baseline first, then one change per row (`only="micro"`: the micro-batch rows)."""
    if stage == "sft":
        n = str(batch or 8)
        if only == "micro":
            return micro_rows(n, (8, 4), "(trajectories)")
        base = ["--batch", n, "--micro", "8"]
        return [("micro-batch 8 (the small preset), checkpointing, chunked head, AdamW", base),
                ("LM head in one piece (N x V logits kept)", base + ["--whole-head"]),
                ("micro-batch 4", ["--batch", n, "--micro", "4"]),
                ("no activation checkpointing", base + ["--no-checkpointing"]),
                ("fused AdamW", base + ["--fused"]),
                ("glibc's default heap (freed blocks kept)", base + ["--glibc-default"]),
                ("glibc's default heap, malloc_trim(0) after each step", base + ["--glibc-default", "--trim"])]
    n = str(batch or 4)
    if only == "micro":
        return micro_rows(n, (4, 2, 1), "(pairs)")
    base = ["--batch", n, "--micro", "4"]
    return [("micro-batch 4 pairs (the small preset), checkpointing, chunked head, AdamW", base),
            ("LM head in one piece (N x V logits kept)", base + ["--whole-head"]),
            ("micro-batch 2 pairs", ["--batch", n, "--micro", "2"]),
            ("micro-batch 1 pair", ["--batch", n, "--micro", "1"]),
            ("fused AdamW", base + ["--fused"]),
            ("glibc's default heap (freed blocks kept)", base + ["--glibc-default"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("dpo", "sft"), default="dpo")
    parser.add_argument("--model", default=SMOLLM2_DIR, help="a converted model directory (python -m eto_ref.gguf)")
    parser.add_argument("--pairs", default=None, help="DPO: a pairs file instead of the synthetic science pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None,
                        help="pairs (DPO) or trajectories (SFT) per optimizer step (default 4 / 8)")
    parser.add_argument("--only", choices=("micro",), default=None,
                        help="micro: only the micro-batch rows, with and without glibc's default heap")
    parser.add_argument("--micro", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole-head", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--glibc-default", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # measure one setting, print JSON
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no converted model; run `python -m eto_ref.gguf --out {args.model}` first")
    if args.one:
        print(json.dumps(measure_one(args)))
        return

    common = [sys.executable, __file__, "--one", "--stage", args.stage, "--model", args.model,
              "--threads", str(args.threads)] + (["--pairs", args.pairs] if args.pairs else [])
    parts = ["loaded"] + (["reference"] if args.stage == "dpo" else []) + ["fwd+bwd", "optimizer", "step 2"]
    print(f"{args.stage}: two optimizer steps, {args.model}, {args.pairs or 'synthetic science data'}, float32, "
          f"{args.threads} threads; "
          "peak resident memory (MB) of each part, cumulative", flush=True)
    print("| setting | " + " | ".join(parts) + " | step 1 s | step 2 s | loss |")
    print("|---|" + "---:|" * (len(parts) + 3))
    for name, flags in settings(args.stage, args.batch, args.only):
        out = subprocess.run(common + flags, capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        marks = json.loads(out.stdout.strip().splitlines()[-1])
        cells = " | ".join(f"{marks[p]:.0f}" for p in parts)
        print(f"| {name} | {cells} | {marks['seconds 1']:.0f} | {marks['seconds 2']:.0f} | {marks['loss']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""Training loops: behavioral cloning (SFT, paper Eq. 5) and one DPO stage of ETO (paper Eq. 7).

    run_sft(SFTConfig(model="models/tiny", data="data/household_sft.json", out="runs/sft"))  -> runs/sft/final
    run_dpo(DPOConfig(model="runs/sft/final", pairs="data/pairs.json", out="runs/eto/iter-1"))  -> .../final

Both stages share one loop (`fit`): AdamW, a learning-rate schedule that is a pure
function of the step (eto_ref/schedule.py), gradient accumulation over
micro-batches, gradient clipping, a held-out evaluation, atomic checkpoints and
exact resume. They differ only in their loss on a micro-batch:

    SFT  (Eq. 5)   L = -(1/N) sum_t log pi(a_t | history)     N = scored tokens of the *global* batch
    DPO  (Eq. 7)   L = -log sigmoid(beta * [(log pi(e_w) - log ref(e_w)) - (log pi(e_l) - log ref(e_l))])

Gradient accumulation: a global batch of `batch_size` sequences is split into
micro-batches of `micro_batch_size`. Each micro-batch loss is scaled so that
the sum over micro-batches equals the loss of the whole batch: the BC loss divides
its token sum by the token count of the whole batch (not the mean of micro-batch
means), the DPO loss weights each micro-batch mean by its share of the pairs.

The DPO reference pi_ref is the policy at the start of the stage (paper Alg. 1).
Its log-probs are fixed, so they are computed once, before training, and cached in
`out/reference_logps.json`, keyed by pair id and a fingerprint of the starting
checkpoint and the encoding settings. With LoRA the reference is the same model with
its adapters disabled.

Run directory (`out`):

    metrics.jsonl                  one JSON record per step / evaluation, flushed per line
    reference_logps.json           DPO only: the cached reference log-probs
    checkpoints/step-000050/       config.json + model.safetensors (or the LoRA adapter files),
                                   tokenizer files, trainer_state.json, optimizer.safetensors
    final/                         the trained model as a plain Hugging Face directory (LoRA merged),
                                   tokenizer files, trainer_state.json

Resume: a rerun of the same command continues from the last checkpoint. The data
order is a function of (seed, epoch) and every step reseeds the RNG with
(seed, step), so the resumed run takes the same batches and ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eto_ref.checkpoint import (TOKENIZER_FILES, check_state_dict, load_model, our_name, read_state_dict, replace_dir,
                                save_model)
from eto_ref.distributed import (all_gather_dicts, all_reduce_sum, barrier, full_tensor,
                                  gradient_sync, init_distributed, is_fsdp, is_main, shard, shard_like, world_size,
                                  wrap_ddp, wrap_fsdp)
from eto_ref.jsonl import write_json_atomic
from eto_ref.lora import disable_adapter, inject_lora, load_adapter, lora_modules, remove_lora, save_adapter
from eto_ref.metrics import MetricsLog, progress_bar, show
from eto_ref.schedule import lr_at

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
REFERENCE_FILE = "reference_logps.json"

# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Settings shared by both stages. Defaults are the tiny-model values (see PRESETS)."""

    model: str = "models/tiny"  # Hugging Face model directory to start from
    out: str = "runs/sft"  # run directory
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0  # the official ETO scripts use 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    epochs: int = 3
    batch_size: int = 16  # sequences (SFT) or pairs (DPO) per optimizer step
    micro_batch_size: int = 8  # sequences or pairs per forward/backward
    max_len: int = 2048
    clip: float = 1.0  # max gradient norm (0 = no clipping)
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    max_steps: int | None = None  # cap on optimizer steps (the schedule is laid out over the capped total)
    max_examples: int | None = None  # use only the first N records of the data file (quick runs)
    # LoRA (rank 0 = full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # evaluation and checkpoints
    eval_fraction: float = 0.05
    eval_every: int = 0  # steps between held-out evaluations (0 = only at the end)
    save_every: int = 100  # steps between checkpoints (0 = none)
    keep_checkpoints: int = 2
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # compute dtype: auto (float32 on CPU, bfloat16 autocast on CUDA) | float32 | bfloat16
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard weights, grads and AdamW states over the ranks (else DDP replicas)
    compile: bool = False  # torch.compile the model (CUDA; slow to start, faster steps)
    resume: bool = True  # False: delete the run's checkpoints and start over
    progress: bool = True  # tqdm bar on stderr

    # Fields whose change makes an old checkpoint of `out` unusable for resuming.
    RESUME_KEYS = ("model", "lr", "weight_decay", "epochs", "batch_size", "max_len", "schedule", "warmup_ratio",
                   "lora_rank", "lora_alpha", "lora_targets", "eval_fraction", "seed", "max_examples", "max_steps")
    STAGE = "sft"

    @classmethod
    def for_model(cls, model: str | Path, preset: str = "auto", **overrides):
        """A config with the defaults of the model's size (PRESETS), then `overrides`.

            DPOConfig.for_model("runs/sft/final", pairs="pairs.json", out="runs/eto/iter-1")
        """
        preset = preset_name(model) if preset == "auto" else preset
        return cls(model=str(model), **{**preset_values(cls.STAGE, preset), **overrides})


@dataclass
class SFTConfig(TrainConfig):
    """Behavioral cloning on expert trajectories (ETO-format SFT JSON/JSONL)."""

    data: str = "data/household_sft.json"

    RESUME_KEYS = TrainConfig.RESUME_KEYS + ("data",)


@dataclass
class DPOConfig(TrainConfig):
    """One DPO stage of ETO on preference pairs (ETO-format pair JSON/JSONL)."""

    pairs: str = ""
    out: str = "runs/eto"
    beta: float = 0.1
    sft_weight: float = 0.0  # + weight * token-mean NLL of the chosen side (0 = the paper's objective)
    lr: float = 5e-5
    schedule: str = "constant"
    warmup_ratio: float = 0.1
    eval_fraction: float = 0.0  # the paper trains on all pairs

    RESUME_KEYS = TrainConfig.RESUME_KEYS + ("pairs", "beta", "sft_weight")
    STAGE = "dpo"


# Defaults per model size. 7b: the official ETO scripts (Llama-2-7B-Chat, run_eto.sh).
# tiny: the built-in few-million-parameter model, which needs far larger learning rates.
PRESETS = {
    "tiny": {
        "sft": dict(lr=2e-3, epochs=3, batch_size=8, micro_batch_size=8, max_len=2048, warmup_ratio=0.03),
        # sft_weight: with the paper's pure DPO objective the tiny model also loses likelihood on the
        # expert trajectories and its replies degrade (README, "Results"); the chosen side's NLL keeps them.
        "dpo": dict(lr=5e-5, epochs=3, batch_size=16, micro_batch_size=4, max_len=2048, warmup_ratio=0.1,
                    sft_weight=1.0),
    },
    "7b": {
        "sft": dict(lr=2e-5, epochs=3, batch_size=64, micro_batch_size=4, max_len=4096, warmup_ratio=0.03,
                    gradient_checkpointing=True),
        "dpo": dict(lr=1e-6, epochs=3, batch_size=32, micro_batch_size=2, max_len=4096, warmup_ratio=0.1,
                    sft_weight=0.0, gradient_checkpointing=True),
    },
}
TINY_MAX_PARAMETERS = 100_000_000  # preset "auto": below this many parameters -> "tiny", else "7b"


def estimate_parameters(model_dir: str | Path) -> int:
    """Parameter count from config.json alone (embeddings + layers + head), without loading weights."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    nh = c["num_attention_heads"]
    hs = c.get("head_dim") or d // nh
    nkv = c.get("num_key_value_heads") or nh
    attn = d * hs * (2 * nh + 2 * nkv)
    head = 0 if c.get("tie_word_embeddings") else V * d
    return V * d + L * (attn + 3 * d * f + 2 * d) + d + head


def preset_name(model_dir: str | Path) -> str:
    """'tiny' for models under TINY_MAX_PARAMETERS parameters, else '7b'."""
    return "tiny" if estimate_parameters(model_dir) < TINY_MAX_PARAMETERS else "7b"


def preset_values(stage: str, preset: str) -> dict:
    """The default hyperparameters of a stage ('sft' | 'dpo') for a model size ('tiny' | '7b')."""
    return dict(PRESETS[preset][stage])


# --------------------------------------------------------------------------- device, precision, model


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 (autocast) on CUDA, unless given."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes: weights stay float32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def setup_runtime(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """This rank's device and the compute dtype.

    Under torchrun (WORLD_SIZE > 1) the process joins the process group and, on
    CUDA, takes GPU LOCAL_RANK (eto_ref/distributed.py). On CUDA, float32 matmuls
    (the float32 LoRA adapters, the float32 loss head) may use TF32 tensor cores.
    """
    device = init_distributed(resolve_device(cfg.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # = torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    return device, compute_dtype(cfg.dtype, device)


def parallelize(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: `model` itself in one process; under torchrun a DDP
    replica per rank, or with cfg.fsdp the model sharded in place (FSDP2). cfg.compile:
    torch.compile the model in place (parameter names, hence checkpoints, unchanged)."""
    train_model = model
    if world_size() > 1:
        train_model = wrap_fsdp(model) if cfg.fsdp else wrap_ddp(model, device)
    if cfg.compile:
        model.compile()
    return train_model


def load_policy(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of `cfg.model`, with fresh LoRA adapters when cfg.lora_rank > 0.

    Trainable parameters are float32 (the optimizer's master copy). With LoRA the
    frozen base weights are kept in the compute dtype, to save memory.
    """
    if cfg.lora_rank == 0:
        model = load_model(cfg.model, torch.float32, device)
    else:
        model = load_model(cfg.model, dtype, device)
        torch.manual_seed(cfg.seed)  # lora_A init
        inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        for m in lora_modules(model).values():
            m.lora_A.float()
            m.lora_B.float()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything the optimizer updates (tied weights once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, named_params) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for _, p in named_params], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def output_dtype(model_dir: str | Path) -> torch.dtype:
    """Save the final model in the dtype of the model we started from (config.json torch_dtype)."""
    try:
        name = json.loads((Path(model_dir) / "config.json").read_text()).get("torch_dtype", "float32")
    except (OSError, json.JSONDecodeError):
        name = "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


# --------------------------------------------------------------------------- data order and batching


def split_train_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A held-out subset of `fraction` of the examples (at least 1 when fraction > 0), chosen by `seed`."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def epoch_order(indices: list[int], seed: int, epoch: int) -> list[int]:
    """The shuffled order of an epoch: a pure function of (seed, epoch), so resume sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def epoch_batches(indices: list[int], seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """Global batches of one epoch (the last one may be smaller)."""
    return chunks(epoch_order(indices, seed, epoch), batch_size)


def step_seed(seed: int, step: int) -> int:
    """RNG seed of one optimizer step (LoRA dropout): resume needs no saved RNG state."""
    return seed * 1_000_003 + step + 1


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- one optimizer step


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of a step is NaN or inf; the step's update was not applied."""


def check_finite(loss: float, grad_norm: float, step: int | None) -> None:
    """Stop before a NaN/inf loss or gradient reaches the weights (nothing after the last checkpoint is saved)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    at = "a step" if step is None else f"step {step}"
    raise NonFiniteLossError(f"{at}: non-finite training signal (loss {loss}, grad norm {grad_norm}); "
                             "stopped before the update, the last saved checkpoint is the last good state. "
                             "Lower the learning rate or check the data, then start from that checkpoint")


def rank_micro_batches(batch: list[int], micro_batch_size: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch, each with a weight: 1 (real) or 0 (padding).

    Every rank cuts the same global batch into the same micro-batches; micro-batch j
    goes to rank j % N. All ranks get the same number of micro-batches, so their
    collectives line up: a rank short of one repeats micro-batch 0 with weight 0.
    In one process: all micro-batches, weight 1.
    """
    micros = chunks(batch, micro_batch_size)
    mine = [(micro, 1.0) for micro in shard(micros)]
    per_rank = math.ceil(len(micros) / world_size())
    return mine + [(micros[0], 0.0)] * (per_rank - len(mine))


def rank_loss(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """The loss a rank backpropagates. DDP and FSDP average gradients over the N ranks, but the
    micro-batch shares of all ranks already add up to the global loss: scale by N to undo the average."""
    scale = world_size() * weight
    return loss if scale == 1 else loss * scale


def accumulate_gradients(model, batch: list[int], micro_batch_size: int, micro_loss: Callable, amp) -> dict:
    """Backpropagate the loss of a global batch, one micro-batch at a time.

    `micro_loss(model, micro, batch) -> (loss, metrics)` returns the micro-batch's
    share of the global-batch loss, so the gradients add up to the gradient of the
    loss of the whole batch. Under torchrun each rank runs its share of the
    micro-batches (rank_micro_batches); gradients are exchanged after the last one
    only. Returns the summed metrics of all ranks (= the global-batch values).
    """
    totals: dict[str, float] = {}
    mine = rank_micro_batches(batch, micro_batch_size)
    for j, (micro, weight) in enumerate(mine):
        with gradient_sync(model, sync=j == len(mine) - 1):
            with amp:
                loss, metrics = micro_loss(model, micro, batch)
            rank_loss(loss, weight).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * weight
    return all_reduce_sum(totals, next(model.parameters()).device)


def optimizer_step(model, optimizer, params, batch, micro_batch_size, micro_loss, lr, clip, amp,
                   step: int | None = None) -> dict:
    """One AdamW update on a global batch: accumulate, clip the global grad norm, check it is finite, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, batch, micro_batch_size, micro_loss, amp)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    check_finite(float(metrics["loss"]), grad_norm.item(), step)
    optimizer.step()
    return {**metrics, "grad_norm": grad_norm.item(), "lr": lr}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with trainer_state.json), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def optimizer_moments(optimizer, named_params) -> tuple[dict, dict]:
    """AdamW moments as whole CPU tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and each param's step.

    Under FSDP the moments are sharded like the params: every rank must call this
    (each tensor is gathered in turn); rank 0 keeps the result.
    """
    tensors, steps = {}, {}
    for name, p in named_params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}.{k}"] = full_tensor(state[k].detach()).cpu().contiguous()
        steps[name] = float(state["step"])
    return tensors, steps


def save_optimizer_state(optimizer, moments: tuple[dict, dict], path: Path) -> dict:
    """Write optimizer_moments() as safetensors; returns the scalars for JSON."""
    tensors, steps = moments
    save_file(tensors, str(path), metadata={"format": "pt"})
    group = optimizer.param_groups[0]
    return {"step": max(steps.values(), default=0.0), "betas": list(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "params": sorted(steps)}


def load_optimizer_state(optimizer, named_params, path: Path, scalars: dict) -> None:
    """Inverse of save_optimizer_state (through optimizer.load_state_dict, which casts to each param)."""
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for i, (name, p) in enumerate(named_params):
            if name in scalars["params"]:
                state[i] = {"step": torch.tensor(scalars["step"], dtype=torch.float32),
                            "exp_avg": shard_like(f.get_tensor(f"{name}.exp_avg"), p),  # FSDP: this rank's shard
                            "exp_avg_sq": shard_like(f.get_tensor(f"{name}.exp_avg_sq"), p)}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def copy_tokenizer_files(src: str | Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def gathered_model(model, cfg: TrainConfig):
    """The model to save: `model` itself, unless it is sharded (FSDP).

    FSDP: every rank must call this; each sharded tensor is gathered in turn and
    rank 0 rebuilds a plain CPU copy (built on the meta device, then the whole
    tensors assigned); the other ranks get None.
    """
    if not is_fsdp(model):
        return model
    from eto_ref.model import Transformer

    state = {}
    for name, t in model.state_dict().items():
        t = full_tensor(t.detach())
        if is_main():
            state[name] = t.cpu()
    if not is_main():
        return None
    with torch.device("meta"):
        plain = Transformer(model.config)
        if cfg.lora_rank:
            inject_lora(plain, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    plain.load_state_dict(state, assign=True)
    return plain


def save_checkpoint(model, optimizer, named_params, cfg: TrainConfig, state: dict) -> Path:
    """Write out/checkpoints/step-NNNNNN atomically (temp dir, then rename); keep the last few.

    Every rank calls it (FSDP gathers the shards); rank 0 writes, the others wait.
    """
    root = Path(cfg.out) / "checkpoints"
    final = root / f"step-{state['step']:06d}"
    model, moments = gathered_model(model, cfg), optimizer_moments(optimizer, named_params)
    if is_main():
        write_checkpoint(model, optimizer, moments, cfg, state, final)
    barrier()
    return final


def write_checkpoint(model, optimizer, moments, cfg: TrainConfig, state: dict, final: Path) -> None:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.lora_rank:
            save_adapter(model, tmp, base_model_name_or_path=str(cfg.model))
            copy_tokenizer_files(cfg.model, tmp)
        else:
            save_model(model, tmp, tokenizer_dir=cfg.model)
        state = {**state, "optimizer": save_optimizer_state(optimizer, moments, tmp / OPTIMIZER_FILE)}
        write_json_atomic(state, tmp / STATE_FILE)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(cfg.out)[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)


def restore_weights(model, ckpt: Path, lora: bool) -> None:
    """Load a checkpoint's trained weights into the freshly built policy."""
    if lora:
        load_adapter(model, ckpt)
        return
    tensors = read_state_dict(ckpt)
    check_state_dict(model, tensors, ckpt)
    with torch.no_grad():
        model.load_state_dict({our_name(k): v for k, v in tensors.items()}, strict=False)


def resume_key(cfg: TrainConfig) -> dict:
    d = config_dict(cfg)
    return {k: d[k] for k in cfg.RESUME_KEYS}


def config_dict(cfg: TrainConfig) -> dict:
    """The config as JSON-ready values (tuples -> lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The run's last checkpoint, if resuming; raises if it was made with different settings."""
    if not cfg.resume:
        if is_main():
            shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)
            shutil.rmtree(Path(cfg.out) / "final", ignore_errors=True)
        barrier()
        return None
    found = checkpoint_dirs(cfg.out)
    if not found:
        return None
    ckpt = found[-1]
    saved = json.loads((ckpt / STATE_FILE).read_text())
    check_same_run(saved, cfg, ckpt)
    return ckpt


def check_same_run(saved_state: dict, cfg: TrainConfig, where: Path) -> None:
    old = {k: saved_state["config"].get(k) for k in cfg.RESUME_KEYS}
    changed = {k: (old[k], v) for k, v in resume_key(cfg).items() if old[k] != v}
    if changed:
        raise ValueError(f"{where}: the run in {cfg.out} was made with other settings {changed} (old, new); "
                         "use another --out, or --no-resume to start over")


def finished_run(cfg: TrainConfig) -> Path | None:
    """out/final if this exact run has already completed (then a rerun has nothing to do)."""
    final = Path(cfg.out) / "final"
    if not cfg.resume or not (final / STATE_FILE).is_file():
        return None
    saved = json.loads((final / STATE_FILE).read_text())
    if not saved.get("done"):
        return None
    check_same_run(saved, cfg, final)
    return final


def save_final(model, cfg: TrainConfig, state: dict) -> Path:
    """out/final: a plain Hugging Face directory (LoRA merged), tokenizer files, trainer_state.json.

    Every rank calls it (FSDP gathers the shards); rank 0 writes, the others wait.
    """
    model = gathered_model(model, cfg)
    if is_main():
        write_final(model, cfg, state)
    barrier()
    return Path(cfg.out) / "final"


def write_final(model, cfg: TrainConfig, state: dict) -> None:
    out = Path(cfg.out)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        remove_lora(model, merge=True)
    try:
        save_model(model, tmp, tokenizer_dir=cfg.model, dtype=output_dtype(cfg.model))
        write_json_atomic({**state, "done": True}, tmp / STATE_FILE)
        replace_dir(tmp, out / "final")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- the shared training loop


class NoLog:
    """The metrics log of ranks other than 0: drops everything."""

    def log(self, **record) -> dict:
        return record

    def close(self) -> None:
        pass



def fit(model, cfg: TrainConfig, stage: str, train_indices: list[int], micro_loss: Callable,
        evaluate: Callable | None, resume_from: Path | None, device: torch.device, dtype: torch.dtype,
        callback: Callable | None = None, data_stats: dict | None = None, lengths: list[int] | None = None) -> Path:
    """Train `model` over `train_indices` for cfg.epochs; returns the final model directory.

    micro_loss(model, micro, batch) -> (loss share, metrics shares)   see accumulate_gradients
    evaluate(model) -> dict of held-out metrics (model in eval mode, under no_grad)
    callback(step, metrics) is called after every optimizer step (and its checkpoint).
    lengths[i]: tokens of example i; a global batch is sorted by length before it is cut into
    micro-batches (less padding; the batch, hence the gradient, is the same).
    Under torchrun every rank runs this loop on the same global batches (each its share of
    the micro-batches, see accumulate_gradients); only rank 0 logs and writes files.
    """
    train_model = parallelize(model, cfg, device)  # = model in one process
    named = trainable_parameters(model)  # after parallelize: FSDP replaces the parameters by shards
    params = [p for _, p in named]
    optimizer = make_optimizer(cfg, named)
    steps_per_epoch = math.ceil(len(train_indices) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    amp = autocast(device, dtype)

    step = 0
    if resume_from is not None:
        saved = json.loads((resume_from / STATE_FILE).read_text())
        load_optimizer_state(optimizer, named, resume_from / OPTIMIZER_FILE, saved["optimizer"])
        step = saved["step"]
    log = (MetricsLog(Path(cfg.out) / "metrics.jsonl", resume_step=step if resume_from else None, stage=stage)
           if is_main() else NoLog())
    if resume_from is None:
        log.log(step=0, event="start", total_steps=total, steps_per_epoch=steps_per_epoch,
                trainable_parameters=sum(p.numel() for p in params), **(data_stats or {}))
    else:
        log.log(step=step, event="resume", checkpoint=str(resume_from))

    def trainer_state(metrics: dict) -> dict:
        return {"stage": stage, "step": step, "epoch": step / steps_per_epoch, "total_steps": total,
                "steps_per_epoch": steps_per_epoch, "seed": cfg.seed,
                "rng": "data order: randperm(seed, epoch); step RNG: manual_seed(step_seed(seed, step))",
                "config": config_dict(cfg), "metrics": metrics}

    def run_eval() -> dict:  # every rank evaluates the whole held-out set (FSDP forwards are collectives)
        train_model.eval()
        with torch.no_grad(), amp:
            result = evaluate(train_model)
        train_model.train()
        log.log(step=step, epoch=step / steps_per_epoch, **result)
        return result

    bar = progress_bar(total, step, desc=stage) if cfg.progress and is_main() else None
    train_model.train()
    metrics, eval_metrics = {}, {}
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            batch = epoch_batches(train_indices, cfg.seed, epoch, cfg.batch_size)[k]
            if lengths is not None:
                batch = sorted(batch, key=lambda i: lengths[i])
            torch.manual_seed(step_seed(cfg.seed, step))
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, total, cfg.warmup_ratio, cfg.schedule)
            metrics = optimizer_step(train_model, optimizer, params, batch, cfg.micro_batch_size, micro_loss,
                                     lr, cfg.clip, amp, step=step + 1)
            step += 1
            metrics["step_time"] = time.perf_counter() - t0
            log.log(step=step, epoch=step / steps_per_epoch, **metrics)
            if bar is not None:
                show(bar, loss=metrics["loss"], lr=lr, **{n: v for n, v in eval_metrics.items() if n == "eval_loss"})
                bar.update(1)
            if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                eval_metrics = run_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(model, optimizer, named, cfg, trainer_state({**metrics, **eval_metrics}))
            if callback is not None:
                callback(step, metrics)
        if evaluate:
            eval_metrics = run_eval()
        final = save_final(model, cfg, trainer_state({**metrics, **eval_metrics}))
        log.log(step=step, event="done", final=str(final))
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return final


# --------------------------------------------------------------------------- SFT: behavioral cloning (Eq. 5)


def scored_targets(loss_mask: torch.Tensor) -> int:
    """Number of scored next-token targets: position t is scored iff target token t+1 is an agent token."""
    from eto_ref.losses import next_token_targets

    mask = torch.as_tensor(loss_mask).bool()[None]  # (1, T)
    ids = torch.zeros_like(mask, dtype=torch.long)
    _, target_mask = next_token_targets(ids, mask)
    return int(target_mask.sum())


def encode_sft_data(trajectories, tokenizer, max_len: int) -> tuple[list, dict]:
    """Encode trajectories; drop those with no scored token left after truncation. Returns (examples, stats)."""
    from eto_ref.trajectory import encode_sft

    examples, truncated, dropped = [], 0, 0
    for traj in trajectories:
        ex = encode_sft(traj, tokenizer, max_len)
        truncated += bool(ex.truncated)
        if scored_targets(ex.loss_mask) == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, {"examples": len(examples), "truncated": truncated, "dropped_empty": dropped}


def sft_micro_loss(examples: list, counts: list[int], pad_id: int, device: torch.device) -> Callable:
    """The SFT loss share of a micro-batch: sum of token NLLs / scored tokens of the global batch."""
    from eto_ref.losses import bc_loss
    from eto_ref.trajectory import collate_sft

    def micro_loss(model, micro: list[int], batch: list[int]):
        n_global = sum(counts[i] for i in batch)
        b = to_device(collate_sft([examples[i] for i in micro], pad_id), device)
        logits = model(b["input_ids"], attention_mask=b["attention_mask"])  # (b, T, V)
        loss = bc_loss(logits, b["input_ids"], b["loss_mask"], num_tokens=n_global)
        return loss, {"loss": loss.detach(), "tokens": sum(counts[i] for i in micro),
                      "truncated": sum(bool(examples[i].truncated) for i in micro)}

    return micro_loss


def sft_evaluate(examples: list, counts: list[int], indices: list[int], pad_id: int, micro_batch_size: int,
                 device: torch.device) -> Callable:
    """Held-out BC loss: token mean over all held-out trajectories."""
    micro_loss = sft_micro_loss(examples, counts, pad_id, device)

    def evaluate(model) -> dict:
        total = sum(float(micro_loss(model, micro, indices)[0]) for micro in chunks(indices, micro_batch_size))
        return {"eval_loss": total, "eval_tokens": sum(counts[i] for i in indices)}

    return evaluate


def run_sft(cfg: SFTConfig, callback: Callable | None = None) -> Path:
    """Behavioral cloning (paper Eq. 5) of cfg.model on cfg.data; returns the final model directory."""
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_trajectories

    done = finished_run(cfg)
    if done is not None:
        return done
    device, dtype = setup_runtime(cfg)
    tok = Tokenizer.from_dir(cfg.model)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    trajectories = load_trajectories(cfg.data, on_error="skip")[:cfg.max_examples]
    examples, stats = encode_sft_data(trajectories, tok, cfg.max_len)
    if not examples:
        raise ValueError(f"{cfg.data}: no trajectory with a trainable (agent) token")
    counts = [scored_targets(ex.loss_mask) for ex in examples]
    train_idx, eval_idx = split_train_eval(len(examples), cfg.eval_fraction, cfg.seed)

    resume_from = find_resume_checkpoint(cfg)
    model = load_policy(cfg, device, dtype)
    if resume_from is not None:
        restore_weights(model, resume_from, bool(cfg.lora_rank))
    evaluate = sft_evaluate(examples, counts, eval_idx, pad_id, cfg.micro_batch_size, device) if eval_idx else None
    stats.update(train_examples=len(train_idx), eval_examples=len(eval_idx),
                 train_tokens=sum(counts[i] for i in train_idx))
    return fit(model, cfg, "sft", train_idx, sft_micro_loss(examples, counts, pad_id, device), evaluate,
               resume_from, device, dtype, callback, stats, lengths=[len(ex.input_ids) for ex in examples])


# --------------------------------------------------------------------------- DPO: one ETO stage (Eq. 7)


def model_fingerprint(model_dir: str | Path) -> str:
    """Identify a checkpoint cheaply: config.json bytes + (name, size, mtime) of its weight files."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def pair_key(pair_id: str, example_batch: dict) -> str:
    """Cache key of one pair: its id + a digest of its tokens and masks (a changed pair is recomputed)."""
    h = hashlib.sha256()
    for k in ("input_ids", "loss_mask"):
        h.update(example_batch[k].to(torch.int64).numpy().tobytes())
    return f"{pair_id}#{h.hexdigest()[:12]}"


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over chosen + rejected rows (2b, T); returns (chosen (b,), rejected (b,), logits (2b, T, V))."""
    from eto_ref.losses import sequence_logprobs
    from eto_ref.trajectory import split_chosen_rejected

    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (2b, T, V)
    logps = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])  # (2b,) sums over agent tokens
    chosen, rejected = split_chosen_rejected(logps)
    return chosen, rejected, logits


def reference_logprobs(model, examples: list, pad_id: int, micro_batch_size: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """log ref(e_w), log ref(e_l) of every pair -> (N, 2), float32 on CPU.

    The reference is the policy as it is now: eval mode (no dropout), no_grad, the
    training dtype; with LoRA, adapters disabled (the base model).
    """
    from eto_ref.trajectory import collate_pairs

    was_training = model.training
    model.eval()
    out = []
    adapters = disable_adapter(model) if lora_modules(model) else contextlib.nullcontext()
    with torch.no_grad(), adapters, autocast(device, dtype):
        for micro in chunks(examples, micro_batch_size):
            chosen, rejected, _ = pair_logprobs(model, to_device(collate_pairs(micro, pad_id), device))
            out.append(torch.stack([chosen, rejected], dim=1).float().cpu())  # (b, 2)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def cached_reference_logprobs(model, pairs: list, examples: list, cfg: DPOConfig, pad_id: int,
                              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Reference log-probs (N, 2) from out/reference_logps.json, computing only the missing pairs.

    The file is valid for one starting checkpoint and encoding: a different
    fingerprint (model, max_len, dtype) discards it.
    """
    from eto_ref.trajectory import collate_pairs

    path = Path(cfg.out) / REFERENCE_FILE
    fingerprint = {"model": str(cfg.model), "checkpoint": model_fingerprint(cfg.model), "max_len": cfg.max_len,
                   "dtype": str(dtype).replace("torch.", "")}
    cache = {}
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("fingerprint") == fingerprint:
            cache = doc["logps"]
    keys = [pair_key(p.id, collate_pairs([ex], pad_id)) for p, ex in zip(pairs, examples)]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        mine = [i for micro in shard(chunks(missing, cfg.micro_batch_size)) for i in micro]  # this rank's share
        ref = reference_logprobs(model, [examples[i] for i in mine], pad_id, cfg.micro_batch_size, device, dtype)
        cache.update(all_gather_dicts({keys[i]: ref[j].tolist() for j, i in enumerate(mine)}))
        if is_main():
            write_json_atomic({"fingerprint": fingerprint, "logps": cache}, path, indent=None)
    return torch.tensor([cache[k] for k in keys], dtype=torch.float32)  # (N, 2)


def encode_pair_data(pairs, tokenizer, max_len: int) -> tuple[list, list, dict]:
    """Encode pairs; drop those where a side has no scored token. Returns (pairs, examples, stats)."""
    from eto_ref.trajectory import collate_pairs, encode_pair

    kept_pairs, examples, truncated, dropped = [], [], 0, 0
    for pair in pairs:
        ex = encode_pair(pair, tokenizer, max_len)
        truncated += bool(getattr(ex, "truncated", False))
        mask = collate_pairs([ex], 0)["loss_mask"]  # (2, T)
        if min(scored_targets(mask[0]), scored_targets(mask[1])) == 0:
            dropped += 1
            continue
        kept_pairs.append(pair)
        examples.append(ex)
    return kept_pairs, examples, {"pairs": len(examples), "truncated": truncated, "dropped_empty": dropped}


def dpo_micro_loss(examples: list, ref: torch.Tensor, chosen_counts: list[int], cfg: DPOConfig, pad_id: int,
                   device: torch.device) -> Callable:
    """The DPO loss share of a micro-batch (its mean over pairs, weighted by b / B), plus the
    optional NLL of the chosen side (token mean over the global batch's chosen tokens)."""
    from eto_ref.losses import bc_loss, dpo_loss
    from eto_ref.trajectory import collate_pairs

    def micro_loss(model, micro: list[int], batch: list[int]):
        b = to_device(collate_pairs([examples[i] for i in micro], pad_id), device)
        policy_chosen, policy_rejected, logits = pair_logprobs(model, b)  # (b,), (b,)
        ref_chosen, ref_rejected = ref[micro, 0].to(device), ref[micro, 1].to(device)  # (b,)
        out = dpo_loss(policy_chosen.float(), policy_rejected.float(), ref_chosen, ref_rejected, cfg.beta)
        share = len(micro) / len(batch)
        loss = out.loss * share
        metrics = {"dpo_loss": loss.detach()}
        if cfg.sft_weight:
            n = len(micro)
            nll = bc_loss(logits[:n], b["input_ids"][:n], b["loss_mask"][:n],
                          num_tokens=sum(chosen_counts[i] for i in batch))
            loss = loss + cfg.sft_weight * nll
            metrics["sft_loss"] = nll.detach()
        metrics.update({
            "loss": loss.detach(),
            "chosen_reward": out.chosen_rewards.float().mean() * share,
            "rejected_reward": out.rejected_rewards.float().mean() * share,
            "margin": out.margin.float().mean() * share,
            "accuracy": out.accuracy.float().mean() * share,
            "tokens": float(b["loss_mask"].sum()),
        })
        return loss, metrics

    return micro_loss


def dpo_evaluate(examples, ref, chosen_counts, indices, cfg: DPOConfig, pad_id, device) -> Callable:
    """Held-out DPO loss, rewards, margin and pair accuracy (means over the held-out pairs)."""
    micro_loss = dpo_micro_loss(examples, ref, chosen_counts, cfg, pad_id, device)

    def evaluate(model) -> dict:
        totals: dict[str, float] = {}
        for micro in chunks(indices, cfg.micro_batch_size):
            for k, v in micro_loss(model, micro, indices)[1].items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {f"eval_{k}": v for k, v in totals.items() if k != "tokens"}

    return evaluate


def run_dpo(cfg: DPOConfig, callback: Callable | None = None) -> Path:
    """One DPO stage of ETO (paper Eq. 7): pi_ref = cfg.model, trained on cfg.pairs; returns the final dir."""
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import collate_pairs, load_pairs

    done = finished_run(cfg)
    if done is not None:
        return done
    device, dtype = setup_runtime(cfg)
    tok = Tokenizer.from_dir(cfg.model)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    pairs, examples, stats = encode_pair_data(load_pairs(cfg.pairs, on_error="skip")[:cfg.max_examples], tok,
                                              cfg.max_len)
    if not examples:
        raise ValueError(f"{cfg.pairs}: no preference pair with trainable tokens on both sides")
    chosen_counts = [scored_targets(collate_pairs([ex], pad_id)["loss_mask"][0]) for ex in examples]
    train_idx, eval_idx = split_train_eval(len(examples), cfg.eval_fraction, cfg.seed)

    resume_from = find_resume_checkpoint(cfg)
    model = load_policy(cfg, device, dtype)  # = pi_ref until it is trained
    ref = cached_reference_logprobs(model, pairs, examples, cfg, pad_id, device, dtype)  # (N, 2)
    if resume_from is not None:
        restore_weights(model, resume_from, bool(cfg.lora_rank))
    evaluate = dpo_evaluate(examples, ref, chosen_counts, eval_idx, cfg, pad_id, device) if eval_idx else None
    stats.update(train_pairs=len(train_idx), eval_pairs=len(eval_idx),
                 ref_chosen_logp=ref[:, 0].mean().item(), ref_rejected_logp=ref[:, 1].mean().item())
    return fit(model, cfg, "dpo", train_idx, dpo_micro_loss(examples, ref, chosen_counts, cfg, pad_id, device),
               evaluate, resume_from, device, dtype, callback, stats,
               lengths=[max(len(ex.chosen.input_ids), len(ex.rejected.input_ids)) for ex in examples])

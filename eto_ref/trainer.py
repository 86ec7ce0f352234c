"""The training loop every stage shares: `fit`, and one optimizer step in `Fit.train_step`.

A stage (eto_ref/sft.py `SFTStage`, eto_ref/dpo.py `DPOStage`, eto_ref/ppo.py `PPOStage`,
eto_ref/grpo.py `GRPOStage`) hands `fit` the indices of its training examples and its `loss`
on a micro-batch (PPO and GRPO also take `repeats` steps on each batch, prepared by
`begin_batch`). `fit` does the rest:
AdamW, a learning-rate schedule that is a pure function of the step
(eto_ref/schedule.py), gradient accumulation over micro-batches, gradient clipping,
a held-out evaluation, atomic checkpoints and exact resume (eto_ref/run_dir.py).

Gradient accumulation: a global batch of `batch_size` sequences is split into
micro-batches of `micro_batch_size`. Each micro-batch loss is scaled so that the
sum over micro-batches equals the loss of the whole batch (the BC loss divides its
token sum by the token count of the whole batch, not the mean of micro-batch means;
the DPO loss weights each micro-batch mean by its share of the pairs).

Resume: the data order is a function of (seed, epoch) and every step reseeds the
RNG with (seed, step), so a resumed run takes the same batches and ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Protocol

import torch

from eto_ref.checkpoint import load_model
from eto_ref.config import TrainConfig
from eto_ref.distributed import (all_reduce_sum, average_gradients, full_tensor, init_distributed, is_main,
                                 local_tensor, shard, world_size, wrap_fsdp)
from eto_ref.lora import inject_lora, lora_modules
from eto_ref.losses import next_token_targets, scored_positions
from eto_ref.metrics import MetricsLog, progress_bar, show
from eto_ref.run_dir import (RunLock, claim_training_run, config_dict, find_resume_checkpoint, finished_run,
                             load_optimizer_state, restore_weights, save_checkpoint, save_final)
from eto_ref.runtime import autocast, compute_dtype, dtype_name, resolve_device, training_memory
from eto_ref.schedule import lr_at

# --------------------------------------------------------------------------- device, model, optimizer


def setup_runtime(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """This rank's device and the compute dtype.

    Under torchrun (WORLD_SIZE > 1) the process joins the process group and, on
    CUDA, takes GPU LOCAL_RANK (eto_ref/distributed.py). On CUDA, float32 matmuls
    (the float32 LoRA adapters, the float32 loss head) may use TF32 tensor cores.
    """
    device = init_distributed(resolve_device(cfg.device))
    dtype = compute_dtype(cfg.dtype, device)
    if dtype == torch.float16:
        raise ValueError(f"{cfg.out}: dtype float16: training in float16 needs loss scaling, which this trainer "
                         "leaves out; use bfloat16 (or float32)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # = torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    return device, dtype


def load_trainable_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
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


def parallelize(model: torch.nn.Module, cfg: TrainConfig, ranks: int, dtype: torch.dtype) -> None:
    """In place: under torchrun with cfg.fsdp, shard the model (FSDP2, computing in `dtype`); cfg.compile:
    torch.compile each decoder layer (the parts with fixed shapes; parameter names, hence checkpoints,
    unchanged)."""
    if ranks > 1 and cfg.fsdp:
        wrap_fsdp(model, dtype)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything the optimizer updates (tied weights once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, named_params) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for _, p in named_params], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- data order and batching


def split_train_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A held-out subset of `fraction` of the examples (at least 1 when fraction > 0), chosen by `seed`."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def epoch_batches(indices: list[int], seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """Global batches of one epoch (the last one may be smaller). The shuffled order is a pure function
    of (seed, epoch), so a resumed run takes the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    return chunks(order, batch_size)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def scored_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(target) (N,), float32, at the scored positions only (row-major): the rows' shared prefix
    run once, the LM head only there and in checkpointed chunks (no N x V logits kept for the backward)."""
    targets, scored = next_token_targets(batch["input_ids"], batch["loss_mask"])  # (B, T-1) each
    return model.scored_logprobs(batch["input_ids"], batch["attention_mask"], scored_positions(batch["loss_mask"]),
                                 targets[scored], batch["shared_prefix"])  # (N,)


# --------------------------------------------------------------------------- one optimizer step


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf in a step's loss, gradient norm or updated weights; nothing of that step is saved."""


def check_finite(loss: float, grad_norm: float, step: int | None) -> None:
    """Stop before a NaN/inf loss or gradient reaches the weights."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    at = "a step" if step is None else f"step {step}"
    raise NonFiniteLossError(f"{at}: non-finite training signal (loss {loss}, grad norm {grad_norm}); "
                             "stopped before the update. Every saved checkpoint is finite: lower the learning "
                             "rate or check the data, then start a new run from the last checkpoint")


def check_finite_update(params, step: int, distributed: bool) -> None:
    """Stop when an update made a weight NaN or inf (e.g. an overflowing learning rate). Under torchrun
    each rank checks its own shard and the ranks add up their counts, so all of them stop together."""
    flags = torch.stack([~torch.isfinite(local_tensor(p.detach()) if distributed else p.detach()).all()
                         for p in params])  # (P,) on the device: one read-back below, not one per parameter
    bad = int(flags.sum())
    if distributed:
        bad = all_reduce_sum({"bad": bad}, params[0].device)["bad"]
    if bad:
        raise NonFiniteLossError(f"step {step}: the update made weights NaN or inf; nothing of this step is "
                                 "saved. Lower the learning rate and start a new run from the last checkpoint")


def rank_micro_batches(batch: list[int], micro_batch_size: int) -> list[tuple[list[int], float]]:
    """Under torchrun: this rank's micro-batches of a global batch, each with a weight: 1 (real) or 0 (padding).

    Every rank cuts the same global batch into the same micro-batches; micro-batch j
    goes to rank j % N. All ranks get the same number of micro-batches, so their
    collectives line up: a rank short of one repeats micro-batch 0 with weight 0.
    """
    micros = chunks(batch, micro_batch_size)
    mine = [(micro, 1.0) for micro in shard(micros)]
    per_rank = math.ceil(len(micros) / world_size())
    return mine + [(micros[0], 0.0)] * (per_rank - len(mine))


# --------------------------------------------------------------------------- the shared training loop


class Stage(Protocol):
    """What a training stage gives the loop: eto_ref/sft.py `SFTStage`, eto_ref/dpo.py `DPOStage`,
    eto_ref/ppo.py `PPOStage`, eto_ref/grpo.py `GRPOStage`."""

    name: str  # "sft" | "dpo" | "ppo" | "grpo": the metrics log's stage field
    train_indices: list[int]  # the examples trained on
    lengths: list[int]  # tokens per example: a batch is sorted by length before it is cut
    data_stats: dict  # logged with the start record
    repeats: int  # optimizer steps taken on each global batch: 1 (PPO, GRPO: their ppo_epochs)

    def begin_batch(self, model, batch: list[int]) -> None:
        """Called before the first of a global batch's steps (PPO: the batch's old log-probs and advantages)."""

    def loss(self, model, micro: list[int], batch: list[int]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the global batch's loss, and its shares of the logged metrics."""

    def evaluate(self, model) -> dict:
        """Held-out metrics, {} when nothing is held out (the model in eval mode, under no_grad)."""


class NoLog:
    """The metrics log of ranks other than 0: drops everything."""

    def log(self, **record) -> dict:
        return record

    def close(self) -> None:
        pass


def steps_of(cfg: TrainConfig, examples: int, repeats: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps), `repeats` steps per global batch; ValueError when no step would run."""
    steps_per_epoch = math.ceil(examples / cfg.batch_size) * repeats
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    if total < 1:
        raise ValueError(f"{cfg.out}: 0 training steps would run ({examples} examples, epochs {cfg.epochs})")
    return steps_per_epoch, total


class Fit:
    """The state of one training run: model, optimizer, step counter, metrics log."""

    def __init__(self, model, cfg: TrainConfig, stage: Stage, resume_from: Path | None, device, dtype):
        self.model, self.cfg, self.stage, self.device, self.dtype = model, cfg, stage, device, dtype
        self.ranks = world_size()  # 1 without torchrun
        parallelize(model, cfg, self.ranks, dtype)
        self.named = trainable_parameters(model)  # after parallelize: FSDP replaces the parameters by shards
        self.params = [p for _, p in self.named]
        self.optimizer = make_optimizer(cfg, self.named)
        self.steps_per_epoch, self.total = steps_of(cfg, len(stage.train_indices), stage.repeats)
        self.amp = autocast(device, dtype)
        self.step = 0 if resume_from is None else load_optimizer_state(self.optimizer, self.named, resume_from)
        self.log = (MetricsLog(Path(cfg.out) / "metrics.jsonl", resume_step=self.step if resume_from else None,
                               stage=stage.name) if is_main() else NoLog())
        if resume_from is None:
            self.log.log(step=0, event="start", total_steps=self.total, steps_per_epoch=self.steps_per_epoch,
                         trainable_parameters=sum(p.numel() for p in self.params), **stage.data_stats)
        else:
            self.log.log(step=self.step, event="resume", checkpoint=str(resume_from))

    def state(self, metrics: dict) -> dict:
        """trainer_state.json: where the run is, and everything needed to check a resume."""
        return {"stage": self.stage.name, "step": self.step, "epoch": self.step / self.steps_per_epoch,
                "total_steps": self.total, "steps_per_epoch": self.steps_per_epoch, "seed": self.cfg.seed,
                "rng": "data order: randperm(seed, epoch); step RNG: manual_seed(seed * 1000003 + step + 1)",
                "config": config_dict(self.cfg), "compute_dtype": dtype_name(self.dtype), "metrics": metrics}

    def evaluate(self) -> dict:
        """Held-out metrics (every rank evaluates the whole held-out set: FSDP forwards are collectives)."""
        self.model.eval()
        with torch.no_grad(), self.amp:
            result = self.stage.evaluate(self.model)
        self.model.train()
        if result:
            self.log.log(step=self.step, epoch=self.step / self.steps_per_epoch, **result)
        return result

    def train_step(self) -> dict:
        """One optimizer step: the global batch, its micro-batches -> loss -> backward, clip, AdamW.

        Each micro-batch's loss is its share of the global batch's loss, so the summed
        gradients are those of the whole batch. Under torchrun (ranks > 1) each rank runs
        its share of the micro-batches and the gradients are averaged over the ranks
        (FSDP: reduce-scattered after each micro-batch; replicas: all-reduced after the last).
        """
        cfg, stage, step = self.cfg, self.stage, self.step + 1
        epoch, k = divmod(self.step, self.steps_per_epoch)
        batch = epoch_batches(stage.train_indices, cfg.seed, epoch, cfg.batch_size)[k // stage.repeats]
        batch = sorted(batch, key=lambda i: stage.lengths[i])  # similar lengths share a micro-batch
        if k % stage.repeats == 0:
            stage.begin_batch(self.model, batch)
        lr = lr_at(self.step, cfg.lr, self.total, cfg.warmup_ratio, cfg.schedule)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # LoRA dropout, by step: resume needs no RNG state
        t0 = time.perf_counter()
        if self.ranks == 1:
            micro_batches = [(micro, 1.0) for micro in chunks(batch, cfg.micro_batch_size)]
        else:
            micro_batches = rank_micro_batches(batch, cfg.micro_batch_size)  # weight 0: padding
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for micro, weight in micro_batches:
            with self.amp:
                loss, shares = stage.loss(self.model, micro, batch)  # () and the metrics' shares
            if self.ranks > 1:
                loss = loss * (weight * self.ranks)  # gradients are averaged over ranks; the shares add up
            loss.backward()
            for name, value in shares.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) * weight
        if self.ranks > 1:
            metrics = all_reduce_sum(metrics, self.device)
            if not cfg.fsdp:
                average_gradients(self.params)  # replicas: one all-reduce per gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip if cfg.clip > 0 else math.inf)
        grad_norm = (full_tensor(grad_norm) if self.ranks > 1 else grad_norm).item()
        check_finite(metrics["loss"], grad_norm, step)
        self.optimizer.step()
        check_finite_update(self.params, step, distributed=self.ranks > 1)
        self.step = step
        metrics.update(grad_norm=grad_norm, lr=lr, step_time=time.perf_counter() - t0)
        self.log.log(step=step, epoch=step / self.steps_per_epoch, **metrics)
        return metrics


@training_memory()
def fit(model, cfg: TrainConfig, stage: Stage, resume_from: Path | None, device: torch.device,
        dtype: torch.dtype, callback: Callable | None = None) -> Path:
    """Train `model` on `stage` for cfg.epochs (or cfg.max_steps); returns the final model directory.

    callback(step, metrics) is called after every optimizer step (and its checkpoint).
    Under torchrun every rank runs this loop on the same global batches (each its share of
    the micro-batches, see Fit.train_step); only rank 0 logs and writes files.
    """
    run = Fit(model, cfg, stage, resume_from, device, dtype)
    bar = progress_bar(run.total, run.step, desc=stage.name) if cfg.progress and is_main() else None
    run.model.train()
    metrics, eval_metrics = {}, {}
    try:
        while run.step < run.total:
            metrics = run.train_step()
            if bar is not None:
                show(bar, loss=metrics["loss"], lr=metrics["lr"],
                     **{n: v for n, v in eval_metrics.items() if n == "eval_loss"})
                bar.update(1)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total:
                eval_metrics = run.evaluate()
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total:
                save_checkpoint(model, run.optimizer, run.named, cfg, run.state({**metrics, **eval_metrics}))
            if callback is not None:
                callback(run.step, metrics)
        eval_metrics = run.evaluate()
        final = save_final(model, cfg, run.state({**metrics, **eval_metrics}))
        run.log.log(step=run.step, event="done", final=str(final))
    finally:
        if bar is not None:
            bar.close()
        run.log.close()
    return final


@contextmanager
def training_run(cfg: TrainConfig):
    """What every stage does around its training: lock cfg.out, compare its run.json with these settings
    (refusing a folder made with others), then yield (final/ if this run has finished else None, device,
    dtype, the newest usable checkpoint to resume from or None)."""
    with RunLock(cfg.out):
        device, dtype = setup_runtime(cfg)
        claim_training_run(cfg, dtype)
        done = finished_run(cfg)
        yield done, device, dtype, None if done is not None else find_resume_checkpoint(cfg)


def start_model(cfg: TrainConfig, device, dtype, resume_from: Path | None):
    """The model to train: cfg.model (+ fresh adapters), with a checkpoint's weights when resuming."""
    model = load_trainable_model(cfg, device, dtype)
    if resume_from is not None:
        restore_weights(model, resume_from, bool(cfg.lora_rank))
    return model

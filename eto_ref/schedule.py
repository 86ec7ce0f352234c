"""Learning-rate schedules: linear warmup, then cosine decay (SFT) or constant (DPO).

The official ETO code trains with the Hugging Face Trainer: SFT uses
`--lr_scheduler_type cosine --warmup_ratio 0.03`, DPO uses
`--lr_scheduler_type constant_with_warmup --warmup_ratio 0.1`. These functions
give the same multipliers as transformers' `get_cosine_schedule_with_warmup` and
`get_constant_schedule_with_warmup`, as a pure function of the step:

    step  = number of optimizer steps already taken (0 for the first update)
    W     = warmup steps = ceil(warmup_ratio * total_steps), at most total_steps - 1

    warmup (step < W):  lr = base_lr * step / W             (so the very first update has lr 0)
    cosine:             lr = base_lr * 0.5 * (1 + cos(pi * (step - W) / (total_steps - W)))
    constant:           lr = base_lr

The one place this differs from transformers: a stage of a single step (an ETO
iteration that found only a few pairs) gets no warmup. transformers would give its
only update lr 0, so the stage would train nothing while reporting that it ran.

Being a pure function of `step`, the schedule needs no saved state: a resumed run
just asks for the lr of its next step.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """W = ceil(ratio * total), as transformers' TrainingArguments.get_warmup_steps, but never every step:
    at least one update runs at the full learning rate (one step in all: no warmup, not an update with lr 0)."""
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


def lr_at(step: int, base_lr: float, total_steps: int, warmup_ratio: float, schedule: str = "cosine") -> float:
    """The learning rate of optimizer update number `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return base_lr * (step / warmup)  # linear warmup from 0
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cosine, from 1 down to 0

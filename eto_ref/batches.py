"""Rendered examples (eto_ref/trajectory.py `Example`, `PairExample`) padded into batches.

    batch = collate_sft(examples, pad_id)     # input_ids, loss_mask, attention_mask (B, T); shared_prefix
    batch = collate_pairs(pairs, pad_id)      # chosen rows, then rejected rows: (2B, T), one forward
    chosen, rejected = split_chosen_rejected(per_row)

Rows are right-padded; the rows' common leading tokens (the instruction every
trajectory of an environment begins with) are counted once, so the model can run
them once for the batch.
"""

from __future__ import annotations

import torch

from eto_ref.trajectory import Example, PairExample


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate pass


def shared_prefix_length(examples: list[Example]) -> int:
    """How many leading tokens (ids and mask alike) every example shares, leaving each at least one of its own.

    The model runs those tokens once for the whole batch (Transformer `shared_prefix`):
    the instruction every trajectory of an environment begins with. 0 for a single
    example or a prefix shorter than MIN_SHARED_PREFIX.
    """
    if len(examples) < 2:
        return 0
    first = examples[0]
    n = min(len(e.input_ids) for e in examples) - 1
    for e in examples[1:]:
        k = 0
        while k < n and e.input_ids[k] == first.input_ids[k] and e.loss_mask[k] == first.loss_mask[k]:
            k += 1
        n = k
    return n if n >= MIN_SHARED_PREFIX else 0


def collate_sft(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into (B, T) tensors: input_ids (long), loss_mask and attention_mask (bool, False on pad),
    and "shared_prefix": the number of leading tokens all rows share (see shared_prefix_length)."""
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        loss_mask[i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask,
            "shared_prefix": shared_prefix_length(examples)}


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows 0..B-1, then rejected rows B..2B-1, padded together: one (2B, T) batch, one forward."""
    return collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)


def split_chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...): undo `collate_pairs`' concatenation."""
    if x.shape[0] % 2:
        raise ValueError(f"expected 2B rows (chosen then rejected), got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]

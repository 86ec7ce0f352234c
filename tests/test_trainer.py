"""eto_ref/trainer.py: gradient accumulation equals the full batch; non-finite values stop a run before
anything is saved."""

import dataclasses
import math

import pytest
import torch

from eto_ref import dpo, run_dir, sft, trainer
from eto_ref.checkpoint import read_state_dict
from eto_ref.config import SFTConfig
from eto_ref.dpo import run_dpo
from eto_ref.metrics import read_metrics
from eto_ref.sft import run_sft
from eto_ref.trainer import NonFiniteLossError
from tests.helpers import (
    assert_same_params,
    dpo_config,
    sft_config,
)

# --------------------------------------------------------------------------- schedules


# --------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_equals_full_batch(tiny_model, data_files):
    """Micro-batches of 1 accumulate to exactly the gradient (and AdamW step) of the whole batch.

    (AdamW's first update is lr * g / (|g| + eps): for gradients near eps, float rounding
    of the summation order shows up at ~1e-4 * lr, hence the moderate lr here.)

    The examples have different numbers of agent tokens, so the mean of per-micro-batch means
    would give a different gradient: the BC loss must divide by the global token count.
    """
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_trajectories

    cfg = SFTConfig(model=str(tiny_model), max_len=256, lr=1e-3, weight_decay=0.1)
    tok = Tokenizer.from_dir(tiny_model)
    examples, _ = sft.encode_sft_data(load_trajectories(data_files["sft"]), tok, cfg.max_len)
    counts = [sft.scored_targets(ex.loss_mask) for ex in examples]
    assert len(set(counts)) > 1
    loss_fn = sft.sft_micro_loss(examples, counts, tok.pad_id, torch.device("cpu"))
    batch = list(range(len(examples)))

    results = []
    for micro in (len(batch), 1):
        model = trainer.load_trainable_model(cfg, torch.device("cpu"), torch.float32)
        named = trainer.trainable_parameters(model)
        opt = trainer.make_optimizer(cfg, named)
        opt.zero_grad()
        metrics = trainer.accumulate_gradients(model, batch, micro, loss_fn, torch.autocast("cpu", enabled=False))
        grads = {n: p.grad.clone() for n, p in named}
        trainer.optimizer_step(model, opt, [p for _, p in named], batch, micro, loss_fn, cfg.lr, 1.0,
                               torch.autocast("cpu", enabled=False))
        results.append((metrics["loss"], grads, {n: p.detach().clone() for n, p in named}))

    (loss_full, g_full, p_full), (loss_acc, g_acc, p_acc) = results
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    for n in g_full:
        torch.testing.assert_close(g_acc[n], g_full[n], atol=1e-6, rtol=1e-5, msg=f"grad {n}")
    assert_same_params(p_acc, p_full)

    # The wrong way (mean of micro-batch means) is measurably different: the test can see the bug.
    model = trainer.load_trainable_model(cfg, torch.device("cpu"), torch.float32)
    from eto_ref.losses import bc_loss
    from eto_ref.trajectory import collate_sft
    for i in batch:
        b = collate_sft([examples[i]], tok.pad_id)
        (bc_loss(model(b["input_ids"], attention_mask=b["attention_mask"]), b["input_ids"], b["loss_mask"])
         / len(batch)).backward()
    wrong = dict(model.named_parameters())["lm_head.weight"].grad
    assert not torch.allclose(wrong, g_full["lm_head.weight"], atol=1e-6)


# --------------------------------------------------------------------------- DPO


# --------------------------------------------------------------------------- resume and checkpoints


def poison_loss_from_step(monkeypatch, module, factory: str, first_bad_step: int, value: float, calls_per_step: int):
    """Make the micro-batch loss (and its reported value) `value` from `first_bad_step` on."""
    real = getattr(module, factory)

    def poisoned_factory(*args, **kw):
        micro_loss, calls = real(*args, **kw), [0]

        def poisoned(model, micro, batch):
            calls[0] += 1
            loss, metrics = micro_loss(model, micro, batch)
            if calls[0] > (first_bad_step - 1) * calls_per_step:
                loss = loss * value
                metrics = {**metrics, "loss": loss.detach()}
            return loss, metrics
        return poisoned

    monkeypatch.setattr(module, factory, poisoned_factory)


@pytest.mark.parametrize("stage, bad", [("sft", math.nan), ("sft", math.inf), ("dpo", math.nan)])
def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        stage, bad, tiny_model, data_files, tmp_path, monkeypatch):
    run, make, module, factory, calls = ((run_sft, sft_config, sft, "sft_micro_loss", 2) if stage == "sft"
                                         else (run_dpo, dpo_config, dpo, "dpo_micro_loss", 1))
    poison_loss_from_step(monkeypatch, module, factory, first_bad_step=3, value=bad, calls_per_step=calls)
    with pytest.raises(NonFiniteLossError, match=r"^step 3: non-finite training signal \(loss (nan|inf)"
                                                 r".*Every saved checkpoint is finite"):
        run(make(tiny_model, data_files, tmp_path, epochs=2, save_every=2))
    assert [p.name for p in run_dir.checkpoint_dirs(tmp_path)] == ["step-000002"]
    assert not (tmp_path / "final").exists()
    tensors = read_state_dict(tmp_path / "checkpoints" / "step-000002")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_check_finite_is_a_named_function_that_accepts_finite_values():
    trainer.check_finite(1.5, 0.3, step=7)
    with pytest.raises(NonFiniteLossError, match="^step 7: .*grad norm inf"):
        trainer.check_finite(1.5, math.inf, step=7)
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_an_update_that_makes_weights_non_finite_stops_before_anything_is_saved(tiny_model, data_files, tmp_path):
    """The last step is checked too: an infinite learning rate never reaches final/."""
    cfg = dataclasses.replace(sft_config(tiny_model, data_files, tmp_path, epochs=1), lr=math.inf, max_steps=1,
                              warmup_ratio=0.0)
    with pytest.raises(NonFiniteLossError, match="^step 1: the update made weights NaN or inf"):
        run_sft(cfg)
    assert not (tmp_path / "final").exists() and not run_dir.checkpoint_dirs(tmp_path)

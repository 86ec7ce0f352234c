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
    params_of,
    dpo_config,
    sft_config,
)

# --------------------------------------------------------------------------- schedules


# --------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_equals_full_batch(tiny_model, data_files, tmp_path):
    """Micro-batches of 1 accumulate to exactly the gradient (and AdamW step) of the whole batch.

    (AdamW's first update is lr * g / (|g| + eps): for gradients near eps, float rounding
    of the summation order shows up at ~1e-4 * lr, hence the moderate lr here.)

    The examples have different numbers of agent tokens, so the mean of per-micro-batch means
    would give a different gradient: the BC loss must divide by the global token count.
    """
    from eto_ref.batches import collate_sft
    from eto_ref.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model)
    results = []
    for micro in (None, 1):
        cfg = SFTConfig(model=str(tiny_model), data=str(data_files["sft"]), out=str(tmp_path / f"m{micro}"),
                        max_len=256, lr=1e-3, weight_decay=0.1, eval_fraction=0.0, progress=False)
        stage = sft.SFTStage(cfg, tok, torch.device("cpu"))
        assert len(set(stage.counts)) > 1
        cfg = dataclasses.replace(cfg, batch_size=len(stage.examples), micro_batch_size=micro or len(stage.examples))
        model = trainer.load_trainable_model(cfg, torch.device("cpu"), torch.float32)
        run = trainer.Fit(model, cfg, stage, None, torch.device("cpu"), torch.float32)
        metrics = run.train_step()
        run.log.close()
        named = trainer.trainable_parameters(model)
        results.append((metrics["loss"], {n: p.grad.clone() for n, p in named}, {n: p.detach().clone() for n, p in named}))
    examples, batch = stage.examples, list(range(len(stage.examples)))

    (loss_full, g_full, p_full), (loss_acc, g_acc, p_acc) = results
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    for n in g_full:
        torch.testing.assert_close(g_acc[n], g_full[n], atol=1e-6, rtol=1e-5, msg=f"grad {n}")
    assert_same_params(p_acc, p_full)

    # The wrong way (mean of micro-batch means) is measurably different: the test can see the bug.
    model = trainer.load_trainable_model(cfg, torch.device("cpu"), torch.float32)
    from eto_ref.losses import agent_token_logprobs, bc_loss
    for i in batch:
        b = collate_sft([examples[i]], tok.pad_id)
        logits = model(b["input_ids"], attention_mask=b["attention_mask"])  # (1, T, V)
        (bc_loss(agent_token_logprobs(logits, b["input_ids"], b["loss_mask"])) / len(batch)).backward()
    wrong = dict(model.named_parameters())["lm_head.weight"].grad
    assert not torch.allclose(wrong, g_full["lm_head.weight"], atol=1e-6)


# --------------------------------------------------------------------------- DPO


# --------------------------------------------------------------------------- resume and checkpoints


def poison_loss_from_step(monkeypatch, stage_class, first_bad_step: int, value: float, calls_per_step: int):
    """Make the micro-batch loss (and its reported value) `value` from `first_bad_step` on."""
    real, calls = stage_class.loss, [0]

    def poisoned(self, model, micro, batch):
        calls[0] += 1
        loss, metrics = real(self, model, micro, batch)
        if calls[0] > (first_bad_step - 1) * calls_per_step:
            loss = loss * value
            metrics = {**metrics, "loss": loss.detach()}
        return loss, metrics

    monkeypatch.setattr(stage_class, "loss", poisoned)


@pytest.mark.parametrize("stage, bad", [("sft", math.nan), ("sft", math.inf), ("dpo", math.nan)])
def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        stage, bad, tiny_model, data_files, tmp_path, monkeypatch):
    run, make, stage_class, calls = ((run_sft, sft_config, sft.SFTStage, 2) if stage == "sft"
                                     else (run_dpo, dpo_config, dpo.DPOStage, 1))
    poison_loss_from_step(monkeypatch, stage_class, first_bad_step=3, value=bad, calls_per_step=calls)
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


def test_compiled_training_takes_the_uncompiled_steps(tiny_model, data_files, tmp_path):
    """--compile (each decoder layer through torch.compile; inductor on the CPU) runs SFT steps on rows of
    several lengths and ends with the weights of the same run uncompiled."""
    kw = dict(epochs=1, max_len=512, batch_size=2, micro_batch_size=1)
    plain = run_sft(sft_config(tiny_model, data_files, tmp_path / "plain", **kw))
    compiled = run_sft(sft_config(tiny_model, data_files, tmp_path / "compiled", compile=True, **kw))
    losses = [[m["loss"] for m in read_metrics(d.parent / "metrics.jsonl") if "loss" in m] for d in (plain, compiled)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert_same_params(params_of(plain), params_of(compiled), atol=1e-4)

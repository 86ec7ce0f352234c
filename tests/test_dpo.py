"""eto_ref/dpo.py: one DPO stage of ETO (paper Eq. 7), its reference log-prob cache, LoRA as the reference."""

import dataclasses
import json
import math

import pytest
import torch

from eto_ref import checkpoint, dpo, run_dir, trainer
from eto_ref.checkpoint import load_model, save_model
from eto_ref.dpo import run_dpo
from eto_ref.lora import disable_adapter
from eto_ref.metrics import read_metrics
from tests.helpers import Interrupt, dpo_config, interrupt_at


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_dpo_micro_batches_of_one_pair_accumulate_to_the_whole_batch(tiny_model, data_files, tmp_path, sft_weight):
    """The `small` preset trains DPO one pair at a time: the accumulated loss and gradients must be those
    of the whole batch in one micro-batch (Eq. 7's mean over pairs; the chosen NLL's global token mean)."""
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_pairs

    cfg = dpo_config(tiny_model, data_files, tmp_path, sft_weight=sft_weight, eval_fraction=0.0, clip=0.0)
    device = torch.device("cpu")
    tok = Tokenizer.from_dir(tiny_model)
    _, examples, stats = dpo.encode_pair_data(load_pairs(data_files["pairs"]), tok, cfg.max_len)
    model = trainer.load_trainable_model(cfg, device, torch.float32)
    ref = dpo.reference_logprobs(model, examples, tok.pad_id, 4, device, torch.float32)  # (N, 2)
    ref = ref + torch.tensor([-2.0, 3.0])  # pi != ref: nonzero margins and a loss away from log 2
    results = []
    for micro in (len(examples), 1):
        cfg_micro = dataclasses.replace(cfg, batch_size=len(examples), micro_batch_size=micro,
                                        out=str(tmp_path / f"micro-{micro}"))
        stage = dpo.DPOStage(cfg_micro, examples, ref, tok.pad_id, device, stats)
        assert len(examples) > 1 and len(set(stage.chosen_counts)) > 1
        model = trainer.load_trainable_model(cfg_micro, device, torch.float32)
        run = trainer.Fit(model, cfg_micro, stage, None, device, torch.float32)
        metrics = run.train_step()
        run.log.close()
        results.append((metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, g_whole), (ones, g_ones) = results
    for key in ("loss", "margin", "accuracy"):
        assert ones[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    for n in g_whole:
        torch.testing.assert_close(g_ones[n], g_whole[n], atol=1e-6, rtol=1e-5, msg=f"grad {n}")


def test_dpo_step_raises_margin(tiny_model, data_files, tmp_path):
    """At the start pi = ref, so every margin is 0 and the loss is log 2; one step makes the margin positive."""
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_pairs

    cfg = dpo_config(tiny_model, data_files, tmp_path, lr=1e-3, eval_fraction=0.0)
    device = torch.device("cpu")
    tok = Tokenizer.from_dir(tiny_model)
    pairs, examples, stats = dpo.encode_pair_data(load_pairs(data_files["pairs"]), tok, cfg.max_len)
    cfg = dataclasses.replace(cfg, batch_size=len(examples))
    model = trainer.load_trainable_model(cfg, device, torch.float32)
    ref = dpo.reference_logprobs(model, examples, tok.pad_id, 4, device, torch.float32)  # (N, 2)
    stage = dpo.DPOStage(cfg, examples, ref, tok.pad_id, device, stats)
    run = trainer.Fit(model, cfg, stage, None, device, torch.float32)
    before = run.train_step()
    run.log.close()
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert before["margin"] == pytest.approx(0.0, abs=1e-4)
    batch = list(range(len(examples)))
    with torch.no_grad():
        after = stage.loss(model, batch, batch)[1]
    assert after["margin"] > 1e-3
    assert after["loss"] < math.log(2)


def test_run_dpo_metrics_and_files(tiny_model, data_files, tmp_path):
    final = run_dpo(dpo_config(tiny_model, data_files, tmp_path, epochs=2, eval_fraction=0.34, eval_every=1))
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 4 train pairs / batch 2 = 2 steps per epoch
    for key in ("lr", "grad_norm", "chosen_reward", "rejected_reward", "margin", "accuracy", "tokens"):
        assert key in steps[0], key
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[-1]["margin"] > steps[0]["margin"]
    assert any("eval_loss" in r and "eval_accuracy" in r for r in records)
    assert (tmp_path / dpo.REFERENCE_FILE).is_file()
    load_model(final)


def test_lora_reference_is_the_model_with_adapters_disabled(tiny_model, data_files, tmp_path):
    from eto_ref.batches import collate_pairs
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_pairs

    cfg = dpo_config(tiny_model, data_files, tmp_path, lora_rank=4, lora_alpha=8, lr=1e-2, epochs=2)
    run_dpo(cfg)
    cache = json.loads((tmp_path / dpo.REFERENCE_FILE).read_text())["logps"]

    tok = Tokenizer.from_dir(tiny_model)
    pairs, examples, _ = dpo.encode_pair_data(load_pairs(data_files["pairs"]), tok, cfg.max_len)
    policy = trainer.load_trainable_model(cfg, torch.device("cpu"), torch.float32)
    run_dir.restore_weights(policy, run_dir.checkpoint_dirs(tmp_path)[-1], lora=True)  # trained adapters
    policy.eval()
    moved = False
    with torch.no_grad():
        for pair, ex in zip(pairs, examples):
            b = collate_pairs([ex], tok.pad_id)
            key = dpo.pair_key(pair.id, b)
            with disable_adapter(policy):
                c, r, _ = dpo.pair_logprobs(policy, b)
            torch.testing.assert_close(torch.tensor(cache[key]), torch.cat([c, r]), atol=1e-4, rtol=1e-5)
            c2, r2, _ = dpo.pair_logprobs(policy, b)
            moved |= not torch.allclose(torch.cat([c, r]), torch.cat([c2, r2]), atol=1e-3)
    assert moved, "the trained adapters should change the policy's log-probs"


def test_reference_cache_reused_on_resume_and_recomputed_for_another_checkpoint(
        tiny_model, data_files, tmp_path, monkeypatch):
    calls = []
    real = dpo.reference_logprobs

    def counting(model, examples, *args, **kw):
        calls.append(len(examples))
        return real(model, examples, *args, **kw)

    monkeypatch.setattr(dpo, "reference_logprobs", counting)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_dpo(dpo_config(tiny_model, data_files, out, epochs=2), callback=interrupt_at(1))
    assert calls == [6]
    mtime = (out / dpo.REFERENCE_FILE).stat().st_mtime_ns
    run_dpo(dpo_config(tiny_model, data_files, out, epochs=2))  # resume: the cache is reused
    assert calls == [6]
    assert (out / dpo.REFERENCE_FILE).stat().st_mtime_ns == mtime

    other = tmp_path / "other_model"  # a different starting checkpoint -> recompute
    model = load_model(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    save_model(model, other, tokenizer_dir=tiny_model)
    with pytest.raises(run_dir.RunError, match=r"made with other settings: .*model_fingerprint: "):
        run_dpo(dpo_config(other, data_files, out, epochs=2))  # the folder's run.json names the old model
    assert calls == [6]
    run_dpo(dpo_config(other, data_files, out, epochs=2, resume=False))
    assert calls == [6, 6]
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["model_fingerprint"] == checkpoint.model_fingerprint(other)

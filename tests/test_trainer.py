"""Tests for eto_ref/trainer.py, eto_ref/schedule.py, eto_ref/metrics.py: the training loops.

Everything runs on a tiny random Llama (2 layers, hidden 32) with a BPE tokenizer
trained on the test texts, saved as a Hugging Face directory in a temp dir, and a
handful of hand-made trajectories and preference pairs in the ETO format.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from eto_ref import checkpoint, config, dpo, run_dir, sft, trainer
from eto_ref.checkpoint import load_model, save_model
from eto_ref.lora import disable_adapter
from eto_ref.metrics import read_metrics
from eto_ref.model import ModelConfig, Transformer
from eto_ref.schedule import lr_at, warmup_steps
from eto_ref.config import DPOConfig, SFTConfig
from eto_ref.dpo import run_dpo
from eto_ref.sft import run_sft

INSTRUCTION = "Interact with a household to solve a task. Reply with Thought: ... and Action: ..."


def conversation(task: str, actions: list[str]) -> list[dict]:
    turns = [{"from": "human", "value": INSTRUCTION}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": task}]
    for i, action in enumerate(actions):
        if i:
            turns.append({"from": "human", "value": f"Observation: You arrive at place {i}."})
        turns.append({"from": "gpt", "value": f"Thought: I should {action}.\nAction: {action}"})
    return turns


TASKS = [
    ("put a mug in cabinet 1.",
     ["go to desk 1", "take mug 1 from desk 1", "go to cabinet 1", "put mug 1 in cabinet 1"]),
    ("put a bowl on table 2.",
     ["go to shelf 3", "take bowl 2 from shelf 3", "go to table 2", "put bowl 2 on table 2"]),
    ("heat an apple.",
     ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1", "heat apple 1 with microwave 1"]),
    ("cool a tomato.", ["go to countertop 1", "take tomato 1 from countertop 1", "cool tomato 1 with fridge 1"]),
    ("clean a knife.",
     ["go to drawer 2", "open drawer 2", "take knife 1 from drawer 2", "clean knife 1 with sinkbasin 1"]),
    ("find a pen.", ["go to desk 2", "examine desk 2", "take pen 1 from desk 2"]),
]


def sft_records() -> list[dict]:
    return [{"id": f"t{i}", "conversations": conversation(task, actions), "reward": 1.0}
            for i, (task, actions) in enumerate(TASKS)]


def pair_records() -> list[dict]:
    """Chosen = the expert turns, rejected = a wrong first action; the prompt is the shared 0-shot prefix."""
    pairs = []
    for i, (task, actions) in enumerate(TASKS):
        conv = conversation(task, actions)
        bad = conversation(task, ["look", "inventory"])
        pairs.append({"id": f"p{i}", "prompt": conv[:3], "chosen": conv[3:], "rejected": bad[3:]})
    return pairs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama + chatml BPE tokenizer as a Hugging Face directory."""
    from eto_ref.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = [t["value"] for r in sft_records() for t in r["conversations"]] + ["Observation: Nothing happened."]
    tok = train_bpe_tokenizer(texts * 4, vocab_size=300, out_dir=root / "tok", template="chatml")
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(config)
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    (root / "sft.json").write_text(json.dumps(sft_records()))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pair_records()))
    return {"sft": str(root / "sft.json"), "pairs": str(root / "pairs.jsonl")}


def sft_config(tiny_model, data_files, out, **kw) -> SFTConfig:
    base = dict(model=str(tiny_model), data=data_files["sft"], out=str(out), lr=3e-3, epochs=2, batch_size=2,
                micro_batch_size=1, max_len=256, eval_fraction=0.0, save_every=2, progress=False, device="cpu")
    return SFTConfig(**{**base, **kw})


def dpo_config(model, data_files, out, **kw) -> DPOConfig:
    base = dict(model=str(model), pairs=data_files["pairs"], out=str(out), lr=1e-3, epochs=1, batch_size=2,
                micro_batch_size=2, max_len=256, save_every=1, progress=False, device="cpu")
    return DPOConfig(**{**base, **kw})


def params_of(model_dir) -> dict:
    return {k: v.clone() for k, v in load_model(model_dir).state_dict().items()}


def assert_same_params(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"parameter {k} differs")


class Interrupt(Exception):
    pass


def interrupt_at(k: int):
    def callback(step, metrics):
        if step == k:
            raise Interrupt(f"simulated kill after step {k}")
    return callback


# --------------------------------------------------------------------------- schedules


def test_cosine_schedule_key_values():
    total, ratio, base = 100, 0.03, 2e-5
    W = warmup_steps(total, ratio)
    assert W == 3  # ceil(0.03 * 100)
    assert lr_at(0, base, total, ratio, "cosine") == 0.0  # the first update has lr 0 (as transformers)
    assert lr_at(1, base, total, ratio, "cosine") == pytest.approx(base / 3)
    assert lr_at(W, base, total, ratio, "cosine") == pytest.approx(base)  # warmup end: peak
    mid = W + (total - W) / 2
    assert lr_at(int(mid), base, total, ratio, "cosine") == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * (int(mid) - W) / (total - W))))
    assert lr_at(total, base, total, ratio, "cosine") == pytest.approx(0.0, abs=1e-12)  # cosine end
    assert lr_at(total - 1, base, total, ratio, "cosine") > 0


def test_constant_schedule_key_values():
    total, ratio, base = 50, 0.1, 1e-6
    assert warmup_steps(total, ratio) == 5
    assert lr_at(0, base, total, ratio, "constant") == 0.0
    assert lr_at(2, base, total, ratio, "constant") == pytest.approx(base * 2 / 5)
    for step in (5, 20, 49, 50):
        assert lr_at(step, base, total, ratio, "constant") == pytest.approx(base)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, base, total, ratio, "linear")


def test_schedules_match_transformers():
    transformers = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    for name, make, ratio in (("cosine", transformers.get_cosine_schedule_with_warmup, 0.03),
                              ("constant", transformers.get_constant_schedule_with_warmup, 0.1)):
        total = 77
        opt = torch.optim.SGD([p], lr=1.0)
        kwargs = dict(num_warmup_steps=warmup_steps(total, ratio))
        if name == "cosine":
            kwargs["num_training_steps"] = total
        sched = make(opt, **kwargs)
        for step in range(total):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, 1.0, total, ratio, name), abs=1e-12)
            opt.step()
            sched.step()


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


def test_dpo_step_raises_margin(tiny_model, data_files, tmp_path):
    """At the start pi = ref, so every margin is 0 and the loss is log 2; one step makes the margin positive."""
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import load_pairs

    cfg = dpo_config(tiny_model, data_files, tmp_path, lr=1e-3)
    device = torch.device("cpu")
    tok = Tokenizer.from_dir(tiny_model)
    pairs, examples, _ = dpo.encode_pair_data(load_pairs(data_files["pairs"]), tok, cfg.max_len)
    model = trainer.load_trainable_model(cfg, device, torch.float32)
    ref = dpo.reference_logprobs(model, examples, tok.pad_id, 4, device, torch.float32)  # (N, 2)
    counts = [1] * len(examples)
    loss_fn = dpo.dpo_micro_loss(examples, ref, counts, cfg, tok.pad_id, device)
    batch = list(range(len(examples)))
    named = trainer.trainable_parameters(model)
    opt = trainer.make_optimizer(cfg, named)
    before = trainer.optimizer_step(model, opt, [p for _, p in named], batch, 2, loss_fn, cfg.lr, 1.0,
                                    torch.autocast("cpu", enabled=False))
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert before["margin"] == pytest.approx(0.0, abs=1e-4)
    after = trainer.accumulate_gradients(model, batch, 2, loss_fn, torch.autocast("cpu", enabled=False))
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
    from eto_ref.tokenizer import Tokenizer
    from eto_ref.trajectory import collate_pairs, load_pairs

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
    run_dpo(dpo_config(other, data_files, out, epochs=2, resume=False))
    assert calls == [6, 6]
    doc = json.loads((out / dpo.REFERENCE_FILE).read_text())
    assert doc["fingerprint"]["checkpoint"] == checkpoint.model_fingerprint(other)


# --------------------------------------------------------------------------- resume and checkpoints


@pytest.mark.parametrize("stage, lora", [("sft", 0), ("dpo", 4)])
def test_resume_ends_with_the_same_parameters(tiny_model, data_files, tmp_path, stage, lora):
    run, make = (run_sft, sft_config) if stage == "sft" else (run_dpo, dpo_config)
    kw = dict(epochs=2, save_every=2, lora_rank=lora, lora_dropout=0.1)
    straight = run(make(tiny_model, data_files, tmp_path / "straight", **kw))
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run(make(tiny_model, data_files, interrupted, **kw), callback=interrupt_at(3))
    assert [p.name for p in run_dir.checkpoint_dirs(interrupted)] == ["step-000002"]
    resumed = run(make(tiny_model, data_files, interrupted, **kw))
    assert_same_params(params_of(resumed), params_of(straight))
    records = [r for r in read_metrics(interrupted / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # step 3 logged once


def test_resume_refuses_other_settings(tiny_model, data_files, tmp_path):
    with pytest.raises(Interrupt):
        run_sft(sft_config(tiny_model, data_files, tmp_path, save_every=1), callback=interrupt_at(1))
    with pytest.raises(ValueError, match="other settings"):
        run_sft(sft_config(tiny_model, data_files, tmp_path, save_every=1, lr=1e-4))


def test_checkpoints_hold_no_pickle_and_final_loads(tiny_model, data_files, tmp_path):
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=3, save_every=1, keep_checkpoints=2,
                               eval_fraction=0.34))
    ckpts = run_dir.checkpoint_dirs(tmp_path)
    assert [p.name for p in ckpts] == ["step-000004", "step-000005"]  # 4 train examples / 2 = 2 steps x 3 epochs
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".jsonl", ".safetensors"), f"unexpected file {path}"
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["config"]["lr"] == 3e-3
    from safetensors import safe_open
    with safe_open(str(ckpts[-1] / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight.exp_avg" in keys and "lm_head.weight.exp_avg_sq" in keys
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    load_model(final)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sum("loss" in r for r in records) == 6
    assert records[-2].get("eval_loss", 0) > 0  # evaluation at the end
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp dirs left behind


def test_max_examples_uses_the_first_records(tiny_model, data_files, tmp_path):
    run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=1, max_examples=4))
    start = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert (start["event"], start["examples"], start["total_steps"]) == ("start", 4, 2)


def test_lora_sft_final_is_a_merged_plain_model(tiny_model, data_files, tmp_path):
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, lora_rank=4, lr=1e-2, epochs=1))
    ckpt = run_dir.checkpoint_dirs(tmp_path)[-1]
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    merged = params_of(final)
    assert not any("lora" in k for k in merged)
    base = params_of(tiny_model)
    assert not torch.allclose(merged["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(merged["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])


def test_final_dir_loads_in_transformers(tiny_model, data_files, tmp_path):
    transformers = pytest.importorskip("transformers")
    final = run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=1))
    ours = load_model(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_preset_by_model_name_or_size(tiny_model, tmp_path):
    """tiny: the built-in from-scratch model (or any model this small); small: pretrained models under 1B
    parameters (SmolLM2-135M must not get the 7B recipe); 7b above. Presets hold only overrides."""
    assert config.preset_for(tiny_model) == "tiny"
    assert config.preset_for("smollm2") == "small" and config.preset_for("tiny") == "tiny"
    cfg_json = json.loads((tiny_model / "config.json").read_text())
    assert config.estimate_parameters(cfg_json) == sum(p.numel() for p in load_model(tiny_model).parameters())
    smollm2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "tie_word_embeddings": True}
    llama7b = {**smollm2, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
               "tie_word_embeddings": False}
    for name, c in (("small", smollm2), ("7b", llama7b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(c))
        assert config.preset_for(tmp_path / name) == name
    marked = {**llama7b, config.PRESET_KEY: "tiny"}  # the key eto_ref/tiny.py writes wins over the size
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "config.json").write_text(json.dumps(marked))
    assert config.preset_for(tmp_path / "marked") == "tiny"
    assert SFTConfig().lr == 2e-5 and DPOConfig().lr == 1e-6  # the field defaults are the paper's 7B values
    assert "lr" not in config.preset_values("7b", "sft")  # ... so the 7b preset leaves them
    cfg = DPOConfig.for_model(tiny_model, pairs="p.json", out="runs/x", beta=0.5)
    assert (cfg.lr, cfg.beta, cfg.schedule, cfg.model) == (config.PRESETS["tiny"]["dpo"]["lr"], 0.5, "constant",
                                                           str(tiny_model))
    assert SFTConfig.for_model(tiny_model, preset="7b").lr == 2e-5
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        SFTConfig.for_model(tiny_model, preset="huge")

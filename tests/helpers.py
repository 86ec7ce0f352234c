"""Shared test helpers: a tiny hand-made model directory and training data (SFT trajectories, pairs), configs
over them, and parameter comparisons. The fixtures are exposed to every test by conftest.py."""

import json
from itertools import cycle
from pathlib import Path

import pytest
import torch
from torch import nn

from envs import make_env
from eto_ref.checkpoint import load_model, save_model
from eto_ref.config import DPOConfig, SFTConfig
from eto_ref.model import ModelConfig, Transformer
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer

INSTRUCTION = "Interact with a household to solve a task. Reply with Thought: ... and Action: ..."


def conversation(task: str, actions: list[str]) -> list[dict]:
    turns = [{"from": "human", "value": INSTRUCTION}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": task}]
    for i, action in enumerate(actions):
        if i:
            turns.append({"from": "human", "value": f"Observation: You arrive at place {i}."})
        turns.append({"from": "gpt", "value": f"Thought: I should {action}.\nAction: {action}"})
    return turns


TRAINING_TASKS = [
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
            for i, (task, actions) in enumerate(TRAINING_TASKS)]


def pair_records() -> list[dict]:
    """Chosen = the expert turns, rejected = a wrong first action; the prompt is the shared 0-shot prefix."""
    pairs = []
    for i, (task, actions) in enumerate(TRAINING_TASKS):
        conv = conversation(task, actions)
        bad = conversation(task, ["look", "inventory"])
        pairs.append({"id": f"p{i}", "prompt": conv[:3], "chosen": conv[3:], "rejected": bad[3:]})
    return pairs


def episode_records() -> list[dict]:
    """Per task: the expert's actions (reward 1) and a wrong run (reward 0), each ending with the
    environment's last observation, as explored episodes do."""
    records = []
    for i, (task, actions) in enumerate(TRAINING_TASKS[:4]):
        for kind, acts, reward in (("good", actions, 1.0), ("bad", ["look", "inventory", "look"], 0.0)):
            turns = conversation(task, acts) + [{"from": "human", "value": "Observation: Nothing happened."}]
            records.append({"id": f"{kind}{i}", "conversations": turns, "reward": reward})
    return records


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
                micro_batch_size=1, max_len=256, eval_fraction=0.0, save_every=2, progress=False, device="cpu",
                dtype="float32")
    return SFTConfig(**{**base, **kw})


def dpo_config(model, data_files, out, **kw) -> DPOConfig:
    base = dict(model=str(model), pairs=data_files["pairs"], out=str(out), lr=1e-3, epochs=1, batch_size=2,
                micro_batch_size=2, max_len=256, save_every=1, progress=False, device="cpu",
                dtype="float32")
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


class ScriptedModel(nn.Module):
    """Emits `script` token by token from the start of every reply (a prefill starts a reply).

    With `endless`, the script repeats for ever (the model never stops by itself).
    """

    def __init__(self, vocab_size: int, script: list[int], endless: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inner = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2)).eval()
        self.config = self.inner.config
        self.script, self.endless = script, endless
        self.reply = iter(())

    def prefill_prefix(self, prefix):
        return self.inner.prefill_prefix(prefix)

    def next_token_logits(self, ids, attention_mask, kv_cache, last):
        logits = self.inner.next_token_logits(ids, attention_mask, kv_cache, last)  # (B, V): fills the cache
        if ids.shape[1] > 1:  # a prefill: the next token is the first of a new reply
            self.reply = cycle(self.script) if self.endless else iter(self.script)
        token = next(self.reply, self.script[-1])
        scripted = torch.full_like(logits, -1e4)
        scripted[..., token] = 0.0
        return scripted


HOUSEHOLD_TASKS = make_env("household").task_ids("train")[:3]
_TOKENIZERS = {}


def household_tokenizer(directory):
    if "tok" not in _TOKENIZERS:
        _TOKENIZERS["tok"] = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=5), 400, directory)
    return _TOKENIZERS["tok"]


def scripted_agent(reply: str, directory, end_turn: bool = True, endless: bool = False):
    """(ScriptedModel, tokenizer): the model answers `reply` (then end-of-turn) at every turn."""
    tok = household_tokenizer(directory)
    script = tok.encode(reply) + ([tok.end_of_turn_id] if end_turn else [])
    return ScriptedModel(tok.vocab_size, script, endless=endless), tok


class CrashingEnv:
    """A household environment whose simulator raises at its `crash_at`-th step."""

    def __init__(self, crash_at: int):
        self.env, self.crash_at, self.steps = make_env("household"), crash_at, 0
        self.instruction, self.max_steps = self.env.instruction, self.env.max_steps

    def reset(self, task_id):
        return self.env.reset(task_id)

    def icl_example(self):
        return self.env.icl_example()

    def step(self, action):
        self.steps += 1
        if self.steps == self.crash_at:
            raise RuntimeError(f"simulator crashed at step {self.steps}")
        return self.env.step(action)

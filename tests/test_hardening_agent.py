"""Issue #8, hardening: faulty environments and degenerate models end an episode with a recorded reason.

The other episodes go on, and exploration keeps every finished episode on disk.
`ScriptedModel` is a real tiny Transformer (so the KV-cached sampler runs for real)
whose logits are overridden to emit a fixed token script: a reply, nothing, only a
stop string, or endless text.
"""

import json
from itertools import cycle

import pytest
import torch
from torch import nn

from eto_ref.agent import INVALID_FORMAT, AgentConfig, run_episodes

from eto_ref.sampler import SamplingConfig
from eto_ref.model import ModelConfig, Transformer
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer
from envs import make_env

TASKS = make_env("household").task_ids("train")[:3]


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

    def forward(self, ids, attention_mask=None, kv_cache=None, logits_at=None):
        logits = self.inner(ids, attention_mask=attention_mask, kv_cache=kv_cache,
                            logits_at=logits_at)  # (B, 1, V): fills the cache
        if ids.shape[1] > 1:  # a prefill: the next token is the first of a new reply
            self.reply = cycle(self.script) if self.endless else iter(self.script)
        token = next(self.reply, self.script[-1])
        scripted = torch.full_like(logits, -1e4)
        scripted[..., token] = 0.0
        return scripted


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


def envs_where_the_first_crashes(crash_at: int):
    made = []

    def factory():
        made.append(CrashingEnv(crash_at) if not made else make_env("household"))
        return made[-1]
    return factory


@pytest.mark.parametrize("batch_size", [1, 3])
def test_environment_raising_mid_episode_ends_that_episode_and_the_others_go_on(tmp_path, batch_size):
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path)
    ended = []
    episodes = run_episodes(model, tok, envs_where_the_first_crashes(crash_at=2), TASKS,
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=batch_size, max_len=4096, max_steps=3),
                            on_episode_end=ended.append)
    crashed, *others = episodes
    assert crashed.done and crashed.reason == "env_error: RuntimeError: simulator crashed at step 2"
    assert crashed.steps == 2 and crashed.turns[-1] == {"from": "gpt", "value": "Thought: look around.\nAction: look"}
    for ep in others:
        assert ep.done and ep.reason == "max_steps" and ep.steps == 3
        assert [t["value"] for t in ep.turns if t["from"] == "gpt"] == ["Thought: look around.\nAction: look"] * 3
    assert sorted(e.task_id for e in ended) == sorted(TASKS)  # every episode reported once, the crashed one too


@pytest.mark.parametrize("kind, reply, end_turn", [
    ("emits nothing (end-of-turn at once)", "", True),
    ("emits only a stop string", "\nObservation: I made this up", False),
])
def test_model_with_no_output_ends_each_episode_with_a_reason(tmp_path, kind, reply, end_turn):
    """An empty reply (nothing before the stop) ends the episode with reason "no_output" at once.

    A reply that is only a stop string is empty once cut at the stop, so it ends the same way.
    """
    model, tok = scripted_agent(reply, tmp_path, end_turn=end_turn)
    episodes = run_episodes(model, tok, lambda: make_env("household"), TASKS[:2],
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=1, max_len=4096, max_steps=3))
    assert len(episodes) == 2  # the second batch ran after the first one's degenerate episode
    for ep in episodes:
        assert ep.done and ep.reason == "no_output" and ep.steps == 1
        assert [t["value"] for t in ep.turns] == [""]
        assert ep.reward == 0.0


def test_environment_raising_in_reset_ends_that_episode_and_the_others_go_on(tmp_path):
    """A task the environment cannot even start is recorded with its error; the batch runs the rest."""
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path, end_turn=True)

    class BrokenReset:
        def __init__(self):
            self.env = make_env("household")

        def __getattr__(self, name):
            return getattr(self.env, name)

        def reset(self, task_id):
            if task_id == TASKS[1]:
                raise RuntimeError("no such room")
            return self.env.reset(task_id)

    ended = []
    episodes = run_episodes(model, tok, BrokenReset, TASKS[:3],
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=3, max_len=4096, max_steps=2),
                            on_episode_end=ended.append)
    assert episodes[1].reason == "env_error: RuntimeError: no such room" and episodes[1].steps == 0
    assert [ep.reason for ep in (episodes[0], episodes[2])] == ["max_steps", "max_steps"]
    assert all(ep.steps == 2 for ep in (episodes[0], episodes[2]))
    assert sorted(e.task_id for e in ended) == sorted(TASKS[:3])


def test_endless_text_is_cut_at_max_new_tokens_each_turn(tmp_path):
    model, tok = scripted_agent("blah ", tmp_path, end_turn=False, endless=True)
    (ep,) = run_episodes(model, tok, lambda: make_env("household"), TASKS[:1],
                         AgentConfig(sampling=SamplingConfig(max_new_tokens=10), batch_size=1, max_len=4096, max_steps=2))
    assert ep.done and ep.reason == "max_steps" and ep.steps == 2
    replies = [t["value"] for t in ep.turns if t["from"] == "gpt"]
    assert len(replies) == 2 and all(r.startswith("blah blah") and len(tok.encode(r)) <= 10 for r in replies)


def test_endless_text_that_fills_the_cache_ends_with_cache_full_and_the_next_batch_goes_on(tmp_path):
    model, tok = scripted_agent("blah ", tmp_path, end_turn=False, endless=True)
    env = make_env("household")
    from eto_ref.agent import prompt_messages
    from eto_ref.sampler import SamplingConfig
    prompt = tok.render(prompt_messages(env.instruction, env.icl_example(), env.reset(TASKS[0])),
                        add_generation_prompt=True)[0]
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=10), batch_size=1, max_len=len(prompt) + 15,
                         max_steps=5)
    episodes = run_episodes(model, tok, lambda: make_env("household"), TASKS[:2], config)
    assert [ep.reason for ep in episodes] == ["cache_full", "cache_full"]
    assert all(ep.done and 1 <= ep.steps < 5 for ep in episodes)


def test_exploration_keeps_every_finished_episode_when_an_environment_crashes(tmp_path, monkeypatch):
    """The crashed episode and the others are all in trajectories.jsonl, each with its end reason."""
    import envs
    from eto_ref.exploration import ExploreConfig, explore

    made = []

    def make(name, seed=0, **kw):
        made.append(CrashingEnv(crash_at=1) if len(made) == 1 else make_env(name, seed=seed))  # made[0]: the task list
        return made[-1]

    monkeypatch.setattr(envs, "make_env", make)
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path / "tok")
    cfg = ExploreConfig(env="household", split="train", out_dir=str(tmp_path / "out"), limit=3,
                        agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=3, max_len=4096, max_steps=2))
    records = explore(model, tok, cfg, progress=False)
    on_disk = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in on_disk) == sorted(TASKS) and len(on_disk) == 3
    reasons = {r["id"]: r["reason"] for r in records}
    assert reasons[TASKS[0]].startswith("env_error: RuntimeError: simulator crashed at step 1")
    assert reasons[TASKS[1]] == reasons[TASKS[2]] == "max_steps"


class FaultyStepEnv:
    """A household environment whose `step` returns a broken result for one task."""

    def __init__(self, fault: str, bad_task: str):
        self.env, self.fault, self.bad_task = make_env("household"), fault, bad_task
        self.instruction, self.max_steps = self.env.instruction, self.env.max_steps

    def reset(self, task_id):
        self.task_id = task_id
        if self.fault == "reset returns None" and task_id == self.bad_task:
            return None
        return self.env.reset(task_id)

    def icl_example(self):
        return self.env.icl_example()

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        if self.task_id == self.bad_task:
            if self.fault == "reward None":
                reward = None
            elif self.fault == "reward NaN":
                reward = float("nan")
            elif self.fault == "info not a dict":
                info = "oops"
        return obs, reward, done, info


@pytest.mark.parametrize("fault, reason", [
    ("reward None", "env_error: ValueError: reward must be a finite number, got None"),
    ("reward NaN", "env_error: ValueError: reward must be a finite number, got nan"),
    ("info not a dict", "env_error: TypeError: info must be a dict, got str"),
    ("reset returns None", f"env_error: TypeError: reset({TASKS[1]!r}) must return the task text, got NoneType"),
])
def test_a_broken_environment_result_ends_that_episode_and_the_others_go_on(tmp_path, fault, reason):
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path)
    episodes = run_episodes(model, tok, lambda: FaultyStepEnv(fault, TASKS[1]), TASKS[:3],
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=3, max_len=4096,
                                        max_steps=2))
    assert episodes[1].done and episodes[1].reason == reason
    assert [ep.reason for ep in (episodes[0], episodes[2])] == ["max_steps", "max_steps"]

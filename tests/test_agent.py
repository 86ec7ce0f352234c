"""The ReAct agent loop: action parsing, invalid formats, faulty environments, batched == one at a time."""

from dataclasses import replace

import pytest
import torch

from eto_ref.agent import INVALID_FORMAT, AgentConfig, Episode, parse_action, prompt_messages, run_episodes, step_episode

from eto_ref.sampler import SamplingConfig
from eto_ref.model import ModelConfig, Transformer
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer
from envs import make_env


@pytest.mark.parametrize("reply,action", [
    ("Thought: go.\nAction: go to desk 1", "go to desk 1"),
    ("Action: search[red shoes]  ", "search[red shoes]"),
    ("Thought: a\nAction: click[Buy Now]\nObservation: made up", "click[Buy Now]"),
    ("Thought: I am thinking", None),
    ("Action:   ", None),
    ("", None),
])
def test_parse_action(reply, action):
    assert parse_action(reply) == action


class RaisingEnv:
    instruction, max_steps = "inst", 5

    def step(self, action):
        raise RuntimeError("simulator crashed")


def test_invalid_format_costs_a_step_and_the_episode_goes_on():
    env = make_env("household")
    task_id = env.task_ids("train")[0]
    ep = Episode(task_id, env.instruction, env.reset(task_id))
    assert step_episode(env, ep, "I will just chat", max_steps=5) == INVALID_FORMAT
    assert ep.steps == 1 and not ep.done


def test_environment_that_raises_ends_the_episode_with_a_reason():
    ep = Episode("t", "inst", "task")
    assert step_episode(RaisingEnv(), ep, "Action: go", max_steps=5) is None
    assert ep.done and ep.reason.startswith("env_error: RuntimeError: simulator crashed")


def test_max_steps_ends_the_episode():
    env = make_env("household")
    task_id = env.task_ids("train")[0]
    ep = Episode(task_id, env.instruction, env.reset(task_id))
    step_episode(env, ep, "Action: look", max_steps=2)
    assert step_episode(env, ep, "Action: look", max_steps=2) is None
    assert ep.done and ep.reason == "max_steps" and ep.turns[-1]["from"] == "human"


def test_prompt_has_the_in_context_example_as_real_turns():
    env = make_env("webshop")
    msgs = prompt_messages(env.instruction, env.icl_example(), "TASK")
    assert [m["role"] for m in msgs[:3]] == ["user", "assistant", "user"] and msgs[1]["content"] == "OK"
    assert msgs[-1] == {"role": "user", "content": "TASK"}
    assert msgs[2:-1] == env.icl_example()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=30), 500, tmp_path_factory.mktemp("t"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    return model, tok


class VaryingLimitEnv:
    """The household environment with a step limit of 1-4 steps depending on the task: episodes end unevenly."""

    def __init__(self):
        self.env = make_env("household")
        self.instruction, self.max_steps = self.env.instruction, 4

    def reset(self, task_id):
        self.max_steps = 1 + int(task_id.split("/")[-1]) % 4
        return self.env.reset(task_id)

    def __getattr__(self, name):
        return getattr(self.env, name)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batched_episodes_equal_one_at_a_time(agent, batch_size):
    """Continuous batching (5 tasks through 2 or 3 rows: a finished episode's row takes the next task),
    the prompt's shared prefix computed once, and per-row caches give the episodes of one-at-a-time runs."""
    model, tok = agent
    env = make_env("household")
    tasks = env.task_ids("test_seen")[:5]
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=12), batch_size=batch_size, max_len=4096)
    batched = run_episodes(model, tok, VaryingLimitEnv, tasks, config)
    single = run_episodes(model, tok, VaryingLimitEnv, tasks, replace(config, batch_size=1))
    assert [e.record() for e in batched] == [e.record() for e in single]
    assert len({e.steps for e in batched}) > 1  # episodes of different lengths: rows were refilled mid-run
    for e in batched:  # an untrained model emits garbage: episodes still end, with a reason
        assert e.done and e.reason and e.record()["conversations"][0]["value"] == env.instruction


def test_on_episode_end_sees_every_episode_once(agent):
    model, tok = agent
    seen = []
    tasks = make_env("household").task_ids("train")[:2]
    run_episodes(model, tok, lambda: make_env("household"), tasks,
                 AgentConfig(sampling=SamplingConfig(max_new_tokens=6), batch_size=2, max_len=4096, max_steps=4), on_episode_end=seen.append)
    assert sorted(e.task_id for e in seen) == sorted(tasks)

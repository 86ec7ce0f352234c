"""eto_ref/agent.py: the ReAct loop: action parsing, invalid formats, continuous batching == one at a time,
faulty environments and degenerate models end an episode with a recorded reason while the others go on."""

from dataclasses import replace

import pytest
import torch

from envs import make_env
from eto_ref.agent import (
    INVALID_FORMAT,
    AgentConfig,
    Episode,
    parse_action,
    prompt_messages,
    run_episodes,
    step_episode,
)
from eto_ref.model import ModelConfig, Transformer
from eto_ref.sampler import SamplingConfig
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer
from tests.helpers import HOUSEHOLD_TASKS, CrashingEnv, scripted_agent


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
    env = make_env("science")
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
    episodes = run_episodes(model, tok, envs_where_the_first_crashes(crash_at=2), HOUSEHOLD_TASKS,
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=batch_size, max_len=4096, max_steps=3),
                            on_episode_end=ended.append)
    crashed, *others = episodes
    assert crashed.done and crashed.reason == "env_error: RuntimeError: simulator crashed at step 2"
    assert crashed.steps == 2 and crashed.turns[-1] == {"from": "gpt", "value": "Thought: look around.\nAction: look"}
    for ep in others:
        assert ep.done and ep.reason == "max_steps" and ep.steps == 3
        assert [t["value"] for t in ep.turns if t["from"] == "gpt"] == ["Thought: look around.\nAction: look"] * 3
    assert sorted(e.task_id for e in ended) == sorted(HOUSEHOLD_TASKS)  # every episode reported once, the crashed one too


@pytest.mark.parametrize("kind, reply, end_turn", [
    ("emits nothing (end-of-turn at once)", "", True),
    ("emits only a stop string", "\nObservation: I made this up", False),
])
def test_model_with_no_output_ends_each_episode_with_a_reason(tmp_path, kind, reply, end_turn):
    """An empty reply (nothing before the stop) ends the episode with reason "no_output" at once.

    A reply that is only a stop string is empty once cut at the stop, so it ends the same way.
    """
    model, tok = scripted_agent(reply, tmp_path, end_turn=end_turn)
    episodes = run_episodes(model, tok, lambda: make_env("household"), HOUSEHOLD_TASKS[:2],
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
            if task_id == HOUSEHOLD_TASKS[1]:
                raise RuntimeError("no such room")
            return self.env.reset(task_id)

    ended = []
    episodes = run_episodes(model, tok, BrokenReset, HOUSEHOLD_TASKS[:3],
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=3, max_len=4096, max_steps=2),
                            on_episode_end=ended.append)
    assert episodes[1].reason == "env_error: RuntimeError: no such room" and episodes[1].steps == 0
    assert [ep.reason for ep in (episodes[0], episodes[2])] == ["max_steps", "max_steps"]
    assert all(ep.steps == 2 for ep in (episodes[0], episodes[2]))
    assert sorted(e.task_id for e in ended) == sorted(HOUSEHOLD_TASKS[:3])


def test_every_environment_is_closed_once_when_its_episode_ends(tmp_path, caplog):
    """An environment holding a process (the real ScienceWorld's Java) is closed as its episode ends, also
    when reset failed; a close that raises is logged and the other episodes go on."""
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path, end_turn=True)
    made = []

    class ClosableEnv:
        def __init__(self):
            self.env, self.closed, self.open_when_closed = make_env("household"), 0, None
            made.append(self)

        def __getattr__(self, name):
            return getattr(self.env, name)

        def reset(self, task_id):
            self.task_id = task_id
            if task_id == HOUSEHOLD_TASKS[1]:
                raise RuntimeError("no such room")
            return self.env.reset(task_id)

        def close(self):
            self.closed += 1
            if self.task_id == HOUSEHOLD_TASKS[2]:
                raise OSError("java already gone")

    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=2, max_len=4096, max_steps=2)
    with caplog.at_level("WARNING", logger="eto_ref.agent"):
        episodes = run_episodes(model, tok, ClosableEnv, HOUSEHOLD_TASKS, config)
    assert [e.closed for e in made] == [1, 1, 1]
    assert [ep.reason for ep in episodes] == ["max_steps", "env_error: RuntimeError: no such room", "max_steps"]
    assert any("java already gone" in r.getMessage() for r in caplog.records)


def test_endless_text_is_cut_at_max_new_tokens_each_turn(tmp_path):
    model, tok = scripted_agent("blah ", tmp_path, end_turn=False, endless=True)
    (ep,) = run_episodes(model, tok, lambda: make_env("household"), HOUSEHOLD_TASKS[:1],
                         AgentConfig(sampling=SamplingConfig(max_new_tokens=10), batch_size=1, max_len=4096, max_steps=2))
    assert ep.done and ep.reason == "max_steps" and ep.steps == 2
    replies = [t["value"] for t in ep.turns if t["from"] == "gpt"]
    assert len(replies) == 2 and all(r.startswith("blah blah") and len(tok.encode(r)) <= 10 for r in replies)


def test_endless_text_that_fills_the_cache_ends_with_cache_full_and_the_next_batch_goes_on(tmp_path):
    model, tok = scripted_agent("blah ", tmp_path, end_turn=False, endless=True)
    env = make_env("household")
    from eto_ref.agent import prompt_messages
    from eto_ref.sampler import SamplingConfig
    prompt = tok.render(prompt_messages(env.instruction, env.icl_example(), env.reset(HOUSEHOLD_TASKS[0])),
                        add_generation_prompt=True)[0]
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=10), batch_size=1, max_len=len(prompt) + 15,
                         max_steps=5)
    episodes = run_episodes(model, tok, lambda: make_env("household"), HOUSEHOLD_TASKS[:2], config)
    assert [ep.reason for ep in episodes] == ["cache_full", "cache_full"]
    assert all(ep.done and 1 <= ep.steps < 5 for ep in episodes)


def test_a_conversation_never_holds_more_tokens_than_the_model_has_positions(tmp_path):
    """AgentConfig.max_len above the model's max_position_embeddings: the model's limit holds (cache_full)."""
    model, tok = scripted_agent("blah ", tmp_path, end_turn=False, endless=True)
    env = make_env("household")
    from eto_ref.agent import prompt_messages
    from eto_ref.sampler import SamplingConfig
    prompt = tok.render(prompt_messages(env.instruction, env.icl_example(), env.reset(HOUSEHOLD_TASKS[0])),
                        add_generation_prompt=True)[0]
    model.config = replace(model.config, max_position_embeddings=len(prompt) + 15)
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=10), batch_size=1, max_len=10**6, max_steps=5)
    episodes = run_episodes(model, tok, lambda: make_env("household"), HOUSEHOLD_TASKS[:1], config)
    assert [ep.reason for ep in episodes] == ["cache_full"] and episodes[0].steps < 5


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
    ("reset returns None", f"env_error: TypeError: reset({HOUSEHOLD_TASKS[1]!r}) must return the task text, got NoneType"),
])
def test_a_broken_environment_result_ends_that_episode_and_the_others_go_on(tmp_path, fault, reason):
    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path)
    episodes = run_episodes(model, tok, lambda: FaultyStepEnv(fault, HOUSEHOLD_TASKS[1]), HOUSEHOLD_TASKS[:3],
                            AgentConfig(sampling=SamplingConfig(max_new_tokens=24), batch_size=3, max_len=4096,
                                        max_steps=2))
    assert episodes[1].done and episodes[1].reason == reason
    assert [ep.reason for ep in (episodes[0], episodes[2])] == ["max_steps", "max_steps"]

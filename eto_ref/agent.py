"""The ReAct agent loop: prompt, generate, parse the action, step the environment.

Prompting follows the official ETO code (`eval_agent/prompt/templates.py`):
training sequences are 0-shot, while evaluation and exploration prompts add one
in-context example as real alternating turns:

    user:      <instruction>
    assistant: OK
    user:      <example task>          \
    assistant: Thought: ...\\nAction: ...  |  one in-context example
    user:      Observation: ...         |
    ...                                /
    user:      <task>
    assistant: Thought: ...\\nAction: ...   <- generated
    user:      Observation: ...
    ...

An unparseable reply gets the observation "Invalid format..." (ALFWorld's mirror:
"Error Input...", as the official code words each benchmark) and the episode
goes on (the step still counts). Episodes of many tasks run batched through the
KV-cached sampler (eto_ref/sampler.py): each episode keeps its own cache row across
its turns, so a new turn only prefills the new observation; the prompt's shared
part (instruction and example) is computed once; and as soon as a row's reply ends,
its environment steps and its next turn (or, when the episode is over, the next
task) is queued while the other rows go on decoding (continuous batching): the
batch stays full instead of waiting for its slowest reply or episode.

The recorded trajectory is 0-shot (instruction, OK, task, turns...) in the
official ETO format, ready for pairing and training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field

from envs.base import OBSERVATION_PREFIX, observation_turn
from eto_ref.config import setting
from eto_ref.sampler import Completion, SamplingConfig, Session

log = logging.getLogger(__name__)
ACTION_PATTERN = re.compile(r"Action:\s*(.*)", re.DOTALL)
INVALID_FORMAT = "Observation: Invalid format. The input must contains 'Action: '"
STOP_STRINGS = ("\nObservation:", "\nTask:", "\n---")  # as the official code


def parse_action(reply: str) -> str | None:
    """`Thought: ...\\nAction: go to desk 1` -> `go to desk 1`; None when there is no action.

    The official code takes everything after the first "Action: "; we also cut at
    the first newline, since an action is one line.
    """
    match = ACTION_PATTERN.search(reply.strip())
    if match is None:
        return None
    action = match.group(1).strip().split("\n")[0].strip()
    return action or None


def invalid_format_turn(env) -> str:
    """The observation an unparseable reply gets (the environment's own wording, else the default)."""
    return getattr(env, "invalid_format", INVALID_FORMAT)


def prompt_messages(instruction: str, icl_example: list[dict], task: str) -> list[dict]:
    """Instruction, "OK", the in-context example as real turns, then the task (all as chat messages)."""
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": "OK"}]
    messages += [{"role": m["role"], "content": m["content"]} for m in icl_example]
    messages.append({"role": "user", "content": task})
    return messages


@dataclass
class Episode:
    """One task's run: its messages (0-shot record) and how it ended."""

    task_id: str
    instruction: str
    task: str
    turns: list[dict] = field(default_factory=list)  # ETO turns after the task: gpt, human, gpt, ...
    reward: float = 0.0
    steps: int = 0
    done: bool = False
    reason: str = ""  # "done" | "max_steps" | "env_error: ..." | "cache_full" | "no_output" (an empty reply)
    sampled: list[Completion] = field(default_factory=list)  # per agent turn, with run_episodes(record_logprobs=True)

    def record(self) -> dict:
        """The official ETO trajectory record (0-shot)."""
        conversations = [
            {"from": "human", "value": self.instruction},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": self.task},
        ] + self.turns
        return {"id": self.task_id, "conversations": conversations, "reward": self.reward,
                "steps": self.steps, "reason": self.reason}


def finite_reward(reward) -> float:
    """An environment's reward as a float; ValueError for a missing, non-numeric or non-finite one."""
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward!r}")
    return float(reward)


def step_episode(env, episode: Episode, reply: str, max_steps: int) -> str | None:
    """Apply one agent reply to the environment; returns the observation turn to append, or None when done.

    An environment that raises, or returns a reward that is not a finite number or an
    `info` that is not a dict, ends the episode with reason "env_error: ..." (the run goes
    on with the other tasks; such an episode is never paired, see eto_ref.pairs).
    """
    episode.turns.append({"from": "gpt", "value": reply})
    episode.steps += 1
    action = parse_action(reply)
    if action is None:
        observation, done = invalid_format_turn(env), False
    else:
        try:
            obs, reward, done, info = env.step(action)
            episode.reward = finite_reward(reward)
            if info is not None and not isinstance(info, dict):
                raise TypeError(f"info must be a dict, got {type(info).__name__}")
        except Exception as e:  # noqa: BLE001 - a faulty environment must not stop the run
            episode.done, episode.reason = True, f"env_error: {type(e).__name__}: {e}"
            return None
        observation = observation_turn(obs, getattr(env, "observation_prefix", OBSERVATION_PREFIX))
        if done:
            episode.reason = (info or {}).get("reason", "done")
    episode.turns.append({"from": "human", "value": observation})
    if done or episode.steps >= max_steps:
        episode.done = True
        episode.reason = episode.reason or "max_steps"
        return None
    return observation


def start_episode(make_env, task_id: str):
    """A fresh environment reset to the task; an environment that fails here ends the episode at once."""
    env = None
    try:
        env = make_env()
        task = env.reset(task_id)
        if not isinstance(task, str):
            raise TypeError(f"reset({task_id!r}) must return the task text, got {type(task).__name__}")
    except Exception as e:  # noqa: BLE001 - one broken task must not stop the others
        close_env(env)
        episode = Episode(task_id, "", "", done=True, reason=f"env_error: {type(e).__name__}: {e}")
        return None, episode
    return env, Episode(task_id, env.instruction, task)


def close_env(env) -> None:
    """Release what an ended episode's environment holds (the real ScienceWorld: its Java process).
    A failure to close is logged, never raised: the episode's record is already complete."""
    close = getattr(env, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:  # noqa: BLE001 - cleanup must not end the other episodes
        log.warning("closing the environment of an ended episode failed: %s: %s", type(e).__name__, e)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class AgentConfig:
    """How the agent runs episodes. Defaults: the official code's (one in-context example, greedy)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # greedy by default, as the paper
    seed: int | None = setting(None, "sampling seed: the episode of task t samples with its own seed (seed, t)", low=0)
    batch_size: int = setting(16, "episodes run at once (a finished one's row takes the next task)", low=1)
    max_len: int = setting(8192, "most tokens one conversation may hold (its KV cache grows by need up to this; "
                                 "at most the model's max_position_embeddings)", low=1)
    max_steps: int | None = setting(None, "cap on an episode's steps (None: the environment's own limit)", low=1)
    icl: bool = setting(True, "one in-context example in the prompt, as the official code (False: 0-shot)")


def episode_seed(seed: int, task_id: str) -> int:
    """A task's own sampling seed: the same whatever batch or order the episode runs in."""
    return int(hashlib.sha256(f"{seed}/{task_id}".encode()).hexdigest()[:15], 16)


@dataclass
class Running:
    """An episode in progress in one row of the session."""

    env: object
    episode: Episode
    messages: list[dict]  # the conversation so far, as chat messages (the prompt with its example)
    max_steps: int


def first_prompt(env, episode: Episode, config: AgentConfig) -> list[dict]:
    """The prompt of an episode: instruction, "OK", the in-context example (when used), the task."""
    return prompt_messages(episode.instruction, env.icl_example() if config.icl else [], episode.task)


def step_limit(env, config: AgentConfig) -> int:
    return env.max_steps if config.max_steps is None else min(env.max_steps, config.max_steps)


def agent_turn(session: Session, tokenizer, row: int, run: Running, reply: str, reason: str) -> bool:
    """Apply one generated reply to its episode; queue the next turn's tokens. True when the episode ended.

    The cache must hold the canonical rendering of the conversation (the tokens
    training will see): if the model's own tokens differ from how the tokenizer
    renders its reply, those tokens are rewound and the canonical ones queued instead.
    """
    episode = run.episode
    if reason == "cache_full":
        episode.done, episode.reason = True, "cache_full"
    elif not reply:  # nothing but a stop token: greedy decoding would repeat it
        episode.turns.append({"from": "gpt", "value": reply})
        episode.steps += 1
        episode.done, episode.reason = True, "no_output"
    else:
        observation = step_episode(run.env, episode, reply, run.max_steps)
    if episode.done:
        return True
    run.messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
    full = tokenizer.render(run.messages, add_generation_prompt=True)[0]
    history = session.history(row)
    keep = common_prefix_length(history, full)
    session.rewind(row, len(history) - keep)
    session.append([full[keep:]], rows=[row])
    return False


class EpisodeRows:
    """The tasks waiting, the episode running in each row of the session, and the episodes ended."""

    def __init__(self, model, tokenizer, make_env, task_ids: list[str], config: AgentConfig, on_episode_end=None,
                 forced: dict[str, list[str]] | None = None, record_logprobs: bool = False):
        self.model, self.tokenizer, self.make_env, self.config = model, tokenizer, make_env, config
        self.record_logprobs = record_logprobs
        self.queue = deque(task_ids)
        self.on_episode_end = on_episode_end
        self.forced = forced or {}  # task id -> replies played for the agent before it acts
        self.size = max(1, min(config.batch_size, len(task_ids)))
        self.session: Session | None = None  # made when the first episode starts (its prompt gives the prefix)
        self.running: dict[int, Running] = {}
        self.ended: dict[str, Episode] = {}

    def end(self, episode: Episode, env=None) -> None:
        close_env(env)
        self.ended[episode.task_id] = episode
        if self.on_episode_end is not None:
            self.on_episode_end(episode)

    def start(self, row: int) -> bool:
        """Start the next task that the environment can start in `row`; False when no task is left."""
        while self.queue:
            env, episode = start_episode(self.make_env, self.queue.popleft())
            if episode.done:  # the environment failed to start this task
                self.end(episode)
                continue
            messages = first_prompt(env, episode, self.config)
            if self.session is None:
                prefix = self.tokenizer.render(messages[:-1])[0]  # everything before the task: the same in all
                max_len = min(self.config.max_len, self.model.config.max_position_embeddings)  # positions it knows
                self.session = Session(self.model, self.size, max_len, prefix=prefix,
                                       record_logprobs=self.record_logprobs)
            if not self.play_forced(env, episode, messages):
                self.end(episode, env)
                continue
            seed = None if self.config.seed is None else episode_seed(self.config.seed, episode.task_id)
            self.session.start(row, self.tokenizer.render(messages, add_generation_prompt=True)[0], seed)
            self.running[row] = Running(env, episode, messages, step_limit(env, self.config))
            return True
        return False

    def play_forced(self, env, episode: Episode, messages: list[dict]) -> bool:
        """Play the task's forced replies (teacher forcing: the step-level contrast) as the agent's first
        turns, recorded as its own; False if the episode ended during them."""
        for reply in self.forced.get(episode.task_id, []):
            observation = step_episode(env, episode, reply, step_limit(env, self.config))
            if episode.done:
                return False
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
        return True


def run_episodes(model, tokenizer, make_env, task_ids: list[str], config: AgentConfig | None = None,
                 on_episode_end=None, forced: dict[str, list[str]] | None = None,
                 record_logprobs: bool = False) -> list[Episode]:
    """Run one episode per task, `config.batch_size` at a time; returns them in task order.

    The loop: every row of the session holds a running episode. Each `session.step`
    feeds the rows one token and returns the replies that ended; each such reply is
    parsed and its action stepped in the environment (`agent_turn`), and the
    observation queued for the row's next turn. When an episode ends, its row takes the
    next task (continuous batching), or leaves the batch when no task is left.

    `make_env()` returns a fresh environment (one per episode, since an environment
    holds one episode's state). `on_episode_end(episode)` is called as soon as an
    episode ends (exploration writes it to disk there). `forced[task]`: replies played
    first, as if the agent had written them (the step-level contrast). `record_logprobs`: each
    episode keeps, per agent turn, the sampled tokens and log pi of each (`Episode.sampled`; not in
    its record). Training scores the canonical rendering of the 0-shot record: the same tokens and
    log-probs where the agent prompted 0-shot and its reply's tokens were the canonical ones
    (tests/test_ppo.py); with the in-context example the sampling context is longer than training's,
    so PPO and GRPO score their "old" policy with the training forward (eto_ref/ppo.py).
    """
    config = config or AgentConfig()
    rows = EpisodeRows(model, tokenizer, make_env, list(task_ids), config, on_episode_end, forced, record_logprobs)
    for row in range(rows.size):
        if not rows.start(row):
            break
    session = rows.session  # None: no task could start
    if session is not None and len(rows.running) < len(session.rows):
        session.drop([row for row in session.rows if row not in rows.running])
    while rows.running:
        idle = []
        for row, completion in session.step(config.sampling, tokenizer.stop_ids, STOP_STRINGS, tokenizer.decode):
            run = rows.running[row]
            if record_logprobs and completion.reason != "cache_full":  # a cache_full reply is not a turn
                run.episode.sampled.append(completion)
            if not agent_turn(session, tokenizer, row, run, completion.text.strip(), completion.reason):
                continue  # the episode goes on: its observation is queued
            del rows.running[row]
            rows.end(run.episode, run.env)
            if not rows.start(row):  # the row takes the next task, or has nothing left to do
                idle.append(row)
        if idle:
            session.drop(idle)
    return [rows.ended[t] for t in task_ids]

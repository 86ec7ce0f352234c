"""The common interface of the text environments, and what all of them share.

An environment is a set of tasks split into `train`, `test_seen` and
`test_unseen`. An episode is

    task = env.reset(task_id)                       # the task text: the agent's first observation
    obs, reward, done, info = env.step(action)      # action: the text after "Action: "
    ...

`step` returns the *bare* observation. Whoever writes it into a conversation
(the expert-trajectory writer here, the agent loop in `eto_ref/agent.py`)
prefixes it with "Observation: ", as the official ETO data does.

Rules every environment follows:

- `step` never raises on any string. An action it cannot parse or carry out
  returns an informative observation and still costs a step.
- `reward` is the episode's reward so far, i.e. the final reward if the episode
  ended now (household: 1.0 once the goal holds; webshop: the attribute-match
  score once bought; science: the max progress score seen).
- `info` has "steps", "valid" (whether the action was understood and possible)
  and "score" (the current progress: equal to the reward except in the science
  environments, whose score can fall while the reward keeps its max).
- The episode ends when the task is finished or after `max_steps` steps
  (`done=True`, `info["reason"] == "max_steps"`).
- Tasks are generated lazily and deterministically from (seed, split, index), so
  `make_env` is instant however many tasks a split holds. Task ids look like
  "household/train/17" and are unique across environments and splits.

A subclass writes four hooks: `make_task(split, index)` (a task's hidden world),
`start(task)` (set up an episode, return the task text), `act(action)` (one step:
observation, done) with `current_reward()`, and `expert_steps()` (a generator of
(thought, action) pairs that may read the world after each step, because
`expert_trajectory` steps the environment between yields).

The expert trajectory uses the official ETO SFT format:

    {"id": task_id, "conversations": [
        {"from": "human", "value": instruction}, {"from": "gpt", "value": "OK"},
        {"from": "human", "value": task text},
        {"from": "gpt", "value": "Thought: ...\\nAction: ..."},
        {"from": "human", "value": "Observation: ..."},
        ...,
        {"from": "gpt", "value": "Thought: ...\\nAction: ..."}],   # the last observation is not included
     "reward": 1.0}
"""

from __future__ import annotations

import random
import re

SPLITS = ("train", "test_seen", "test_unseen")
DEFAULT_SIZES = {"train": 3000, "test_seen": 200, "test_unseen": 200}
MAX_ECHO = 60  # an invalid action is quoted back at most this long


OBSERVATION_PREFIX = "Observation: "


def observation_turn(observation: str, prefix: str = OBSERVATION_PREFIX) -> str:
    """The human turn that carries an observation in a trajectory."""
    return f"{prefix}{observation}"


def agent_turn(thought: str, action: str) -> str:
    """The gpt turn of one ReAct step."""
    return f"Thought: {thought}\nAction: {action}"


def clean_action(action) -> str:
    """Any input -> one line of single-spaced text (the environments parse this)."""
    text = action if isinstance(action, str) else str(action)
    return re.sub(r"\s+", " ", text).strip()


def quote(action: str) -> str:
    """An action as echoed back in an error message (cut when long)."""
    return action if len(action) <= MAX_ECHO else action[:MAX_ECHO] + "..."


def task_rng(seed: int, name: str, split: str, index: int) -> random.Random:
    """The random generator of one task: a pure function of (seed, env, split, index)."""
    return random.Random(f"{name}/{seed}/{split}/{index}")  # str seeds are hashed with sha512: stable


def a_or_an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def join_list(items: list[str], empty: str = "nothing") -> str:
    """["a cup", "a pen", "a mug"] -> "a cup, a pen, and a mug"."""
    if not items:
        return empty
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + (", and " if len(items) > 2 else " and ") + items[-1]


class TextEnv:
    """Base class: splits, task ids, step counting, max_steps, expert trajectories."""

    name: str = ""
    instruction: str = ""
    max_steps: int = 20
    # How the official ETO code words the turns of the benchmark this environment mirrors:
    observation_prefix: str = OBSERVATION_PREFIX  # WebShop: "Observation:\n"
    invalid_format: str = "Observation: Invalid format. The input must contains 'Action: '"  # ALFWorld: "Error Input"
    unmatched_action: str = ""  # what the environment answers to a well-formed action it cannot carry out
    truncate_rejected: bool = True  # the pair rule cuts a failed run's tail (the official code: not for ALFWorld)

    def __init__(self, seed: int = 0, train: int | None = None, test_seen: int | None = None,
                 test_unseen: int | None = None):
        self.seed = seed
        given = {"train": train, "test_seen": test_seen, "test_unseen": test_unseen}
        self.sizes = {s: DEFAULT_SIZES[s] if n is None else n for s, n in given.items()}
        self.task = None  # the current task's hidden world (subclass-defined)
        self.task_id = None
        self.steps = 0
        self.done = False

    # ---- hooks for subclasses -------------------------------------------------
    def make_task(self, split: str, index: int):
        """The hidden world of task (split, index): deterministic in (self.seed, split, index)."""
        raise NotImplementedError

    def start(self, task) -> str:
        """Set up a new episode on `task`; return the task text."""
        raise NotImplementedError

    def act(self, action: str) -> tuple[str, bool, dict]:
        """Carry out one (cleaned) action: (observation, task finished, info)."""
        raise NotImplementedError

    def current_reward(self) -> float:
        """The episode's reward so far."""
        raise NotImplementedError

    def expert_steps(self):
        """Yield (thought, action) pairs that solve the current task (the env is stepped between yields)."""
        raise NotImplementedError

    def admissible_actions(self) -> list[str]:
        """Actions that make sense in the current state (for random baselines; not shown to the agent)."""
        raise NotImplementedError

    def random_action(self, rng: random.Random) -> str:
        """One action of the random baseline policy."""
        return rng.choice(self.admissible_actions())

    # ---- the interface ------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        check_split(split)
        return [f"{self.name}/{split}/{i}" for i in range(self.sizes[split])]

    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        """"household/train/17" -> ("train", 17); ValueError for an id of another env or out of range."""
        parts = str(task_id).split("/")
        if len(parts) != 3 or parts[0] != self.name or parts[1] not in SPLITS or not parts[2].isdigit():
            raise ValueError(f"not a {self.name} task id: {task_id!r} (expected '{self.name}/<split>/<index>')")
        split, index = parts[1], int(parts[2])
        if index >= self.sizes[split]:
            raise ValueError(f"{task_id!r}: index out of range, split {split} has {self.sizes[split]} tasks")
        return split, index

    def reset(self, task_id: str) -> str:
        split, index = self.parse_task_id(task_id)
        self.task_id, self.steps, self.done = task_id, 0, False
        self.task = self.make_task(split, index)
        return self.start(self.task)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.task is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self.done:
            return "The episode is over.", self.current_reward(), True, {"reason": "episode_over", "steps": self.steps}
        self.steps += 1
        observation, finished, info = self.act(clean_action(action))
        info = {"score": self.current_reward(), **info, "steps": self.steps}
        if finished:
            self.done = True
            info.setdefault("reason", "done")
        elif self.steps >= self.max_steps:
            self.done = True
            info["reason"] = "max_steps"
        return observation, self.current_reward(), self.done, info

    def expert_trajectory(self, task_id: str) -> dict:
        """The expert's ReAct trajectory of a task, in the official ETO SFT format.

        It runs on a fresh copy of the environment, so the caller's episode is untouched.
        """
        env = self.fresh_copy()
        conversations = [
            {"from": "human", "value": self.instruction},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": env.reset(task_id)},
        ]
        reward = 0.0
        for thought, action in env.expert_steps():
            if conversations[-1]["from"] == "gpt":  # the previous step's observation
                conversations.append({"from": "human", "value": observation_turn(observation, self.observation_prefix)})
            conversations.append({"from": "gpt", "value": agent_turn(thought, action)})
            observation, reward, done, _ = env.step(action)
            if done:
                break
        return {"id": task_id, "conversations": conversations, "reward": reward}

    def icl_example(self) -> list[dict]:
        """One in-context example: the expert trajectory of a fixed train task, as chat messages."""
        turns = self.expert_trajectory(self.icl_task_id())["conversations"][2:]
        return [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]

    def icl_task_id(self) -> str:
        """The train task shown as the in-context example (override to pick a more typical one)."""
        return f"{self.name}/train/0"

    def options(self) -> dict:
        """Settings beyond name and seed that decide the tasks (none for the built-ins: their sizes only
        extend a split); a run records them in its identity, so a rerun with other ones is refused."""
        return {}

    def close(self) -> None:
        """Release what the environment holds (the built-ins: nothing); called when an agent's episode ends."""

    def fresh_copy(self) -> "TextEnv":
        """A new environment with the same seed and split sizes (used to write expert trajectories)."""
        return type(self)(seed=self.seed, **self.sizes)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

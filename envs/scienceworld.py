"""Adapter for the real ScienceWorld (optional: `pip install -r requirements-scienceworld.txt`, needs Java 17).

Same `TextEnv` interface as the built-in environments, set up as in the
official ETO code (`eval_agent/envs/sciworld_env.py`, `eval_agent/tasks/sciworld.py`):

- the 24 task types of `OFFICIAL_MAX_STEPS` (the official `max_steps.json`), each
  episode limited to its task type's official step limit;
- splits: ScienceWorld's train variations -> `train`, dev variations ->
  `test_seen`, test variations -> `test_unseen`; the sizes given to the
  constructor are caps *per task type*: by default the first 120 train and the
  first 10 dev and test variations of each type (1408 / 199 / 211 tasks). The
  official lists (ETO's `eval_agent/data/sciworld/{train,dev,test}_indices.json`)
  hold the same 211 test tasks, but a random subset of the dev variations (194) and
  a random sample of up to 120 per type for train (1483, four types drawing beyond
  ScienceWorld's train range); to run on exactly those, point
  `SCIENCEWORLD_SPLITS_DIR` (or `splits_dir=`) at a folder holding the three files;
- the task types: all 24, or those named in `SCIENCEWORLD_TASKS` (comma-separated,
  or `task_names=`); a split lists its tasks round-robin over the types (each type's
  first variation, then each one's second, ...), so the first N tasks of a split
  (`--sft-examples`, `--explore-limit`, `--eval-limit`) cover every type. These
  choices are part of a run's identity: a rerun with other ones is refused;
- `simplificationStr="easy"`; the task text is ScienceWorld's task description
  without its "Task Description:" header (the official SFT data has none; the
  official prompts keep it, see docs/official-code.md);
- `info["score"]` is the current score / 100, `reward` the max score seen / 100
  (a failed task's negative score counts as 0);
- expert trajectories are ScienceWorld's gold action sequences with a generic
  Thought per action. A gold path may be longer than the official step limit,
  so an expert run raises the limit to the gold path's length.

Task ids: "scienceworld/<split>/<task name>/<variation>". One Java process per
adapter, started lazily on first use; `scienceworld` is imported only then, so
this module imports without it. Unlike the built-ins, `expert_trajectory` runs on
this same simulator and so replaces the current episode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from envs.base import TextEnv, check_split

OFFICIAL_MAX_STEPS = {
    "task-1-boil": 100, "task-1-change-the-state-of-matter-of": 80, "task-1-freeze": 80, "task-1-melt": 80,
    "task-10-measure-melting-point-(known-substance)": 120, "task-10-use-thermometer": 30,
    "task-2-power-component": 20, "task-2-power-component-(renewable-vs-nonrenewable-energy)": 30,
    "task-2a-test-conductivity": 30, "task-2a-test-conductivity-of-unknown-substances": 30,
    "task-3-find-animal": 15, "task-3-find-living-thing": 15, "task-3-find-non-living-thing": 15,
    "task-3-find-plant": 15, "task-4-grow-fruit": 60, "task-4-grow-plant": 30, "task-5-chemistry-mix": 60,
    "task-5-chemistry-mix-paint-(secondary-color)": 15, "task-5-chemistry-mix-paint-(tertiary-color)": 30,
    "task-6-lifespan-(longest-lived)": 10, "task-6-lifespan-(longest-lived-then-shortest-lived)": 12,
    "task-6-lifespan-(shortest-lived)": 10, "task-7-identify-life-stages-1": 30, "task-7-identify-life-stages-2": 30,
}

INSTRUCTION = """You are a helpful assistant doing a science experiment in an environment.
In the environment, there are several rooms: kitchen, foundry, workshop, bathroom, outside, living room, bedroom, greenhouse, art studio, hallway.
You should explore the environment and find the items you need to complete the experiment.
You can teleport to any room in one step. All containers are already open: you can take items out of them directly.

The available actions are:
open OBJ: open a container
close OBJ: close a container
activate OBJ: activate a device
deactivate OBJ: deactivate a device
connect OBJ to OBJ: connect electrical components
disconnect OBJ: disconnect electrical components
use OBJ [on OBJ]: use a device or item
look around: describe the current room
examine OBJ: describe an object in detail
look at OBJ: describe a container's contents
read OBJ: read a note or book
move OBJ to OBJ: move an object to a container
pick up OBJ: move an object to the inventory
pour OBJ into OBJ: pour a liquid into a container
mix OBJ: chemically mix a container
teleport to LOC: teleport to a room
focus on OBJ: signal intent on a task object
wait: take no action for 10 steps
wait1: take no action for a step

Your response should use the following format:

Thought: <your thoughts>
Action: <your next action>"""

SPLIT_VARIATIONS = {"train": "get_variations_train", "test_seen": "get_variations_dev",
                    "test_unseen": "get_variations_test"}
OFFICIAL_SPLIT_FILES = {"train": "train", "test_seen": "dev", "test_unseen": "test"}
NO_MATCH = "No known action matches that input."


def names_from_environment() -> list[str] | None:
    """The task types in SCIENCEWORLD_TASKS (comma-separated), or None when it is unset or empty."""
    value = os.environ.get("SCIENCEWORLD_TASKS", "")
    names = [name.strip() for name in value.split(",") if name.strip()]
    return names or None


def checked_task_names(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in OFFICIAL_MAX_STEPS]
    if unknown:
        raise ValueError(f"unknown ScienceWorld task type(s) {unknown} (task_names / SCIENCEWORLD_TASKS); "
                         f"known: {', '.join(OFFICIAL_MAX_STEPS)}")
    return list(names)


def round_robin(per_type: list[list[str]]) -> list[str]:
    """[[a0, a1], [b0, b1, b2]] -> [a0, b0, a1, b1, b2]: the first N tasks of a split cover every task type."""
    ids = []
    for rank in range(max((len(ids_) for ids_ in per_type), default=0)):
        ids += [ids_[rank] for ids_ in per_type if rank < len(ids_)]
    return ids


def gold_thought(action: str) -> str:
    """A short generic Thought for a gold action."""
    verb = action.split(" ")[0] if action else ""
    if action.startswith("teleport to "):
        return f"I need to go to the {action[len('teleport to '):]}."
    if action.startswith("focus on "):
        return f"The {action[len('focus on '):]} is the object of the task, so I focus on it."
    if action.startswith("look around"):
        return "I look around to see what is here."
    if verb.startswith("wait"):
        return "I wait for the process to go on."
    return f"Next, I will {action}."


class ScienceWorldAdapter(TextEnv):
    name = "scienceworld"
    instruction = INSTRUCTION
    max_steps = 100  # replaced on reset by the task type's official limit
    unmatched_action = NO_MATCH

    def __init__(self, seed: int = 0, train: int | None = 120, test_seen: int | None = 10,
                 test_unseen: int | None = 10, task_names: list[str] | None = None, env_step_limit: int = 1000,
                 splits_dir: str | None = None):
        super().__init__(seed)
        self.sizes = {"train": train, "test_seen": test_seen, "test_unseen": test_unseen}  # caps per task type
        self.task_names = checked_task_names(task_names or names_from_environment() or list(OFFICIAL_MAX_STEPS))
        self.env_step_limit = env_step_limit
        self.splits_dir = splits_dir or os.environ.get("SCIENCEWORLD_SPLITS_DIR")
        self._sim = None
        self._ids: dict[str, list[str]] = {}

    def simulator(self):
        """The ScienceWorld simulator (a Java process), started on first use."""
        if self._sim is None:
            from scienceworld import ScienceWorldEnv  # optional dependency

            self._sim = ScienceWorldEnv("", envStepLimit=self.env_step_limit)
        return self._sim

    def close(self) -> None:
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    # ---- tasks ------------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        check_split(split)
        if split not in self._ids and self.splits_dir:
            self._ids[split] = self.listed_task_ids(split)
        if split not in self._ids:
            sim, per_type = self.simulator(), []
            for task in self.task_names:
                sim.load(task, 0, "easy")
                variations = list(getattr(sim, SPLIT_VARIATIONS[split])())[: self.sizes[split]]
                per_type.append([f"{self.name}/{split}/{task}/{v}" for v in variations])
            self._ids[split] = round_robin(per_type)
        return list(self._ids[split])

    def options(self) -> dict:
        """What, besides name and seed, decides this adapter's tasks (recorded in a run's identity)."""
        options = {}
        if self.task_names != list(OFFICIAL_MAX_STEPS):
            options["task_names"] = list(self.task_names)
        if self.sizes != {"train": 120, "test_seen": 10, "test_unseen": 10}:
            options["sizes"] = dict(self.sizes)
        if self.splits_dir:
            options["splits_dir"] = str(self.splits_dir)
        return options

    def listed_task_ids(self, split: str) -> list[str]:
        """The task ids of an official index list ([[task name, variation], ...]) in `splits_dir`."""
        path = Path(self.splits_dir) / f"{OFFICIAL_SPLIT_FILES[split]}_indices.json"
        try:
            pairs = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the official index list ({e})") from None
        return [f"{self.name}/{split}/{task}/{variation}" for task, variation in pairs if task in self.task_names]

    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        """"scienceworld/train/task-1-boil/3" -> ("task-1-boil", 3)."""
        parts = str(task_id).split("/")
        if len(parts) != 4 or parts[0] != self.name or parts[2] not in self.task_names or not parts[3].isdigit():
            raise ValueError(f"not a scienceworld task id: {task_id!r} (expected 'scienceworld/<split>/<task>/<n>')")
        check_split(parts[1])
        return parts[2], int(parts[3])

    def reset(self, task_id: str) -> str:
        self.task = self.parse_task_id(task_id)
        self.task_id, self.steps, self.done = task_id, 0, False
        return self.start(self.task)

    def start(self, task: tuple[str, int], gold: bool = False) -> str:
        name, variation = task
        sim = self.simulator()
        sim.load(name, variation, simplificationStr="easy", generateGoldPath=gold)
        _, info = sim.reset()
        self.max_steps = OFFICIAL_MAX_STEPS.get(name, 100)
        self.score, self.best = 0.0, 0.0
        return info["taskDesc"].replace("Task Description:", "").strip()

    # ---- steps ------------------------------------------------------------------------
    def current_reward(self) -> float:
        return self.best

    def act(self, action: str) -> tuple[str, bool, dict]:
        try:
            observation, _, completed, info = self.simulator().step(action)
            score = info["score"]
        except Exception:  # noqa: BLE001 - the Java side rejected the input; step never raises
            return NO_MATCH, False, {"valid": False, "score": self.score}
        self.score = score / 100
        self.best = max(self.best, self.score)
        info = {"valid": observation.strip() != NO_MATCH, "score": self.score}
        if score < 0:
            info["reason"] = "failed"
        return observation.strip(), bool(completed), info

    # ---- expert -----------------------------------------------------------------------
    def expert_steps(self):
        self.start(self.task, gold=True)
        gold = list(self.simulator().get_gold_action_sequence())
        self.max_steps = max(self.max_steps, len(gold))
        for action in gold:
            yield gold_thought(action), action

    def fresh_copy(self) -> "ScienceWorldAdapter":
        return self  # one Java process per adapter: the expert runs on this one

    def icl_task_id(self) -> str:
        return f"{self.name}/train/task-5-chemistry-mix-paint-(secondary-color)/0"

    def admissible_actions(self) -> list[str]:
        return list(self.simulator().get_valid_action_object_combinations())

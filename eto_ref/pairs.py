"""Contrastive trajectory pairs: the agent's explored trajectory vs the expert's.

ETO (Song et al. 2024, Sec. 3.2) collects failure trajectories by letting the
SFT policy explore the training tasks, then pairs each with the expert
trajectory of the same task. This module is that rule, faithful to the official
`construct_preference.py`:

    r <  r_e  ->  chosen = expert,   rejected = explored   ("lose")
    r >  r_e  ->  chosen = explored, rejected = expert     ("win")
    r == r_e  ->  no pair                                   ("tie": equally good)

The rejected side of a "lose" pair is cut to at most `len(expert) + 5` agent
turns (failed runs are often much longer than successful ones); `extra_turns`
sets the 5 (None keeps the whole failed run). The official code keeps ALFWorld's
failed runs whole: "auto" (`rejected_turns`) is each environment's official rule.
Both sides must end with an agent turn.

Trajectories here are official ETO records: `{"id", "conversations": [{"from",
"value"}, ...], "reward"}` whose conversations start with the 2-turn instruction
part (instruction, "OK") followed by the task. A pair is `{"id", "prompt",
"chosen", "rejected"}` with prompt = instruction part + task turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INSTRUCTION_TURNS = 2  # human instruction + gpt "OK"
PROMPT_TURNS = INSTRUCTION_TURNS + 1  # ... + the task: the agent's turns start after these
EXTRA_REJECTED_TURNS = 5  # the official code allows 5 more agent turns than the expert
AUTO = "auto"  # the rejected-side rule of the environment: EXTRA_REJECTED_TURNS, or None where it keeps runs whole


@dataclass
class PairStats:
    win: int = 0
    tie: int = 0
    lose: int = 0
    dropped: int = 0  # no expert, no usable reward (missing, NaN, an environment error), or a side that
    # does not end with an agent turn

    def as_dict(self) -> dict:
        return {"win": self.win, "tie": self.tie, "lose": self.lose, "dropped": self.dropped}


def strip_trailing_observation(turns: list[dict]) -> list[dict]:
    """An episode ends with the environment's last observation; a training side ends with the agent."""
    return turns[:-1] if turns and turns[-1]["from"] == "human" else turns


def truncate_agent_turns(turns: list[dict], max_agent_turns: int) -> list[dict]:
    """Keep turns up to and including the `max_agent_turns`-th agent (gpt) turn."""
    kept, agent_turns = [], 0
    for turn in turns:
        if turn["from"] == "gpt":
            if agent_turns == max_agent_turns:
                break
            agent_turns += 1
        kept.append(turn)
    return kept


def rejected_turns(setting: int | str | None, truncates: bool) -> int | None:
    """The extra agent turns a rejected side keeps (None: the whole failed run) for a setting.

    `setting` is a number, None, or AUTO: the official rule of the environment, which
    cuts (EXTRA_REJECTED_TURNS) where `truncates` and keeps the failed run whole where
    not (ALFWorld in the official code; the built-in household). A number or None is
    applied as given, in every environment.
    """
    if setting == AUTO:
        return EXTRA_REJECTED_TURNS if truncates else None
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 0):
        raise ValueError(f"rejected_extra_turns must be a number >= 0, none or {AUTO}, got {setting!r}")
    return setting


def count_agent_turns(turns: list[dict]) -> int:
    return sum(turn["from"] == "gpt" for turn in turns)


def build_pair(expert: dict, explored: dict, extra_turns: int | None = EXTRA_REJECTED_TURNS,
               forced_steps: int = 0) -> tuple[str, dict | None]:
    """Apply the ETO pairing rule to one task. Returns (outcome, pair or None).

    outcome is "win", "lose", "tie" or "dropped". With `forced_steps` = k (the paper's
    step-level contrast), the explored run followed the expert for its first k steps
    and acted on its own from step k + 1: the prompt then holds those k shared steps
    (each agent turn and its observation), and the two sides are what follows.
    """
    r_e, r = float(expert.get("reward", 1.0)), float(explored["reward"])
    shared = INSTRUCTION_TURNS + 2 * forced_steps  # then the task turn; forced turns go into the prompt
    expert_turns = strip_trailing_observation(expert["conversations"][shared:])  # task, a_{k+1}, o_{k+1}, ..., a_n
    explored_turns = strip_trailing_observation(explored["conversations"][shared:])
    instruction = expert["conversations"][:shared]
    if r == r_e:
        return "tie", None
    if r < r_e:
        outcome, winner, loser = "lose", expert_turns, explored_turns
        if extra_turns is not None:
            limit = count_agent_turns(expert_turns) + extra_turns
            loser = strip_trailing_observation(truncate_agent_turns(loser, limit))
    else:
        outcome, winner, loser = "win", explored_turns, expert_turns
    pair = {
        "id": str(expert["id"]),
        "prompt": instruction + winner[:1],  # instruction part + the task (+ the forced steps)
        "chosen": winner[1:],
        "rejected": loser[1:],
    }
    if not pair["chosen"] or not pair["rejected"] or \
            pair["chosen"][-1]["from"] != "gpt" or pair["rejected"][-1]["from"] != "gpt":
        return "dropped", None
    return outcome, pair


def pairable(explored: dict) -> bool:
    """An explored episode is paired only when its reward means something: a finite number, and the
    episode not stopped by a fault of the environment (reason "env_error: ...")."""
    reward = explored.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return False
    return not str(explored.get("reason", "")).startswith("env_error")


def build_pairs(experts: list[dict], explored: list[dict], extra_turns: int | None = EXTRA_REJECTED_TURNS,
                forced_steps: int = 0) -> tuple[list[dict], PairStats]:
    """Pair every explored trajectory with the expert trajectory of the same task id."""
    expert_by_id = {str(e["id"]): e for e in experts}
    stats, pairs = PairStats(), []
    for traj in explored:
        expert = expert_by_id.get(str(traj["id"]))
        if expert is None or not pairable(traj):
            stats.dropped += 1
            continue
        outcome, pair = build_pair(expert, traj, extra_turns, forced_steps)
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def self_play_pairs(samples: list[list[dict]]) -> tuple[list[dict], PairStats]:
    """Pairs without expert trajectories (the paper's self-play analysis): per task, the policy's best-rewarded
    sampled run is chosen and its worst rejected; tasks whose samples all score the same give none.

    `samples[i]` is the i-th sampled run over the tasks (records matched by id).
    """
    by_task: dict[str, list[dict]] = {}
    for run in samples:
        for record in run:
            if pairable(record):
                by_task.setdefault(str(record["id"]), []).append(record)
    stats, pairs = PairStats(), []
    for task_id, records in by_task.items():
        best = max(records, key=lambda r: float(r["reward"]))
        worst = min(records, key=lambda r: float(r["reward"]))
        if float(best["reward"]) == float(worst["reward"]):
            stats.tie += 1
            continue
        outcome, pair = build_pair(best, worst, extra_turns=None)  # `best` plays the expert's part
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats

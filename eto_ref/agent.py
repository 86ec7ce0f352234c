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

An unparseable reply gets the observation "Invalid format..." and the episode
goes on (the step still counts). Episodes of many tasks run in lockstep, batched
through the KV-cached sampler: each episode keeps its own cache rows across its
turns, so a new turn only prefills the new observation.

The recorded trajectory is 0-shot (instruction, OK, task, turns...) in the
official ETO format, ready for pairing and training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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


def observation_turn(observation: str) -> str:
    """The user turn that carries an environment observation."""
    return f"Observation: {observation}"


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

    def record(self) -> dict:
        """The official ETO trajectory record (0-shot)."""
        conversations = [
            {"from": "human", "value": self.instruction},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": self.task},
        ] + self.turns
        return {"id": self.task_id, "conversations": conversations, "reward": self.reward,
                "steps": self.steps, "reason": self.reason}


def step_episode(env, episode: Episode, reply: str, max_steps: int) -> str | None:
    """Apply one agent reply to the environment; returns the observation turn to append, or None when done.

    An environment that raises ends the episode with reason "env_error" (the
    exploration goes on with the other tasks).
    """
    episode.turns.append({"from": "gpt", "value": reply})
    episode.steps += 1
    action = parse_action(reply)
    if action is None:
        observation, done = INVALID_FORMAT, False
    else:
        try:
            obs, reward, done, info = env.step(action)
        except Exception as e:  # noqa: BLE001 - a faulty environment must not stop the run
            episode.done, episode.reason = True, f"env_error: {type(e).__name__}: {e}"
            return None
        episode.reward = float(reward)
        observation = observation_turn(obs)
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
    try:
        env = make_env()
        task = env.reset(task_id)
    except Exception as e:  # noqa: BLE001 - one broken task must not stop the others
        episode = Episode(task_id, "", "", done=True, reason=f"env_error: {type(e).__name__}: {e}")
        return None, episode
    return env, Episode(task_id, env.instruction, task)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class AgentConfig:
    max_new_tokens: int = 128  # per agent turn
    temperature: float = 0.0  # 0 = greedy (the default for exploration and evaluation)
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    batch_size: int = 16  # episodes run in lockstep
    max_len: int = 8192  # KV-cache slots per batch (shared by its rows)
    max_steps: int | None = None  # None: the environment's own limit
    icl_example: bool = True  # one in-context example in the prompt, as the official code (False: 0-shot)


def run_episodes(model, tokenizer, make_env, task_ids: list[str], config: AgentConfig = AgentConfig(),
                 on_episode_end=None) -> list[Episode]:
    """Run one episode per task, `config.batch_size` at a time, batched in lockstep.

    `make_env()` returns a fresh environment (one per episode, since an
    environment holds one episode's state). `on_episode_end(episode)` is called as
    soon as an episode ends (exploration writes it to disk there).

    Each episode's conversation lives in the rows of one `Session`: the prompt is
    prefilled once; after each reply only the observation turn and the next
    assistant header are prefilled. The cache always holds the canonical
    rendering of the conversation (the tokens training will see): if the model's
    own tokens differ from how the tokenizer renders its reply, those tokens are
    rewound and the canonical ones prefilled instead.
    """
    episodes = []
    for start in range(0, len(task_ids), config.batch_size):
        chunk = task_ids[start:start + config.batch_size]
        episodes += run_batch(model, tokenizer, make_env, chunk, config, on_episode_end)
    return episodes


def run_batch(model, tokenizer, make_env, task_ids, config: AgentConfig, on_episode_end=None) -> list[Episode]:
    from eto_ref.sampler import Session

    envs, episodes, messages, rendered = [], [], [], []
    for task_id in task_ids:
        env, episode = start_episode(make_env, task_id)
        envs.append(env)
        episodes.append(episode)
        messages.append(prompt_messages(episode.instruction, env.icl_example() if config.icl_example else [],
                                        episode.task) if not episode.done else [])
        rendered.append(tokenizer.render(messages[-1], add_generation_prompt=True)[0] if not episode.done else [])
    for episode in episodes:
        if episode.done and on_episode_end is not None:  # the environment failed to start this task
            on_episode_end(episode)
    live = [row for row, episode in enumerate(episodes) if not episode.done]
    if not live:
        return episodes
    session = Session(model, batch_size=len(task_ids), max_len=config.max_len)
    session.append([rendered[row] for row in live], rows=live)
    if len(live) < len(task_ids):
        session.drop([row for row in range(len(task_ids)) if row not in live])
    turn = 0

    def limit(env) -> int:
        return env.max_steps if config.max_steps is None else min(env.max_steps, config.max_steps)

    while live:
        completions = session.generate(
            config.max_new_tokens, stop_ids=tokenizer.stop_ids, stop_strings=STOP_STRINGS,
            decode=tokenizer.decode, temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, seed=None if config.seed is None else config.seed + turn, rows=live)
        turn += 1
        finished, next_tokens = [], []
        for row, completion in zip(live, completions):
            episode, reply = episodes[row], completion.text.strip()
            if completion.reason == "cache_full":
                episode.done, episode.reason = True, "cache_full"
            elif not reply:  # nothing but a stop token: the episode cannot go on
                episode.turns.append({"from": "gpt", "value": reply})
                episode.steps += 1
                episode.done, episode.reason = True, "no_output"
            else:
                observation = step_episode(envs[row], episode, reply, limit(envs[row]))
            if episode.done:
                finished.append(row)
                continue
            messages[row] += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
            full = tokenizer.render(messages[row], add_generation_prompt=True)[0]
            history = session.history(row)
            keep = common_prefix_length(history, full)
            if keep < len(history):  # the model's tokens are not the canonical rendering: rewind them
                session.rewind(row, len(history) - keep)
            next_tokens.append((row, full[keep:]))
        for row in finished:
            if on_episode_end is not None:
                on_episode_end(episodes[row])
        if finished:
            session.drop(finished)
        live = [row for row in live if row not in finished]
        if next_tokens:
            session.append([t for _, t in next_tokens], rows=[r for r, _ in next_tokens])
    return episodes

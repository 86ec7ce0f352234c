"""envs/scienceworld.py: the real ScienceWorld, as the official ETO code sets it up.

Needs the optional extra (`pip install -r requirements-scienceworld.txt`, which .ci/run
installs) and Java 17; without Java the module is skipped, saying so.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if shutil.which("java") is None:
    pytest.skip("Java is not installed (ScienceWorld runs on the JVM; Java 17 is needed)", allow_module_level=True)
pytest.importorskip("scienceworld", reason="scienceworld is not installed: pip install -r requirements-scienceworld.txt")

from envs import make_env  # noqa: E402
from envs.scienceworld import OFFICIAL_MAX_STEPS  # noqa: E402
from eto_ref.agent import AgentConfig, run_episodes  # noqa: E402
from eto_ref.sampler import SamplingConfig  # noqa: E402
from tests.helpers import ScriptedModel, household_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["task-3-find-animal", "task-2a-test-conductivity", "task-5-chemistry-mix-paint-(secondary-color)"]


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld", task_names=TASKS)
    yield env
    env.close()


def test_the_official_task_types_splits_and_step_limits(tmp_path):
    """24 task types and the official step limits (max_steps.json). Splits: the first 120 train and 10 dev /
    10 test variations of each type (the official test list is exactly these 211 tasks; its dev and train lists
    are random subsets, 194 and 1483, used when given as files)."""
    assert len(OFFICIAL_MAX_STEPS) == 24
    assert (OFFICIAL_MAX_STEPS["task-1-boil"], OFFICIAL_MAX_STEPS["task-3-find-animal"],
            OFFICIAL_MAX_STEPS["task-6-lifespan-(longest-lived-then-shortest-lived)"]) == (100, 15, 12)
    full = make_env("scienceworld")
    try:
        sizes = {split: len(full.task_ids(split)) for split in ("train", "test_seen", "test_unseen")}
        assert sizes == {"train": 1408, "test_seen": 199, "test_unseen": 211}
        unseen = full.task_ids("test_unseen")
        assert unseen[0] == "scienceworld/test_unseen/task-1-boil/21"  # round-robin: every type's first, then ...
        assert [t.split("/")[2] for t in unseen[:24]] == list(OFFICIAL_MAX_STEPS)
        assert unseen[24] == "scienceworld/test_unseen/task-1-boil/22"
        full.reset("scienceworld/test_seen/task-3-find-animal/120")
        assert full.max_steps == 15
    finally:
        full.close()
    for name, pairs in (("train", [["task-1-boil", 4], ["task-3-find-animal", 0]]), ("dev", [["task-1-boil", 15]]),
                        ("test", [["task-1-boil", 21]])):
        (tmp_path / f"{name}_indices.json").write_text(json.dumps(pairs))
    listed = make_env("scienceworld", splits_dir=str(tmp_path))
    assert listed.task_ids("train") == ["scienceworld/train/task-1-boil/4", "scienceworld/train/task-3-find-animal/0"]
    assert listed.task_ids("test_seen") == ["scienceworld/test_seen/task-1-boil/15"]


def test_splits_are_train_dev_test_variations(env):
    ids = {split: env.task_ids(split) for split in ("train", "test_seen", "test_unseen")}
    assert all(ids.values())
    variations = {split: {t.split("/", 2)[2] for t in v} for split, v in ids.items()}
    assert not variations["train"] & variations["test_seen"] and not variations["train"] & variations["test_unseen"]
    with pytest.raises(ValueError, match="test_unseen"):
        env.task_ids("dev")


@pytest.mark.parametrize("split,task", list(zip(["train", "test_seen", "test_unseen"], TASKS)))
def test_gold_path_reaches_full_score_in_the_eto_format(env, split, task):
    task_id = next(t for t in env.task_ids(split) if f"/{task}/" in t)
    trajectory = env.expert_trajectory(task_id)
    conv = trajectory["conversations"]
    assert trajectory["reward"] == 1.0 and trajectory["id"] == task_id
    assert conv[0]["value"] == env.instruction and conv[1]["value"] == "OK" and conv[-1]["from"] == "gpt"
    assert conv[2]["value"].startswith("Your task is to")  # no "Task Description:" header
    assert all(t["value"].startswith("Thought: ") and "\nAction: " in t["value"] for t in conv[3::2])
    assert all(t["value"].startswith("Observation: ") for t in conv[4::2])


def test_reward_is_the_max_score_seen(env):
    task_id = next(t for t in env.task_ids("train") if "/task-3-find-animal/" in t)
    gold = [turn["value"].split("Action: ")[1] for turn in env.expert_trajectory(task_id)["conversations"][3::2]]
    env.reset(task_id)
    rewards = [env.step(action)[1] for action in gold[:-1]]
    assert rewards == sorted(rewards) and 0 < rewards[-1] < 1.0  # partial progress, never falling
    _, reward, _, info = env.step("look around")
    assert reward == rewards[-1] and info["score"] <= reward


def test_bad_actions_do_not_raise(env):
    env.reset(env.task_ids("train")[0])
    for action in ["", "x" * 10_000, "héllo ✓ 🙂", "Action: look around", None]:
        obs, reward, done, info = env.step(action)
        assert isinstance(obs, str) and obs and 0.0 <= reward <= 1.0 and "score" in info
    obs, reward, done, info = env.step("look around")
    assert obs.startswith("This room is called")


class GoldModel(ScriptedModel):
    """A policy that replies with the next gold action of its task, turn after turn (one episode at a time)."""

    def __init__(self, tok, replies: list[str]):
        scripts = [tok.encode(r) + [tok.end_of_turn_id] for r in replies]
        super().__init__(tok.vocab_size, scripts[0])
        self.scripts, self.turn = scripts, 0

    def next_token_logits(self, ids, attention_mask, kv_cache, last):
        if ids.shape[1] > 1:  # a prefill: the next reply of the script starts
            self.script = self.scripts[min(self.turn, len(self.scripts) - 1)]
            self.turn += 1
        return super().next_token_logits(ids, attention_mask, kv_cache, last)


@pytest.mark.parametrize("task", TASKS[:2])
def test_an_agent_episode_through_eto_ref_reaches_the_gold_reward(env, task, tmp_path):
    task_id = next(t for t in env.task_ids("test_seen") if f"/{task}/" in t)
    replies = [turn["value"] for turn in env.expert_trajectory(task_id)["conversations"][3::2]]
    tok = household_tokenizer(tmp_path)
    (episode,) = run_episodes(GoldModel(tok, replies), tok, lambda: env, [task_id],
                              AgentConfig(sampling=SamplingConfig(max_new_tokens=200), batch_size=1, icl=False))
    assert episode.reward == 1.0 and episode.reason == "done" and episode.steps == len(replies)
    assert [t["value"] for t in episode.turns[0::2]] == replies


def test_write_expert_data_writes_gold_paths_as_sft_data(tmp_path):
    out = tmp_path / "sciworld_sft.json"
    result = subprocess.run([sys.executable, "-m", "envs.write_expert_data", "--env", "scienceworld", "--limit", "2",
                             "--task-types", TASKS[0], "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [d["reward"] for d in data] == [1.0, 1.0] and not (tmp_path / "sciworld_sft.json.partial.jsonl").exists()
    from eto_ref.trajectory import load_trajectories

    assert len(load_trajectories(out, on_error="raise")) == 2

"""The real ScienceWorld through the adapter (optional: needs `pip install -r requirements-scienceworld.txt` and Java)."""

import shutil

import pytest

if shutil.which("java") is None:
    pytest.skip("Java is not installed (ScienceWorld runs on the JVM)", allow_module_level=True)
pytest.importorskip("scienceworld", reason="scienceworld is not installed: pip install -r requirements-scienceworld.txt")

from envs import make_env  # noqa: E402

TASKS = ["task-3-find-animal", "task-2a-test-conductivity", "task-5-chemistry-mix-paint-(secondary-color)"]


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld", task_names=TASKS)
    yield env
    env.close()


def test_splits_are_train_dev_test_variations(env):
    ids = {split: env.task_ids(split) for split in ("train", "test_seen", "test_unseen")}
    assert all(ids.values())
    assert len(ids["test_seen"]) <= 10 * len(TASKS) and len(ids["test_unseen"]) <= 10 * len(TASKS)
    variations = {split: {t.split("/", 2)[2] for t in v} for split, v in ids.items()}
    assert not variations["train"] & variations["test_seen"] and not variations["train"] & variations["test_unseen"]
    with pytest.raises(ValueError, match="test_unseen"):
        env.task_ids("dev")


@pytest.mark.parametrize("split,task", list(zip(["train", "test_seen", "test_unseen"], TASKS)))
def test_gold_path_reaches_full_score(env, split, task):
    task_id = next(t for t in env.task_ids(split) if f"/{task}/" in t)
    trajectory = env.expert_trajectory(task_id)
    conv = trajectory["conversations"]
    assert trajectory["reward"] == 1.0 and trajectory["id"] == task_id
    assert conv[0]["value"] == env.instruction and conv[1]["value"] == "OK" and conv[-1]["from"] == "gpt"
    assert conv[2]["value"].startswith("Your task is to")
    assert all(t["value"].startswith("Observation: ") for t in conv[4::2])


def test_bad_actions_do_not_raise(env):
    env.reset(env.task_ids("train")[0])
    for action in ["", "x" * 10_000, "héllo ✓ 🙂", "Action: look around", None]:
        obs, reward, done, info = env.step(action)
        assert isinstance(obs, str) and obs and 0.0 <= reward <= 1.0 and "score" in info
    obs, reward, done, info = env.step("look around")
    assert obs.startswith("This room is called")

"""The built-in environments: experts, replay, random baseline, determinism, splits, robustness, format."""

import random
import time

import pytest

from envs import SPLITS, household, make_env, science, webshop
from envs.base import agent_turn

ENVS = ("webshop", "household", "science")
SAMPLE = 50  # tasks per split in the fast tests


def agent_actions(trajectory):
    return [t["value"].split("\nAction: ", 1)[1] for t in trajectory["conversations"][3::2]]


def observations(trajectory):
    return [t["value"] for t in trajectory["conversations"][4::2]]


def check_expert(env, task_id):
    """The expert reaches 1.0, and replaying its actions reproduces observations and reward."""
    trajectory = env.expert_trajectory(task_id)
    assert trajectory["reward"] == 1.0, task_id
    env.reset(task_id)
    seen = []
    for action in agent_actions(trajectory):
        obs, reward, done, info = env.step(action)
        seen.append(env.observation_prefix + obs)
    assert done and info["reason"] == "done" and reward == trajectory["reward"]
    assert seen[:-1] == observations(trajectory)  # the final observation is not part of the trajectory


# ---- experts ---------------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", ENVS)
def test_expert_solves_and_replays_a_sample(name, split):
    env = make_env(name)
    for task_id in env.task_ids(split)[:SAMPLE]:
        check_expert(env, task_id)


@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", ENVS)
def test_expert_solves_and_replays_every_task(name, split):
    env = make_env(name)
    for task_id in env.task_ids(split):
        check_expert(env, task_id)


@pytest.mark.parametrize("name", ENVS)
def test_random_policy_scores_far_below_the_expert(name):
    env, rng, rewards = make_env(name), random.Random(0), []
    for task_id in env.task_ids("train")[:200]:
        env.reset(task_id)
        done = False
        while not done:
            _, reward, done, _ = env.step(env.random_action(rng))
        rewards.append(reward)
    assert sum(rewards) / len(rewards) < 0.3


@pytest.mark.parametrize("name", ENVS)
def test_expert_episode_lengths_fit_max_steps(name):
    env = make_env(name)
    lengths = [len(agent_actions(env.expert_trajectory(t))) for t in env.task_ids("train")[:300]]
    assert 4 <= sum(lengths) / len(lengths) <= 15
    assert max(lengths) <= env.max_steps


# ---- format ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ENVS)
def test_expert_trajectory_has_the_eto_format(name):
    env = make_env(name)
    task_id = env.task_ids("test_seen")[3]
    traj = env.expert_trajectory(task_id)
    assert set(traj) == {"id", "conversations", "reward"} and traj["id"] == task_id
    conv = traj["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"] == env.instruction and conv[1]["value"] == "OK"
    assert conv[2]["value"] == env.reset(task_id)
    for turn in conv[3::2]:
        thought, action = turn["value"].split("\nAction: ")
        assert thought.startswith("Thought: ") and len(thought) > 15 and action and "\n" not in action
    assert all(t["value"].startswith(env.observation_prefix) for t in conv[4::2])
    assert isinstance(traj["reward"], float)


def test_turns_are_worded_as_the_official_code_words_each_benchmark():
    """WebShop observations start "Observation:\n"; ALFWorld's reply to a reply without an action is "Error
    Input"; ALFWorld-like pairs keep the whole failed run (binary reward)."""
    from eto_ref.agent import Episode, step_episode

    webshop, household, science = make_env("webshop"), make_env("household"), make_env("science")
    assert webshop.observation_prefix == "Observation:\n" and science.observation_prefix == "Observation: "
    task = household.task_ids("train")[0]
    episode = Episode(task, household.instruction, household.reset(task))
    assert step_episode(household, episode, "no action here", 5) == (
        "Observation: Error Input. Your input must contains 'Action: '")
    assert (household.truncate_rejected, webshop.truncate_rejected, science.truncate_rejected) == (False, True, True)


@pytest.mark.parametrize("name", ENVS)
def test_icl_example_is_an_expert_run_as_chat_messages(name):
    env = make_env(name)
    messages = env.icl_example()
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert messages[0]["content"] == env.reset(env.task_ids("train")[0])
    assert messages[1]["content"].startswith("Thought: ") and messages[-1]["content"].startswith("Thought: ")
    assert "Action: " in env.instruction and "Thought: " in env.instruction


def test_agent_turn_format():
    assert agent_turn("I look.", "look") == "Thought: I look.\nAction: look"


# ---- determinism -------------------------------------------------------------------

@pytest.mark.parametrize("name", ENVS)
def test_same_seed_same_tasks_other_seed_other_tasks(name):
    a, b, c = make_env(name, seed=0), make_env(name, seed=0), make_env(name, seed=1)
    ids = a.task_ids("train")[:20]
    assert [a.expert_trajectory(t) for t in ids] == [b.expert_trajectory(t) for t in ids]
    texts_a = [a.expert_trajectory(t)["conversations"][2:] for t in ids]
    texts_c = [c.expert_trajectory(t)["conversations"][2:] for t in ids]
    assert sum(x != y for x, y in zip(texts_a, texts_c)) >= 15


@pytest.mark.parametrize("name", ENVS)
def test_expert_trajectory_leaves_the_current_episode_alone(name):
    env, other = make_env(name), make_env(name)
    ids = env.task_ids("train")
    env.reset(ids[1])
    other.reset(ids[1])
    for action in agent_actions(env.expert_trajectory(ids[1])):
        env.expert_trajectory(ids[2])
        assert env.step(action) == other.step(action)


def test_make_env_is_instant_and_sizes_are_arguments():
    start = time.perf_counter()
    for name in ENVS:
        env = make_env(name, seed=3, train=10, test_seen=5, test_unseen=4)
        assert [len(env.task_ids(s)) for s in SPLITS] == [10, 5, 4]
        assert len(make_env(name).task_ids("train")) >= 2000
    assert time.perf_counter() - start < 0.5


def test_unknown_env_and_split_and_task_id():
    with pytest.raises(ValueError, match="household"):
        make_env("alfworld")
    env = make_env("household")
    with pytest.raises(ValueError, match="test_unseen"):
        env.task_ids("dev")
    for bad in ("webshop/train/0", "household/train/999999", "household/dev/1", "17"):
        with pytest.raises(ValueError):
            env.reset(bad)


# ---- splits ----------------------------------------------------------------------------

def test_task_ids_are_unique_across_envs_and_splits():
    ids = [t for name in ENVS for s in SPLITS for t in make_env(name).task_ids(s)]
    assert len(ids) == len(set(ids))


def combos(name, split, n=None):
    """(held-out key) of the first n tasks of a split."""
    env = make_env(name)
    out = []
    for i in range(n or env.sizes[split]):
        task = env.make_task(split, i)
        if name == "household":
            out.append((task["goal"], task["object"]))
        elif name == "science":
            out.append((task["procedure"], task["item"]))
        else:
            goal = task["goal"]
            out.append((goal["type"], tuple(goal["attributes"])))
    return out


@pytest.mark.parametrize("name,module", [("household", household), ("science", science)])
def test_unseen_combinations_are_held_out(name, module):
    train, seen, unseen = combos(name, "train"), combos(name, "test_seen"), combos(name, "test_unseen")
    assert not set(train) & module.UNSEEN and not set(seen) & module.UNSEEN
    assert set(unseen) <= module.UNSEEN and len(set(unseen)) == len(module.UNSEEN)  # all of them are tested
    assert set(seen) <= set(train)  # test_seen: new layouts of combinations seen in train
    # each held-out item is seen in train with another goal/procedure, and each goal/procedure with other items
    items_in_train, kinds_in_train = {i for _, i in train}, {k for k, _ in train}
    for kind, item in module.UNSEEN:
        assert kind in kinds_in_train
        if (kind, item) == ("mix", "violet"):  # red + blue: each primary is mixed in train
            assert {"red", "blue"} <= {c for mix in items_in_train & set(science.MIXES) for c in science.MIXES[mix]}
        else:
            assert item in items_in_train, (kind, item)


def test_webshop_held_out_type_attribute_pairs():
    env = make_env("webshop")
    for split in ("train", "test_seen"):
        for i in range(env.sizes[split]):
            task = env.make_task(split, i)
            pairs = {(task["goal"]["type"], a) for a in task["goal"]["attributes"]}
            pairs |= {(p["type"], a) for p in task["catalog"] for a in p["attributes"]}
            assert not pairs & webshop.UNSEEN
    for i in range(env.sizes["test_unseen"]):
        goal = env.make_task("test_unseen", i)["goal"]
        assert sum((goal["type"], a) in webshop.UNSEEN for a in goal["attributes"]) == 1
    train_pairs = {(t, a) for t, attrs in combos("webshop", "train") for a in attrs}
    for ptype, attr in webshop.UNSEEN:  # the attribute is requested for other product types in train
        assert any(a == attr and t != ptype for t, a in train_pairs)
    assert {t for t, _ in combos("webshop", "test_seen")} <= {t for t, _ in train_pairs}


# ---- robustness -------------------------------------------------------------------------

BAD_ACTIONS = ["", "   ", "\n\t", "asdkjh qwe", "x" * 10_000, "Action: go to cabinet 1", "Thought: hm\nAction:",
               "héllo ✓ 日本語 🙂", "click[", "search[]", "go to", "put", "take  from ", "move  to ", "focus on",
               "teleport to the moon", "click[Buy Now", "]]]][[[", "None", "\x00\x01"]


@pytest.mark.parametrize("name", ENVS)
def test_bad_actions_give_an_observation_and_cost_a_step(name):
    env = make_env(name)
    env.reset(env.task_ids("train")[5])
    for i, action in enumerate(BAD_ACTIONS[: env.max_steps - 1]):
        obs, reward, done, info = env.step(action)
        assert isinstance(obs, str) and obs and not obs.startswith("Observation:")
        assert reward == 0.0 and not done and info["steps"] == i + 1 and info["valid"] is False
    env.step(None)  # not even a string


@pytest.mark.parametrize("name", ENVS)
def test_max_steps_ends_the_episode(name):
    env = make_env(name)
    env.reset(env.task_ids("test_unseen")[0])
    for _ in range(env.max_steps - 1):
        assert not env.step("inventory")[2]
    obs, reward, done, info = env.step("inventory")
    assert done and info["reason"] == "max_steps" and reward == 0.0
    assert env.step("look")[2]  # stays over
    with pytest.raises(RuntimeError):
        make_env(name).step("look")  # before reset


# ---- environment-specific semantics ----------------------------------------------------

def test_household_objects_hide_in_closed_receptacles():
    env = make_env("household")
    trajs = [env.expert_trajectory(t) for t in env.task_ids("train")[:100]]
    assert sum(any(a.startswith("open ") for a in agent_actions(t)) for t in trajs) > 30
    goals = {env.make_task("train", i)["goal"] for i in range(200)}
    assert goals == set(household.GOALS)


def test_household_heat_then_put_rule():
    env = make_env("household")
    task_id = next(t for t in env.task_ids("train") if env.make_task("train", int(t.split("/")[2]))["goal"] == "heat")
    actions = agent_actions(env.expert_trajectory(task_id))
    env.reset(task_id)  # skipping the heating: putting the object there is not a success
    for action in actions:
        if not action.startswith("heat "):
            obs, reward, done, _ = env.step(action)
    assert reward == 0.0 and not done


def test_webshop_partial_credit_for_a_wrong_product():
    env = make_env("webshop")
    task_id = env.task_ids("train")[7]
    env.reset(task_id)
    goal = env.task["goal"]
    env.step(f"search[{goal['type']}]")
    wrong = next(p for p in env.on_page() if not webshop.match_score(goal, p, {}) == 1.0)
    env.step(f"click[{wrong['id']}]")
    obs, reward, done, _ = env.step("click[Buy Now]")
    assert done and 0.0 < reward < 1.0
    assert reward == webshop.match_score(goal, wrong, {})


def test_science_reward_is_max_score_seen():
    env = make_env("science")
    task_id = next(t for t in env.task_ids("train") if env.make_task("train", int(t.split("/")[2]))["procedure"] == "boil")
    actions = agent_actions(env.expert_trajectory(task_id))
    env.reset(task_id)
    for action in actions[:5]:  # teleport, look, focus, move to the heater, activate
        obs, reward, done, info = env.step(action)
    assert 0.5 < info["score"] < 1.0 and reward == info["score"]
    obs, reward, done, info = env.step(actions[4].replace("activate", "deactivate"))
    assert info["score"] < reward  # the score fell, the reward keeps the max


def test_science_wrong_focus_fails_the_task():
    env = make_env("science")
    env.reset(env.task_ids("train")[0])
    env.step("teleport to kitchen")
    obs, reward, done, info = env.step("focus on counter")
    assert done and info["reason"] == "failed" and reward == 0.0 and "failed" in obs


@pytest.mark.parametrize("module", [household, science, webshop])
def test_docstring_names_every_held_out_combination(module):
    doc = " ".join(module.__doc__.split())
    for kind, item in module.UNSEEN:
        assert (f"{kind}/{item}" if module is webshop else item) in doc, (kind, item)


@pytest.mark.parametrize("name", ENVS)
def test_fuzzed_actions_never_raise(name):
    """Admissible actions cut, glued and shuffled into near-misses."""
    env, rng = make_env(name), random.Random(1)
    for task_id in env.task_ids("train")[:40]:
        env.reset(task_id)
        done = False
        while not done:
            words = " ".join(rng.choices(env.admissible_actions(), k=2)).split()
            action = " ".join(rng.sample(words, rng.randint(1, min(6, len(words)))))
            obs, reward, done, info = env.step(rng.choice([action, action.upper(), action + "]", "[" + action]))
            assert isinstance(obs, str) and 0.0 <= reward <= 1.0


def test_scienceworld_task_types_order_and_options_need_no_simulator(monkeypatch, tmp_path):
    """The real ScienceWorld's choices (task types from SCIENCEWORLD_TASKS, split sizes, official lists) are
    checked and recorded without starting Java; splits list their tasks round-robin over the types."""
    from envs.scienceworld import round_robin
    from eto_ref.eto import LoopConfig
    from eto_ref.exploration import ExploreConfig, run_identity
    from eto_ref.pipeline import PipelineConfig

    assert round_robin([["a0", "a1"], ["b0", "b1", "b2"], []]) == ["a0", "b0", "a1", "b1", "b2"]
    assert make_env("scienceworld").options() == {}
    assert "env_options" not in run_identity(ExploreConfig(model="m", env="scienceworld"))
    monkeypatch.setenv("SCIENCEWORLD_TASKS", " task-3-find-animal, task-3-find-plant ")
    env = make_env("scienceworld", test_seen=5)
    assert env.task_names == ["task-3-find-animal", "task-3-find-plant"] and env._sim is None
    assert env.options() == {"task_names": ["task-3-find-animal", "task-3-find-plant"],
                             "sizes": {"train": 120, "test_seen": 5, "test_unseen": 10}}
    assert run_identity(ExploreConfig(model="m", env="scienceworld"))["env_options"] == {
        "task_names": ["task-3-find-animal", "task-3-find-plant"]}
    job = PipelineConfig(loop=LoopConfig(env="scienceworld"))
    assert job.identity()["env_options"] == {"task_names": ["task-3-find-animal", "task-3-find-plant"]}
    assert "env_options" not in PipelineConfig(loop=LoopConfig(env="science")).identity()
    monkeypatch.setenv("SCIENCEWORLD_TASKS", "task-3-find-animal,task-99-fly")
    with pytest.raises(ValueError, match=r"unknown ScienceWorld task type\(s\) \['task-99-fly'\].*SCIENCEWORLD_TASKS"):
        make_env("scienceworld")
    monkeypatch.delenv("SCIENCEWORLD_TASKS")
    assert make_env("scienceworld", splits_dir=str(tmp_path)).options() == {"splits_dir": str(tmp_path)}


def test_webshop_unmet_requirements_names_each_missed_kind():
    """match_score's terms, by kind: the reward is 1.0 exactly when nothing is missed."""
    goal = {"type": "yoga mat", "attributes": ["extra thick", "lightweight"], "options": {"color": "blue"},
            "price": 30.0}
    fits = {"type": "yoga mat", "attributes": ["extra thick", "lightweight", "foldable"], "price": 29.99}
    assert webshop.unmet_requirements(goal, fits, {"color": "blue"}) == []
    assert webshop.match_score(goal, fits, {"color": "blue"}) == 1.0
    # over the cap, one attribute missing, the wrong color: 3 of the 5 requirements missed, 2/5 met
    near = {"type": "yoga mat", "attributes": ["extra thick"], "price": 30.01}
    assert webshop.unmet_requirements(goal, near, {"color": "pink"}) == ["attribute", "option", "price"]
    assert webshop.match_score(goal, near, {"color": "pink"}) == pytest.approx(2 / 5)
    other = {"type": "desk lamp", "attributes": ["led"], "price": 10.0}
    assert webshop.unmet_requirements(goal, other, {}) == ["type", "attribute", "option"]

"""The ETO pairing rule on hand-made reward cases (lose, win, tie, truncation)."""

import pytest

from eto_ref.pairs import AUTO, build_pair, build_pairs, rejected_turns, truncate_agent_turns

INSTRUCTION = [{"from": "human", "value": "You are an agent."}, {"from": "gpt", "value": "OK"}]


def episode(task_id, actions, reward, final_observation=True):
    """An ETO record: instruction part, task, then agent/observation turns."""
    conv = INSTRUCTION + [{"from": "human", "value": f"Task {task_id}"}]
    for i, a in enumerate(actions):
        conv.append({"from": "gpt", "value": f"Thought: t\nAction: {a}"})
        if i < len(actions) - 1 or final_observation:
            conv.append({"from": "human", "value": f"Observation: after {a}"})
    return {"id": task_id, "conversations": conv, "reward": reward}


def actions_of(turns):
    return [t["value"].split("Action: ")[1] for t in turns if t["from"] == "gpt"]


def test_lose_pairs_expert_as_chosen_and_strips_the_final_observation():
    expert = episode("1", ["a", "b"], 1.0, final_observation=False)
    explored = episode("1", ["x", "y", "z"], 0.0)
    outcome, pair = build_pair(expert, explored)
    assert outcome == "lose"
    assert pair["prompt"] == INSTRUCTION + [{"from": "human", "value": "Task 1"}]
    assert actions_of(pair["chosen"]) == ["a", "b"]
    assert actions_of(pair["rejected"]) == ["x", "y", "z"]
    assert pair["rejected"][-1]["from"] == "gpt" and pair["chosen"][-1]["from"] == "gpt"


def test_win_pairs_explored_as_chosen():
    expert = episode("2", ["a", "b"], 0.5, final_observation=False)
    explored = episode("2", ["x"], 0.75)
    outcome, pair = build_pair(expert, explored)
    assert outcome == "win"
    assert actions_of(pair["chosen"]) == ["x"]
    assert actions_of(pair["rejected"]) == ["a", "b"]


def test_tie_gives_no_pair():
    expert = episode("3", ["a"], 1.0, final_observation=False)
    assert build_pair(expert, episode("3", ["a"], 1.0)) == ("tie", None)


def test_rejected_is_truncated_to_expert_length_plus_five_agent_turns():
    expert = episode("4", ["a", "b", "c"], 1.0, final_observation=False)
    explored = episode("4", [f"x{i}" for i in range(20)], 0.0)
    _, pair = build_pair(expert, explored)
    assert actions_of(pair["rejected"]) == [f"x{i}" for i in range(3 + 5)]
    assert pair["rejected"][-1]["from"] == "gpt"
    _, untruncated = build_pair(expert, explored, extra_turns=None)
    assert len(actions_of(untruncated["rejected"])) == 20
    _, tight = build_pair(expert, explored, extra_turns=0)  # no longer than the expert
    assert actions_of(tight["rejected"]) == ["x0", "x1", "x2"] and tight["rejected"][-1]["from"] == "gpt"
    pairs, _ = build_pairs([expert], [explored], extra_turns=1)
    assert actions_of(pairs[0]["rejected"]) == ["x0", "x1", "x2", "x3"]


def test_auto_is_the_environments_rule_and_a_given_number_applies_everywhere():
    """auto: +5 where the environment cuts, the whole run where it does not (household, as ALFWorld in the
    official code); a number or None is the rule as given, household included."""
    assert rejected_turns(AUTO, truncates=True) == 5
    assert rejected_turns(AUTO, truncates=False) is None
    for setting in (0, 3, None):
        assert rejected_turns(setting, truncates=True) == setting
        assert rejected_turns(setting, truncates=False) == setting
    for bad in (-1, 2.5, "five", True):
        with pytest.raises(ValueError, match="rejected_extra_turns"):
            rejected_turns(bad, truncates=True)


def test_truncate_agent_turns_keeps_observations_between():
    turns = [{"from": "gpt", "value": "1"}, {"from": "human", "value": "o"}, {"from": "gpt", "value": "2"}]
    assert truncate_agent_turns(turns, 1) == turns[:2]
    assert truncate_agent_turns(turns, 5) == turns


def test_explored_run_without_agent_turn_is_dropped():
    expert = episode("5", ["a"], 1.0, final_observation=False)
    explored = {"id": "5", "conversations": INSTRUCTION + [{"from": "human", "value": "Task 5"}], "reward": 0.0}
    assert build_pair(expert, explored) == ("dropped", None)


def test_build_pairs_counts_outcomes_and_matches_by_id():
    experts = [episode(str(i), ["a"], 1.0, final_observation=False) for i in range(4)]
    explored = [episode("0", ["x"], 0.0), episode("1", ["a"], 1.0), episode("2", ["y"], 0.0), episode("99", ["z"], 0.0)]
    pairs, stats = build_pairs(experts, explored)
    assert [p["id"] for p in pairs] == ["0", "2"]
    assert stats.as_dict() == {"win": 0, "tie": 1, "lose": 2, "dropped": 1}


def test_runs_without_a_usable_reward_are_never_paired():
    """A NaN or missing reward, or an episode an environment fault stopped, says nothing about the agent."""
    expert = episode("t", ["a1", "a2"], 1.0, final_observation=False)
    failed = episode("t", ["x"], 0.0)
    bad = [{**failed, "reward": float("nan")}, {**failed, "reward": None},
           {**failed, "reason": "env_error: RuntimeError: simulator crashed"}]
    for explored in bad:
        pairs, stats = build_pairs([expert], [explored])
        assert pairs == [] and stats.dropped == 1 and stats.win == stats.lose == 0


def test_step_level_pairs_share_the_forced_steps_in_the_prompt():
    """The step-level contrast: the explored run followed the expert for k steps; the prompt holds them and
    the sides are what each did from step k + 1 (the rejected side cut to the expert's remaining steps + 5)."""
    expert = episode("t", ["a1", "a2", "a3"], 1.0, final_observation=False)
    explored = episode("t", ["a1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10"], 0.4)
    outcome, pair = build_pair(expert, explored, extra_turns=5, forced_steps=1)
    assert outcome == "lose"
    assert pair["prompt"] == expert["conversations"][:5]  # instruction, OK, task, a1, observation after a1
    assert actions_of(pair["chosen"]) == ["a2", "a3"]
    assert actions_of(pair["rejected"]) == ["x2", "x3", "x4", "x5", "x6", "x7", "x8"]  # 2 + 5 agent turns
    assert pair["rejected"][-1]["from"] == "gpt"


def test_self_play_pairs_prefer_the_better_sample_of_each_task():
    from eto_ref.pairs import self_play_pairs

    good, bad = episode("a", ["a1", "a2"], 1.0), episode("a", ["z1"], 0.25)
    same1, same2 = episode("b", ["b1"], 0.5), episode("b", ["b2"], 0.5)
    pairs, stats = self_play_pairs([[good, same1], [bad, same2]])
    assert stats.tie == 1 and stats.lose == 1 and len(pairs) == 1  # "lose": the worse run is the rejected one
    assert actions_of(pairs[0]["chosen"]) == ["a1", "a2"] and actions_of(pairs[0]["rejected"]) == ["z1"]
    assert pairs[0]["prompt"] == good["conversations"][:3]

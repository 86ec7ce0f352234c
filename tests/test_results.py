"""eto_ref/results.py: the results table, the seeds report (with paired differences), the plot."""

import json

import pytest

from eto_ref import behaviour, results
from eto_ref.run_dir import RUN_FORMAT

from eto_ref.results import (
    differences_from_sft,
    finished_rows,
    paired_difference,
    per_task_rewards,
    report_seeds,
    results_table,
    seeds_table,
    verdict,
    write_reward_plot,
)


def test_results_table_has_the_papers_shape():
    rows = {"SFT": {"test_seen": 50.0, "test_unseen": 40.25}, "RFT": {"test_seen": 55.5},
            "ETO-iter-1": {"test_seen": 60.0, "test_unseen": 45.0}}
    table = results_table(rows, ("test_seen", "test_unseen"))
    assert table.splitlines() == ["| method | test_seen | test_unseen |", "|---|---:|---:|",
                                  "| SFT | 50.0 | 40.2 |", "| RFT | 55.5 | - |", "| ETO-iter-1 | 60.0 | 45.0 |"]


def test_reward_plot_has_one_point_per_iteration_and_split(tmp_path):
    rows = {"SFT": {"test_seen": 10.0, "test_unseen": 5.0}, "RFT": {"test_seen": 99.0, "test_unseen": 99.0},
            "ETO-iter-1": {"test_seen": 20.0, "test_unseen": 8.0}, "ETO-iter-2": {"test_seen": 30.0}}
    svg = write_reward_plot(rows, ("test_seen", "test_unseen"), tmp_path / "plot.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert svg.count("<circle") == 3 + 2  # SFT + 2 iterations seen, SFT + 1 iteration unseen; RFT not plotted


def test_seeds_table_lists_each_seed_and_the_mean():
    per_seed = {0: {"SFT": {"test_seen": 10.0, "test_unseen": 20.0}, "ETO-iter-1": {"test_seen": 30.0}},
                1: {"SFT": {"test_seen": 20.0, "test_unseen": 40.0}, "ETO-iter-1": {"test_seen": 50.0}}}
    lines = seeds_table(per_seed, ("test_seen", "test_unseen")).splitlines()
    assert lines[0] == ("| method | test_seen s0 | test_seen s1 | **test_seen mean** | test_unseen s0 | "
                        "test_unseen s1 | **test_unseen mean** |")
    assert lines[2] == "| SFT | 10.0 | 20.0 | **15.0** | 20.0 | 40.0 | **30.0** |"
    assert lines[3] == "| ETO-iter-1 | 30.0 | 50.0 | **40.0** | - | - | - |"  # no mean over missing seeds


def conversation(steps, task: str = "task") -> list[dict]:
    """An episode's turns as explore.py writes them: the opening exchange, the task, then each
    (reply, observation) step."""
    turns = [{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": task}]
    for reply, observation in steps:
        turns += [{"from": "gpt", "value": reply}, {"from": "human", "value": observation}]
    return turns


def _summary(path, reward, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps({"average_reward": reward, **extra}))


def test_report_reads_only_finished_phases(tmp_path):
    """--report: rows come from the summaries on disk; an unfinished phase is absent, its cells '-'."""
    splits = ("test_seen", "test_unseen")
    full, partial = tmp_path / "seed-0", tmp_path / "seed-1"
    for split, r in zip(splits, (40.0, 20.0)):
        _summary(full / "sft" / f"eval-{split}", r)
        _summary(full / "rft" / f"eval-{split}", r + 1)
        _summary(full / "best-of-n" / split, r + 10, n=4)
    (full / "eto").mkdir()
    (full / "eto" / "summary.json").write_text(json.dumps([{"iteration": 1, "test_seen": 44.0, "test_unseen": 18.0}]))
    _summary(partial / "sft" / "eval-test_seen", 30.0)  # test_unseen still running: no summary yet

    assert finished_rows(full, splits) == {"SFT": {"test_seen": 40.0, "test_unseen": 20.0},
                                           "RFT": {"test_seen": 41.0, "test_unseen": 21.0},
                                           "Best-of-4": {"test_seen": 50.0, "test_unseen": 30.0},
                                           "ETO-iter-1": {"test_seen": 44.0, "test_unseen": 18.0}}
    assert finished_rows(partial, splits) == {"SFT": {"test_seen": 30.0}}

    replies = ["Thought: a\nAction: look around", "no action here", "Action: wait", "Action: wait"]
    observations = ["Observation: o", "Observation: Invalid format.",
                    "Observation: No known action matches that input.", "Observation: You wait."]
    turns = conversation(zip(replies, observations))
    with open(full / "sft" / "eval-test_seen" / "trajectories.jsonl", "w") as f:
        f.write(json.dumps({"id": "science/test_seen/0", "conversations": turns, "reward": 0.4}) + "\n")

    table = report_seeds(tmp_path, [0, 1], splits, "science", tmp_path / "results" / "t.md")
    rewards, formats = table.split("\n\n**science: replies without a parsable action")
    lines = {line.split(" | ")[0].strip("| "): line for line in rewards.splitlines() if line.startswith("| ")}
    assert lines["SFT"] == "| SFT | 40.0 | 30.0 | **35.0** | 20.0 | - | - |"  # a mean needs every seed
    assert lines["ETO-iter-1"] == "| ETO-iter-1 | 44.0 | - | - | 18.0 | - | - |"
    formats, unmatched = formats.split("\n\n**science: actions the environment could not match")
    format_lines = [line for line in formats.splitlines() if line.startswith("| SFT")]
    assert format_lines == ["| SFT | 25.0 | - | - | - | - | - |"]  # 1 reply of 4; no trajectories file: "-"
    unmatched_lines = [line for line in unmatched.splitlines() if line.startswith("| SFT")]
    assert unmatched_lines == ["| SFT | 33.3 | - | - | - | - | - |"]  # 1 of the 3 well-formed actions
    assert (tmp_path / "results" / "t.md").read_text() == table + "\n"
    assert json.loads((tmp_path / "results" / "t.json").read_text())["rows"]["1"] == {"SFT": {"test_seen": 30.0}}


def test_valid_column_is_read_like_the_test_splits(tmp_path):
    _summary(tmp_path / "sft" / "eval-valid", 33.0)
    _summary(tmp_path / "sft" / "eval-test_seen", 40.0)
    assert finished_rows(tmp_path, ("valid", "test_seen", "test_unseen")) == {"SFT": {"valid": 33.0,
                                                                                   "test_seen": 40.0}}


def test_paired_difference_hand_computed():
    """Tasks t1..t3, two seeds each: per-task means of a - b are 0.5, 0.0, 0.25 (x100: 50, 0, 25);
    mean 25, sample sd = sqrt((25^2 + 25^2 + 0^2) / 2) = 25, se = 25 / sqrt(3)."""
    a = {"t1": [1.0, 1.0], "t2": [0.5, 0.5], "t3": [0.5, 0.0], "only-a": [1.0]}
    b = {"t1": [0.5, 0.5], "t2": [0.5, 0.5], "t3": [0.0, 0.0]}
    d = paired_difference(a, b)
    assert d["tasks"] == 3
    assert d["mean"] == pytest.approx(25.0)
    assert d["se"] == pytest.approx(25.0 / 3 ** 0.5)
    assert paired_difference({"t1": [1.0]}, {"t1": [0.0]}) is None  # one task: no standard error


def test_differences_from_sft_pool_seeds_per_task(tmp_path):
    """Per-task rewards come from the trajectory files of each seed's evaluations."""
    for seed, (sft, eto) in enumerate([((0.0, 1.0), (1.0, 1.0)), ((0.0, 0.0), (1.0, 0.0))]):
        for name, rewards in (("sft", sft), ("eto/iter-1", eto)):
            run = tmp_path / f"seed-{seed}" / name / "eval-test_seen"
            _summary(run, 100 * sum(rewards) / 2)
            with open(run / "trajectories.jsonl", "w") as f:
                for i, r in enumerate(rewards):
                    f.write(json.dumps({"id": f"t{i}", "conversations": [], "reward": r}) + "\n")
    per_seed = {s: per_task_rewards(tmp_path / f"seed-{s}", ("test_seen",)) for s in (0, 1)}
    assert per_seed[0]["SFT"]["test_seen"] == {"t0": 0.0, "t1": 1.0}
    diffs = differences_from_sft(per_seed, ("test_seen",))
    # t0: ETO 1, 1 vs SFT 0, 0 -> +100; t1: ETO 1, 0 vs SFT 1, 0 -> 0. Mean 50, sd 70.7, se 50.
    d = diffs["ETO-iter-1"]["test_seen"]
    assert (d["mean"], d["tasks"]) == (pytest.approx(50.0), 2) and d["se"] == pytest.approx(50.0)


def test_a_seed_without_the_method_adds_nothing_to_the_sft_side():
    """Seed 1 has finished SFT but not ETO: the difference is seed 0's alone, not ETO over seed 0
    minus SFT over seeds 0 and 1."""
    per_seed = {0: {"SFT": {"test_seen": {"t0": 0.0, "t1": 0.5, "t2": 1.0}},
                    "ETO-iter-1": {"test_seen": {"t0": 1.0, "t1": 0.5, "t2": 1.0}}},
                1: {"SFT": {"test_seen": {"t0": 1.0, "t1": 1.0, "t2": 1.0}}}}
    d = differences_from_sft(per_seed, ("test_seen",))["ETO-iter-1"]["test_seen"]
    # differences 100, 0, 0: mean 33.33, sd 57.74, se 33.33 (pooling seed 1's SFT would give 0, -25, 0)
    assert d["mean"] == pytest.approx(100 / 3) and d["se"] == pytest.approx(100 / 3)
    assert (d["tasks"], d["seeds"]) == (3, [0])
    table = results.differences_table({"ETO-iter-1": {"test_seen": d}}, ("test_seen",), all_seeds=[0, 1])
    assert "+33.3 ± 33.3 (3, seeds 0)" in table


def test_compare_pairs_the_runs_task_by_task(tmp_path):
    def folder(name, rewards):
        (tmp_path / name).mkdir()
        turns = conversation([("Action: wait", "Observation: You wait.")])
        lines = [json.dumps({"id": t, "conversations": turns, "reward": r, "steps": 1, "reason": "done"})
                 for t, r in rewards.items()]
        (tmp_path / name / "trajectories.jsonl").write_text("\n".join(lines) + "\n")
        return tmp_path / name

    a = folder("a", {"t0": 0.2, "t1": 0.5, "t2": 1.0})
    b = folder("b", {"t0": 0.4, "t1": 0.5, "t2": 0.6, "t3": 1.0})  # t3: not in the first run, not paired
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            results.main(["compare", str(a), str(b), "--env", "science"]).splitlines()[2:]}
    # differences 20, 0, -40 (x100): mean -6.67, sd 30.55, se 17.64
    assert rows[str(b)][2:4] == ["62.5", "-6.7 ± 17.6"] and rows[str(a)][2:4] == ["56.7", "-"]
    with pytest.raises(SystemExit):
        results.main(["compare", str(a), str(tmp_path / "missing"), "--env", "science"])


def compare_folder(path, env, replies):
    """An evaluation folder of one episode on task t0 (reward 0) whose agent turns are `replies`,
    with the run.json explore.py writes (identity.env) unless env is None."""
    path.mkdir()
    turns = conversation([(reply, f"Observation: {observation}") for reply, observation in replies])
    record = {"id": "t0", "conversations": turns, "reward": 0.0, "steps": len(replies), "reason": "max_steps"}
    (path / "trajectories.jsonl").write_text(json.dumps(record) + "\n")
    if env is not None:
        (path / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "identity": {"env": env}}))
    return path


def test_compare_counts_unmatched_actions_by_the_environment_its_folders_ran(tmp_path):
    """Each environment words an unmatched action its own way: household's "Nothing happened." is
    unmatched there and an ordinary observation to science's rules. Without --env the folders'
    run.json decides; a household folder read by science's rules would print 0% without a word."""
    import envs

    household = envs.env_class("household").unmatched_action
    replies = [("Action: go to shelf 9", household), ("Action: look", "You are in the middle of a room.")]
    a = compare_folder(tmp_path / "a", "household", replies)
    b = compare_folder(tmp_path / "b", "household", replies)

    def unmatched(argv):  # the "unmatched actions %" column of folder a's row
        return results.main(["compare", str(a), str(b), *argv]).splitlines()[2].split(" | ")[6]

    assert unmatched([]) == unmatched(["--env", "household"]) == "50.0"  # 1 of its 2 actions
    with pytest.raises(SystemExit):  # --env naming another environment than the folders ran: refused
        results.main(["compare", str(a), str(b), "--env", "science"])


def test_compare_refuses_to_guess_the_environment(tmp_path):
    """Folders of two environments, or a folder without run.json and no --env: refused, naming them."""
    a = compare_folder(tmp_path / "a", "household", [("Action: look", "x")])
    b = compare_folder(tmp_path / "b", "science", [("Action: look", "x")])
    c = compare_folder(tmp_path / "c", None, [("Action: look", "x")])
    with pytest.raises(ValueError, match="different environments"):
        results.compare_runs([a, b])
    with pytest.raises(ValueError, match=f"{c}: give --env"):
        results.compare_runs([a, c])
    assert "| 1 |" in results.compare_runs([a, c], "household")  # a run.json-less folder, env given


def test_purchases_replays_each_webshop_episode_and_names_what_it_missed(tmp_path):
    """The expert's episode is exact. Buying the top search result without choosing its options misses
    the option (every goal has one), and the price exactly when that product costs more than the cap:
    on train/0 it does, on train/3 it does not (read here from the catalog, not from the replay).
    A reply without an action is skipped, as the agent skips it; an episode that never buys says so."""
    import envs

    env = envs.make_env("webshop")

    def record(task, actions):
        turns = conversation([(a, "Observation:\n...") for a in actions], task="t")
        return {"id": task, "conversations": turns, "reward": 0.0, "steps": len(actions), "reason": "done"}

    def hasty(task):
        """search the expert's keywords, open the top result, buy it."""
        env.reset(task)
        goal = env.task["goal"]
        query = " ".join(goal["attributes"] + [goal["type"]])
        top = env.search(query)[0]
        actions = [f"Thought: I will search.\nAction: search[{query}]", "a reply with no action",
                   f"Action: click[{top['id']}]", "Action: click[Buy Now]"]
        return record(task, actions), top["price"] > goal["price"]

    over_cap, over = hasty("webshop/train/0")
    under_cap, under = hasty("webshop/train/3")
    assert (over, under) == (True, False)
    assert behaviour.replay_purchase(env, over_cap) == {"missed": ["option", "price"], "first_rank": 0,
                                                      "first_fits": False, "first_left": False}
    assert behaviour.replay_purchase(env, under_cap)["missed"] == ["option"]
    expert = env.expert_trajectory("webshop/train/0")
    assert behaviour.replay_purchase(env, expert)["missed"] == []
    # the expert opens the first result whose title and price fit; on train/0 it is the third, which lacks
    # the requested size, so the expert goes back from it (`click[< Prev]`, its third action)
    env.reset("webshop/train/0")
    goal = env.task["goal"]
    ranked = env.search(" ".join(goal["attributes"] + [goal["type"]]))
    fit = next(i for i, p in enumerate(ranked) if p["price"] <= goal["price"] and p["type"] == goal["type"]
               and set(goal["attributes"]) <= set(p["attributes"]))
    assert fit == 2
    assert {k: v for k, v in behaviour.replay_purchase(env, expert).items() if k != "missed"} == {
        "first_rank": 2, "first_fits": True, "first_left": True}
    expert_actions = [t["value"].split("Action: ")[-1] for t in expert["conversations"][3:] if t["from"] == "gpt"]
    assert expert_actions[2] == "click[< Prev]"
    # one that goes back from the top result and opens it again before buying it has left it once
    turns = under_cap["conversations"]  # 3 instruction turns, then search, no action, top result, buy
    back = [{"from": "gpt", "value": "Action: click[< Prev]"}, {"from": "human", "value": "Observation:\n..."}]
    again = turns[:9] + back + turns[7:]
    wanderer = {**under_cap, "conversations": again}
    assert behaviour.replay_purchase(env, wanderer) == {"missed": ["option"], "first_rank": 0, "first_fits": True,
                                                      "first_left": True}
    idle = record("webshop/train/0", ["Action: click[Next >]"])
    assert behaviour.replay_purchase(env, idle) == {"missed": ["never bought"], "first_rank": None, "first_fits": None,
                                                  "first_left": None}

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "trajectories.jsonl").write_text(
        "\n".join(json.dumps(r) for r in (expert, over_cap, under_cap, idle, wanderer)) + "\n")
    row = results.main(["purchases", str(folder)]).splitlines()[2].split(" | ")
    # 5 episodes: exact 1, never bought 1, price missed 1, option missed 3, attribute 0, type 0;
    # the top result opened first by the two hasty ones and the wanderer; a product that fits first by
    # the expert and train/3's two (its top result is under the cap, and has the attributes: they are
    # the query); went back from it: the expert and the wanderer
    assert row[1:] == ["5", "20.0", "20.0", "20.0", "60.0", "0.0", "0.0", "60.0", "60.0", "40.0 |"]
    science = tmp_path / "science"
    science.mkdir()
    (science / "trajectories.jsonl").write_text(json.dumps({**idle, "id": "science/train/0"}) + "\n")
    with pytest.raises(ValueError, match=r"science/trajectories.jsonl: record 1 \('science/train/0'\): not a webshop"):
        behaviour.replay_folder(env, science / "trajectories.jsonl")
    with pytest.raises(SystemExit):
        results.main(["purchases", str(science)])


def test_pairs_table_counts_where_the_sides_part(tmp_path):
    """Three pairs written by hand: the failed side parts from the expert's at action 2, at action 3, and
    never (it stops after the expert's first action); it ends with the expert's last action once and
    repeats an action once. A reply without an action is not an action."""
    prompt = [{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": "t"}]

    def side(*replies):
        turns = []
        for r in replies:
            turns += [{"from": "gpt", "value": r}, {"from": "human", "value": "Observation: ..."}]
        return turns[:-1]

    expert = side("Action: search[a]", "Action: click[B1]", "Action: click[Buy Now]")
    pairs = [{"id": "p0", "prompt": prompt, "chosen": expert,
              "rejected": side("Action: search[a]", "no action here", "Action: click[B2]", "Action: click[Buy Now]")},
             {"id": "p1", "prompt": prompt, "chosen": expert,
              "rejected": side("Action: search[a]", "Action: click[B1]", "Action: click[x]", "Action: Click[X] ")},
             {"id": "p2", "prompt": prompt, "chosen": expert, "rejected": side("Action: search[a]")}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    assert behaviour.parting_action(["a", "b"], ["a", "c", "d"]) == 2
    assert behaviour.parting_action(["a", "b"], ["a"]) is None
    row = results.main(["pairs", str(path)]).splitlines()[2].split(" | ")
    # the expert's action where they part: click[B1] (p0, action 2), click[Buy Now] (p1, action 3);
    # actions: chosen 3, 3, 3 -> 3.0; rejected 3, 4, 1 -> 2.7; ends as chosen: p0 (1 of 3);
    # repeats: p1's click[x] then Click[X] (case and spaces aside)
    assert row[1:] == ["3", "2: 1, 3: 1, never: 1", "click[B1]: 1, click[Buy Now]: 1", "3.0 / 2.7", "33.3", "33.3 |"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{**pairs[0], "chosen": []}]))
    with pytest.raises(SystemExit):
        results.main(["pairs", str(broken)])
    with pytest.raises(SystemExit):
        results.main(["pairs", str(tmp_path / "missing.json")])


def _eval_folder(path, rewards):
    """An explore.py --out folder with one finished episode per task."""
    path.mkdir(parents=True)
    lines = [json.dumps({"id": t, "conversations": [], "reward": r}) for t, r in rewards.items()]
    (path / "trajectories.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_seeds_pools_each_tasks_difference_over_the_seeds(tmp_path):
    """Seed 0: differences (x100) +100, 0, 0 -> +33.3 ± 33.3. Seed 1: 0, -100, 0 (t3 run by its baseline
    only, so not paired) -> -33.3 ± 33.3. Pooled per task: +50, -50, 0 -> mean 0, sd 50, se 50 / sqrt(3)."""
    bases = [_eval_folder(tmp_path / "sft-0", {"t0": 0.0, "t1": 0.5, "t2": 1.0}),
             _eval_folder(tmp_path / "sft-1", {"t0": 1.0, "t1": 1.0, "t2": 1.0, "t3": 0.0})]
    others = [_eval_folder(tmp_path / "dpo-0", {"t0": 1.0, "t1": 0.5, "t2": 1.0}),
              _eval_folder(tmp_path / "dpo-1", {"t0": 1.0, "t1": 0.0, "t2": 1.0})]
    table = results.main(["seeds", "--base", *map(str, bases), "--other", *map(str, others)])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:5]]
    assert [r[5:7] for r in rows[:2]] == [["+33.3 ± 33.3", "3"], ["-33.3 ± 33.3", "3"]]
    assert [r[:3] for r in rows[:2]] == [["1", str(bases[0]), str(others[0])], ["2", str(bases[1]), str(others[1])]]
    assert rows[1][3:5] == ["75.0", "66.7"]  # each folder's own average, over all the tasks it ran
    assert rows[2][5] == f"**+0.0 ± {50 / 3 ** 0.5:.1f}**" and rows[2][6] == "3"
    with pytest.raises(SystemExit):  # one baseline per setting folder
        results.main(["seeds", "--base", str(bases[0]), "--other", *map(str, others)])
    with pytest.raises(SystemExit):
        results.main(["seeds", "--base", str(bases[0]), "--other", str(tmp_path / "missing")])


def test_verdict_says_in_words_whether_each_difference_is_beyond_two_standard_errors():
    diffs = {"ETO-iter-1": {"test_seen": {"mean": 0.4, "se": 1.3}, "test_unseen": {"mean": 6.7, "se": 2.0}},
             "RFT": {"test_seen": {"mean": -5.0, "se": 2.0}, "test_unseen": {"mean": 4.0, "se": 2.0}}}
    lines = verdict(diffs, ("test_seen", "test_unseen")).splitlines()
    assert lines == [
        "ETO-iter-1: test_seen +0.4 ± 1.3, within two standard errors of SFT (no clear difference); "
        "test_unseen +6.7 ± 2.0, above SFT by more than two standard errors.",
        "RFT: test_seen -5.0 ± 2.0, below SFT by more than two standard errors; "
        "test_unseen +4.0 ± 2.0, within two standard errors of SFT (no clear difference).",  # 4.0 = 2 SE: not beyond
    ]


def test_the_online_baselines_are_rows_per_iteration(tmp_path):
    """OUT/ppo-online/iter-k and OUT/grpo/iter-k are table rows, per-task rewards included, beside ETO's."""
    for folder, reward in (("sft", 0.0), ("ppo-online/iter-2", 0.5), ("grpo/iter-1", 1.0), ("eto/iter-1", 1.0)):
        run = tmp_path / folder / "eval-test_seen"
        _summary(run, 100 * reward)
        (run / "trajectories.jsonl").write_text(json.dumps({"id": "t0", "conversations": [], "reward": reward}) + "\n")
    for loop, it, reward in (("ppo-online", 2, 50.0), ("grpo", 1, 100.0), ("eto", 1, 100.0)):
        (tmp_path / loop / "summary.json").write_text(json.dumps([{"iteration": it, "test_seen": reward}]))
    assert finished_rows(tmp_path, ("test_seen",)) == {
        "SFT": {"test_seen": 0.0}, "PPO-online-iter-2": {"test_seen": 50.0}, "GRPO-iter-1": {"test_seen": 100.0},
        "ETO-iter-1": {"test_seen": 100.0}}
    rewards = per_task_rewards(tmp_path, ("test_seen",))
    assert {name: r["test_seen"]["t0"] for name, r in rewards.items()} == {"SFT": 0.0, "PPO-online-iter-2": 0.5,
                                                                           "GRPO-iter-1": 1.0, "ETO-iter-1": 1.0}


def _metrics(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"stage": "ppo", **r}) + "\n" for r in records))


def test_costs_sum_the_steps_of_a_finished_stage(tmp_path):
    """Hand-made log: 2 steps of 100 and 250 tokens (an eval record has none), from t=1000 s to t=1120 s."""
    _metrics(tmp_path / "ppo", [{"step": 0, "event": "start", "total_steps": 2, "train_episodes": 192, "time": 1000},
                                {"step": 1, "tokens": 100.0, "step_time": 25.0, "time": 1030},
                                {"step": 1, "eval_loss": 0.5, "time": 1035},
                                {"step": 2, "tokens": 250.0, "step_time": 80.0, "time": 1119},
                                {"step": 2, "event": "done", "final": "x", "time": 1120}])
    assert results.stage_cost(tmp_path / "ppo") == {"stage": "ppo", "trained_on": "192 episodes", "steps": 2,
                                                    "tokens": 350, "minutes": 2.0}
    assert "| ppo | 192 episodes | 2 | 350 | 2.0 |" in results.main(["costs", str(tmp_path / "ppo")])


def test_costs_of_a_resumed_stage_leave_out_the_time_after_its_last_kept_record(tmp_path):
    """Killed after step 1 (t=60 s), resumed at t=200 s: 60 s + 70 s."""
    _metrics(tmp_path / "dpo", [{"step": 0, "event": "start", "total_steps": 2, "train_pairs": 11, "time": 0},
                                {"step": 1, "tokens": 10.0, "step_time": 50.0, "time": 60},
                                {"step": 1, "event": "resume", "checkpoint": "c", "time": 200},
                                {"step": 2, "tokens": 20.0, "step_time": 50.0, "time": 260},
                                {"step": 2, "event": "done", "final": "x", "time": 270}])
    cost = results.stage_cost(tmp_path / "dpo")
    assert (cost["trained_on"], cost["tokens"], cost["minutes"]) == ("11 pairs", 30, 130 / 60)


def test_costs_refuse_an_unfinished_stage(tmp_path):
    _metrics(tmp_path / "a", [{"step": 0, "event": "start", "total_steps": 2, "train_episodes": 4, "time": 0},
                              {"step": 1, "tokens": 100.0, "step_time": 30.0, "time": 30}])
    with pytest.raises(ValueError, match="not finished"):
        results.stage_cost(tmp_path / "a")
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        results.stage_cost(tmp_path / "missing")


def test_costs_of_a_real_sft_run_count_every_epoch_of_its_tokens(tiny_model, data_files, tmp_path):
    """The loss tokens of all steps are the start record's train_tokens once per epoch."""
    from eto_ref.sft import run_sft
    from tests.helpers import sft_config

    run_sft(sft_config(tiny_model, data_files, tmp_path, epochs=2))
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    cost = results.stage_cost(tmp_path)
    assert cost["tokens"] == 2 * start["train_tokens"] > 0
    assert (cost["stage"], cost["trained_on"], cost["steps"]) == ("sft", f"{start['train_examples']} examples",
                                                                   start["total_steps"])


def test_curve_adds_up_episodes_and_minutes_over_each_loops_iterations(tmp_path):
    """ETO's loop ran 2 iterations (valid too), GRPO's 1; minutes are each row's phase seconds, summed."""
    (tmp_path / "eto").mkdir()
    (tmp_path / "grpo").mkdir()
    (tmp_path / "eto" / "summary.json").write_text(json.dumps([
        {"iteration": 1, "episodes": 192, "train_reward": 96.2, "seconds": {"explore": 420, "dpo": 60, "evaluate": 600},
         "valid": 96.0, "test_seen": 96.0, "test_unseen": 74.0},
        {"iteration": 2, "episodes": 192, "train_reward": 97.0, "seconds": {"explore": 400, "dpo": 20, "evaluate": 580},
         "valid": 96.5, "test_seen": 96.4, "test_unseen": 75.0}]))
    (tmp_path / "grpo" / "summary.json").write_text(json.dumps([
        {"iteration": 1, "episodes": 192, "train_reward": 90.0, "seconds": {"collect": 480, "grpo": 1200},
         "test_seen": 95.4, "test_unseen": 73.0}]))
    lines = results.curve_table([tmp_path / "eto", tmp_path / "grpo"]).splitlines()
    assert lines[2:] == [f"| {tmp_path / 'eto'} | 1 | 192 | 18 | 96.2 | 96.0 | 96.0 | 74.0 |",
                         f"| {tmp_path / 'eto'} | 2 | 384 | 35 | 97.0 | 96.5 | 96.4 | 75.0 |",
                         f"| {tmp_path / 'grpo'} | 1 | 192 | 28 | 90.0 | - | 95.4 | 73.0 |"]


def test_curve_refuses_a_row_without_its_episodes(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps([{"iteration": 1, "train_reward": 96.2, "seconds": {}}]))
    with pytest.raises(ValueError, match="row 0 has no episodes"):
        results.curve_table([tmp_path])

"""eto_ref/exploration.py: runs resume after being killed (nothing lost or repeated), refuse other settings and
locked directories, keep every ended episode; explore.py refuses settings out of range."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import eto_ref.exploration as exploration
from envs import make_env
from eto_ref.agent import (
    AgentConfig,
)
from eto_ref.exploration import ExploreConfig, explore, explore_and_pair
from eto_ref.model import ModelConfig, Transformer
from eto_ref.sampler import SamplingConfig
from eto_ref.tiny import environment_texts
from eto_ref.tokenizer import train_bpe_tokenizer
from tests.helpers import HOUSEHOLD_TASKS, CrashingEnv, scripted_agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=30), 500, tmp_path_factory.mktemp("t"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    return model, tok


def config(tmp_path, limit=4):
    return ExploreConfig(env="household", split="train", out_dir=str(tmp_path), limit=limit,
                         agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=8), batch_size=1, max_len=4096, max_steps=2))


def test_killed_exploration_resumes_without_loss_or_repeats(agent, tmp_path, monkeypatch):
    model, tok = agent
    uninterrupted = explore(model, tok, config(tmp_path / "full"), progress=False)

    real = exploration.run_episodes

    def killed_after_two(*args, on_episode_end=None, **kw):
        count = [0]

        def callback(episode):
            on_episode_end(episode)
            count[0] += 1
            if count[0] == 2:
                raise KeyboardInterrupt  # the process is killed here
        return real(*args, on_episode_end=callback, **kw)

    monkeypatch.setattr(exploration, "run_episodes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        explore(model, tok, config(tmp_path / "resumed"), progress=False)
    lines = (tmp_path / "resumed" / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 2
    monkeypatch.setattr(exploration, "run_episodes", real)
    resumed = explore(model, tok, config(tmp_path / "resumed"), progress=False)
    lines = (tmp_path / "resumed" / "trajectories.jsonl").read_text().splitlines()
    ids = [json.loads(l)["id"] for l in lines]
    assert len(ids) == len(set(ids)) == 4
    assert resumed == uninterrupted  # greedy decoding: the same trajectories as an uninterrupted run


def test_explore_and_pair_writes_official_pairs(agent, tmp_path):
    model, tok = agent
    path, summary = explore_and_pair(model, tok, config(tmp_path, limit=3), progress=False)
    pairs = json.loads(path.read_text())
    assert summary["episodes"] == 3 and summary["lose"] + summary["win"] + summary["tie"] + summary["dropped"] == 3
    for p in pairs:
        assert set(p) == {"id", "prompt", "chosen", "rejected"}
        assert p["prompt"][1] == {"from": "gpt", "value": "OK"} and p["prompt"][-1]["from"] == "human"
        assert p["chosen"][-1]["from"] == "gpt" and p["rejected"][-1]["from"] == "gpt"
    from eto_ref.trajectory import load_pairs
    assert len(load_pairs(path, on_error="raise")) == len(pairs)


def test_split_slice_start_and_limit():
    ids = [f"t/{i}" for i in range(10)]
    assert exploration.split_slice(ids) == ids
    assert exploration.split_slice(ids, 0, 3) == ["t/0", "t/1", "t/2"]
    assert exploration.split_slice(ids, 7) == ["t/7", "t/8", "t/9"]
    assert exploration.split_slice(ids, 8, 5) == ["t/8", "t/9"]  # a limit past the end stops at the end
    with pytest.raises(ValueError, match="past the end"):
        exploration.split_slice(ids, 10, 1)
    with pytest.raises(ValueError, match=">= 0"):
        exploration.split_slice(ids, -1)


def test_explore_with_start_runs_only_that_slice(agent, tmp_path):
    """--start 5 --limit 2 is train[5:7]: a validation slice, resumable like any run."""
    model, tok = agent
    cfg = config(tmp_path, limit=2)
    cfg.start = 5
    records = explore(model, tok, cfg, progress=False)
    assert [r["id"] for r in records] == ["household/train/5", "household/train/6"]


def test_summary_counts_replies_without_an_action():
    def episode(*replies, reward=0.0):
        turns = [{"from": "human", "value": "instruction"}, {"from": "gpt", "value": "OK"},
                 {"from": "human", "value": "Your task is to boil water."}]
        for reply in replies:
            turns += [{"from": "gpt", "value": reply}, {"from": "human", "value": "Observation: ..."}]
        return {"id": "t", "conversations": turns, "reward": reward, "steps": len(replies), "reason": "max_steps"}

    records = [episode("Thought: go.\nAction: look around", "Thought: plant is in the stove"),
               episode("Action:", reward=1.0)]  # an empty action is no action
    assert exploration.invalid_format_rate(records) == pytest.approx(100 * 2 / 3)  # "OK" is not a reply
    summary = exploration.summarize(records, "science", "test_seen")
    assert summary["invalid_format_rate"] == pytest.approx(66.6667, abs=1e-3)
    assert (summary["average_reward"], summary["success_rate"], summary["mean_steps"]) == (50.0, 50.0, 1.5)
    assert exploration.invalid_format_rate([]) == 0.0


def test_summary_counts_actions_the_environment_could_not_match_and_repeats():
    def episode(*steps):
        turns = [{"from": "human", "value": "instruction"}, {"from": "gpt", "value": "OK"},
                 {"from": "human", "value": "Your task is to boil water."}]
        for reply, observation in steps:
            turns += [{"from": "gpt", "value": reply}, {"from": "human", "value": observation}]
        return {"id": "t", "conversations": turns, "reward": 0.0, "steps": len(steps), "reason": "max_steps"}

    nope = "Observation: No known action matches that input, or the object is not here."
    records = [episode(("Action: look around", "Observation: This room is called the kitchen."),
                       ("Action: activate stove", nope),
                       ("Action: Activate stove ", nope),  # the same action again (case and spaces aside)
                       ("Thought: the stove is on.", "Observation: Invalid format.")),  # no action: not counted
               episode(("Action: wait", "Observation: You wait.")),
               episode()]
    # 4 actions, 2 unmatched; of the 2 action-to-action transitions (both in the first episode), 1 repeats
    assert exploration.unmatched_action_rate(records, "No known action matches") == 50.0
    assert exploration.repeated_action_rate(records) == 50.0
    summary = exploration.summarize(records, "science", "train")
    assert summary["unmatched_action_rate"] == summary["repeated_action_rate"] == 50.0
    assert exploration.unmatched_action_rate([], "x") == exploration.repeated_action_rate([]) == 0.0


def test_a_rerun_with_other_settings_is_refused_naming_them_and_no_resume_starts_over(agent, tmp_path):
    """run.json records what made the episodes; another env seed or sampling must not resume them."""
    from dataclasses import replace

    from eto_ref.run_dir import RunError

    model, tok = agent
    first = explore(model, tok, config(tmp_path, limit=2), progress=False)
    before = (tmp_path / "trajectories.jsonl").read_text()
    with pytest.raises(RunError, match=r"made with other settings: env_seed: 0 then, 7 now.*--no-resume"):
        explore(model, tok, replace(config(tmp_path, limit=2), env_seed=7), progress=False)
    other_agent = replace(config(tmp_path).agent, sampling=SamplingConfig(max_new_tokens=8, temperature=0.5), seed=1)
    with pytest.raises(RunError, match=r"agent\.sampling\.temperature: 0\.0 then, 0\.5 now"):
        explore(model, tok, replace(config(tmp_path, limit=2), agent=other_agent), progress=False)
    assert (tmp_path / "trajectories.jsonl").read_text() == before  # nothing overwritten
    larger = explore(model, tok, config(tmp_path, limit=3), progress=False)  # same settings, more tasks: extends
    assert larger[:2] == first and len(larger) == 3
    fresh = explore(model, tok, replace(config(tmp_path, limit=2), env_seed=7, resume=False), progress=False)
    assert len(fresh) == 2 and fresh[0]["id"] == first[0]["id"] and fresh != first  # other tasks' contents


def test_a_second_run_on_a_locked_directory_refuses_and_a_stale_lock_is_taken_over(agent, tmp_path):
    import subprocess
    import sys

    from eto_ref.run_dir import RunError

    model, tok = agent
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(sleeper.pid))  # a live run holds the directory
        with pytest.raises(RunError, match=f"another run \\(pid {sleeper.pid}\\) is writing here"):
            explore(model, tok, config(tmp_path, limit=1), progress=False)
        assert not (tmp_path / "trajectories.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    records = explore(model, tok, config(tmp_path, limit=1), progress=False)  # its owner is gone: stale
    assert len(records) == 1 and not (tmp_path / ".lock").exists()  # released at exit


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
    (["--limit", "0"], "--limit: must be >= 1, got 0"),
    (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["--top-p", "1.5"], "--top-p: must be > 0 and <= 1, got 1.5"),
])
def test_explore_cli_refuses_settings_out_of_range(flags, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "explore.py"), "--model", "tiny", *flags], cwd=root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_exploration_keeps_every_finished_episode_when_an_environment_crashes(tmp_path, monkeypatch):
    """The crashed episode and the others are all in trajectories.jsonl, each with its end reason."""
    import envs
    from eto_ref.exploration import ExploreConfig, explore

    made = []

    def make(name, seed=0, **kw):
        # made[0]: the run's identity (env_options), made[1]: the task list, made[2]: the first episode's
        made.append(CrashingEnv(crash_at=1) if len(made) == 2 else make_env(name, seed=seed))
        return made[-1]

    model, tok = scripted_agent("Thought: look around.\nAction: look", tmp_path / "tok")  # before: it may make envs
    monkeypatch.setattr(envs, "make_env", make)
    cfg = ExploreConfig(env="household", split="train", out_dir=str(tmp_path / "out"), limit=3,
                        agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=3, max_len=4096, max_steps=2))
    records = explore(model, tok, cfg, progress=False)
    on_disk = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in on_disk) == sorted(HOUSEHOLD_TASKS) and len(on_disk) == 3
    reasons = {r["id"]: r["reason"] for r in records}
    assert reasons[HOUSEHOLD_TASKS[0]].startswith("env_error: RuntimeError: simulator crashed at step 1")
    assert reasons[HOUSEHOLD_TASKS[1]] == reasons[HOUSEHOLD_TASKS[2]] == "max_steps"


class EvilIdsEnv:
    """A household environment whose task ids try to climb out of the output directory."""

    IDS = ["../../escaped", "/tmp/absolute-escape", "..", "a/../../b", "sub/dir/x"]

    def __init__(self, seed=0, **sizes):
        from envs.household import HouseholdEnv

        self.env = HouseholdEnv(seed=seed)
        self.instruction, self.max_steps = self.env.instruction, 2

    def real(self, task_id):
        return self.env.task_ids("train")[self.IDS.index(task_id)]

    def task_ids(self, split):
        return list(self.IDS)

    def reset(self, task_id):
        return self.env.reset(self.real(task_id))

    def step(self, action):
        return self.env.step(action)

    def icl_example(self):
        return self.env.icl_example()

    def expert_trajectory(self, task_id):
        return {**self.env.expert_trajectory(self.real(task_id)), "id": task_id}


def test_ids_from_data_never_become_paths_outside_the_output_directory(tmp_path, monkeypatch):
    """Ids never become file names: exploration writes only its fixed file names inside out_dir."""
    import envs
    from eto_ref.agent import AgentConfig
    from eto_ref.exploration import ExploreConfig, explore_and_pair
    from eto_ref.sampler import SamplingConfig
    from tests.helpers import scripted_agent

    monkeypatch.setattr(envs, "make_env", lambda name, seed=0, **kw: EvilIdsEnv(seed))
    model, tok = scripted_agent("Thought: look.\nAction: look", tmp_path / "tok")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative "../../escaped" would land around here
    out = work / "deep" / "out"
    cfg = ExploreConfig(env="household", split="train", out_dir=str(out),
                        agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=2, max_len=2048, max_steps=2))
    path, summary = explore_and_pair(model, tok, cfg, progress=False)
    assert summary["episodes"] == len(EvilIdsEnv.IDS)
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == [
        "deep", "deep/out", "deep/out/pairs.json", "deep/out/run.json", "deep/out/summary.json",
        "deep/out/trajectories.jsonl"]
    assert [p.name for p in tmp_path.iterdir() if p.name != "tok"] == ["work"]
    assert not Path("/tmp/absolute-escape").exists()
    ids = [json.loads(line)["id"] for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert ids == EvilIdsEnv.IDS  # the ids are data, kept verbatim inside the files


def test_forced_steps_play_the_experts_first_steps_and_pair_what_follows(agent, tmp_path):
    """Exploration with --forced-steps 1: every run starts with the expert's first reply, recorded as its own;
    the pairs' prompts end with that step's observation."""
    from dataclasses import replace

    from eto_ref.exploration import expert_records

    model, tok = agent
    cfg = replace(config(tmp_path, limit=2), forced_steps=1)
    path, summary = explore_and_pair(model, tok, cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    experts = {e["id"]: e for e in expert_records("household", [r["id"] for r in records])}
    for record in records:
        assert record["conversations"][3] == experts[record["id"]]["conversations"][3]  # the forced first reply
    pairs = json.loads(path.read_text())
    assert pairs and all(p["prompt"] == experts[p["id"]]["conversations"][:5] for p in pairs)


def test_a_run_made_in_float32_is_refused_with_a_bfloat16_policy(agent, tmp_path):
    """Greedy replies differ between precisions: one trajectory file never mixes them."""
    import copy

    from eto_ref.run_dir import RunError

    model, tok = agent
    explore(model, tok, config(tmp_path, limit=1), progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["dtype"] == "float32"
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(RunError, match=r"dtype: 'float32' then, 'bfloat16' now"):
        explore(half, tok, config(tmp_path, limit=2), progress=False)
    bf16_run = explore(half, tok, config(tmp_path / "bf16", limit=2), progress=False)  # a bfloat16 agent runs
    assert len(bf16_run) == 2
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["identity"]["dtype"] == "bfloat16"
    with pytest.raises(RunError, match=r"dtype: 'bfloat16' then, 'float32' now"):
        explore(model, tok, config(tmp_path / "bf16", limit=2), progress=False)


def test_a_folder_from_an_earlier_version_is_refused_saying_to_rerun(agent, tmp_path):
    """No migration: a run.json of another format, or outputs without run.json, are refused."""
    from eto_ref.run_dir import RunError

    model, tok = agent
    explore(model, tok, config(tmp_path / "old-format", limit=1), progress=False)
    (tmp_path / "old-format" / "run.json").write_text(json.dumps({"identity": {}}))
    with pytest.raises(RunError, match=r"old-format/run.json: written by an earlier version of eto_ref "
                                       r"\(format None, now 2\)\. Rerun it into another folder, or pass --no-resume"):
        explore(model, tok, config(tmp_path / "old-format", limit=1), progress=False)
    explore(model, tok, config(tmp_path / "no-run-json", limit=1), progress=False)
    (tmp_path / "no-run-json" / "run.json").unlink()
    with pytest.raises(RunError, match=r"no-run-json: holds trajectories.jsonl but no run.json: "
                                       r"made by an earlier version"):
        explore(model, tok, config(tmp_path / "no-run-json", limit=1), progress=False)
    rerun = explore(model, tok, dataclasses.replace(config(tmp_path / "no-run-json", limit=1), resume=False),
                    progress=False)
    assert len(rerun) == 1


def test_household_keeps_failed_runs_whole_unless_a_cut_is_given(tmp_path):
    """The official rule on household (auto) keeps a failed run whole; `extra_turns` given as a number cuts it
    there too (it used to be ignored); a rerun on the same directory explores nothing and rebuilds the pairs."""
    from eto_ref.exploration import expert_records
    from eto_ref.pairs import count_agent_turns

    model, tok = scripted_agent("Thought: look.\nAction: look", tmp_path / "tok")  # fails every task, 12 steps
    cfg = ExploreConfig(env="household", split="train", out_dir=str(tmp_path / "out"), limit=2,
                        agent=AgentConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=2, max_len=8192,
                                          max_steps=12))
    path, summary = explore_and_pair(model, tok, cfg, progress=False)
    experts = {e["id"]: count_agent_turns(e["conversations"]) - 1  # less the "OK" of the instruction part
               for e in expert_records("household", ["household/train/0", "household/train/1"])}
    whole = json.loads(path.read_text())
    assert summary["rejected_extra_turns"] is None and summary["end_reasons"] == {"max_steps": 2}
    assert len(whole) == 2 and all(count_agent_turns(p["rejected"]) == 12 > experts[p["id"]] + 1 for p in whole)
    lines = (tmp_path / "out" / "trajectories.jsonl").read_text()

    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    path, summary = explore_and_pair(model, tok, cfg, progress=False, extra_turns=1)
    cut = json.loads(path.read_text())
    assert calls == [] and (tmp_path / "out" / "trajectories.jsonl").read_text() == lines
    assert summary["rejected_extra_turns"] == 1
    assert [count_agent_turns(p["rejected"]) for p in cut] == [experts[p["id"]] + 1 for p in cut]
    assert [p["chosen"] for p in cut] == [p["chosen"] for p in whole]

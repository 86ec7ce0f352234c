"""eto_ref/pipeline.py: the main job's wiring, its checks, and one end-to-end run on the tiny model."""

import json

import pytest

from eto_ref.eto import LoopConfig
from eto_ref.pipeline import PipelineConfig, check_valid


def test_valid_column_comes_first_and_must_follow_the_sft_tasks():
    assert PipelineConfig().loop.eval_splits == ("test_seen", "test_unseen")
    cfg = PipelineConfig(loop=LoopConfig(valid=100))
    assert cfg.loop.eval_splits == ("valid", "test_seen", "test_unseen")
    check_valid(cfg)  # train[1000:1100] after the SFT data train[:480]
    with pytest.raises(ValueError, match=r"train\[400:500\] overlaps the SFT data train\[:480\]"):
        check_valid(PipelineConfig(loop=LoopConfig(valid=100, valid_start=400)))


@pytest.mark.slow
def test_main_job_end_to_end_on_reduced_sizes(tmp_path):
    """The README's main command, `python train.py --stage all`, on reduced sizes."""
    import train

    out = tmp_path / "main"
    results = train.main(["--stage", "all", "--model", "tiny", "--env", "science", "--out", str(out),
                          "--sft-examples", "32", "--sft-epochs", "3",
                          "--explore-limit", "8", "--eval-limit", "4", "--iterations", "2", "--best-of-n", "2",
                          "--max-new-tokens", "24", "--valid", "3", "--baselines", "--no-progress"])
    online = {"PPO-online-iter-1", "PPO-online-iter-2", "GRPO-iter-1", "GRPO-iter-2"}
    assert set(results["rows"]) == {"SFT", "RFT", "PPO", "Best-of-2", "ETO-iter-1", "ETO-iter-2"} | online or \
        "note" in results["iterations"][-1]
    for name, row in results["rows"].items():
        assert 0.0 <= row["test_seen"] <= 100.0, name
        assert ("valid" in row) == (name != "Best-of-2"), name  # Best-of-N: test splits only
    valid = [json.loads(line)["id"] for line in (out / "sft" / "eval-valid" / "trajectories.jsonl").open()]
    assert valid == ["science/train/1000", "science/train/1001", "science/train/1002"]
    assert (out / "results.md").read_text().startswith("**science, tiny, seed 0")
    assert "| method | valid | test_seen | test_unseen |" in (out / "results.md").read_text()
    assert "| method - SFT | valid | test_seen | test_unseen |" in (out / "results.md").read_text()
    assert "ETO-iter-1: valid " in (out / "results.md").read_text()  # the plain line on two standard errors
    assert set(results["difference_from_sft"]) <= {"RFT", "PPO", "Best-of-2", "ETO-iter-1", "ETO-iter-2"} | online
    assert (out / "reward_per_iteration.svg").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    seconds = results["seconds"]
    assert list(seconds) == ["base model", "SFT", "SFT evaluation", "ETO", "RFT", "PPO", "online RL", "Best-of-2",
                             "total"]
    assert len(list((out / "grpo" / "iter-2" / "samples").glob("sample-*"))) == 4  # GRPO's groups of 4
    assert (out / "ppo" / "final" / "config.json").is_file()
    assert seconds["total"] == pytest.approx(sum(t for name, t in seconds.items() if name != "total"), abs=0.1)




def test_the_default_main_job_is_the_setting_that_showed_the_effect():
    """`python train.py --stage all` with SmolLM2: SFT on 96 tasks, explore train[:192], three DPO epochs at
    lr 1e-6 and beta 0.1, 100 tasks per test split, no baselines; `--iterations 2` the official schedule."""
    import train

    cfg = train.pipeline_config(train.parse_args(["--stage", "all", "--model", "smollm2"]))
    assert (cfg.sft_examples, cfg.sft.epochs, cfg.sft.lr) == (96, 2, 2e-4)
    assert (cfg.loop.explore_limit, cfg.loop.eval_limit, cfg.loop.iterations) == (192, 100, 1)
    assert (cfg.dpo.epochs, cfg.dpo.lr, cfg.dpo.beta) == (3, 1e-6, 0.1)
    assert (cfg.loop.beta_schedule, cfg.loop.lr_schedule) == ((0.1, 0.5), (1e-6, 5e-7))
    assert cfg.baselines is False
    assert train.pipeline_config(train.parse_args(["--stage", "all", "--model", "smollm2", "--baselines"])).baselines


def test_a_rerun_with_other_settings_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The job's settings are recorded (run.json); a rerun that differs names each difference and changes
    nothing, while the same settings resume (here: run the phases again)."""
    from dataclasses import replace

    import eto_ref.pipeline as pipeline
    from eto_ref.run_dir import RunError

    ran = []
    monkeypatch.setattr(pipeline, "run_phases", lambda cfg, out: ran.append(cfg) or {})
    cfg = PipelineConfig(out=str(tmp_path), model="tiny")
    pipeline.run_pipeline(cfg)
    written = (tmp_path / "pipeline_config.json").read_text()
    other = replace(cfg, dpo=replace(cfg.dpo, beta=0.5), loop=replace(cfg.loop, eval_limit=7))
    with pytest.raises(RunError, match=r"made with other settings: (dpo\.beta: 0\.1 then, 0\.5 now; "
                                       r"loop\.eval_limit: None then, 7 now|loop\.eval_limit.*dpo\.beta)"):
        pipeline.run_pipeline(other)
    assert (tmp_path / "pipeline_config.json").read_text() == written and len(ran) == 1
    pipeline.run_pipeline(replace(cfg, sft=replace(cfg.sft, progress=False)))  # how it runs is not what it makes
    assert len(ran) == 2
    pipeline.run_pipeline(replace(other, resume=False))  # start over with the new settings
    assert len(ran) == 3 and json.loads((tmp_path / "pipeline_config.json").read_text())["dpo"]["beta"] == 0.5


def test_a_rerun_may_evaluate_more_tasks_but_not_fewer(tmp_path, monkeypatch):
    """--eval-limit may grow on a rerun (each evaluation keeps its episodes and runs the new tasks; run.json
    records the new count); fewer tasks, or a growth together with another change, is refused."""
    from dataclasses import replace

    import eto_ref.pipeline as pipeline
    from eto_ref.run_dir import RunError

    monkeypatch.setattr(pipeline, "run_phases", lambda cfg, out: {})
    cfg = PipelineConfig(out=str(tmp_path), model="tiny", loop=LoopConfig(eval_limit=50))
    identity = lambda: json.loads((tmp_path / "run.json").read_text())["identity"]["loop"]["eval_limit"]  # noqa: E731
    pipeline.run_pipeline(cfg)
    pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, eval_limit=100)))
    assert identity() == 100
    with pytest.raises(RunError, match=r"loop\.eval_limit: 100 then, 60 now \(it can only grow\)"):
        pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, eval_limit=60)))
    with pytest.raises(RunError, match=r"dpo\.beta: 0\.1 then, 0\.5 now") as refused:
        pipeline.run_pipeline(replace(cfg, dpo=replace(cfg.dpo, beta=0.5), loop=replace(cfg.loop, eval_limit=200)))
    assert "200 now (it can only grow)" not in str(refused.value)  # that part grew; the beta change is refused
    assert identity() == 100  # a refused rerun changes nothing
    pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, eval_limit=None)))  # all tasks
    assert identity() is None


def test_a_rerun_may_add_iterations_but_not_remove_them(tmp_path, monkeypatch):
    """--iterations may grow on a rerun (the finished iterations resume as done, the new ones run);
    fewer iterations are refused, and a refused rerun leaves run.json as it was."""
    from dataclasses import replace

    import eto_ref.pipeline as pipeline
    from eto_ref.run_dir import RunError

    ran = []
    monkeypatch.setattr(pipeline, "run_phases", lambda cfg, out: ran.append(cfg.loop.iterations))
    cfg = PipelineConfig(out=str(tmp_path), model="tiny", loop=LoopConfig(iterations=1))
    iterations = lambda: json.loads((tmp_path / "run.json").read_text())["identity"]["loop"]["iterations"]  # noqa: E731
    pipeline.run_pipeline(cfg)
    pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, iterations=3)))
    assert iterations() == 3 and ran == [1, 3]
    with pytest.raises(RunError, match=r"loop\.iterations: 3 then, 2 now \(it can only grow\)"):
        pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, iterations=2)))
    assert iterations() == 3 and ran == [1, 3]


def test_how_often_checkpoints_are_saved_is_not_part_of_the_job(tmp_path, monkeypatch):
    """--sft-save-every / --dpo-keep-checkpoints change no result: a rerun may change them."""
    from dataclasses import replace

    import eto_ref.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_phases", lambda cfg, out: ran.append(cfg) or {})
    cfg = PipelineConfig(out=str(tmp_path), model="tiny")
    pipeline.run_pipeline(cfg)
    run_json = tmp_path / "run.json"
    recorded = json.loads(run_json.read_text())
    assert "save_every" not in recorded["identity"]["dpo"] and "keep_checkpoints" not in recorded["identity"]["sft"]
    pipeline.run_pipeline(replace(cfg, sft=replace(cfg.sft, save_every=3), dpo=replace(cfg.dpo, keep_checkpoints=5)))
    assert len(ran) == 2


def test_the_rejected_side_rule_recorded_is_the_one_applied(tmp_path, monkeypatch):
    """run.json records the rule each environment applies (household, like ALFWorld: the whole failed run);
    a rerun with a cut that would change the pairs is refused."""
    from dataclasses import replace

    import eto_ref.pipeline as pipeline
    from eto_ref.run_dir import RunError

    rule = lambda env, setting="auto": PipelineConfig(  # noqa: E731
        loop=LoopConfig(env=env, rejected_extra_turns=setting)).identity()["loop"]["rejected_cut"]
    assert (rule("science"), rule("webshop"), rule("household")) == (5, 5, None)
    assert (rule("household", 5), rule("household", 0), rule("science", None)) == (5, 0, None)

    monkeypatch.setattr(pipeline, "run_phases", lambda cfg, out: {})
    cfg = PipelineConfig(out=str(tmp_path), model="tiny", loop=LoopConfig(env="household"))
    pipeline.run_pipeline(cfg)
    with pytest.raises(RunError, match=r"loop\.rejected_cut: None then, 5 now"):
        pipeline.run_pipeline(replace(cfg, loop=replace(cfg.loop, rejected_extra_turns=5)))
    pipeline.run_pipeline(cfg)  # the default: the rule it ran with

"""eto_ref/report.py: the HTML report of a run: its table values, the mask colouring, the pair, a screenshot.

The run directory is built by hand from the tiny model and data of tests/helpers.py, with
known rewards, so the table's means and standard errors can be written out here.
"""

import html
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from eto_ref.dpo import run_dpo
from eto_ref.pipeline import PipelineConfig
from eto_ref.report import build_report
from eto_ref.tokenizer import Tokenizer
from tests.helpers import dpo_config, sft_records

REWARDS = {  # method folder -> split -> rewards of tasks t0..t3
    "sft": {"test_seen": [1.0, 0.0, 0.5, 0.5], "test_unseen": [0.0, 0.0, 1.0, 0.0]},
    "eto/iter-1": {"test_seen": [1.0, 1.0, 0.5, 0.5], "test_unseen": [0.0, 1.0, 1.0, 0.0]},
}


def write_evaluation(folder: Path, rewards: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "trajectories.jsonl", "w") as f:
        for i, r in enumerate(rewards):
            turns = [{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": "t"},
                     {"from": "gpt", "value": "Thought: t\nAction: look" if i % 2 else "no action"}]
            f.write(json.dumps({"id": f"t{i}", "conversations": turns, "reward": r, "steps": 1,
                                "reason": "done"}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"average_reward": 100 * sum(rewards) / len(rewards),
                                                     "end_reasons": {"done": len(rewards)},
                                                     "invalid_format_rate": 50.0, "mean_steps": 1.0}))


@pytest.fixture(scope="module")
def run(tiny_model, data_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "pipeline_config.json").write_text(json.dumps(asdict(PipelineConfig(model="tiny"))))
    (run / "data").mkdir()
    (run / "data" / "sft.json").write_text(json.dumps(sft_records()))
    shutil.copytree(tiny_model, run / "sft" / "final")
    (run / "sft" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n"
                                                       for s in (1, 2, 3)))
    explore = run / "eto" / "iter-1" / "explore"
    explore.mkdir(parents=True)
    shutil.copy(data_files["pairs"], explore / "pairs.json")
    pairs = [json.loads(line) for line in (explore / "pairs.json").read_text().splitlines()]
    (explore / "pairs.json").write_text(json.dumps(pairs))
    run_dpo(dpo_config(run / "sft" / "final", {"pairs": str(explore / "pairs.json")}, run / "eto" / "iter-1" / "dpo",
                       epochs=1, lr=5e-3))
    for folder, by_split in REWARDS.items():
        for split, rewards in by_split.items():
            write_evaluation(run / folder / f"eval-{split}", rewards)
    build_report(run)
    return run


def test_the_table_shows_each_mean_with_its_standard_error(run):
    page = (run / "report.html").read_text()
    # SFT test_seen: rewards 1, 0, .5, .5 -> mean 50, sd = sqrt((50^2 + 50^2 + 0 + 0) / 3) = 40.8, se = 20.4
    assert "<td>SFT</td><td class='num'>50.0 ± 20.4</td>" in page
    # ETO test_unseen: 0, 1, 1, 0 -> mean 50, sd = sqrt(4 * 50^2 / 3) = 57.7, se = 28.9
    assert "<td class='num'>50.0 ± 28.9</td></tr>" in page
    assert "<td>ETO-iter-1</td><td class='num'>75.0 ± 14.4</td>" in page  # 1, 1, .5, .5


def test_the_trajectory_is_shown_token_by_token_with_its_mask(run):
    page = (run / "report.html").read_text()
    tok = Tokenizer.from_dir(run / "sft" / "final")
    spans = re.findall(r"<span class='tok (\w+)' title='id (\d+)'>(.*?)</span>", page, re.S)
    record = sft_records()[0]
    ids, mask = tok.render([{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                            for t in record["conversations"]])
    assert [int(i) for _, i, _ in spans[:len(ids)]] == ids  # every token of the first trajectory, in order
    kinds = [kind for kind, _, _ in spans[:len(ids)]]
    for token, trained, kind in zip(ids, mask, kinds):
        expected = "eot" if token == tok.end_of_turn_id and trained else ("agent" if trained else "masked")
        assert kind == expected
    agent_text = "".join(html.unescape(t) for kind, _, t in spans[:len(ids)] if kind == "agent")
    assert "Action: go to desk 1" in agent_text and "Interact with a household" not in agent_text
    assert kinds.count("eot") == sum(t["from"] == "gpt" for t in record["conversations"])


def test_the_pair_curves_and_endings_are_shown(run):
    page = (run / "report.html").read_text()
    assert re.search(r"<div class='turn (up|down)'><b>[+-]\d+\.\d\d nats</b>", page)  # per-turn log-ratios
    assert "<h3>chosen (expert)</h3>" in page and "<h3>rejected (explored)</h3>" in page
    assert page.count("<svg") == 4  # reward plot, SFT loss, DPO loss/margin, DPO accuracy
    assert "average reward x100" in page and "ETO iteration (0 = SFT)" in page  # titled axes
    assert "<td class='num'>50.0%</td>" in page  # replies without an action


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium; .ci/run installs it)")
def test_the_report_renders_in_headless_chromium(run, tmp_path):
    shot = tmp_path / "report.png"
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                             "--window-size=1200,1600", (run / "report.html").as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""eto_ref/convert_data.py: Hugging Face messages and ShareGPT files become loadable ETO trajectories."""

import json
import subprocess
import sys
from pathlib import Path

from eto_ref.convert_data import convert_file
from eto_ref.trajectory import load_trajectories

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Task"},
                                  {"role": "assistant", "content": "Thought: t\nAction: a"}], "reward": "1.0"}
SHAREGPT = {"conversations": [{"from": "user", "value": "Task"}, {"from": "assistant", "value": "Action: a"},
                              {"from": "human", "value": "Observation: o"}, {"from": "gpt", "value": "Action: b"}]}


def test_messages_and_sharegpt_records_convert_to_the_eto_format(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (MESSAGES, SHAREGPT, {"messages": "oops"})) + "\n")
    written, problems = convert_file(src, tmp_path / "out.json")
    assert written == 2 and len(problems) == 1 and "record 2 (line 3): messages: expected a list" in problems[0]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out[0] == {"id": "7", "conversations": [{"from": "system", "value": "Be brief."},
                                                    {"from": "human", "value": "Task"},
                                                    {"from": "gpt", "value": "Thought: t\nAction: a"}],
                      "reward": "1.0"}
    assert out[1]["id"] == "record-1" and [t["from"] for t in out[1]["conversations"]] == ["human", "gpt", "human",
                                                                                           "gpt"]
    loaded = load_trajectories(tmp_path / "out.json", on_error="raise")
    assert [t.id for t in loaded] == ["7", "record-1"] and loaded[0].reward == 1.0


def test_the_command_reports_what_it_wrote(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([MESSAGES]))
    result = subprocess.run([sys.executable, "-m", "eto_ref.convert_data", str(src), "--out", str(tmp_path / "o.jsonl")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1 records converted, 1 valid ETO trajectories, 0 skipped" in result.stdout

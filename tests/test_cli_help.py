"""Every command-line entry point prints its help (argparse formats each help string with %)."""
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MODULES = [  # python -m MODULE --help, and its subcommands
    ["eto_ref.results"], ["eto_ref.results", "compare"], ["eto_ref.results", "purchases"],
    ["eto_ref.results", "pairs"],
    ["eto_ref.analyses"], ["eto_ref.analyses", "step-level"], ["eto_ref.analyses", "self-play"],
    ["eto_ref.analyses", "efficiency"], ["eto_ref.analyses", "iterations"],
    ["eto_ref.diagnose"], ["eto_ref.report"], ["eto_ref.gguf"], ["eto_ref.convert_data"],
    ["eto_ref.tiny"], ["eto_ref.minimal"], ["envs.write_expert_data"],
]
SCRIPTS = ["train.py", "explore.py", "bench/precision.py", "bench/envs.py", "bench/train_memory.py",
           "bench/memory.py", "bench/throughput.py", "bench/train_step.py", "bench/gpu.py", "bench/reading_path.py",
           "bench/resume_soak.py"]


def run_help(monkeypatch, capsys, run, name, subcommand):
    monkeypatch.setattr(sys, "argv", [name, *subcommand, "--help"])
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running an imported module
@pytest.mark.parametrize("command", MODULES, ids=" ".join)
def test_module_help(command, monkeypatch, capsys):
    module, *subcommand = command
    run_help(monkeypatch, capsys, lambda: runpy.run_module(module, run_name="__main__"), module, subcommand)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    run_help(monkeypatch, capsys, lambda: runpy.run_path(str(ROOT / script), run_name="__main__"), script, [])


def entry_points() -> set[str]:
    """Every file of the project that runs as a command (has an `if __name__ == "__main__":` block)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("eto_ref/*.py"), *ROOT.glob("envs/*.py")]
    return {f.relative_to(ROOT).as_posix() for f in files if 'if __name__ == "__main__":' in f.read_text()}


def test_every_entry_point_is_listed():
    listed = set(SCRIPTS) | {command[0].replace(".", "/") + ".py" for command in MODULES}
    assert entry_points() - listed == set(), "a new command: add it to MODULES or SCRIPTS above"

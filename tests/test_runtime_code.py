"""The runtime code as a whole (eto_ref/, envs/, train.py, explore.py): it never unpickles or evaluates strings."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNTIME_CODE = ["eto_ref", "envs", "train.py", "explore.py"]


FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|\b(c?pickle|dill|joblib)\.(loads?|Unpickler)\b",
                         re.M),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
}


def runtime_python_files() -> list[Path]:
    files = []
    for name in RUNTIME_CODE:
        path = ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_runtime_code_never_unpickles_or_evaluates_strings():
    files = runtime_python_files()
    assert len(files) > 10 and ROOT / "eto_ref" / "checkpoint.py" in files
    found = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {what}"
             for path in files for text in [path.read_text()] for what, pattern in FORBIDDEN.items()
             for m in pattern.finditer(text)]
    assert found == []


def test_the_security_patterns_catch_what_they_are_meant_to():
    """The grep above can fail: each pattern finds its target and lets the harmless look-alikes pass."""
    bad = ["import pickle", "from pickle import loads", "x = pickle.loads(b)", "torch.load(path)",
           "torch.load(path, weights_only=False)", "y = eval(text)", "exec(code)"]
    fine = ["model.eval()", "def run_eval():", "torch.load(p, weights_only=True)", "# never unpickles",
            "safetensors.torch.load_file(p)"]
    assert all(any(p.search(line) for p in FORBIDDEN.values()) for line in bad)
    assert not any(p.search(line) for p in FORBIDDEN.values() for line in fine)

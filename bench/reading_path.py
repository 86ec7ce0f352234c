"""How far a reader has to step from a command to the code that does the work.

    python bench/reading_path.py [-v]

Runs a 3-step SFT of the tiny model (`train.py --stage sft`) and a 2-task
exploration (`explore.py`) in this process, under a profiler hook that sees only
this repository's functions, and prints:

- the project frames on the stack when `loss.backward()` is called (train.py's
  entry first) and when the model's forward (`next_token_logits`) runs during exploration;
- the distinct project functions called in one optimizer step (from the end of
  step 2's `optimizer.step()` to the end of step 3's), and how many of them live
  in eto_ref/distributed.py;
- the longest modules and functions of eto_ref/, and whether its imports form a cycle.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def project_frames(stack) -> list[str]:
    """'file:function' of the stack's frames inside this repository (bench/ and tests/ excluded)."""
    out = []
    for f in stack:
        path = Path(f.filename).resolve()
        if ROOT in path.parents and path.parts[len(ROOT.parts)] not in ("bench", "tests"):
            out.append(f"{path.relative_to(ROOT)}:{f.name}")
    return out


class Calls:
    """A sys.setprofile hook that records the project functions called while `on` is set."""

    def __init__(self):
        self.on, self.seen = False, set()

    def __call__(self, frame, event, arg):
        if self.on and event == "call":
            path = Path(frame.f_code.co_filename)
            name = frame.f_code.co_qualname
            if name.split(".")[-1].startswith("<"):  # a comprehension or lambda: part of the function around it
                return
            if path.is_absolute() and ROOT in path.parents and path.parts[len(ROOT.parts)] not in ("bench", "tests"):
                self.seen.add(f"{path.relative_to(ROOT)}:{name}")


def trace_sft(tmp: Path) -> tuple[list[str], set[str]]:
    import train

    backward_stacks, calls, steps = [], Calls(), [0]
    real_backward, real_step = torch.Tensor.backward, torch.optim.AdamW.step

    def backward(self, *a, **k):
        if not backward_stacks:
            backward_stacks.append(project_frames(traceback.extract_stack()[:-1]))
        return real_backward(self, *a, **k)

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        steps[0] += 1
        calls.on = steps[0] == 2  # on from the end of step 2 to the end of step 3
        return out

    torch.Tensor.backward, torch.optim.AdamW.step = backward, step
    sys.setprofile(calls)
    try:
        train.main(["--stage", "sft", "--model", "tiny", "--max-steps", "3", "--batch-size", "4",
                    "--micro-batch-size", "2", "--out", str(tmp / "sft"), "--no-progress"])
    finally:
        sys.setprofile(None)
        torch.Tensor.backward, torch.optim.AdamW.step = real_backward, real_step
    return backward_stacks[0], calls.seen


def trace_explore(tmp: Path) -> list[str]:
    import explore
    from eto_ref.model import Transformer

    stacks, real_forward = [], Transformer.next_token_logits  # the sampler's forward

    def forward(self, *a, **k):
        stacks.append(project_frames(traceback.extract_stack()[:-1]))
        return real_forward(self, *a, **k)

    Transformer.next_token_logits = forward
    try:
        explore.main(["--model", "tiny", "--env", "science", "--split", "train", "--limit", "2",
                      "--max-steps", "2", "--out", str(tmp / "explore"), "--no-progress"])
    finally:
        Transformer.next_token_logits = real_forward
    return max(stacks, key=len)


def module_sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
    """(lines, module) and (lines, function) of eto_ref/, longest first; the import cycles among its modules."""
    modules, functions, imports = [], [], {}
    for path in sorted((ROOT / "eto_ref").glob("*.py")):
        text = path.read_text()
        modules.append((len(text.splitlines()), path.name))
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
        imports[path.stem] = {n.module.split(".")[1] for n in tree.body
                              if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("eto_ref.")}
    cycles = []

    def visit(m, chain):
        for dep in sorted(imports.get(m, ())):
            if dep in chain:
                cycle = " -> ".join(chain[chain.index(dep):] + [dep])
                if min(chain[chain.index(dep):]) == dep:
                    cycles.append(cycle)
            elif len(chain) < 12:
                visit(dep, chain + [dep])

    for m in imports:
        visit(m, [m])
    return sorted(modules, reverse=True), sorted(functions, reverse=True), sorted(set(cycles))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also list the step's functions, the functions over 60 lines and the import cycles")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        to_backward, step_calls = trace_sft(Path(tmp))
        to_forward = trace_explore(Path(tmp))
    distributed = sorted(c for c in step_calls if c.startswith("eto_ref/distributed.py"))
    files = sorted({c.split(":")[0] for c in step_calls})
    modules, functions, cycles = module_sizes()
    print("\n## train.py --stage sft (tiny, 3 steps): project frames at loss.backward()")
    print("\n".join(f"  {f}" for f in to_backward))
    print("\n## explore.py (tiny, 2 tasks): project frames at the model's forward")
    print("\n".join(f"  {f}" for f in to_forward))
    print("\n| measure | value |\n|---|---:|")
    print(f"| project frames, train.py entry -> backward() | {len(to_backward)} |")
    print(f"| distinct project functions in one optimizer step | {len(step_calls)} |")
    print(f"| ... in how many files | {len(files)} |")
    print(f"| ... in eto_ref/distributed.py | {len(distributed)} |")
    print(f"| project frames, explore.py entry -> the model's forward | {len(to_forward)} |")
    print(f"| longest module | {modules[0][1]} ({modules[0][0]} lines) |")
    print(f"| modules over 450 lines | {sum(n > 450 for n, _ in modules)} |")
    print(f"| longest function | {functions[0][1]} ({functions[0][0]} lines) |")
    print(f"| functions over 60 lines | {sum(n > 60 for n, _ in functions)} |")
    print(f"| import cycles in eto_ref/ | {len(cycles)} |")
    if args.verbose:
        print("\none optimizer step calls:\n" + "\n".join(f"  {c}" for c in sorted(step_calls)))
        print("\nfunctions over 60 lines:\n" + "\n".join(f"  {n} {f}" for n, f in functions if n > 60))
        print("\nimport cycles:\n" + "\n".join(f"  {c}" for c in cycles))


if __name__ == "__main__":
    main()

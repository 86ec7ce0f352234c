"""Issue #8, hardening: bad data, bad checkpoints, and unsafe code are clear errors; good records are kept.

Each case of the issue is one test (or one row of a table) that fails if the
error stops naming the file, the record and the field, or if a good record is lost.
Runs (kill and resume, NaN guard): tests/test_hardening_runs.py.
Environments and agents: tests/test_hardening_agent.py.
"""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from eto_ref.checkpoint import CheckpointError, load_model, save_model
from eto_ref.jsonl import JsonlWriter, read_jsonl_records
from eto_ref.model import ModelConfig, Transformer
from eto_ref.trajectory import TrajectoryError, encode_pair, encode_sft, load_pairs, load_trajectories
from tests.conftest import FakeTokenizer

ROOT = Path(__file__).resolve().parents[1]

INSTRUCTION = [{"from": "human", "value": "You are an agent. Act."}, {"from": "gpt", "value": "OK"}]
TASK = {"from": "human", "value": "Put a mug in the cabinet."}
A1 = {"from": "gpt", "value": "Thought: find mug.\nAction: go to desk 1"}
O1 = {"from": "human", "value": "Observation: You see a mug 1."}
A2 = {"from": "gpt", "value": "Thought: take it.\nAction: take mug 1 from desk 1"}


def trajectory(rid, turns=None):
    return {"id": rid, "conversations": INSTRUCTION + (turns or [TASK, A1, O1, A2]), "reward": 1.0}


def pair(rid, **sides):
    return {"id": rid, "prompt": INSTRUCTION + [TASK], "chosen": [A1, O1, A2], "rejected": [A2], **sides}


def jsonl_line(record) -> bytes:
    return record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n"


def load_both_ways(load, path, caplog):
    """(records kept by the lenient load, warnings logged, the strict load's error message)."""
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        kept = load(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(TrajectoryError) as raised:
        load(path, on_error="raise")
    return kept, warnings, str(raised.value)


# --------------------------------------------------------------------------- data: one row per case of the issue

# case: (line 2 of a three-line JSONL file, expected message after "<file>: ")
BAD_TRAJECTORY_LINES = {
    "truncated JSON line": (b'{"id": "bad", "conversations": [{"from": "hum\n',
                            "record 1 (line 2): invalid JSON line"),
    "non-UTF-8 bytes": (b'{"id": "bad", "conversations": "\xff\xfe"}\n', "record 1 (line 2): invalid JSON line"),
    "wrong roles (user/assistant)": (
        trajectory("bad", [{"from": "user", "value": "task"}, {"from": "assistant", "value": "Action: go"}]),
        "record 1 (id 'bad', line 2): conversations[2].from: unknown role 'user' (expected 'human' or 'gpt')"),
    "role/content keys instead of from/value": (
        {"id": "bad", "conversations": [{"role": "user", "content": "hi"}]},
        "record 1 (id 'bad', line 2): conversations[0].from: missing"),
    "non-alternating turns": (trajectory("bad", [TASK, O1, A1]),
                              "record 1 (id 'bad', line 2): conversations[3].from: expected 'gpt' after 'human', "
                              "got 'human'"),
    "an empty action": (trajectory("bad", [TASK, {"from": "gpt", "value": " \n "}]),
                        "record 1 (id 'bad', line 2): conversations[3].value: empty agent turn"),
    "duplicate id": (trajectory("t0"), "record 1 (id 't0', line 2): id: duplicate of record 0 (ids must be unique)"),
}


@pytest.mark.parametrize("case", list(BAD_TRAJECTORY_LINES))
def test_bad_trajectory_is_named_and_the_good_records_are_kept(case, tmp_path, caplog):
    bad, message = BAD_TRAJECTORY_LINES[case]
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl_line(trajectory("t0")) + jsonl_line(bad) + jsonl_line(trajectory("t2")))
    kept, warnings, error = load_both_ways(load_trajectories, path, caplog)
    assert [t.id for t in kept] == ["t0", "t2"]
    assert kept[0].messages[-1]["content"] == A2["value"]  # the first of a duplicate id is the one kept
    assert any(w.startswith(f"skipping bad record: {path}: {message}") for w in warnings), warnings
    assert error.startswith(f"{path}: {message}")


def test_duplicate_id_in_a_json_list_names_both_records_and_integer_ids_count(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([trajectory(7), trajectory("a"), trajectory("7")]))
    assert [t.id for t in load_trajectories(path)] == ["7", "a"]
    with pytest.raises(TrajectoryError, match=re.escape(f"{path}: record 2 (id '7'): id: duplicate of record 0")):
        load_trajectories(path, on_error="raise")


BAD_PAIRS = {
    "chosen equals rejected": (pair("bad", rejected=[A1, O1, A2]),
                               "record 1 (id 'bad', line 2): rejected: identical to chosen (nothing to prefer)"),
    "duplicate pair id": (pair("p0", rejected=[A1]), "record 1 (id 'p0', line 2): id: duplicate of record 0"),
    "wrong roles in chosen": (pair("bad", chosen=[{"from": "assistant", "value": "x"}]),
                              "record 1 (id 'bad', line 2): chosen[0].from: unknown role 'assistant'"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_pair_is_named_and_the_good_pairs_are_kept(case, tmp_path, caplog):
    bad, message = BAD_PAIRS[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_line(pair("p0")) + jsonl_line(bad) + jsonl_line(pair("p2")))
    kept, warnings, error = load_both_ways(load_pairs, path, caplog)
    assert [p.id for p in kept] == ["p0", "p2"]
    assert kept[0].rejected == [{"role": "assistant", "content": A2["value"]}]  # the first "p0"
    assert any(f"{path}: {message}" in w for w in warnings), warnings
    assert error.startswith(f"{path}: {message}")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_file_is_an_error_even_when_skipping(content, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for load in (load_trajectories, load_pairs):
        with pytest.raises(TrajectoryError, match=re.escape(f"{path}: file is empty")):
            load(path)


def test_non_utf8_json_list_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "sft.json"
    path.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(TrajectoryError, match=re.escape(f"{path}: not a valid JSON list") + ".*utf-8"):
        load_trajectories(path)


def test_trajectory_longer_than_max_len_is_kept_cut_and_named(tmp_path, caplog, fake_tok):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl_line(trajectory("short", [TASK, {"from": "gpt", "value": "Action: a"}]))
                     + jsonl_line(trajectory("long")))
    short, long = load_trajectories(path)
    full = len(fake_tok.render(long.messages)[0])
    max_len = len(fake_tok.render(short.messages)[0])  # the short one fits exactly, the long one does not
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        assert not encode_sft(short, fake_tok, max_len).truncated
        cut = encode_sft(long, fake_tok, max_len)
    assert cut.truncated and len(cut.input_ids) == max_len
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{path}: record 1 (id 'long', line 2): conversations: {full} tokens, "
                              f"longer than max_len {max_len}; cut to the first {max_len} "
                              f"({sum(cut.loss_mask)} agent tokens kept)")


def test_pair_longer_than_max_len_names_the_side_that_was_cut(tmp_path, caplog, fake_tok):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair("p0")]))
    (p,) = load_pairs(path)
    rejected_len = len(fake_tok.render(p.prompt + p.rejected)[0])
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        ex = encode_pair(p, fake_tok, rejected_len)
    assert ex.chosen.truncated and not ex.rejected.truncated
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{path}: record 0 (id 'p0'): prompt + chosen: ")


def test_records_built_in_code_are_named_by_id_when_cut(caplog, fake_tok):
    from eto_ref.trajectory import Trajectory

    traj = Trajectory("mine", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    with caplog.at_level(logging.WARNING, logger="eto_ref.trajectory"):
        encode_sft(traj, fake_tok, 4)
    assert caplog.records[0].getMessage().startswith("trajectory 'mine': conversations: 14 tokens")


def test_jsonl_log_torn_last_line_is_dropped_and_a_corrupt_middle_line_is_named(tmp_path):
    """Exploration output (eto_ref/jsonl.py): a kill mid-write loses only the record being written."""
    path = tmp_path / "trajectories.jsonl"
    with JsonlWriter(path) as w:
        w.write({"id": "a"})
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "rew')  # killed here
    with pytest.warns(UserWarning, match=r"trajectories.jsonl: line 2: incomplete last record dropped"):
        assert read_jsonl_records(path) == [{"id": "a"}]
    path.write_bytes(b'{"id": "a"}\n\xff\xfe\n{"id": "c"}\n')  # non-UTF-8 bytes inside the file
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: not valid JSON")):
        read_jsonl_records(path)


# --------------------------------------------------------------------------- checkpoints

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(Transformer(ModelConfig(**SMALL)), tmp_path / "model")


def rewrite_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


def rewrite_weights(model_dir: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    save_file(change(tensors), str(model_dir / "model.safetensors"))


CHECKPOINT_CASES = {  # case: (how to break the directory, a regex the CheckpointError must match)
    "missing config.json": (lambda d: (d / "config.json").unlink(),
                            r"model/config.json: model config not found.*found: \['model.safetensors'\]"),
    "unknown architecture": (lambda d: rewrite_config(d, architectures=["GPTNeoXForCausalLM"]),
                             r"config.json: unknown architecture 'GPTNeoXForCausalLM' in key 'architectures'"),
    "config key missing": (lambda d: _drop_key(d, "hidden_size"),
                           r"config.json: missing required key 'hidden_size'"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{"), r"config.json: not valid JSON"),
    "missing tensor": (lambda d: rewrite_weights(d, lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k}),
                       r"model: missing tensor 'model.layers.1.mlp.down_proj.weight' \(expected shape \(32, 48\)\) "
                       r"and 2 more"),
    "extra tensor": (lambda d: rewrite_weights(d, lambda t: {**t, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}),
                     r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' \(shape \(1,\)\) not in a LlamaForCausalLM"),
    "wrong shape": (lambda d: rewrite_weights(d, lambda t: {**t, "model.embed_tokens.weight": torch.zeros(65, 32)}),
                    r"tensor 'model.embed_tokens.weight' has shape \(65, 32\), the model from config.json expects "
                    r"\(64, 32\)"),
    "truncated safetensors (header)": (lambda d: _truncate(d / "model.safetensors", 6),
                                       r"model.safetensors: cannot read safetensors file .*header.*truncated"),
    "truncated safetensors (data)": (lambda d: _truncate(d / "model.safetensors", -100),
                                     r"model.safetensors: cannot read safetensors file .*truncated"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(),
                   r"model: no model.safetensors or model.safetensors.index.json \(found: \['config.json'\]\)"),
}


def _drop_key(model_dir: Path, key: str) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config[key]
    (model_dir / "config.json").write_text(json.dumps(config))


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:n])


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_a_clear_checkpoint_error(case, model_dir):
    load_model(model_dir)  # the directory is fine before it is broken
    breaks, message = CHECKPOINT_CASES[case]
    breaks(model_dir)
    with pytest.raises(CheckpointError, match=message):
        load_model(model_dir)


def test_missing_config_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from eto_ref.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tok")
    texts = ["Thought: go.\nAction: go to desk 1", "Observation: You see a mug 1."] * 8
    train_bpe_tokenizer(texts, vocab_size=120, out_dir=root, template="chatml")
    return root


def test_tokenizer_larger_than_the_embedding_is_a_checkpoint_error(tmp_path, tokenizer_dir):
    from eto_ref.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    fits = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab})), tmp_path / "fits",
                      tokenizer_dir=tokenizer_dir)
    load_model(fits)
    padded = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab + 16})), tmp_path / "padded",
                        tokenizer_dir=tokenizer_dir)
    load_model(padded)  # more embedding rows than tokens is normal (padded vocabularies)
    small = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab - 10})), tmp_path / "small",
                       tokenizer_dir=tokenizer_dir)
    with pytest.raises(CheckpointError, match=re.escape(f"{small / 'tokenizer.json'}: tokenizer has token id "
                                                        f"{vocab - 1} (")
                       + rf".*only {vocab - 10} embedding rows \(config.json vocab_size\)"):
        load_model(small)
    (small / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read tokenizer"):
        load_model(small)


def test_training_stops_on_a_tokenizer_that_does_not_fit_before_any_step(tmp_path, tokenizer_dir):
    from eto_ref.config import SFTConfig
    from eto_ref.sft import run_sft

    from eto_ref.tokenizer import Tokenizer
    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    model = save_model(Transformer(ModelConfig(**{**SMALL, "vocab_size": vocab - 10})), tmp_path / "small",
                       tokenizer_dir=tokenizer_dir)
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([trajectory("t0"), trajectory("t1")]))
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="embedding rows"):
        run_sft(SFTConfig(model=str(model), data=str(data), out=str(out), progress=False, device="cpu",
                          max_len=64, eval_fraction=0.0))
    assert not out.exists() or not any(out.iterdir())  # no metrics, no checkpoint: nothing started


# --------------------------------------------------------------------------- security

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
    from eto_ref.sampler import SamplingConfig
    from eto_ref.exploration import ExploreConfig, explore_and_pair
    from tests.test_hardening_agent import scripted_agent

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


def test_config_errors_without_a_file_name_get_one(model_dir):
    rewrite_config(model_dir, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=re.escape(f"{model_dir / 'config.json'}: num_attention_heads (4) "
                                                        "must be a multiple of num_key_value_heads (3)")):
        load_model(model_dir)


def test_truncated_tokenizer_or_config_is_a_clear_error_naming_the_file(tmp_path):
    from eto_ref.tiny import environment_texts
    from eto_ref.tokenizer import Tokenizer, train_bpe_tokenizer

    train_bpe_tokenizer(environment_texts(["science"], tasks_per_env=5), 300, tmp_path)
    text = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json .*truncated"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)

"""Several ranks give the single-process result: replicated / FSDP training, sharded exploration.

Each distributed test spawns 2 CPU processes that meet over gloo, with the
environment variables torchrun would set (MASTER_ADDR/MASTER_PORT, RANK,
LOCAL_RANK, WORLD_SIZE), and compares with a run in this process (one rank).
Models are tiny (hidden 32-64, 1-2 layers); every process uses one thread.
"""

import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eto_ref import config, dpo, sft, trainer
from eto_ref.distributed import shard
from eto_ref.model import ModelConfig, Transformer
from tests.helpers import assert_same_params, dpo_config, params_of, sft_config

# --------------------------------------------------------------------------- launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, args):
    """One spawned rank: torchrun's environment variables, one thread, then `job(*args)`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        job(*args)
    finally:
        # Free the job's FSDP modules (held in reference cycles) while the process group is alive;
        # left to interpreter exit, gloo's teardown aborted the rank now and then (SIGABRT).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(job, *args, world: int = 2) -> None:
    """Run `job(*args)` in `world` fresh processes (a top-level function: it is pickled by name)."""
    mp.start_processes(_rank_main, args=(world, free_port(), job, args), nprocs=world, start_method="spawn")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_process_group_waits_longer_than_a_big_checkpoint_takes(monkeypatch):
    """NCCL's default 10 minutes would end a job whose rank 0 writes a 7B checkpoint while the others wait."""
    from eto_ref import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    assert distributed.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert seen == {"backend": "gloo", "timeout": distributed.COLLECTIVE_TIMEOUT}
    assert distributed.COLLECTIVE_TIMEOUT.total_seconds() >= 3600


def resume_check_job(out: str, log_dir: str) -> None:
    """One rank looks for the checkpoint to resume from, noting each checkpoint it reads and its answer."""
    from types import SimpleNamespace

    from eto_ref import run_dir
    from eto_ref.distributed import init_distributed, rank

    init_distributed(torch.device("cpu"))
    read = run_dir.checkpoint_problem

    def noted(ckpt):
        with open(Path(log_dir) / f"read-{rank()}", "a") as f:
            f.write(ckpt.name + "\n")
        return read(ckpt)
    run_dir.checkpoint_problem = noted
    found = run_dir.find_resume_checkpoint(SimpleNamespace(out=out))
    (Path(log_dir) / f"found-{rank()}").write_text(found.name)


def test_rank_0_alone_reads_the_checkpoints_to_resume_from(tmp_path):
    """Rank 0 reads the checkpoints (here the newer one holds a NaN and is passed over) and tells rank 1
    which one to resume from; rank 1 reads none (a 7B checkpoint and its optimizer file: 80 GB)."""
    from safetensors.torch import save_file

    from eto_ref.run_dir import OPTIMIZER_FILE, STATE_FILE

    for step, value in ((2, 1.0), (4, float("nan"))):
        ckpt = tmp_path / "run" / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.full((2,), value)}, str(ckpt / "model.safetensors"))
        save_file({"w.exp_avg": torch.zeros(2)}, str(ckpt / OPTIMIZER_FILE))
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "optimizer": {}}))
    run_ranks(resume_check_job, str(tmp_path / "run"), str(tmp_path))
    assert (tmp_path / "read-0").read_text().split() == ["step-000004", "step-000002"]
    assert not (tmp_path / "read-1").exists()
    assert [(tmp_path / f"found-{r}").read_text() for r in (0, 1)] == ["step-000002", "step-000002"]


def test_shard_is_a_partition():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items


def test_rank_micro_batches_pad_short_ranks(monkeypatch):
    """3 micro-batches over 2 ranks: rank 1 gets one real and one zero-weight padding micro-batch."""
    import eto_ref.trainer as t

    monkeypatch.setattr(t, "world_size", lambda: 2)
    monkeypatch.setattr(t, "shard", lambda items: items[1::2])
    assert t.rank_micro_batches([0, 1, 2, 3, 4], 2) == [([2, 3], 1.0), ([0, 1], 0.0)]


# --------------------------------------------------------------------------- training: replicas and FSDP


def train_both_stages(root: str, model: str, data: dict, interrupt_sft_at: int | None = None,
                      fsdp: bool = False) -> None:
    """SFT (a held-out example, checkpoints, uneven micro-batches), then DPO from its result."""
    kw = {"fsdp": True} if fsdp else {}
    stage = sft_config(model, data, Path(root) / "sft", epochs=2, batch_size=4, micro_batch_size=1,
                       eval_fraction=0.2, save_every=2, **kw)
    if interrupt_sft_at is not None:  # a killed run, then the same command again: resume
        try:
            sft.run_sft(stage, callback=_stop_at(interrupt_sft_at))
        except KeyboardInterrupt:
            pass
    final = sft.run_sft(stage)
    dpo.run_dpo(dpo_config(final, data, Path(root) / "dpo", epochs=1, batch_size=4, micro_batch_size=1,
                               save_every=1, **kw))


def _stop_at(k: int):
    def callback(step, metrics):
        if step == k:
            raise KeyboardInterrupt
    return callback


@pytest.fixture(scope="module")
def single_process_run(tiny_model, data_files, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_both_stages(str(root), str(tiny_model), data_files)
    finally:
        torch.set_num_threads(threads)
    return root


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def assert_same_runs(dist_root: Path, single_root: Path) -> None:
    for stage in ("sft", "dpo"):
        assert_same_params(params_of(dist_root / stage / "final"), params_of(single_root / stage / "final"),
                           atol=1e-5)
        a, b = losses(dist_root / stage / "metrics.jsonl"), losses(single_root / stage / "metrics.jsonl")
        assert len(a) == len(b) and a == pytest.approx(b, rel=1e-5)  # rank 0 alone wrote, global values


def test_replicas_two_ranks_equal_one_process_and_resume(tiny_model, data_files, single_process_run,  # noqa: F811
                                                     tmp_path):
    """2 ranks, the same global batch: SFT and DPO end with the single-process parameters and losses,
    also when SFT was interrupted after its step-2 checkpoint and resumed."""
    run_ranks(train_both_stages, str(tmp_path), str(tiny_model), data_files, 3)
    assert_same_runs(tmp_path, single_process_run)
    events = [r.get("event") for r in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())]
    assert events.count("resume") == 1
    assert json.loads((tmp_path / "dpo" / dpo.REFERENCE_FILE).read_text())["logps"]  # cached by rank 0


def test_fsdp_two_ranks_equal_one_process(tiny_model, data_files, single_process_run, tmp_path):  # noqa: F811
    """fully_shard per decoder layer + root, gloo on CPU: the same result, checkpoints gathered to rank 0."""
    run_ranks(train_both_stages, str(tmp_path), str(tiny_model), data_files, 3, True)
    assert_same_runs(tmp_path, single_process_run)
    assert (tmp_path / "dpo" / "checkpoints").is_dir()


def mixed_precision_job(out: str) -> None:
    """One FSDP forward/backward in bfloat16: what dtype the layers compute in and the gradients are kept in."""
    from eto_ref.distributed import init_distributed, rank, wrap_fsdp
    from eto_ref.trainer import scored_logprobs

    init_distributed(torch.device("cpu"))
    model, batch = mixed_precision_case()
    wrap_fsdp(model, torch.bfloat16)
    seen = []
    model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(str(m.weight.dtype)))
    loss = scored_logprobs(model, batch).mean()
    loss.backward()
    grads = sorted({str(p.grad.dtype) for p in model.parameters()})
    (Path(out) / f"rank-{rank()}.json").write_text(json.dumps({"loss": loss.item(), "computed_in": seen,
                                                               "grads": grads}))


def mixed_precision_case():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 64, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.bool),
                   "loss_mask": torch.ones(2, 12, dtype=torch.bool), "shared_prefix": 0}


def test_fsdp_gathers_weights_in_the_compute_dtype_and_keeps_float32_gradients(tmp_path):
    """FSDP2's MixedPrecisionPolicy: the layers compute with bfloat16 weights (no autocast copy of every
    weight), the sharded gradients are float32; the loss is autocast's to bfloat16 precision."""
    from eto_ref.trainer import scored_logprobs

    run_ranks(mixed_precision_job, str(tmp_path))
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    model, batch = mixed_precision_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = scored_logprobs(model, batch).mean().item()
    for result in results:
        assert result["computed_in"] == ["torch.bfloat16"] and result["grads"] == ["torch.float32"]
        assert result["loss"] == pytest.approx(expected, rel=2e-2)


# --------------------------------------------------------------------------- exploration


def tiny_agent_dir(root: Path) -> Path:
    from eto_ref.checkpoint import save_model
    from eto_ref.tiny import environment_texts
    from eto_ref.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(environment_texts(["household"], tasks_per_env=20), 400, root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return save_model(model, root / "model", tokenizer_dir=root / "tok")


def explore_job(model_dir: str, out_dir: str, limit: int) -> None:
    from eto_ref.agent import AgentConfig
    from eto_ref.checkpoint import load_model
    from eto_ref.exploration import ExploreConfig, explore
    from eto_ref.sampler import SamplingConfig
    from eto_ref.tokenizer import Tokenizer

    model, tok = load_model(model_dir).eval(), Tokenizer.from_dir(model_dir)
    agent = AgentConfig(sampling=SamplingConfig(max_new_tokens=6), batch_size=2, max_len=4096, max_steps=2)
    cfg = ExploreConfig(env="household", split="train", out_dir=out_dir, limit=limit, agent=agent)
    records = explore(model, tok, cfg, progress=False)
    (Path(out_dir) / f"returned-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(records))


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_exploration_two_ranks_writes_the_single_process_records(tmp_path, one_thread):
    """5 tasks over 2 ranks (uneven), resuming from an interrupted run's merged and rank files:
    trajectories.jsonl = the single-process records, in task order, each once; the rank files are gone."""
    model_dir = tiny_agent_dir(tmp_path)
    explore_job(str(model_dir), str(tmp_path / "single"), 5)
    single = (tmp_path / "single" / "trajectories.jsonl").read_text().splitlines()
    assert len(single) == 5

    out = tmp_path / "dist"
    out.mkdir()
    (out / "run.json").write_text((tmp_path / "single" / "run.json").read_text())  # the same settings
    (out / "trajectories.jsonl").write_text(single[3] + "\n")  # finished by an earlier (merged) run
    (out / "trajectories.rank-1.jsonl").write_text(single[0] + "\n")  # finished, not merged: killed
    run_ranks(explore_job, str(model_dir), str(out), 5)

    assert (out / "trajectories.jsonl").read_text().splitlines() == single
    assert not list(out.glob("trajectories.rank-*"))
    for r in (0, 1):  # every rank returns all the records
        assert json.loads((out / f"returned-{r}.json").read_text()) == [json.loads(line) for line in single]


# --------------------------------------------------------------------------- activation checkpointing


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing each decoder layer's activations in backward changes memory, not the gradients."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 64, (2, 12))  # (B, T)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row

    grads = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        logits = model(ids, attention_mask=mask)  # (B, T, V)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-7, rtol=1e-6, msg=n)


def test_fsdp_shards_only_under_torchrun_and_compile_compiles_each_layer():
    from torch.distributed.tensor import DTensor

    cfg = config.SFTConfig()
    assert cfg.fsdp is False and cfg.compile is False
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1))
    names = [n for n, _ in model.named_parameters()]
    trainer.parallelize(model, config.SFTConfig(fsdp=True, compile=True), ranks=1, dtype=torch.float32)  # 1 rank: nothing to shard
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    assert model._compiled_call_impl is None
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their names

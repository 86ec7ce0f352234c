"""A training run's directory: its lock, checkpoints, resume, and the final model.

    out/
      .lock                          held while a process runs in `out` (pid inside; see RunLock)
      run.json                       what determines the run's results (claim_run), compared on every rerun
      metrics.jsonl                  one JSON record per step / evaluation
      checkpoints/step-000050/       config.json + model.safetensors (or the LoRA adapter files),
                                     tokenizer files, optimizer.safetensors, trainer_state.json
      final/                         the trained model as a plain Hugging Face directory (LoRA merged),
                                     tokenizer files, trainer_state.json ("done": true)

Every file is written into a temporary directory that is then renamed, so a
checkpoint directory exists only complete. A rerun with other settings than run.json
records is refused, naming them. Resume takes the newest checkpoint that reads back
whole and finite; a damaged newer one is reported and skipped. A rerun of a finished
run returns `final/` at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eto_ref.checkpoint import (TOKENIZER_FILES, CheckpointError, check_state_dict, model_fingerprint, our_name,
                                read_state_dict, replace_dir, save_model)
from eto_ref.config import TrainConfig
from eto_ref.distributed import barrier, from_main, full_tensor, is_fsdp, is_main, shard_like
from eto_ref.jsonl import write_json_atomic
from eto_ref.lora import inject_lora, load_adapter, remove_lora, save_adapter
from eto_ref.model import Transformer
from eto_ref.runtime import dtype_name

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"  # a PPO run's checkpoints: its critic (eto_ref/ppo.py)
LOCK_FILE = ".lock"
RUN_FILE = "run.json"
RUN_FORMAT = 2  # run.json's layout and identities; a folder of another format is refused
TRAINING_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "reference_logps.json")


class RunError(ValueError):
    """A run directory that cannot be used as asked (locked, other settings, unreadable files)."""


# --------------------------------------------------------------------------- one run per directory


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """Hold `directory/.lock` while a run writes there; a second run on the same directory refuses.

    The lock file holds the owner's pid. A lock left by a process that no longer
    exists (killed) is stale: it is taken over, with a note. Released at exit.
    Under torchrun only rank 0 takes it.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.held = False

    def __enter__(self):
        if not is_main():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and pid_alive(owner):
                    raise RunError(f"{self.path.parent}: another run (pid {owner}) is writing here; wait for it "
                                   f"to end, or use another output directory") from None
                log.warning("%s: taking over a stale lock (pid %s no longer runs)", self.path, owner)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise RunError(f"{self.path}: could not take the lock")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def flatten(d: dict, prefix: str = "") -> dict:
    """{"dpo": {"beta": 0.1}} -> {"dpo.beta": 0.1}: one entry per setting, for messages that name it."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def grows(then, now) -> bool:
    """A task count that only widens: a larger number, or None (all tasks) after a number."""
    if then is None:
        return False
    return now is None or (isinstance(now, int) and isinstance(then, int) and now > then)


def claim_run(directory: str | Path, identity: dict, resume: bool = True, outputs: tuple[str, ...] = (),
              growable: tuple[str, ...] = ()) -> None:
    """Record in `directory/run.json` what determines its results; a rerun with other settings is refused.

    This is the one check that a folder holds the run asked for: training stages,
    explorations and the main job each record their identity here, and compare it on
    every rerun. `identity` holds the settings that change what the run produces (model,
    data, environment, sampling, ...). A directory made with other settings raises
    RunError naming each difference; with resume=False its `outputs` (and run.json) are
    deleted first and the run starts over. `growable` names task counts (flattened keys,
    e.g. "loop.eval_limit") that a rerun may raise: what was done is kept and extended.
    A directory holding `outputs` but no run.json of this format (RUN_FORMAT) was made by
    an earlier version of eto_ref and is refused. Only rank 0 reads and writes the file.
    """
    directory, path = Path(directory), Path(directory) / RUN_FILE
    if is_main():
        if not resume:
            for name in (RUN_FILE, *outputs):
                target = directory / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        recorded = recorded_identity(directory)
        if recorded is None:
            found = [name for name in outputs if (directory / name).exists()]
            if found:
                raise RunError(f"{directory}: holds {', '.join(found)} but no {RUN_FILE}: made by an earlier "
                               "version of eto_ref. Rerun it into another folder, or pass --no-resume to start over")
            write_json_atomic({"format": RUN_FORMAT, "identity": identity}, path)
        else:
            old, new = flatten(recorded), flatten(identity)
            changed = {k: (old.get(k), new.get(k)) for k in {**old, **new} if old.get(k) != new.get(k)}
            extended = {k: v for k, v in changed.items() if k in growable and grows(*v)}
            if len(extended) < len(changed):
                shrunk = {k for k in changed if k in growable and k not in extended}
                raise RunError(f"{directory}: made with other settings: " + "; ".join(
                    f"{k}: {a!r} then, {b!r} now" + (" (it can only grow)" if k in shrunk else "")
                    for k, (a, b) in changed.items())
                    + ". Use another output directory, or --no-resume to start over")
            if extended:
                log.warning("%s: extending the run: %s (what was done is kept)", directory,
                            ", ".join(f"{k} from {a!r} to {b!r}" for k, (a, b) in extended.items()))
                write_json_atomic({"format": RUN_FORMAT, "identity": identity}, path)
    barrier()


# --------------------------------------------------------------------------- reading run files


def read_json_file(path: Path) -> dict:
    """A run's JSON file; RunError naming the file when it is missing, truncated or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: cannot read ({type(e).__name__}: {e}); is it truncated?") from None


def recorded_identity(directory: str | Path) -> dict | None:
    """The settings a run directory's run.json records as its identity (None: no run.json yet).
    A run.json of another format than RUN_FORMAT was written by an earlier version of eto_ref: RunError."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    doc = read_json_file(path)
    if doc.get("format") != RUN_FORMAT:
        raise RunError(f"{path}: written by an earlier version of eto_ref (format {doc.get('format')}, now "
                       f"{RUN_FORMAT}). Rerun it into another folder, or pass --no-resume to start over")
    return doc["identity"]


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with trainer_state.json), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def config_dict(cfg: TrainConfig) -> dict:
    """The config as JSON-ready values (tuples -> lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def training_identity(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """What determines a training run's model (its run.json): the settings (`TrainConfig.identity`),
    the compute dtype `--dtype auto` resolved to, the starting model's fingerprint and the data's digest."""
    identity = {**cfg.identity(), "compute_dtype": dtype_name(dtype)}
    if (Path(cfg.model) / "config.json").is_file():
        identity["model_fingerprint"] = model_fingerprint(cfg.model)
    for key in ("data", "pairs"):
        if key in identity and Path(identity[key]).is_file():  # a missing file is reported when it is read
            identity[f"{key}_sha256"] = file_sha256(identity[key])
    return identity


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable or non-finite file), or None when it can."""
    try:
        state = read_json_file(ckpt / STATE_FILE)
        for path in sorted(ckpt.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        return f"{path.name}: tensor {name!r} holds NaN or inf"
        if "optimizer" not in state or not (ckpt / OPTIMIZER_FILE).is_file():
            return f"{OPTIMIZER_FILE} missing"
    except (RunError, OSError, Exception) as e:  # noqa: BLE001 - safetensors raises its own error types
        return str(e)
    return None


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The run's newest usable checkpoint (the folder's run.json has vouched for its settings).

    A newer checkpoint that does not read back whole, or holds NaN/inf, is skipped
    with a warning naming the file (resume falls back to the one before it). Under
    torchrun rank 0 alone reads the checkpoints (a 7B one holds 80 GB with its optimizer
    file) and tells the other ranks which one to resume from.
    """
    def newest_resumable() -> Path | None:
        for ckpt in reversed(checkpoint_dirs(cfg.out)):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("%s: not resumable (%s); falling back to the checkpoint before it", ckpt, problem)
        return None
    return from_main(newest_resumable)


def finished_run(cfg: TrainConfig) -> Path | None:
    """out/final if this run has already completed (then a rerun has nothing to do)."""
    final = Path(cfg.out) / "final"
    if not (final / STATE_FILE).is_file():
        return None
    return final if read_json_file(final / STATE_FILE).get("done") else None


def claim_training_run(cfg: TrainConfig, dtype: torch.dtype) -> None:
    """claim_run for a training stage: its identity, and what --no-resume deletes."""
    claim_run(cfg.out, training_identity(cfg, dtype), cfg.resume, outputs=TRAINING_OUTPUTS)


# --------------------------------------------------------------------------- optimizer state


def optimizer_moments(optimizer, named_params) -> tuple[dict, dict]:
    """AdamW moments as whole CPU tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and each param's step.

    Under FSDP the moments are sharded like the params: every rank must call this
    (each tensor is gathered in turn); rank 0 alone copies them to the CPU and keeps
    them (the other ranks get no tensors: 54 GB of host memory each at 7B).
    """
    tensors, steps = {}, {}
    for name, p in named_params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            whole = full_tensor(state[k].detach())  # a collective under FSDP
            if is_main():
                tensors[f"{name}.{k}"] = whole.cpu().contiguous()
        steps[name] = float(state["step"])
    return tensors, steps


def save_optimizer_state(optimizer, moments: tuple[dict, dict], path: Path) -> dict:
    """Write optimizer_moments() as safetensors; returns the scalars for JSON."""
    tensors, steps = moments
    save_file(tensors, str(path), metadata={"format": "pt"})
    group = optimizer.param_groups[0]
    return {"step": max(steps.values(), default=0.0), "betas": list(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "params": sorted(steps)}


def load_optimizer_state(optimizer, named_params, ckpt: Path) -> int:
    """Inverse of save_optimizer_state (through optimizer.load_state_dict, which casts to each param);
    returns the step the checkpoint was saved at."""
    saved = read_json_file(ckpt / STATE_FILE)
    scalars, path, state = saved["optimizer"], ckpt / OPTIMIZER_FILE, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for i, (name, p) in enumerate(named_params):
                if name in scalars["params"]:
                    state[i] = {"step": torch.tensor(scalars["step"], dtype=torch.float32),
                                "exp_avg": shard_like(f.get_tensor(f"{name}.exp_avg"), p),  # FSDP: this rank's shard
                                "exp_avg_sq": shard_like(f.get_tensor(f"{name}.exp_avg_sq"), p)}
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise RunError(f"{path}: cannot read the optimizer state ({e})") from None
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return saved["step"]


# --------------------------------------------------------------------------- writing checkpoints and final/


def copy_tokenizer_files(src: str | Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def gathered_model(model, cfg: TrainConfig):
    """The model to save: `model` itself, unless it is sharded (FSDP).

    FSDP: every rank must call this; each sharded tensor is gathered in turn and
    rank 0 rebuilds a plain CPU copy (built on the meta device, then the whole
    tensors assigned); the other ranks get None.
    """
    if not is_fsdp(model):
        return model
    state = {}
    for name, t in model.state_dict().items():
        t = full_tensor(t.detach())
        if is_main():
            state[name] = t.cpu()
    if not is_main():
        return None
    with torch.device("meta"):
        plain = Transformer(model.config)
        if cfg.lora_rank:
            inject_lora(plain, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    plain.load_state_dict(state, assign=True)
    return plain


def save_checkpoint(model, optimizer, named_params, cfg: TrainConfig, state: dict) -> Path:
    """Write out/checkpoints/step-NNNNNN atomically (temp dir, then rename); keep the last few.

    Every rank calls it (FSDP gathers the shards); rank 0 writes, the others wait.
    """
    final = Path(cfg.out) / "checkpoints" / f"step-{state['step']:06d}"
    model, moments = gathered_model(model, cfg), optimizer_moments(optimizer, named_params)
    if is_main():
        write_checkpoint(model, optimizer, moments, cfg, state, final)
    barrier()
    return final


def write_checkpoint(model, optimizer, moments, cfg: TrainConfig, state: dict, final: Path) -> None:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.lora_rank:
            save_adapter(model, tmp, base_model_name_or_path=str(cfg.model))
            copy_tokenizer_files(cfg.model, tmp)
        else:
            save_model(model, tmp, tokenizer_dir=cfg.model)
        if getattr(model, "value_head", None) is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
                      str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})
        state = {**state, "optimizer": save_optimizer_state(optimizer, moments, tmp / OPTIMIZER_FILE)}
        write_json_atomic(state, tmp / STATE_FILE)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(cfg.out)[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)


def restore_weights(model, ckpt: Path, lora: bool) -> None:
    """Load a checkpoint's trained weights into the freshly built policy (and a PPO run's value head)."""
    if getattr(model, "value_head", None) is not None:
        restore_value_head(model.value_head, ckpt / VALUE_HEAD_FILE)
    if lora:
        load_adapter(model, ckpt)
        return
    tensors = read_state_dict(ckpt, device=next(model.parameters()).device)
    check_state_dict(model, tensors, ckpt)
    with torch.no_grad():
        model.load_state_dict({our_name(k): v for k, v in tensors.items()}, strict=False)


def restore_value_head(head: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise RunError(f"{path}: missing; a PPO checkpoint holds its value head there")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"{path}: not this run's value head ({e})") from None


def output_dtype(model_dir: str | Path) -> torch.dtype:
    """Save the final model in the dtype of the model we started from (config.json torch_dtype)."""
    try:
        name = json.loads((Path(model_dir) / "config.json").read_text()).get("torch_dtype", "float32")
    except (OSError, json.JSONDecodeError):
        name = "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def check_finite_weights(model, where: str) -> None:
    """CheckpointError naming the first parameter that holds NaN or inf (nothing non-finite is ever saved)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise CheckpointError(f"{where}: parameter {name!r} holds NaN or inf; not saved")


def save_final(model, cfg: TrainConfig, state: dict) -> Path:
    """out/final: a plain Hugging Face directory (LoRA merged), tokenizer files, trainer_state.json.

    Every rank calls it (FSDP gathers the shards); rank 0 writes, the others wait.
    """
    model = gathered_model(model, cfg)
    if is_main():
        write_final(model, cfg, state)
    barrier()
    return Path(cfg.out) / "final"


def write_final(model, cfg: TrainConfig, state: dict) -> None:
    out = Path(cfg.out)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        remove_lora(model, merge=True)
    check_finite_weights(model, str(out / "final"))
    try:
        save_model(model, tmp, tokenizer_dir=cfg.model, dtype=output_dtype(cfg.model))
        write_json_atomic({**state, "done": True}, tmp / STATE_FILE)
        replace_dir(tmp, out / "final")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

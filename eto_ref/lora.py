"""LoRA: low-rank adapters on the linear layers of a frozen model.

LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3) keeps a pretrained weight W0
frozen and learns a low-rank update next to it:

    h = W0 x + (alpha / r) * B A x        A: (r, in)   B: (out, r)   r << min(in, out)

B starts at zero, so a freshly adapted model computes exactly what the base model
computes, and training moves away from it smoothly.

Two properties make LoRA convenient for ETO:

* The base weight keeps its name (`...q_proj.weight`), so base checkpoints load
  into an adapted model unchanged and only the small A, B matrices are trained.
* `disable_adapter(model)` switches the adapters off, which turns the policy back
  into the frozen base model: the DPO reference model pi_ref comes for free,
  with no second copy of the weights. ETO sets pi_ref to the policy at the start
  of each iteration; with LoRA, fold the previous adapter in first
  (`remove_lora(model, merge=True)`, then `inject_lora(...)`): the base is then
  the current policy and the disabled adapters give exactly pi_ref.

Adapters are saved in the PEFT format (`adapter_config.json` +
`adapter_model.safetensors`, keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained` can load what we save and vice versa.
`remove_lora(model, merge=True)` folds the adapters into plain weights for
exporting a full Hugging Face model directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

VALID_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the HF model twice: PeftModel.base_model.model


# --------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, Hu et al. 2021).

        h = W0 x + b + (alpha / r) * B A dropout(x)

    Parameters and their state_dict keys (relative to this module):
        weight          (out, in)  frozen base weight W0, same key as nn.Linear
        bias            (out,)     frozen base bias (or None), same key as nn.Linear
        lora_A.weight   (r, in)    kaiming-uniform init (as PEFT)
        lora_B.weight   (out, r)   zero init, so the layer starts equal to the base

    State:
        disabled  True -> forward is the base layer only (the DPO reference model).
        merged    True -> W0 has been replaced by W0 + (alpha/r) B A in place; forward is
                  one matmul and the adapter path is skipped. Merging is for inference and
                  export; unmerge before training the adapters again (gradients do not
                  reach A, B through a merged weight, and unmerge subtracts the *current* B A).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout = dropout
        self.disabled = False
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight/bias Parameters are reused (no copy), frozen;
        the adapters get the base weight's device and dtype."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                    bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        return layer

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) like PEFT and nn.Linear; B = 0 so B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A, the update to W0, computed in float32.  -> (out, in)"""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha/r) B A, in place. Afterwards forward is a single matmul."""
        if self.merged:
            return
        if self.disabled:
            raise RuntimeError("cannot merge a disabled LoRA adapter (its output would then include the update)")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha/r) B A. Exact up to one rounding of W0 in its dtype (exact-ish in float32)."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        y = F.linear(x, self.weight, self.bias)  # (..., out): W0 x + b
        if self.disabled and self.merged:
            raise RuntimeError("LoRALinear is merged and disabled at once; use disable_adapter(model), "
                               "which unmerges temporarily")
        if self.disabled or self.merged:
            return y
        z = self.lora_A(self.lora_dropout(x))  # (..., r)
        return y + self.scaling * self.lora_B(z)  # (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
                f"disabled={self.disabled}, merged={self.merged}")


# --------------------------------------------------------------------------- model-level helpers


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of `model`, by module name (e.g. 'layers.0.self_attn.q_proj')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_targets(targets) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError(f"no LoRA target modules given; valid targets: {', '.join(VALID_TARGETS)}")
    for t in targets:
        if t not in VALID_TARGETS:
            raise ValueError(f"unknown LoRA target module {t!r}; valid targets: {', '.join(VALID_TARGETS)}")
    return targets


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),
) -> list[str]:
    """Replace every nn.Linear whose name ends in one of `targets` by a LoRALinear, in place.

    Every other parameter of the model is frozen; only the adapters (lora_A, lora_B)
    are trainable. Base weights keep their Parameters, names, device and dtype, so
    `model.state_dict()` still holds all base keys unchanged (plus the lora_* keys).
    Returns the names of the replaced modules.
    """
    targets = _check_targets(targets)
    if lora_modules(model):
        raise ValueError("inject_lora: the model already has LoRA adapters (remove_lora first)")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"inject_lora: no nn.Linear module named {targets} found in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, dropout))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (lora_A.weight, lora_B.weight of every LoRALinear)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W0 += (alpha/r) B A)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W0 -= (alpha/r) B A)."""
    for m in lora_modules(model).values():
        m.unmerge()


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: `with disable_adapter(policy): ref_logits = policy(ids)`.

    Sets `disabled` on every LoRALinear and restores the previous flags on exit,
    also when the body raises. Merged adapters are unmerged for the duration and
    merged again on exit (a merged weight no longer holds W0). In float32 that round
    trip is exact up to rounding; in bf16/fp16 it rounds W0 twice, so for the DPO
    reference prefer computing reference log-probs with unmerged adapters.
    """
    saved = [(m, m.disabled, m.merged) for m in lora_modules(model).values()]
    try:
        for m, _, _ in saved:
            m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, disabled, merged in saved:
            m.disabled = False
            if merged:
                m.merge()
            m.disabled = disabled


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Turn every LoRALinear back into a plain nn.Linear, in place; returns their names.

    merge=True keeps the adapted behaviour (weight = W0 + (alpha/r) B A), e.g. to save
    a full Hugging Face model directory; merge=False restores the base layer. The
    weight and bias Parameters are reused and stay frozen (requires_grad=False).
    """
    names = []
    for name, m in lora_modules(model).items():
        if merge and not m.merged:
            m.disabled = False
            m.merge()
        elif not merge:
            m.unmerge()
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        linear.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
        names.append(name)
    return names


# --------------------------------------------------------------------------- PEFT-format save / load


def hf_module_name(name: str) -> str:
    """Our module name -> Hugging Face name: 'layers.0.mlp.up_proj' -> 'model.layers.0.mlp.up_proj'.

    Everything but the output head lives under the HF `model.` prefix.
    """
    return name if name == "lm_head" or name.startswith("lm_head.") else "model." + name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under their PEFT file names, e.g.
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> (r, in).
    (PEFT omits the adapter name 'default' in saved files.)"""
    out = {}
    for name, m in lora_modules(model).items():
        prefix = PEFT_PREFIX + hf_module_name(name)
        out[prefix + ".lora_A.weight"] = m.lora_A.weight
        out[prefix + ".lora_B.weight"] = m.lora_B.weight
    return out


def adapter_config(model: nn.Module, base_model_name_or_path: str = "") -> dict:
    """The PEFT `adapter_config.json` dictionary describing the model's adapters."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA adapters (call inject_lora first)")
    settings = {(m.rank, m.alpha, m.dropout) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"adapters differ in (rank, alpha, dropout): {sorted(settings)}; "
                         "the PEFT format stores one setting for all")
    rank, alpha, dropout = settings.pop()
    suffixes = {name.rsplit(".", 1)[-1] for name in modules}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": [t for t in VALID_TARGETS if t in suffixes],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) to `out_dir`.

    Files are written into a temporary directory next to `out_dir` first. A new
    `out_dir` appears by one rename of that directory; into an existing `out_dir`
    each file is moved by os.replace (weights first, config last), leaving other
    files there untouched. A crash never leaves a half-written file behind.
    """
    out_dir = Path(out_dir)
    config = adapter_config(model, base_model_name_or_path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            for fname in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                os.replace(tmp / fname, out_dir / fname)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# Config keys for PEFT features this implementation does not have; each must be off (falsy).
_UNSUPPORTED_KEYS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                     "rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication",
                     "exclude_modules", "target_parameters", "trainable_token_indices")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """Read and validate `adapter_config.json`; ValueError naming the file and key if unsupported."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found (an adapter directory needs "
                                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: key 'peft_type' is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path}: missing required key {key!r}")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: key 'bias' is {cfg['bias']!r}, only 'none' is supported")
    for key in _UNSUPPORTED_KEYS:
        if cfg.get(key):
            raise ValueError(f"{path}: key {key!r} = {cfg[key]!r} is not supported by eto_ref.lora")
    targets = cfg["target_modules"]
    if targets == "all-linear":
        targets = list(VALID_TARGETS)
    elif isinstance(targets, str):
        targets = [targets]  # PEFT reads a string as a regex; we accept a single plain module name
    try:
        cfg["target_modules"] = list(_check_targets(targets))
    except ValueError as e:
        raise ValueError(f"{path}: key 'target_modules': {e}") from None
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter directory into `model`, injecting adapters first if it has none.

    Strict: every adapter tensor of the model must be in the file and every tensor of
    the file must belong to an adapter, with matching shape; otherwise ValueError
    naming the file and the key. Returns the names of the adapted modules.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    rank, alpha = cfg["r"], cfg["lora_alpha"]
    if not lora_modules(model):
        inject_lora(model, rank, alpha, cfg.get("lora_dropout", 0.0), cfg["target_modules"])
    for name, m in lora_modules(model).items():
        if m.merged:
            raise RuntimeError(f"{name}: adapter is merged; unmerge_lora(model) before load_adapter")
        if not math.isclose(m.scaling, alpha / rank):
            raise ValueError(f"{adapter_dir / ADAPTER_CONFIG_NAME}: r={rank}, lora_alpha={alpha} give scaling "
                             f"{alpha / rank}, but the model's adapter {name} has scaling {m.scaling}")

    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        hint = " (adapter_model.bin is a pickle; only safetensors is read)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: adapter weights not found{hint}")
    expected = lora_state_dict(model)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        unknown, missing = sorted(set(f.keys()) - expected.keys()), sorted(expected.keys() - set(f.keys()))
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r} ({len(unknown)} unknown in all; the model "
                             f"has no such LoRA adapter, expected keys like {next(iter(expected))!r})")
        if missing:
            raise ValueError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
        with torch.no_grad():
            for key, param in expected.items():
                t = f.get_tensor(key)
                if t.shape != param.shape:
                    raise ValueError(f"{path}: key {key!r} has shape {tuple(t.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                param.copy_(t)
    return list(lora_modules(model))

"""The settings of a training stage, in one place: each default is a dataclass field.

The field defaults are the official ETO values for Llama-2-7B-Chat (`run_eto.sh`,
`fastchat/train/train_dpo.py`): SFT lr 2e-5, 3 epochs, batch 64, cosine, 3% warmup;
DPO lr 1e-6, beta 0.1, 3 epochs, batch 32, constant, 10% warmup. A model of
another size needs other values; a *preset* holds only the fields it overrides:

    preset  model                                    what changes
    tiny    the built-in 4M model, trained from      much larger learning rates, small batches,
            scratch (eto_ref/tiny.py)                chosen-side NLL in DPO
    small   pretrained models under 1B parameters    full fine-tuning at CPU-sized batches and
            (the default, SmolLM2-135M-Instruct)     learning rates chosen on the validation slice
    7b      the paper's models                       gradient checkpointing (values as the paper)

`preset_for(model_dir)` picks one from the model directory: the `eto_ref_preset` key
that eto_ref writes into config.json (the tiny model), else the parameter count.
`TrainConfig.for_model(model, **given)` = the defaults, the preset's overrides, then
what the caller gave. Command-line flags are generated from these fields (eto_ref/cli.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRESET_KEY = "eto_ref_preset"  # config.json key naming a model's preset (written by eto_ref/tiny.py)
SMALL_MAX_PARAMETERS = 1_000_000_000  # pretrained models below this use the "small" preset
TINY_MAX_PARAMETERS = 20_000_000  # a model this small (without the key) is a from-scratch toy: "tiny"
PRESET_NAMES = ("tiny", "small", "7b")
BUILTIN_PRESETS = {"smollm2": "small", "tiny": "tiny"}  # the built-in models (eto_ref/models.py) by name


def setting(default, help: str, low=None, high=None, above: bool = False, choices: tuple | None = None,  # noqa: A002
            **kwargs):
    """A dataclass field with its help text and the values it allows: the one place a setting is described.

    A number must be >= low (> low with `above`) and <= high, where given; a word one of `choices`.
    The command line checks them as it parses (eto_ref/cli.py).
    """
    metadata = {"help": help, "low": low, "high": high, "above": above, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Settings every training stage shares (SFT, DPO, PPO, GRPO). Defaults: the paper's 7B values."""

    model: str = setting("smollm2", "model directory to start from, or a built-in name: smollm2, tiny")
    out: str = setting("runs/sft", "run directory (checkpoints, metrics.jsonl, final/)")
    lr: float = setting(2e-5, "peak learning rate", low=0, above=True)
    weight_decay: float = setting(0.0, "AdamW weight decay (the official ETO scripts use 0)", low=0)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    adam_eps: float = setting(1e-8, "AdamW epsilon", low=0)
    epochs: int = setting(3, "passes over the data", low=1)
    batch_size: int = setting(64, "sequences (SFT) or pairs (DPO) per optimizer step", low=1)
    micro_batch_size: int = setting(4, "sequences or pairs per forward/backward; gradients accumulate to batch_size", low=1)
    max_len: int = setting(4096, "max tokens per sequence (longer ones are cut, with a warning)", low=1)
    clip: float = setting(1.0, "max gradient norm (0 = no clipping)", low=0)
    schedule: str = setting("cosine", "lr schedule after warmup: cosine | constant", choices=("cosine", "constant"))
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming the lr up from 0", low=0, high=1)
    max_steps: int | None = setting(None, "cap on optimizer steps (the schedule is laid out over the capped total)", low=1)
    max_examples: int | None = setting(None, "use only the first N records of the data file (quick runs)", low=1)
    lora_rank: int = setting(0, "LoRA adapter rank; 0 = full fine-tuning", low=0)
    lora_alpha: float = setting(16.0, "LoRA scale alpha", low=0, above=True)
    lora_dropout: float = setting(0.05, "LoRA input dropout", low=0)
    lora_targets: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"), "modules LoRA adapts")
    eval_fraction: float = setting(0.05, "held-out fraction of the data for the evaluation loss", low=0, high=1)
    eval_every: int = setting(0, "steps between held-out evaluations (0 = only at the end)", low=0)
    save_every: int = setting(100, "steps between checkpoints (0 = none)", low=0)
    keep_checkpoints: int = setting(2, "checkpoints kept", low=1)
    seed: int = setting(0, "data order, held-out split, LoRA init and dropout", low=0)
    device: str = setting("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = setting("auto", "compute dtype (training: autocast over float32 weights; the agent: the "
                                 "policy's weights): auto (bfloat16 on CUDA and on CPUs with bfloat16 "
                                 "instructions, else float32) | float32 | bfloat16", choices=("auto", "float32", "bfloat16"))
    gradient_checkpointing: bool = setting(False, "recompute each layer's activations in backward (less memory)")
    fsdp: bool = setting(False, "under torchrun: shard weights, grads and AdamW states over the ranks (else a full replica per rank)")
    compile: bool = setting(False, "torch.compile the model (CUDA; slow to start, faster steps)")
    resume: bool = setting(True, "continue the run in `out` from its last checkpoint (False: start over)")
    progress: bool = setting(True, "progress bar on stderr")

    # Where and how a run computes, not what it computes: left out of its identity. (micro_batch_size:
    # gradients accumulate to the same update; dtype: the identity records what `auto` resolved to.)
    RUNNING = ("out", "resume", "progress", "device", "dtype", "micro_batch_size", "gradient_checkpointing", "fsdp",
               "compile", "save_every", "keep_checkpoints", "eval_every")
    STAGE = "sft"

    def identity(self) -> dict:
        """The settings that determine the trained model: every field but those of RUNNING."""
        return {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if k not in self.RUNNING}

    @classmethod
    def for_model(cls, model: str | Path, preset: str = "auto", **given):
        """The config of `model`: the field defaults, the preset's overrides (auto: `preset_for`), `given`.

            DPOConfig.for_model("runs/sft/final", pairs="pairs.json", out="runs/eto/iter-1")
        """
        preset = preset_for(model) if preset == "auto" else preset
        return cls(model=str(model), **{**preset_values(preset, cls.STAGE), **given})


@dataclass
class SFTConfig(TrainConfig):
    """Behavioral cloning (paper Eq. 5) on expert trajectories (ETO-format SFT JSON/JSONL)."""

    data: str = setting("data/science_sft.json", "ETO-format SFT data (JSON list or JSONL)")


@dataclass
class DPOConfig(TrainConfig):
    """One DPO stage of ETO (paper Eq. 7) on preference pairs (ETO-format pair JSON/JSONL)."""

    pairs: str = setting("", "ETO-format preference pairs (JSON list or JSONL)")
    out: str = setting("runs/eto", "run directory (checkpoints, metrics.jsonl, reference_logps.json, final/)")
    beta: float = setting(0.1, "DPO beta: the strength of the pull towards the reference", low=0, above=True)
    sft_weight: float = setting(0.0, "add this times the chosen side's token-mean NLL (0 = the paper's objective)", low=0)
    lr: float = setting(1e-6, "peak learning rate", low=0, above=True)
    batch_size: int = setting(32, "pairs per optimizer step", low=1)
    micro_batch_size: int = setting(2, "pairs per forward/backward (each is a chosen and a rejected row)", low=1)
    schedule: str = setting("constant", "lr schedule after warmup: cosine | constant", choices=("cosine", "constant"))
    warmup_ratio: float = setting(0.1, "fraction of the steps spent warming the lr up from 0", low=0, high=1)
    eval_fraction: float = setting(0.0, "held-out fraction of the pairs (the paper trains on all)", low=0, high=1)
    STAGE = "dpo"


@dataclass
class PPOConfig(TrainConfig):
    """Offline PPO, the paper's PPO row (eto_ref/ppo.py): token-level PPO with a value head on episodes
    collected beforehand. Defaults: TRL's PPOConfig, which the official train_ppo.py leaves in place."""

    trajectories: str = setting("", "the episodes to learn from, with their rewards: an exploration's "
                                     "trajectories.jsonl (ETO-format records)")
    out: str = setting("runs/ppo", "run directory (checkpoints, metrics.jsonl, final/)")
    reference: str = setting("", "the KL reference, a model directory (empty: the model trained from; with LoRA "
                                  "its base)")
    lr: float = setting(1.41e-5, "peak learning rate", low=0, above=True)
    epochs: int = setting(1, "passes over the episodes", low=1)
    batch_size: int = setting(16, "episodes per rollout batch: their advantages are computed and whitened "
                                  "together, then ppo_epochs optimizer steps are taken on them", low=1)
    micro_batch_size: int = setting(4, "episodes per forward/backward", low=1)
    ppo_epochs: int = setting(4, "optimizer steps on each rollout batch (its old log-probs stay fixed)", low=1)
    kl_coef: float = setting(0.2, "beta of the per-token KL penalty against the reference (the starting "
                                  "policy) in the reward", low=0)
    gamma: float = setting(1.0, "GAE discount over agent tokens", low=0, high=1)
    lam: float = setting(0.95, "GAE lambda", low=0, high=1)
    clip_ratio: float = setting(0.2, "PPO clip range of the probability ratio: 1 - eps .. 1 + eps", low=0,
                                above=True)
    value_clip: float = setting(0.2, "clip range of the value head's change from its old value", low=0, above=True)
    vf_coef: float = setting(0.1, "weight of the value loss in the total loss", low=0)
    schedule: str = setting("constant", "lr schedule after warmup: cosine | constant", choices=("cosine", "constant"))
    warmup_ratio: float = setting(0.0, "fraction of the steps spent warming the lr up from 0", low=0, high=1)
    eval_fraction: float = setting(0.0, "held-out fraction of the episodes (PPO trains on all)", low=0, high=1)
    save_every: int = setting(100, "steps between checkpoints (0 = none); a multiple of ppo_epochs, so a resumed "
                                   "run starts a rollout batch", low=0)
    STAGE = "ppo"


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO (beyond the paper; eto_ref/grpo.py): the clipped surrogate with group-normalised episode rewards
    as advantages, no critic, a k3 KL term. Defaults: TRL's GRPOConfig (lr 1e-6, one step per batch)."""

    samples: str = setting("", "the groups: a folder of sampled runs over the same tasks, "
                                "sample-*/trajectories.jsonl (one run per sample)")
    out: str = setting("runs/grpo", "run directory (checkpoints, metrics.jsonl, final/)")
    reference: str = setting("", "the KL reference, a model directory (empty: the model trained from; with LoRA "
                                  "its base)")
    lr: float = setting(1e-6, "peak learning rate", low=0, above=True)
    epochs: int = setting(1, "passes over the episodes", low=1)
    batch_size: int = setting(16, "episodes per rollout batch: scored once, then ppo_epochs optimizer steps", low=1)
    micro_batch_size: int = setting(4, "episodes per forward/backward", low=1)
    ppo_epochs: int = setting(1, "optimizer steps on each rollout batch (its old log-probs stay fixed)", low=1)
    kl_coef: float = setting(0.04, "weight of the k3 KL estimate against the reference (the starting policy)", low=0)
    clip_ratio: float = setting(0.2, "clip range of the probability ratio: 1 - eps .. 1 + eps", low=0, above=True)
    schedule: str = setting("constant", "lr schedule after warmup: cosine | constant", choices=("cosine", "constant"))
    warmup_ratio: float = setting(0.0, "fraction of the steps spent warming the lr up from 0", low=0, high=1)
    eval_fraction: float = setting(0.0, "held-out fraction of the episodes (GRPO trains on all)", low=0, high=1)
    group_size: int = setting(4, "online GRPO (no --samples): sampled runs of each task per iteration, over "
                                 "explore_limit // group_size tasks", low=2)
    group_temperature: float = setting(0.7, "online GRPO: the temperature its groups are sampled at (evaluation "
                                            "keeps the agent's --temperature, greedy by default)", low=0, above=True)
    RUNNING = TrainConfig.RUNNING + ("group_size", "group_temperature")  # how the loop collects groups
    STAGE = "grpo"


# Per model size: only what differs from the field defaults. Keys: the stage configs ("sft", "dpo", "ppo",
# "grpo"), the ETO loop ("loop", eto_ref/eto.py), the agent ("agent", "sampling", eto_ref/agent.py, eto_ref/sampler.py)
# and the main job ("pipeline", eto_ref/pipeline.py).
PRESETS = {
    "tiny": {
        "sft": dict(lr=2e-3, epochs=6, batch_size=8, micro_batch_size=8, max_len=2048),
        # sft_weight: with the paper's pure DPO objective the tiny model also loses likelihood on the
        # expert trajectories and its replies degrade (docs/results-tiny.md); the chosen side's NLL keeps them.
        "dpo": dict(lr=5e-5, batch_size=16, micro_batch_size=4, max_len=2048, sft_weight=1.0),
        "ppo": dict(lr=5e-5, max_len=2048),
        "grpo": dict(lr=5e-5, max_len=2048),
        "loop": dict(explore_limit=160, eval_limit=50),
        # trained from scratch on 0-shot sequences, it is thrown off by an in-context example
        "agent": dict(icl=False),
        "sampling": dict(max_new_tokens=96),
    },
    "small": {
        # SmolLM2-135M on 2 CPU cores: full fine-tuning in batches of 8. SFT lr and epochs chosen on the
        # validation slice (docs/results.md). Activation checkpointing keeps a step under 3 GB.
        # Checkpoints every few minutes of work, so an interrupted stage loses little.
        "sft": dict(lr=2e-4, epochs=2, batch_size=8, micro_batch_size=8, max_len=2048, gradient_checkpointing=True,
                    save_every=10),
        # The main job's DPO: the paper's lr 1e-6 and beta 0.1, three epochs (docs/results.md, the settings
        # searched on valid). Micro-batches of 4 pairs peak at 2.7 GB with training's freed memory returned.
        "dpo": dict(lr=1e-6, epochs=3, batch_size=8, micro_batch_size=4, max_len=2048, gradient_checkpointing=True,
                    save_every=4),
        # Offline PPO on the 192 episodes of ETO's first exploration, at TRL's learning rate: 6 rollout
        # batches of 32, 2 optimizer steps on each (12 steps, about half an hour on 2 cores).
        "ppo": dict(batch_size=32, ppo_epochs=2, max_len=2048, gradient_checkpointing=True, save_every=2),
        "grpo": dict(max_len=2048, gradient_checkpointing=True, save_every=4),
        # Explore the 96 SFT tasks and 96 more: the SFT policy ties the expert on nearly every task it was
        # trained on, so the unseen half gives the failures to pair. Later iterations: the official schedule.
        "loop": dict(explore_limit=192, eval_limit=100, beta_schedule=(0.1, 0.5), lr_schedule=(1e-6, 5e-7)),
        # fine-tuned 0-shot, SmolLM2 follows an in-context example's task instead of its own (2.0 vs 47.3)
        "agent": dict(icl=False, batch_size=16),
        "sampling": dict(max_new_tokens=128),
        "pipeline": dict(sft_examples=96),
    },
    "7b": {
        # under torchrun: sharded (a replica of a 7B model with its AdamW states needs ~113 GB per GPU)
        "sft": dict(gradient_checkpointing=True, fsdp=True),
        "dpo": dict(gradient_checkpointing=True, fsdp=True),
        "ppo": dict(gradient_checkpointing=True),
        "grpo": dict(gradient_checkpointing=True, fsdp=True),
        # run_eto.sh: 3 iterations; beta 0.1 and lr 1e-6, then beta 0.5 and lr 5e-7
        "loop": dict(iterations=3, beta_schedule=(0.1, 0.5), lr_schedule=(1e-6, 5e-7)),
    },
}


def preset_values(preset: str, key: str) -> dict:
    """A preset's overrides of one config ("sft", "dpo", "loop", "agent", "sampling", "pipeline")."""
    return dict(PRESETS[check_preset(preset)].get(key, {}))


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (or auto)")
    return name


def estimate_parameters(config: dict) -> int:
    """Parameter count from a config.json dict alone (embeddings + layers + head), without loading weights."""
    d, f, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    nh = config["num_attention_heads"]
    hs = config.get("head_dim") or d // nh
    nkv = config.get("num_key_value_heads") or nh
    attn = d * hs * (2 * nh + 2 * nkv)
    head = 0 if config.get("tie_word_embeddings") else V * d
    return V * d + L * (attn + 3 * d * f + 2 * d) + d + head


def preset_for(model_dir: str | Path) -> str:
    """The preset of a model directory: its config.json `eto_ref_preset`, else by size (see the module docstring)."""
    if str(model_dir) in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[str(model_dir)]
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config not found (a model directory needs config.json)")
    config = json.loads(path.read_text())
    if config.get(PRESET_KEY) in PRESETS:
        return config[PRESET_KEY]
    n = estimate_parameters(config)
    return "tiny" if n < TINY_MAX_PARAMETERS else "small" if n < SMALL_MAX_PARAMETERS else "7b"

"""Command-line flags generated from config dataclasses, so a setting's default and help live in one place.

    add_config_flags(parser, SFTConfig)                  # --lr, --batch-size, ... (one per field)
    add_config_flags(parser, DPOConfig, prefix="dpo-")   # --dpo-lr, --dpo-batch-size, ...
    args = parser.parse_args()
    given_values(args, DPOConfig, prefix="dpo-")         # {"lr": 1e-6} for the flags given, nothing else

A flag that is not given is absent from the parsed namespace (its argparse default
is SUPPRESS), so the value comes from the dataclass field or a preset, never from a
second copy of the default here. The help text is the field's, plus its default and
the presets that change it. Every numeric value is checked at parse time (a count
must be >= 1, a rate finite and in range): a setting out of range is a one-line error.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, fields, is_dataclass

# Ranges checked at parse time, by field name: (low, high, whether low itself is allowed). Counts are >= 1.
POSITIVE = ("epochs", "batch_size", "micro_batch_size", "max_len", "keep_checkpoints", "iterations",
            "max_new_tokens", "sft_examples", "rft_epochs", "threads", "top_k")
AT_LEAST_ONE_OR_NONE = ("max_steps", "max_examples", "explore_limit", "eval_limit", "limit")
NON_NEGATIVE = ("weight_decay", "clip", "lora_rank", "lora_dropout", "eval_every", "save_every", "seed", "env_seed",
                "valid", "valid_start", "start", "best_of_n", "temperature", "bon_temperature", "sft_weight",
                "rejected_extra_turns", "adam_eps")
RANGES = {"lr": (0.0, math.inf, False), "beta": (0.0, math.inf, False), "warmup_ratio": (0.0, 1.0, True),
          "eval_fraction": (0.0, 1.0, True), "top_p": (0.0, 1.0, False), "lora_alpha": (0.0, math.inf, False),
          "rft_lr_scale": (0.0, math.inf, False)}
CHOICES = {"schedule": ("cosine", "constant"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("auto", "float32", "bfloat16", "float16")}


def flag(name: str, prefix: str = "") -> str:
    return "--" + prefix + name.replace("_", "-")


def dest(name: str, prefix: str = "") -> str:
    return (prefix + name).replace("-", "_")


def check_value(name: str, value):
    """The value, or ValueError when it is out of the range the setting allows."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if value is None:
        return value
    if name in POSITIVE or name in AT_LEAST_ONE_OR_NONE:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
    elif name in NON_NEGATIVE:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
    elif name in RANGES:
        low, high, low_ok = RANGES[name]
        if not (low <= value <= high) or (value == low and not low_ok):
            bound = f"{'>=' if low_ok else '>'} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
            raise ValueError(f"must be {bound}, got {value}")
    return value


def value_parser(name: str, type_name: str):
    """The argparse `type` of a field whose annotation reads `type_name` (e.g. "int | None"; "int | str"
    takes a number or the word auto)."""
    base = type_name.replace(" | None", "").replace(" | str", "").strip()
    if base.startswith("tuple["):
        item = float if "float" in base else str
        return lambda text: tuple(item(t.strip()) for t in text.split(",") if t.strip())
    convert = {"int": int, "float": float, "str": str}[base]

    words = [w for w, allowed in (("none", "None" in type_name), ("auto", base != "str" and "str" in type_name))
             if allowed]
    kinds = [{"int": "a whole number", "float": "a number"}.get(base, "text"), *words]
    expected = " or ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)

    def parse(text: str):
        if text.lower() in words:
            return {"none": None, "auto": "auto"}[text.lower()]
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check_value(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = base  # argparse names the type in its error messages
    return parse


def describe(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_flags(parser, cls, prefix: str = "", skip=(), presets: dict | None = None, note: str = "") -> None:
    """One flag per field of dataclass `cls` (nested dataclasses and `skip` left out).

    `presets` maps a preset name to that preset's overrides of `cls`'s fields: they are
    listed in the help. `note` is appended to every help text (e.g. "for both stages").
    """
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(default):
            continue
        text = f.metadata.get("help", "")
        extra = [f"default {describe(default)}"]
        changed = {p: v[f.name] for p, v in (presets or {}).items() if f.name in v}
        if changed:
            extra.append("presets: " + ", ".join(f"{p} {describe(v)}" for p, v in changed.items()))
        help_text = f"{text} ({'; '.join(extra)}){note}"
        kwargs = dict(dest=dest(f.name, prefix), default=argparse.SUPPRESS, help=help_text)
        if f.type == "bool":
            parser.add_argument(flag(f.name, prefix), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
            parser.add_argument(flag(f.name, prefix), type=value_parser(f.name, f.type), metavar=f.name.upper(),
                                **kwargs)


def given_values(args: argparse.Namespace, cls, prefix: str = "", skip=()) -> dict:
    """{field: value} of the flags of `cls` given on the command line (absent ones are not in the namespace)."""
    out = {}
    for f in fields(cls):
        key = dest(f.name, prefix)
        if f.name not in skip and hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out

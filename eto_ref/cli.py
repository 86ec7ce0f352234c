"""Command-line flags generated from config dataclasses, so a setting's default and help live in one place.

    add_config_flags(parser, SFTConfig)                  # --lr, --batch-size, ... (one per field)
    add_config_flags(parser, DPOConfig, prefix="dpo-")   # --dpo-lr, --dpo-batch-size, ...
    args = parser.parse_args()
    given_values(args, DPOConfig, prefix="dpo-")         # {"lr": 1e-6} for the flags given, nothing else

A flag that is not given is absent from the parsed namespace (its argparse default
is SUPPRESS), so the value comes from the dataclass field or a preset, never from a
second copy of the default here. The help text is the field's, plus its default and
the presets that change it. Every numeric value is checked at parse time against the
range its field declares (`setting(..., low=1)`): a setting out of range is a one-line error.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, fields, is_dataclass

def flag(name: str, prefix: str = "") -> str:
    return "--" + prefix + name.replace("_", "-")


def dest(name: str, prefix: str = "") -> str:
    return (prefix + name).replace("-", "_")


def check_value(f: Field, value):
    """The value, or ValueError when it is out of the range the field declares (eto_ref/config.py `setting`)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
    if value is None or isinstance(value, (str, tuple)) or (low is None and high is None):
        return value
    if (low is not None and (value < low or (above and value == low))) or (high is not None and value > high):
        bound = " and ".join(([f"{'>' if above else '>='} {low:g}"] if low is not None else [])
                             + ([f"<= {high:g}"] if high is not None else []))
        raise ValueError(f"must be {bound}, got {value}")
    return value


def value_parser(f: Field):
    """The argparse `type` of a field, from its annotation (e.g. "int | None"; "int | str" takes a number
    or the word auto), checking the range it declares."""
    type_name = f.type
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
            return check_value(f, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = base  # argparse names the type in its error messages
    return parse


def field_of(cls, name: str) -> Field:
    """The dataclass field `name` of `cls` (for a flag declared by hand from a config field)."""
    return next(f for f in fields(cls) if f.name == name)


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
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag(f.name, prefix), type=value_parser(f), metavar=f.name.upper(), **kwargs)


def given_values(args: argparse.Namespace, cls, prefix: str = "", skip=()) -> dict:
    """{field: value} of the flags of `cls` given on the command line (absent ones are not in the namespace)."""
    out = {}
    for f in fields(cls):
        key = dest(f.name, prefix)
        if f.name not in skip and hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out

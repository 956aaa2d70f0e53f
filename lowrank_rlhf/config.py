"""Recipe configuration: one dataclass per concern, loaded strictly from YAML plus key=value overrides.

Every field carries a one-line help text (TRL style) and, where it matters, its allowed values or range.
Unknown keys are an error that names the nearest valid key: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported in one line that names the file, the key and the allowed values."""


def opt(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    """A dataclass field with its help line and validation rules in the metadata."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("tiny-llama", "tiny-llama | smollm2-135m | a local path or hub id of a LLaMA-family causal LM")
    quantization: str = opt("4bit", "how the shared base is stored", choices=("4bit", "8bit", "none"))
    dtype: str = opt("auto", "compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
                     choices=("auto", "bfloat16", "float16", "float32"))
    device: str = opt("auto", "where the base lives; auto = cuda if available else cpu", choices=("auto", "cuda", "cpu"))
    trust_remote_code: bool = opt(False, "run model code from the hub; off unless a recipe turns it on")
    max_length: int = opt(1024, "longest prompt + response the model is asked to handle", low=8)


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank of every role adapter", low=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r)", low=1)
    dropout: float = opt(0.0, "LoRA dropout; 0 keeps PPO's logprobs deterministic", low=0.0, high=1.0)
    target_modules: list = opt(["all-linear"], "linear layers that get adapters; all-linear = every one but lm_head")
    critic: str = opt("separate", "separate = value role has its own adapter; shared = value head on the policy",
                      choices=("separate", "shared"))


@dataclass
class MemoryConfig:
    budget: str = opt("auto", "memory budget, e.g. 24GiB; auto = the device's free memory (on CUDA enforced "
                              "with set_per_process_memory_fraction)")
    gradient_checkpointing: str = opt("auto", "auto = the planner decides", choices=("auto", "on", "off"))
    micro_batch: dict = opt({}, "fixed micro-batch per phase (generate/score/train), skipping the planner")


@dataclass
class RecipeConfig:
    """The whole recipe. Sections group settings by concern, as in alignment-handbook recipes."""

    run_dir: str = opt("runs/default", "where adapters, heads, checkpoints and metrics are written")
    seed: int = opt(0, "seed for torch, python and numpy", low=0)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the shared base"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the role adapters"})
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"help": "memory budget and planner"})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert, int -> float) a YAML value against a field type; raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is list and isinstance(value, str):
        return [value]
    base = origin or tp
    if isinstance(base, type) and not isinstance(value, base):
        raise ConfigError(f"{where}: expected {_type_name(base)}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value: Any, meta: dict, where: str) -> None:
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where}: {value!r} is out of range; allowed range: {bounds}")


def build(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys, wrong types and bad values all raise."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, path = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name], f"{path}.")
        else:
            value = _coerce(data[name], tp, path)
            _check_range(value, f.metadata, path)
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[last] = value


def parse_overrides(items: list[str]) -> dict:
    """['ppo.kl_coef=0.1', 'model.quantization=8bit'] -> nested dict; values parsed as YAML scalars."""
    data: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. ppo.kl_coef=0.05")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (or defaults when path is None), apply key=value overrides, validate strictly."""
    data: dict = {}
    label = "defaults"
    if path is not None:
        label = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{label}: recipe file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{label}: not valid YAML ({str(err).splitlines()[0]})") from None
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return build(RecipeConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

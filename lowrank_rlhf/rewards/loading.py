"""Loading `module:function` reward specs, calling them with checks, and the weighted sum of the parts."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import RewardFunctionError, _first_line
from .timeout import CallTimeout, call_with_timeout

SPEC_FORM = "module:function or path/to/file.py:function"


# ----------------------------------------------------------------------------------------------------------- loading
def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise RewardFunctionError(f"rewards.functions: {spec!r}: file not found: {path}")
    # A unique module name per file, so two reward files named rewards.py do not shadow each other.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"lowrank_rlhf_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[module_name]
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise RewardFunctionError(f"rewards.functions: cannot import {path} for {spec!r}: {_first_line(err)}") \
            from err
    return module


def load_reward_function(spec: str) -> Callable:
    """Resolve "package.module:function" or "path/to/file.py:function" to the callable."""
    spec = str(spec).strip()
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr or not attr.isidentifier():
        raise RewardFunctionError(f"rewards.functions: {spec!r} is not a reward function spec; expected {SPEC_FORM}, "
                                  f"e.g. lowrank_rlhf.rewards:exact_yes_no")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target).expanduser(), spec)
        where = target
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise RewardFunctionError(f"rewards.functions: cannot import module {target!r} for {spec!r}: "
                                      f"{_first_line(err)}") from err
        where = f"module {target!r}"
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise RewardFunctionError(f"rewards.functions: {where} has no attribute {attr!r}; functions found: "
                                  f"{', '.join(found) or '(none)'}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardFunctionError(f"rewards.functions: {spec!r} is not callable (it is a {type(fn).__name__}); "
                                  f"expected a function (prompts, completions, **kwargs) -> list[float]")
    return fn


def load_reward_functions(specs: Sequence[str], weights: Sequence[float] = (), timeout_s: float | None = None
                          ) -> dict[str, tuple[Callable, float]]:
    """rewards.functions + rewards.function_weights -> {spec: (function, weight)}; empty weights = 1.0 each.
    timeout_s (rewards.timeout_s): each call of a function may take this long, then fails naming it."""
    specs = list(specs)
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardFunctionError(f"rewards.function_weights: {len(weights)} weights for {len(specs)} functions; "
                                  f"give one weight per function or none (1.0 each)")
    if len(set(specs)) != len(specs):
        dup = next(s for s in specs if specs.count(s) > 1)
        raise RewardFunctionError(f"rewards.functions: {dup!r} is listed twice; list each function once and "
                                  f"set its weight instead")
    return {spec: (bounded(load_reward_function(spec), spec, timeout_s), float(w))
            for spec, w in zip(specs, weights)}


def bounded(fn: Callable, name: str, timeout_s: float | None) -> Callable:
    """fn, giving up after timeout_s per call with a RewardFunctionError naming it (a hung function would stall the
    run forever). functools.wraps keeps fn's signature, which decides the columns fn gets (_accepted_kwargs)."""
    if not timeout_s:
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        try:
            return call_with_timeout(fn, timeout_s, *args, **kwargs)
        except CallTimeout:
            raise RewardFunctionError(f"reward function {name} did not return within rewards.timeout_s={timeout_s:g} "
                                      f"s; make it faster, or raise rewards.timeout_s (null = no limit)") from None
    return call


# ----------------------------------------------------------------------------------------------------------- calling
def _accepted_kwargs(fn: Callable, kwargs: Mapping[str, Any]) -> dict:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return dict(kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    return None


def call_reward_function(fn: Callable, prompts: Sequence[str], completions: Sequence[Any], name: str | None = None,
                         **kwargs: Any) -> torch.Tensor:
    """Call fn(prompts=..., completions=..., **kwargs) and check its answer: one finite number per completion.
    Returns a float32 tensor [n] on the CPU. Extra kwargs (dataset columns) reach fn as far as it accepts them."""
    name = name or getattr(fn, "__qualname__", repr(fn))
    n = len(completions)
    try:
        result = fn(prompts=list(prompts), completions=list(completions), **_accepted_kwargs(fn, kwargs))
    except RewardFunctionError:
        raise
    except Exception as err:
        raise RewardFunctionError(f"reward function {name} raised {_first_line(err)}") from err
    if isinstance(result, torch.Tensor):
        values = result.detach().float().cpu().reshape(-1).tolist() if result.dim() <= 1 else None
        if values is None:
            raise RewardFunctionError(f"reward function {name} returned a tensor of shape {tuple(result.shape)}; "
                                      f"expected {n} scores, one per completion")
    elif isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__len__"):
        raise RewardFunctionError(f"reward function {name} returned {type(result).__name__}; expected a list of "
                                  f"{n} floats, one per completion")
    else:
        values = list(result)
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name} returned {len(values)} scores for {n} completions; "
                                  f"expected {n}")
    scores = []
    for i, value in enumerate(values):
        number = _as_float(value)
        if number is None:
            raise RewardFunctionError(f"reward function {name} returned a non-numeric score at index {i}: "
                                      f"{value!r} ({type(value).__name__})")
        if not math.isfinite(number):
            raise RewardFunctionError(f"reward function {name} returned a non-finite score ({number}) at index {i}")
        scores.append(number)
    return torch.tensor(scores, dtype=torch.float32)


def combine_scores(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The PPO score: sum over parts of weights[name] * parts[name]; every part needs a weight and vice versa.
    Returns float32 [n] on the first part's device."""
    if not parts:
        raise RewardFunctionError("rewards: no reward sources; set rewards.learned_weight > 0 or list "
                                  "rewards.functions")
    if set(parts) != set(weights):
        raise RewardFunctionError(f"rewards: parts and weights differ; parts: {', '.join(parts)}; weights: "
                                  f"{', '.join(weights)}")
    first = next(iter(parts.values()))
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for name, scores in parts.items():
        if scores.shape != first.shape:
            raise RewardFunctionError(f"rewards: part {name!r} has shape {tuple(scores.shape)}, expected "
                                      f"{tuple(first.shape)}")
        total = total + float(weights[name]) * scores.to(device=first.device, dtype=torch.float32)
    return total

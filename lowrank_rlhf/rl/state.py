"""The run state of an RL loop on disk: checkpoints (adapters, heads, optimizer, scheduler, counters, RNG states),
written atomically with a manifest, and an exact resume from them.

An exact resume needs more than the adapters: the optimizer's moments, the schedule's position, the KL controller,
the running score statistics and every RNG a user's reward function might draw from. Sampling itself is keyed
(sampling.py), so it needs no RNG state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..models.roles import HEAD_FILES, RoleModel
from ..run import checkpoint as ckpt

TRAINED_ROLES = ("policy", "value")


def get_rng_state() -> dict:
    """Every RNG a user's reward function or a library might draw from (the loop itself uses keyed sampling)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(blob: dict) -> None:
    torch.set_rng_state(blob["torch"])
    if blob["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda"])
    version, state, gauss = blob["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    keys, pos, has_gauss, cached = blob["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def trained_roles(model: RoleModel) -> list[str]:
    return [r for r in TRAINED_ROLES if r in model.roles]


def save_checkpoint(checkpoint_dir: Path, model: RoleModel, optimizer, scheduler, counters: dict) -> None:
    """Adapters, heads, optimizer, scheduler, RNG states and the loop's `counters` (JSON), atomically."""

    def write(tmp: Path) -> None:
        model.save(tmp, roles=trained_roles(model))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": get_rng_state()}, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(counters, default=float))

    ckpt.write_atomically(checkpoint_dir, write)


def load_checkpoint(checkpoint_dir: Path, model: RoleModel, optimizer, scheduler) -> tuple[Path, dict] | None:
    """Load the latest checkpoint into the live objects (a damaged one is refused); returns (its path, the loop's
    counters), or None when there is none."""
    source = ckpt.latest(checkpoint_dir)
    if source is None:
        return None
    ckpt.verify(source)
    load_adapter_weights(model, source)
    blob = torch.load(source / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return source, json.loads((source / "trainer_state.json").read_text())


def load_adapter_weights(model: RoleModel, source: Path) -> None:
    """Copy saved policy/value adapter and head weights into the live model in place: requires_grad and the
    optimizer's parameter identities stay as they are."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for role in trained_roles(model):
        path = source / role / "adapter_model.safetensors"
        if path.is_file():
            result = set_peft_model_state_dict(model.peft, load_file(str(path), device=str(model.device)),
                                               adapter_name=role)
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ckpt.CheckpointError(f"{path}: keys that fit no adapter, e.g. {bad[0]}")
    for head, module in model.heads.items():
        path = source / model.adapter_for(head) / HEAD_FILES[head]
        if path.is_file():
            with torch.no_grad():
                for name, tensor in load_file(str(path), device=str(model.device)).items():
                    getattr(module, name).copy_(tensor)


def save_best(target: Path, model: RoleModel, best: dict) -> None:
    """RUN/best: the policy (plain PEFT) at the best held-out metric so far, and best.json saying which."""

    def write(tmp: Path) -> None:
        model.save(tmp, roles=["policy"])
        (tmp / "best.json").write_text(json.dumps(best, indent=2))

    ckpt.write_atomically(target, write, manifest=False)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after the checkpoint: a kill between a step's log line and its checkpoint would
    otherwise leave that step twice in metrics.jsonl after the resume."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))

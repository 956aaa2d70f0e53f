"""What a run directory says about itself: RUN/lowrank_rlhf.json records the base the adapters were trained on (an
architecture fingerprint), its quantization and compute dtype, the roles and the LoRA settings; loading adapters onto
a base with a different fingerprint fails with a message that names both bases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

META_FILE = "lowrank_rlhf.json"
# The architecture fields that decide whether adapters fit a base; the name alone may differ (a moved checkpoint).
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")


class BaseMismatchError(ValueError):
    """Adapters saved for one base were loaded onto another."""


def base_fingerprint(config, name: str) -> dict:
    return {"name": name, **{k: getattr(config, k, None) for k in FINGERPRINT_KEYS}}


def run_metadata(config, base_name: str, quantization: str, compute_dtype, roles: list, critic: str, heads: list,
                 lora) -> dict:
    """RUN/lowrank_rlhf.json's content: which base (fingerprint, quantization, compute dtype) the adapters belong
    to, which roles and heads the run has, and the LoRA shape. One builder for RoleModel.save and the TRL stages."""
    return {"base": base_fingerprint(config, base_name), "quantization": quantization,
            "compute_dtype": dtype_name(compute_dtype), "roles": list(roles), "critic": critic,
            "heads": list(heads),
            "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}}


def _describe(fp: dict) -> str:
    return (f"'{fp.get('name')}' ({fp.get('model_type')}, {fp.get('num_hidden_layers')} layers, "
            f"hidden {fp.get('hidden_size')}, vocab {fp.get('vocab_size')})")


def read_run_metadata(run_dir: Path) -> dict:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a lowrank_rlhf run directory (no {META_FILE})")
    return json.loads(path.read_text())


def check_base(meta: dict, config, base_name: str, run_dir: Path) -> None:
    saved = meta.get("base", {})
    current = base_fingerprint(config, base_name)
    if any(saved.get(k) != current.get(k) for k in FINGERPRINT_KEYS):
        raise BaseMismatchError(f"adapters in {run_dir} were trained on base {_describe(saved)} but the loaded base "
                                f"is {_describe(current)}")


def dtype_name(dtype) -> str | None:
    """torch.bfloat16 -> 'bfloat16' (the form recipes use for model.dtype); None when unknown."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def warn_on_compute_dtype_change(meta: dict, dtype, run_dir: Path) -> None:
    """Adapters trained over one compute dtype and used over another still load, but their answers can change a lot:
    the text2sql SFT adapter trained in float32 on a CPU answered 33 of 56 held-out questions there and 23-24 over
    bf16 compute on a GPU (docs/design.md). Legal (a CPU-trained adapter served on a GPU), so a warning, not an
    error; runs written before this field existed say nothing."""
    saved, current = meta.get("compute_dtype"), dtype_name(dtype)
    if saved and saved != current:
        log.warning("adapters in %s were trained over %s compute and now run over %s: their answers can differ "
                    "(set model.dtype=%s to match)", run_dir, saved, current, saved)

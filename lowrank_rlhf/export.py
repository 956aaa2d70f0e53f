"""Exporting a finished run's policy: the adapter alone (plain PEFT), or merged into a standalone bf16 model.

An adapter trained on a 4-bit (or 8-bit) base learned to correct the quantized weights, not the original ones: on
SmolLM2-135M the quickstart's SFT adapter is right on 77.5% of held-out headlines on its 4-bit base and answers
`yes` to all of them on the unquantized weights. So the merge goes into the dequantized base the run trained on
(transformers' `dequantize`), never into the original checkpoint, and never into the 4-bit weights themselves
(merging into NF4 would round the update away).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import torch

from .checkpoint import write_atomically
from .config import ConfigError
from .inference import run_recipe
from .models.loading import load_base
from .models.run_metadata import read_run_metadata


def policy_adapter_dir(run_dir: Path) -> Path:
    """RUN/policy, or RUN/sft for a run that stopped after SFT."""
    source = run_dir / "policy" if (run_dir / "policy").is_dir() else run_dir / "sft"
    if not (source / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir}: no policy (or sft) adapter to export")
    return source


def merged_policy(run_dir: Path):
    """(model, tokenizer): the run's policy merged into the bf16 dequantized base it was trained on."""
    cfg = run_recipe(run_dir)
    base, tokenizer = load_base(cfg.model)  # the base exactly as the run saw it
    if cfg.model.quantization != "none":
        base = base.dequantize(dtype=torch.bfloat16)
    base.to(torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(base, str(policy_adapter_dir(run_dir))).merge_and_unload()
    return merged, tokenizer


def export_run(run_dir: Path, out: Path, merge: bool = False, overwrite: bool = False) -> Path:
    """The policy adapter alone (plain PEFT), or merged into a bf16 copy of the run's dequantized base."""
    read_run_metadata(run_dir)  # a clear error if this is not a run directory
    source = policy_adapter_dir(run_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another")

    def write(tmp: Path) -> None:
        if merge:
            model, tokenizer = merged_policy(run_dir)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            shutil.copytree(source, tmp, dirs_exist_ok=True)

    return write_atomically(out, write, manifest=False)

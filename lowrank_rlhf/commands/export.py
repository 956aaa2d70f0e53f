"""Exporting a finished run's policy: the adapter alone (plain PEFT), or merged into a standalone bf16 model.

An adapter trained on a 4-bit (or 8-bit) base learned to correct the quantized weights, not the original ones: on
SmolLM2-135M the quickstart's SFT adapter is right on 77.5% of held-out headlines on its 4-bit base and answers
`yes` to all of them on the unquantized weights. So the merge goes into the dequantized base the run trained on
(transformers' `dequantize`) by default; `merge_into="original"` (the unquantized checkpoint) stays available, with a
warning. Never into the 4-bit weights themselves (merging into NF4 would round the update away).

`--out` follows the run directory's rule (run_dir.py): an empty directory, or an earlier export of ours, which
`--overwrite` replaces; a directory with anyone else's files is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import peft
import torch

from ..config import ConfigError
from ..models.loading import load_base
from ..run.checkpoint import CheckpointError, verify_adapter, write_atomically
from ..run.directory import OWNED_FILE, RunDirError, check_writable, claim, owned_names
from ..run.metadata import read_run_metadata
from .inference import run_recipe

log = logging.getLogger(__name__)
MERGE_TARGETS = ("dequantized", "original")
FORMATS = ("peft", "gguf")
GGUF_FILE = "model.gguf"


def policy_adapter_dir(run_dir: Path) -> Path:
    """RUN/policy, or RUN/sft for a run that stopped after SFT."""
    source = run_dir / "policy" if (run_dir / "policy").is_dir() else run_dir / "sft"
    if not (source / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir}: no policy (or sft) adapter to export")
    return source


def merged_policy(run_dir: Path, merge_into: str = "dequantized"):
    """(model, tokenizer): the run's policy merged into bf16 weights: the dequantized base it was trained on, or
    with merge_into="original" the unquantized checkpoint."""
    if merge_into not in MERGE_TARGETS:
        raise ConfigError(f"--merge-into: {merge_into!r} is not allowed; allowed values: {', '.join(MERGE_TARGETS)}")
    cfg = run_recipe(run_dir)
    if merge_into == "original" and cfg.model.quantization != "none":
        log.warning("--merge-into original: merging into the unquantized weights of %s, but the adapter was trained "
                    "on its %s base and never saw them; the merged model may answer differently from the trained "
                    "policy (the default, --merge-into dequantized, keeps its answers)", cfg.model.name,
                    cfg.model.quantization)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
    base, tokenizer = load_base(cfg.model)  # the base exactly as the run saw it (or the original weights)
    if cfg.model.quantization != "none":
        base = base.dequantize(dtype=torch.bfloat16)
    base.to(torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(base, str(policy_adapter_dir(run_dir))).merge_and_unload()
    return merged, tokenizer


def export_run(run_dir: Path, out: Path, merge: bool = False, overwrite: bool = False,
               merge_into: str = "dequantized", fmt: str = "peft", quant: str = "f16") -> Path:
    """The policy adapter alone (plain PEFT), or merged into a bf16 copy of the run's dequantized base (or, with
    merge_into="original", of the original weights)."""
    read_run_metadata(run_dir)  # a clear error if this is not a run directory
    source = policy_adapter_dir(run_dir)
    if not verify_adapter(source):  # a damaged file raised already; never pass on one nobody can check
        raise CheckpointError(f"{source} has no manifest (written before adapters carried checksums), so export "
                              f"cannot tell it is sound; `lowrank-rlhf verify {run_dir} --seal` checks it opens and "
                              f"records its checksums")
    check_writable(out, "--out")  # anyone else's file: refused, also with --overwrite
    if out.exists() and owned_names(out) and not overwrite:
        raise RunDirError(f"{out} already holds an export; pass --overwrite to replace it, or choose another --out")

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; allowed values: {', '.join(FORMATS)}")

    def write(tmp: Path) -> None:
        if fmt == "gguf":  # the merged policy, for llama.cpp / Ollama
            from .gguf_export import ollama_modelfile, write_gguf

            model, tokenizer = merged_policy(run_dir, merge_into)
            write_gguf(model, tokenizer, tmp / GGUF_FILE, quant)
            (tmp / "Modelfile").write_text(ollama_modelfile(GGUF_FILE))
        elif merge:
            model, tokenizer = merged_policy(run_dir, merge_into)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        claim(tmp, [p.name for p in tmp.iterdir()] + [OWNED_FILE])  # the swap below replaces only this list

    return write_atomically(out, write, manifest=False)

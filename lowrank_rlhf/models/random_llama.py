"""Published decoder shapes with random weights (LLaMA-2 7B/13B/70B, LLaMA-1 33B/65B, Llama-3.1-8B, Qwen3-8B), built
directly in 4-bit (or 8-bit, or bf16) one layer at a time.

Memory and speed do not depend on the weights' values, so a benchmark can use the exact published architectures
without a download and without ever holding the 13 GB (7B) / 26 GB (13B) bf16 checkpoint: the skeleton is created on
the meta device, then every decoder linear is materialised on the target device from a random bf16 matrix that is
quantized at once and freed, so at most one linear's bf16 weight (11008 x 4096 for 7B, 90 MB) exists at a time.

The result looks to transformers and PEFT exactly like a model loaded with `from_pretrained(quantization_config=
BitsAndBytesConfig(...))`: bitsandbytes `Linear4bit` layers (NF4, double quantization, bf16 compute on GPU), the
quantization config on `model.config`, an `hf_quantizer` and `is_loaded_in_4bit`, so `RoleModel` wraps the layers
with PEFT's 4-bit LoRA layer. A tiny `LlamaConfig` (or `Qwen3Config`) works the same way on CPU (tests).

The names are the short names of memory/shapes.py's KNOWN_SHAPES (those without a hub organisation), so a shape the
planner knows is a shape the bench can build. Qwen3 is built as transformers' Qwen3ForCausalLM (LLaMA's layout plus
an RMSNorm on every query and key head), the others as LlamaForCausalLM.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .loading import keep_one_cpu_4bit_path, quantization_config
from .shapes import KNOWN_SHAPES, SHORT_NAMES

log = logging.getLogger(__name__)

# Every short name of memory/shapes.py's table (the one place for model shapes) can be built.
RANDOM_MODELS = SHORT_NAMES

# The rest of each family's published config.json, by name prefix (the shapes come from memory/shapes.py). Token ids
# are the random tokenizer's (<unk>=pad 0, <s> 1, </s> 2) for every family: the bench feeds random ids and forces the
# response length, so the real ids would only disagree with the tokenizer.
_COMMON = dict(hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, use_cache=True,
               attention_bias=False)
_FAMILIES = (  # (name prefix, config class, fields), first match wins
    ("llama2-", LlamaConfig, dict(max_position_embeddings=4096, rms_norm_eps=1e-5, pretraining_tp=1,
                                  rope_theta=10000.0, mlp_bias=False)),           # meta-llama/Llama-2-*-hf
    ("llama3.1-", LlamaConfig, dict(max_position_embeddings=131072, rms_norm_eps=1e-5, mlp_bias=False,
                                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=8192))),  # Llama-3.1-8B
    ("llama-", LlamaConfig, dict(max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                                 mlp_bias=False)),                                # huggyllama/llama-30b, -65b
    ("qwen3-", Qwen3Config, dict(max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 use_sliding_window=False)),                      # Qwen/Qwen3-8B
)
_MODEL_CLASSES = {LlamaConfig: LlamaForCausalLM, Qwen3Config: Qwen3ForCausalLM}

# The seven linears of a LLaMA decoder layer, as (submodule, attribute): the ones quantization and LoRA touch.
DECODER_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                   ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def random_config(shape_or_name: str | PreTrainedConfig) -> PreTrainedConfig:
    """A name of RANDOM_MODELS -> its published config (LlamaConfig or Qwen3Config); a config is returned as is."""
    if isinstance(shape_or_name, PreTrainedConfig):
        return shape_or_name
    if shape_or_name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {shape_or_name!r}; allowed: {', '.join(RANDOM_MODELS)} or a "
                         f"LlamaConfig / Qwen3Config")
    config_class, fields = next((cls, fields) for prefix, cls, fields in _FAMILIES if shape_or_name.startswith(prefix))
    config = config_class(**KNOWN_SHAPES[shape_or_name].hf_config_fields(), **_COMMON, **fields)
    config.name_or_path = f"random-{shape_or_name}"
    return config


llama_config = random_config  # the name from when every random model was a LLaMA-2


def model_class(config: PreTrainedConfig) -> type:
    """The transformers model class that builds `config` (Qwen3ForCausalLM for a Qwen3Config)."""
    for config_class, cls in _MODEL_CLASSES.items():
        if type(config) is config_class:
            return cls
    raise ValueError(f"no random builder for {type(config).__name__}; allowed: "
                     f"{', '.join(c.__name__ for c in _MODEL_CLASSES)}")


def random_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` tokens: <unk>=0 (also the pad), <s>=1, </s>=2, then t3, t4, ...

    Enough for everything PPO needs from a tokenizer (pad/eos ids, token <-> id, decoding); the benchmark feeds
    random token ids and never tokenizes text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def _normal(shape, std: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def _quantized_linear(weight: torch.Tensor, quantization: str, compute_dtype: torch.dtype,
                      device: torch.device) -> nn.Module:
    """A Linear (no bias) holding `weight`, quantized on `device` as bitsandbytes does in from_pretrained."""
    out_features, in_features = weight.shape
    if quantization == "none":
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer
    import bitsandbytes as bnb

    if quantization == "4bit":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                  device="meta")
        # Params4bit.to(device) quantizes a not-yet-quantized weight (NF4 + double quantization of the absmax).
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.uint8, module=layer).to(device)
        return layer
    if quantization == "8bit":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0,
                                    device="meta")
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        # Int8Params.to() only quantizes on a move from the CPU; the weight is already on `device`.
        layer.weight = param._quantize(device)
        return layer
    raise ValueError(f"unknown quantization {quantization!r}; allowed: 4bit, 8bit, none")


def _mark_quantized(model: LlamaForCausalLM, quantization: str, compute_dtype: torch.dtype) -> None:
    """Set what from_pretrained sets on a bitsandbytes model (config.quantization_config, hf_quantizer,
    is_loaded_in_4bit/8bit, is_quantized, quantization_method): PEFT picks its 4-bit/8-bit LoRA layers from them."""
    bnb_config: BitsAndBytesConfig | None = quantization_config(quantization, compute_dtype)
    if bnb_config is None:
        return
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def _norms(layer: nn.Module) -> list[nn.Module]:
    """The layer's RMSNorms (a module holding only a 1-d `weight`), found by what they hold, not by name."""
    return [m for m in layer.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and not list(m.children())]


@torch.no_grad()
def build_random_llama(shape_or_name: str | PreTrainedConfig = "llama2-7b", quantization: str = "4bit",
                       device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A randomly initialised LLaMA (std `initializer_range`, 0.02 for LLaMA-2) built layer by layer on `device`;
    returns (model, tokenizer) like `models.load_base`: frozen, eval mode, KV cache on.

    `dtype` is the dtype of the embeddings, norms and lm_head and the 4-bit compute dtype: bf16 on GPU (bitsandbytes'
    float32 default is a silent slow path), float32 on CPU as `load_base` does."""
    from accelerate import init_empty_weights

    config = random_config(shape_or_name)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = model_class(config)(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range

    model.model.embed_tokens.weight = nn.Parameter(
        _normal((config.vocab_size, config.hidden_size), std, dtype, device, generator), requires_grad=False)
    for layer in model.model.layers:
        for parent_name, name in DECODER_LINEARS:
            parent = getattr(layer, parent_name)
            meta = getattr(parent, name)
            weight = _normal((meta.out_features, meta.in_features), std, dtype, device, generator)
            setattr(parent, name, _quantized_linear(weight, quantization, dtype, device))
            del weight  # one bf16 linear alive at a time
        for norm in _norms(layer):  # input, post-attention, and Qwen3's per-head q_norm / k_norm
            norm.weight = nn.Parameter(torch.ones(norm.weight.shape, dtype=dtype, device=device),
                                       requires_grad=False)
    model.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype, device=device),
                                           requires_grad=False)
    model.lm_head.weight = nn.Parameter(_normal((config.vocab_size, config.hidden_size), std, dtype, device,
                                                generator), requires_grad=False)
    for module in model.modules():  # the rotary tables were built on the CPU
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"random model left tensors on the meta device: {leftover[:3]}")

    _mark_quantized(model, quantization, dtype)
    model.requires_grad_(False)
    if device.type == "cpu":
        keep_one_cpu_4bit_path(model)
    model.eval()
    model.config.use_cache = True
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.build_seconds = time.perf_counter() - started
    log.info("built random %s (%s) on %s in %.1f s", config.name_or_path or "llama", quantization, device,
             model.build_seconds)
    return model, random_tokenizer(config.vocab_size)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes the base's weights occupy: parameters and buffers, plus the bitsandbytes quantization state that
    lives outside them (4-bit absmax, nested absmax, code tables; 8-bit row scales). LoRA weights excluded."""
    seen: set[int] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        key = tensor.data_ptr()
        if key in seen or tensor.numel() == 0:
            return
        seen.add(key)
        total += tensor.numel() * tensor.element_size()

    def add_quant_state(state) -> None:
        if state is None:
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(state, name, None))
        add_quant_state(getattr(state, "state2", None))

    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        add(param)
        add_quant_state(getattr(param, "quant_state", None))
        add(getattr(param, "SCB", None))
    for name, buffer in model.named_buffers():
        if "lora_" not in name:
            add(buffer)
    for module in model.modules():
        state = getattr(module, "state", None)  # Linear8bitLt moves its row scales here after the first forward
        if state is not None and hasattr(state, "SCB"):
            add(state.SCB)
    return total

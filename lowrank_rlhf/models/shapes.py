"""Model shapes: the numbers of a LLaMA-layout decoder that memory depends on, and the published shapes the planner
knows offline (LLaMA-1/2 7B-70B, Llama-3.1-8B, Qwen3-8B).

The one place for model shapes: the planner reads them, and the random LLaMA-2 bases of the benchmark
(models/random_llama.py) build their `LlamaConfig` from them, so the two cannot drift apart. Also the LoRA target
names and the exact LoRA parameter count, which only depend on the shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ALL_LINEAR", "KNOWN_SHAPES", "LINEAR_NAMES", "LLAMA2_7B", "LLAMA2_13B", "LLAMA2_70B", "LLAMA31_8B",
           "LLAMA_33B", "LLAMA_65B", "QWEN3_8B", "ModelShape", "linear_shapes", "lora_params", "lora_targets",
           "lora_tensor_sizes", "resolve_targets"]

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a LLaMA-layout decoder that memory depends on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_params: int
    tie_word_embeddings: bool = False

    @classmethod
    def llama(
        cls,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        vocab_size: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        tie_word_embeddings: bool = False,
    ) -> ModelShape:
        """Build a shape and count its parameters with the LLaMA layout (no biases)."""
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        shape = cls(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                    head_dim, vocab_size, 0, tie_word_embeddings)
        return cls(**{**asdict(shape), "num_params": _count_params(shape)})

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (or a dict of its fields)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d))
        return cls.llama(
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_heads=get("num_attention_heads"),
            vocab_size=get("vocab_size"),
            num_kv_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    def hf_config_fields(self) -> dict[str, Any]:
        """The `LlamaConfig` fields this shape sets (the inverse of `from_hf_config`)."""
        return dict(num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_attention_heads=self.num_heads,
                    num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
                    tie_word_embeddings=self.tie_word_embeddings)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size  # 2 RMSNorms per layer + final

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder linears (the ones quantization and LoRA touch)."""
        return self.num_layers * sum(i * o for i, o in linear_shapes(self).values())

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 KV cache for one token across all layers (x dtype_bytes / 2 for other dtypes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` for the seven linears of one decoder layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def _count_params(shape: ModelShape) -> int:
    return shape.embedding_params + shape.linear_params + shape.norm_params + shape.lm_head_params


# The published configs (config.json) of meta-llama/Llama-2-7b-hf and meta-llama/Llama-2-13b-hf.
LLAMA2_7B = ModelShape.llama(32, 4096, 11008, 32, 32000)
LLAMA2_13B = ModelShape.llama(40, 5120, 13824, 40, 32000)
# LLaMA-1 33B and 65B (huggyllama/llama-30b, huggyllama/llama-65b; Meta's paper calls the first 33B): 32.5 B and
# 65.3 B parameters, full multi-head attention.
LLAMA_33B = ModelShape.llama(60, 6656, 17920, 52, 32000)
LLAMA_65B = ModelShape.llama(80, 8192, 22016, 64, 32000)
# meta-llama/Llama-2-70b-hf: grouped-query attention, 8 KV heads (68,976,648,192 parameters).
LLAMA2_70B = ModelShape.llama(80, 8192, 28672, 64, 32000, num_kv_heads=8)
# meta-llama/Llama-3.1-8B: GQA with 8 KV heads, a 128,256-token vocabulary, untied lm_head (8,030,261,248).
LLAMA31_8B = ModelShape.llama(32, 4096, 14336, 32, 128256, num_kv_heads=8)
# Qwen/Qwen3-8B: GQA with 8 KV heads of head_dim 128, a 151,936-token vocabulary, untied lm_head
# (tie_word_embeddings: false; the smaller Qwen3 models tie theirs), no attention biases. Its q_norm and k_norm
# (an RMSNorm of head_dim on every query and key head) are left out: 2 x 128 weights per layer (9,216 of 8.19 B
# parameters) and, per token, one fp32 copy of q and k in the layer's forward, under 1% of its activations.
QWEN3_8B = ModelShape.llama(36, 4096, 12288, 32, 151936, num_kv_heads=8, head_dim=128)

# Published shapes by name, so recipes for gated hub models plan without a download. LLaMA-1 7B/13B share LLaMA-2's.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": LLAMA2_7B, "meta-llama/Llama-2-7b-chat-hf": LLAMA2_7B,
    "huggyllama/llama-7b": LLAMA2_7B, "llama2-7b": LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": LLAMA2_13B, "meta-llama/Llama-2-13b-chat-hf": LLAMA2_13B,
    "huggyllama/llama-13b": LLAMA2_13B, "llama2-13b": LLAMA2_13B,
    "huggyllama/llama-30b": LLAMA_33B, "llama-33b": LLAMA_33B,
    "huggyllama/llama-65b": LLAMA_65B, "llama-65b": LLAMA_65B,
    "meta-llama/Llama-2-70b-hf": LLAMA2_70B, "meta-llama/Llama-2-70b-chat-hf": LLAMA2_70B, "llama2-70b": LLAMA2_70B,
    "meta-llama/Llama-3.1-8B": LLAMA31_8B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B": LLAMA31_8B, "meta-llama/Meta-Llama-3.1-8B-Instruct": LLAMA31_8B,
    "llama3.1-8b": LLAMA31_8B,
    "Qwen/Qwen3-8B": QWEN3_8B, "Qwen/Qwen3-8B-Base": QWEN3_8B, "qwen3-8b": QWEN3_8B,
}
# the names without a hub organisation: the random-weight models the bench builds (models/random_llama.py)
SHORT_NAMES = tuple(name for name in KNOWN_SHAPES if "/" not in name)


# --------------------------------------------------------------------------- LoRA targets


def lora_targets(target_modules: Sequence[str]) -> str | list[str]:
    """A recipe's `lora.target_modules` as PEFT and the planner take it: ``["all-linear"]`` -> ``"all-linear"``
    (PEFT only expands the bare string), any other list unchanged."""
    return ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)


def resolve_targets(targets: str | Iterable[str]) -> list[str]:
    """The decoder linears a LoRA target spec names (``"all-linear"``, ``"q_proj,v_proj"`` or a list)."""
    if isinstance(targets, str):
        targets = LINEAR_NAMES if targets == ALL_LINEAR else [t.strip() for t in targets.split(",")]
    names = list(targets)
    unknown = [t for t in names if t not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}: use {ALL_LINEAR!r} or names from {list(LINEAR_NAMES)}")
    return list(dict.fromkeys(names))


def lora_params(shape: ModelShape, r: int, targets: str | Iterable[str] = ALL_LINEAR) -> int:
    """Exact LoRA parameter count of one adapter: r*(in+out) per targeted linear per layer."""
    if r < 0:
        raise ValueError(f"LoRA rank must be >= 0, got {r}")
    linears = linear_shapes(shape)
    return shape.num_layers * sum(r * sum(linears[t]) for t in resolve_targets(targets))


def lora_tensor_sizes(shape: ModelShape, r: int, targets: str | Iterable[str] = ALL_LINEAR) -> list[int]:
    """Element counts of one adapter's tensors, one lora_A (r x in) and one lora_B (out x r) per targeted linear per
    layer: an 8-bit optimizer decides per tensor whether its states are 8-bit (see estimate.optimizer_bytes)."""
    linears = linear_shapes(shape)
    per_layer = [n for t in resolve_targets(targets) for n in (r * linears[t][0], r * linears[t][1])]
    return per_layer * shape.num_layers

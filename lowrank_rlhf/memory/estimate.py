"""GPU memory: pure estimates per phase -> a plan, and the OOM-retry runner.

Everything above ``MicroBatchRunner`` is arithmetic on a model's shape: no model is
loaded and no GPU is needed, so a recipe can be planned (and tested) anywhere.
docs/memory.md lists the formulas; every coefficient below says why it is what it is.

Units: bytes everywhere. ``dtype_bytes`` is the compute dtype (2 for bf16/fp16, 4 for fp32).
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "ALL_LINEAR",
    "BUDGET_FRACTION",
    "AdapterSpec",
    "MemoryBudgetError",
    "MemoryPlan",
    "MicroBatchOOMError",
    "MicroBatchRunner",
    "ModelShape",
    "PhasePlan",
    "LLAMA2_7B",
    "LLAMA2_13B",
    "estimate_generate",
    "estimate_score",
    "estimate_train",
    "format_bytes",
    "linear_shapes",
    "lora_params",
    "parse_bytes",
    "plan",
    "static_floor",
    "weight_bytes",
]

# --------------------------------------------------------------------------- constants

# The planner fills at most this fraction of the budget: the caching allocator fragments
# (blocks rounded to 512 B / 2 MiB segments, freed blocks that do not fit the next request),
# and our estimates ignore small tensors (masks, position ids, rotary tables).
BUDGET_FRACTION = 0.9

# PEFT keeps LoRA weights in fp32 on a quantized base (autocast_adapter_dtype=True), so every
# adapter, trained or frozen, costs 4 bytes per parameter.
ADAPTER_PARAM_BYTES = 4
# A trained parameter additionally holds an fp32 gradient (4) and AdamW's exp_avg and
# exp_avg_sq (4 + 4): with the fp32 weight that is 16 bytes per trained parameter.
OPTIMIZER_BYTES_PER_TRAINED_PARAM = 4 + 4 + 4  # grad + exp_avg + exp_avg_sq

# bitsandbytes NF4: 4 bits per weight, one absmax per block of 64 weights. With double
# quantization the absmax values are themselves 8-bit (1 byte each), with one fp32 absmax
# (4 bytes) per 256 of them.
NF4_BLOCK = 64
NF4_ABSMAX_BYTES = 1
NF4_DQ_BLOCK = 256
NF4_DQ_ABSMAX_BYTES = 4
# LLM.int8: 1 byte per weight plus one fp32 scale per output row (the SCB vector).
INT8_ROW_SCALE_BYTES = 4

# cuBLAS workspace, RNG state, small buffers: a fixed allowance present in every phase.
WORKSPACE_BYTES = 64 * 1024**2

# Activations, counted per token per decoder layer, in units of one element of the compute
# dtype (multiply by dtype_bytes). See _layer_forward_elems / _layer_saved_elems.
#
# Forward without grad, live at the peak of one layer: the residual stream, the RMSNorm
# output, its fp32 upcast (2 units), the attention output and the o_proj output = 6 hidden-
# sized, q (num_heads*head_dim), k and v (num_kv_heads*head_dim); in the MLP, gate, up and
# act(gate)*up, plus the output-sized temporary each PEFT LoRA adds to the base output of
# gate_proj and up_proj = 5 intermediate-sized. (3 until 2026-11-24; the H100 runs in
# docs/benchmarks/ measured 1.31-1.33x the 3-unit figure for 7B and 13B, which 5 units give.)
NOGRAD_HIDDEN_UNITS = 6
NOGRAD_INTER_UNITS = 5
# Saved for backward in one layer (LoRA on the linears, frozen base): each RMSNorm saves its
# fp32 upcast input (2 units) and its normalized output (1) = 3, twice = 6; q and the
# attention output saved by SDPA/flash and o_proj's LoRA = 2; k, v saved by SDPA; in the MLP,
# gate out (SiLU backward), up out and silu(gate) (mul backward), and their product (down_proj
# LoRA input) = 4 intermediate-sized.
TRAIN_HIDDEN_UNITS = 8
TRAIN_INTER_UNITS = 4
# During backward a layer's gradients are in flight next to its saved activations: we count
# the layer being back-propagated twice (saved tensors + their gradients).
BACKWARD_LAYER_FACTOR = 2

# Logits: generation keeps the last position's logits, the fp32 upcast the sampler works on,
# and the softmax probabilities = 3 fp32 copies of batch x vocab.
GEN_LOGITS_COPIES = 3
# Scoring: fp32 logits of the response tokens plus the selective log-softmax temporaries
# (logsumexp reduction and the cast from the lm_head's dtype) ~ 2 fp32 copies. They exist
# after the last layer has freed its activations, so the phase peaks at the larger of the two.
SCORE_LOGITS_COPIES = 2
# Training the policy: fp32 logits, the log-softmax kept for backward and the logits'
# gradient = 3 fp32 copies, while the loss is back-propagated to the last hidden state; after
# that only the kept logits (1 copy, read for the entropy) stay beside the layers' backward.
TRAIN_LOGITS_COPIES = 3
TRAIN_KEPT_LOGITS_COPIES = 1

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"

_QUANT_ALIASES = {
    "4bit": "4bit", "nf4": "4bit", "4-bit": "4bit",
    "8bit": "8bit", "int8": "8bit", "8-bit": "8bit",
    "none": "none", "bf16": "none", "fp16": "none", "fp32": "none",
}


class MemoryBudgetError(ValueError):
    """The budget cannot hold what every phase needs (weights + adapters + optimizer)."""


class MicroBatchOOMError(RuntimeError):
    """A phase ran out of memory at micro-batch 1: halving cannot help any more."""


# --------------------------------------------------------------------------- byte strings

_UNITS = {
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_ALLOWED_UNITS = "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float) -> int:
    """``"24GiB" -> 25769803776``; plain ints (or digit strings) are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"cannot parse memory size {value!r}: use a number with one of {_ALLOWED_UNITS}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"memory size must be a non-negative number of bytes, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).upper() if match else None
    if match is None or (unit and unit not in _UNITS):
        raise ValueError(
            f"cannot parse memory size {value!r}: use a number with one of {_ALLOWED_UNITS}, e.g. '24GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit or "B"])


def format_bytes(n: int | float, unit: str | None = None) -> str:
    """``format_bytes(10_533_584_896) -> "9.81 GiB"``; ``unit`` forces B/KiB/MiB/GiB/TiB."""
    steps = [("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4)]
    if unit is None:
        unit, scale = steps[0]
        for name, size in steps:
            if abs(n) >= size:
                unit, scale = name, size
    else:
        scale = dict(steps)[unit]
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / scale:.2f} {unit}"


# --------------------------------------------------------------------------- model shape


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
    ) -> "ModelShape":
        """Build a shape and count its parameters with the LLaMA layout (no biases)."""
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        shape = cls(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                    head_dim, vocab_size, 0, tie_word_embeddings)
        return cls(**{**asdict(shape), "num_params": _count_params(shape)})

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelShape":
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


LLAMA2_7B = ModelShape.llama(32, 4096, 11008, 32, 32000)
LLAMA2_13B = ModelShape.llama(40, 5120, 13824, 40, 32000)


# --------------------------------------------------------------------------- adapters


def _targets(targets: str | Iterable[str]) -> list[str]:
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
    return shape.num_layers * sum(r * sum(linears[t]) for t in _targets(targets))


@dataclass(frozen=True)
class AdapterSpec:
    """The LoRA adapters and scalar heads living on the shared base."""

    r: int = 16
    targets: str | tuple[str, ...] = ALL_LINEAR
    n_trainable: int = 2  # policy, value
    n_frozen: int = 2  # sft (the reference), reward
    n_trainable_heads: int = 1  # value head
    n_frozen_heads: int = 1  # reward head

    def head_params(self, shape: ModelShape) -> int:
        return shape.hidden_size + 1  # Linear(hidden, 1) with bias: an upper bound

    def param_bytes(self, shape: ModelShape) -> int:
        """fp32 weights of every adapter and head (trained or not)."""
        n = lora_params(shape, self.r, self.targets) * (self.n_trainable + self.n_frozen)
        n += self.head_params(shape) * (self.n_trainable_heads + self.n_frozen_heads)
        return n * ADAPTER_PARAM_BYTES

    def optimizer_bytes(self, shape: ModelShape) -> int:
        """Gradient + two AdamW states (fp32) for every trained adapter and head."""
        n = lora_params(shape, self.r, self.targets) * self.n_trainable
        n += self.head_params(shape) * self.n_trainable_heads
        return n * OPTIMIZER_BYTES_PER_TRAINED_PARAM


def _adapters(lora: AdapterSpec | None) -> AdapterSpec:
    return lora if lora is not None else AdapterSpec(r=0, n_trainable=0, n_frozen=0,
                                                     n_trainable_heads=0, n_frozen_heads=0)


# --------------------------------------------------------------------------- weights


def _quant(quantization: str | None) -> str:
    key = "none" if quantization is None else str(quantization).lower()
    if key not in _QUANT_ALIASES:
        raise ValueError(f"unknown quantization {quantization!r}: use '4bit', '8bit' or 'none'")
    return _QUANT_ALIASES[key]


def weight_bytes(shape: ModelShape, quantization: str | None, dtype_bytes: int = 2) -> int:
    """Bytes of the base weights on the GPU.

    - ``"4bit"`` (NF4, double quant): per linear ``n/2`` + ``ceil(n/64)`` 8-bit absmax
      + ``ceil(ceil(n/64)/256)`` fp32 second-level absmax;
    - ``"8bit"`` (LLM.int8): per linear ``n`` + ``4*out_features`` (fp32 row scales);
    - ``"none"``: ``dtype_bytes`` per parameter.
    Embeddings, lm_head (unless tied) and norms stay in the compute dtype in every case.
    """
    q = _quant(quantization)
    unquantized = (shape.embedding_params + shape.lm_head_params + shape.norm_params) * dtype_bytes
    if q == "none":
        return unquantized + shape.linear_params * dtype_bytes
    per_layer = 0
    for fan_in, fan_out in linear_shapes(shape).values():
        n = fan_in * fan_out
        if q == "4bit":
            blocks = math.ceil(n / NF4_BLOCK)
            per_layer += math.ceil(n / 2) + blocks * NF4_ABSMAX_BYTES
            per_layer += math.ceil(blocks / NF4_DQ_BLOCK) * NF4_DQ_ABSMAX_BYTES
        else:
            per_layer += n + fan_out * INT8_ROW_SCALE_BYTES
    return unquantized + shape.num_layers * per_layer


def _dequant_workspace(shape: ModelShape, quantization: str | None, dtype_bytes: int) -> int:
    # bitsandbytes dequantizes a whole weight to the compute dtype before a multi-token
    # matmul (and in backward); the largest linear bounds that temporary.
    if _quant(quantization) == "none":
        return 0
    return max(i * o for i, o in linear_shapes(shape).values()) * dtype_bytes


# --------------------------------------------------------------------------- phase estimates


def static_floor(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                 dtype_bytes: int = 2) -> dict[str, int]:
    """What no micro-batch size can avoid: weights + adapters (+heads) + grads/AdamW states.

    ``total = weight_bytes + 4*(n_trainable+n_frozen)*P_lora + 12*n_trainable*P_lora``
    (+ the same for the scalar heads), with ``P_lora = lora_params(shape, r, targets)``.
    """
    lora = _adapters(lora)
    parts = {
        "weights": weight_bytes(shape, quantization, dtype_bytes),
        "adapters": lora.param_bytes(shape),
        "optimizer": lora.optimizer_bytes(shape),
    }
    parts["total"] = sum(parts.values())
    return parts


def _layer_forward_elems(shape: ModelShape) -> int:
    """Elements live per token at the peak of one layer's forward without grad."""
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    return NOGRAD_HIDDEN_UNITS * shape.hidden_size + qkv + NOGRAD_INTER_UNITS * shape.intermediate_size


def _layer_saved_elems(shape: ModelShape) -> int:
    """Elements saved for backward per token by one layer (LoRA on a frozen base)."""
    kv = 2 * shape.num_kv_heads * shape.head_dim
    return TRAIN_HIDDEN_UNITS * shape.hidden_size + kv + TRAIN_INTER_UNITS * shape.intermediate_size


def _attention_scores(shape: ModelShape, batch: int, length: int, dtype_bytes: int) -> int:
    # Eager attention materialises batch x heads x L x L scores (compute dtype), their fp32
    # softmax and its cast back: (2*dtype_bytes + 4) bytes per score. SDPA/flash: none.
    return batch * shape.num_heads * length * length * (2 * dtype_bytes + 4)


def _total(parts: dict[str, int]) -> dict[str, int]:
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def _floor_parts(shape, quantization, lora, dtype_bytes) -> dict[str, int]:
    floor = static_floor(shape, quantization, lora, dtype_bytes)
    floor.pop("total")
    return floor


def estimate_generate(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                      batch: int, prompt_len: int, response_len: int, dtype_bytes: int = 2,
                      *, flash_attention: bool = True, static_cache: bool = False) -> dict[str, int]:
    """Peak of sampling ``batch`` responses: the larger of the prefill and the last decode step.

    Prefill runs one layer at a time over the whole prompt with the cache at prompt length (a
    ``static_cache`` is allocated at full length from the start); the last decode step holds the
    cache at full length, plus one layer's K and V twice while a growing cache is concatenated,
    plus the sampler's logits.
    """
    length = prompt_len + response_len
    parts = _floor_parts(shape, quantization, lora, dtype_bytes)
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes
    prefill = batch * ((length if static_cache else prompt_len) * kv_per_token
                       + prompt_len * _layer_forward_elems(shape) * dtype_bytes)
    if not flash_attention:
        prefill += _attention_scores(shape, batch, prompt_len, dtype_bytes)
    decode = {"kv_cache": batch * length * kv_per_token,
              "kv_growth": 0 if static_cache else batch * length * kv_per_token // shape.num_layers,
              "logits": GEN_LOGITS_COPIES * batch * shape.vocab_size * 4}
    if prefill > sum(decode.values()):
        parts["prefill"] = prefill
    else:
        parts.update(decode)
    parts["dequant_workspace"] = _dequant_workspace(shape, quantization, dtype_bytes)
    parts["workspace"] = WORKSPACE_BYTES
    return _total(parts)


def estimate_score(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                   micro_batch: int, prompt_len: int, response_len: int, dtype_bytes: int = 2,
                   *, flash_attention: bool = True) -> dict[str, int]:
    """Peak of one forward without grad over ``micro_batch`` full sequences (any role).

    Assumes the scorer runs the lm_head on the response positions only and takes a
    selective log-softmax in fp32 (DESIGN section 3). The logits exist only after the last
    layer has freed its activations, so the peak is the larger of the two.
    """
    length = prompt_len + response_len
    parts = _floor_parts(shape, quantization, lora, dtype_bytes)
    layer = micro_batch * length * _layer_forward_elems(shape) * dtype_bytes
    if not flash_attention:
        layer += _attention_scores(shape, micro_batch, length, dtype_bytes)
    logits = SCORE_LOGITS_COPIES * micro_batch * response_len * shape.vocab_size * 4
    parts["activations" if layer >= logits else "logits"] = max(layer, logits)
    parts["dequant_workspace"] = _dequant_workspace(shape, quantization, dtype_bytes)
    parts["workspace"] = WORKSPACE_BYTES
    return _total(parts)


def estimate_train(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                   micro_batch: int, prompt_len: int, response_len: int, dtype_bytes: int = 2,
                   *, gradient_checkpointing: bool = True, flash_attention: bool = True) -> dict[str, int]:
    """Peak of one PPO forward+backward over ``micro_batch`` sequences.

    The trainer runs one backward per forward (policy, then value; the shared critic is one
    forward), so one forward's activations are live at a time. Only the policy computes logits;
    it keeps them (for the entropy) while the value role runs. The trained adapters' new
    gradients exist beside the accumulated ones until they are added.
    """
    lora = _adapters(lora)
    length = prompt_len + response_len
    tokens = micro_batch * length
    layer_saved = tokens * _layer_saved_elems(shape) * dtype_bytes
    if not flash_attention:
        layer_saved += _attention_scores(shape, micro_batch, length, dtype_bytes)
    logits_unit = micro_batch * response_len * shape.vocab_size * 4
    parts = _floor_parts(shape, quantization, lora, dtype_bytes)
    if gradient_checkpointing:
        # Each layer keeps only its input hidden state; during backward one layer is
        # recomputed (its saved tensors + their gradients in flight).
        parts["checkpoints"] = shape.num_layers * tokens * shape.hidden_size * dtype_bytes
        layers_backward = BACKWARD_LAYER_FACTOR * layer_saved
    else:
        # Every layer keeps its saved tensors; the layer being back-propagated also holds
        # its gradients.
        parts["activations"] = shape.num_layers * layer_saved
        layers_backward = (BACKWARD_LAYER_FACTOR - 1) * layer_saved
    # The loss's backward to the last hidden state (all logits copies), then the layers'
    # backward beside the kept logits: whichever is larger sets the peak.
    parts["backward"] = max(TRAIN_LOGITS_COPIES * logits_unit,
                            TRAIN_KEPT_LOGITS_COPIES * logits_unit + layers_backward)
    parts["new_gradients"] = ADAPTER_PARAM_BYTES * lora.n_trainable * lora_params(shape, lora.r, lora.targets)
    parts["dequant_workspace"] = _dequant_workspace(shape, quantization, dtype_bytes)
    parts["workspace"] = WORKSPACE_BYTES
    return _total(parts)


# --------------------------------------------------------------------------- the plan

PHASES = ("generate", "score", "train")


@dataclass
class PhasePlan:
    """The micro-batch chosen for one phase and its estimated peak."""

    phase: str
    micro_batch: int
    peak_bytes: int
    fits: bool
    components: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryPlan:
    """Micro-batch sizes per phase that keep every phase under ``BUDGET_FRACTION * budget``."""

    phases: dict[str, PhasePlan]
    gradient_checkpointing: bool
    floor_bytes: int
    budget_bytes: int
    usable_bytes: int

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases.values())

    @property
    def micro_batches(self) -> dict[str, int]:
        return {name: p.micro_batch for name, p in self.phases.items()}

    def micro_batch(self, phase: str) -> int:
        return self.phases[phase].micro_batch

    def peak_bytes(self, phase: str) -> int:
        return self.phases[phase].peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "gradient_checkpointing": self.gradient_checkpointing,
            "floor_bytes": self.floor_bytes,
            "budget_bytes": self.budget_bytes,
            "usable_bytes": self.usable_bytes,
            "phases": {name: asdict(p) for name, p in self.phases.items()},
        }

    def table(self) -> str:
        rows = [("phase", "micro-batch", "est. peak", "budget", "fits")]
        for name, p in self.phases.items():
            label = f"{name} (ckpt)" if name == "train" and self.gradient_checkpointing else name
            rows.append((label, str(p.micro_batch), format_bytes(p.peak_bytes, "GiB"),
                         format_bytes(self.usable_bytes, "GiB"), "yes" if p.fits else "NO"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"floor {format_bytes(self.floor_bytes, 'GiB')} (weights + adapters + optimizer); "
                     f"budget {format_bytes(self.budget_bytes, 'GiB')} x {BUDGET_FRACTION}")
        return "\n".join(lines)


def _powers_of_two_down(n: int) -> list[int]:
    top = 1 << (max(1, n).bit_length() - 1)
    return [top >> k for k in range(top.bit_length())]


def _largest_fitting(estimate: Callable[[int], dict[str, int]], max_batch: int, usable: int) -> PhasePlan | None:
    for mb in _powers_of_two_down(max_batch):
        parts = estimate(mb)
        if parts["total"] <= usable:
            return PhasePlan("", mb, parts["total"], True, parts)
    return None


def plan(shape: ModelShape, quantization: str | None, lora_r: int, lora_targets: str | Sequence[str],
         n_trainable_adapters: int, prompt_len: int, response_len: int, rollout_batch: int,
         budget_bytes: int | str, dtype_bytes: int = 2, *, n_frozen_adapters: int = 2,
         train_batch: int | None = None, flash_attention: bool = True, static_cache: bool = False) -> MemoryPlan:
    """Largest power-of-two micro-batch per phase that fits ``BUDGET_FRACTION * budget``.

    ``train_batch`` (the PPO minibatch; default ``rollout_batch``) caps the train micro-batch.
    Gradient checkpointing stays off if training fits at micro-batch >= min(4, train_batch)
    without it. A phase that does not fit even at micro-batch 1 is planned at 1 with
    ``fits=False``. Raises ``MemoryBudgetError`` when the budget is below the static floor.
    """
    if rollout_batch < 1 or prompt_len < 0 or response_len < 1:
        raise ValueError("rollout_batch and response_len must be >= 1 and prompt_len >= 0")
    budget = parse_bytes(budget_bytes)
    lora = AdapterSpec(r=lora_r, targets=tuple(_targets(lora_targets)), n_trainable=n_trainable_adapters,
                       n_frozen=n_frozen_adapters)
    floor = static_floor(shape, quantization, lora, dtype_bytes)["total"]
    if budget < floor:
        unit = "GiB" if floor >= 1024**3 else None  # a tiny model's floor is not "0.00 GiB"
        smaller = "" if _quant(quantization) == "4bit" else "4-bit quantization, "
        raise MemoryBudgetError(
            f"memory budget {format_bytes(budget, unit)} is below the static floor "
            f"{format_bytes(floor, unit)} (weights + adapters + optimizer); use {smaller}a smaller LoRA rank or "
            f"fewer targets, or a larger budget"
        )
    usable = int(budget * BUDGET_FRACTION)
    train_batch = rollout_batch if train_batch is None else train_batch
    common = dict(dtype_bytes=dtype_bytes, flash_attention=flash_attention)

    def phase(name: str, estimate: Callable[[int], dict[str, int]], max_batch: int) -> PhasePlan:
        found = _largest_fitting(estimate, max_batch, usable)
        if found is None:
            parts = estimate(1)
            found = PhasePlan(name, 1, parts["total"], False, parts)
        found.phase = name
        return found

    def train_estimate(ckpt: bool) -> Callable[[int], dict[str, int]]:
        return lambda mb: estimate_train(shape, quantization, lora, mb, prompt_len, response_len,
                                         gradient_checkpointing=ckpt, **common)

    phases = {
        "generate": phase("generate", lambda mb: estimate_generate(
            shape, quantization, lora, mb, prompt_len, response_len, static_cache=static_cache, **common),
            rollout_batch),
        "score": phase("score", lambda mb: estimate_score(
            shape, quantization, lora, mb, prompt_len, response_len, **common), rollout_batch),
    }
    train = phase("train", train_estimate(False), train_batch)
    checkpointing = not (train.fits and train.micro_batch >= min(4, train_batch))
    if checkpointing:
        train = phase("train", train_estimate(True), train_batch)
    phases["train"] = train
    return MemoryPlan(phases, checkpointing, floor, budget, usable)


# --------------------------------------------------------------------------- OOM-retry runner

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if t is not None
)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, _OOM_TYPES) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


class MicroBatchRunner:
    """Runs ``fn(start, end)`` over ``[0, n_items)`` in micro-batches, halving on OOM.

    On an out-of-memory error the runner leaves the ``except`` block (the traceback pins the
    failed step's tensors), runs ``gc.collect()`` and ``torch.cuda.empty_cache()``, halves
    ``micro_batch`` and redoes the same items from ``start``. The halved size is kept for the
    rest of this runner's life.

    Contract for ``fn``: it must not mutate state (gradients, optimizer, buffers, RNG
    consumers whose results are kept) until it returns, because a failed call is simply
    redone. Then on success ``fn`` has been called exactly once per item. Callers that
    accumulate gradients scale each micro-batch loss by ``(end - start) / n_items``, so the
    accumulated gradient is the same weighted mean whatever the micro-batch size; a backward
    that can OOM halfway should write into a snapshot-able place (e.g. ``torch.autograd.grad``
    then add into ``.grad`` on success).

    ``inject_oom_above`` is a test hook: slices larger than it raise ``torch.OutOfMemoryError``
    before ``fn`` is called, so recovery can be exercised on CPU.
    """

    def __init__(self, phase: str, micro_batch: int, inject_oom_above: int | None = None):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.phase = phase
        self.micro_batch = int(micro_batch)
        self.inject_oom_above = inject_oom_above
        self.oom_events: list[dict[str, Any]] = []
        self.calls = 0  # run() calls so far: an OOM event records which call and item it struck

    def _call(self, fn: Callable[[int, int], Any], start: int, end: int) -> Any:
        if self.inject_oom_above is not None and end - start > self.inject_oom_above:
            raise _OOM_TYPES[0](
                f"CUDA out of memory (injected: {end - start} > {self.inject_oom_above} items in phase {self.phase!r})")
        return fn(start, end)

    def run(self, n_items: int, fn: Callable[[int, int], Any]) -> list[Any]:
        results: list[Any] = []
        start = 0
        self.calls += 1
        while start < n_items:
            end = min(start + self.micro_batch, n_items)
            failed = False
            try:
                result = self._call(fn, start, end)
            except RuntimeError as err:  # torch.OutOfMemoryError subclasses RuntimeError
                if not _is_oom(err):
                    raise
                failed = True  # only a flag leaves this block: `err` and its frames die here
            if failed:
                self._recover(start, end)
                continue
            results.append(result)
            start = end
        return results

    def _recover(self, start: int, end: int) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = min(self.micro_batch, end - start)  # the slice that failed (the last may be short)
        if size == 1:
            raise MicroBatchOOMError(
                f"phase {self.phase!r} ran out of memory at micro-batch 1 (items [{start}, {end})); "
                f"shorten the sequences, enable gradient checkpointing or 4-bit quantization, or free GPU memory"
            )
        new = size // 2
        # `call` and `start` tell whether the micro-batches run before the OOM had another size than those after it
        self.oom_events.append({"phase": self.phase, "from": self.micro_batch, "to": new, "call": self.calls,
                                "start": start})
        self.micro_batch = new

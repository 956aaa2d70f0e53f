"""Pure per-phase memory estimates: a model's shape, quantization and adapters -> the peak bytes of each PPO phase.

Arithmetic only: no model is loaded and no GPU is needed, so a recipe can be planned (and tested) anywhere; plan.py
picks the micro-batches from these estimates. docs/memory.md lists the formulas; every coefficient below says why it
is what it is.

Units: bytes everywhere. ``dtype_bytes`` is the compute dtype (2 for bf16/fp16, 4 for fp32). ``bases`` is the number
of copies of the base weights on the device: 1 for our shared base, 3 for the four-model layout the benchmark
compares against (policy, value and reward bases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.shapes import ALL_LINEAR, ModelShape, linear_shapes, lora_params, lora_tensor_sizes

__all__ = [
    "ADAPTER_PARAM_BYTES",
    "AdapterSpec",
    "OPTIMIZER_BYTES_PER_TRAINED_PARAM",
    "OPTIMIZERS",
    "estimate_generate",
    "estimate_score",
    "estimate_train",
    "logits_tokens",
    "optimizer_state_bytes",
    "quantization_kind",
    "static_floor",
    "weight_bytes",
]

# --------------------------------------------------------------------------- constants

# PEFT keeps LoRA weights in fp32 on a quantized base (autocast_adapter_dtype=True), so every
# adapter, trained or frozen, costs 4 bytes per parameter.
ADAPTER_PARAM_BYTES = 4
# A trained parameter additionally holds an fp32 gradient (4) and AdamW's exp_avg and
# exp_avg_sq (4 + 4): with the fp32 weight that is 16 bytes per trained parameter.
OPTIMIZER_BYTES_PER_TRAINED_PARAM = 4 + 4 + 4  # grad + exp_avg + exp_avg_sq
# ppo.optim: adamw = torch AdamW (above); adamw_8bit / paged_adamw_8bit = bitsandbytes' AdamW8bit / PagedAdamW8bit.
# The gradient stays fp32 (4 B). bitsandbytes (optim/optimizer.py, Optimizer2State.init_state, 0.50) keeps a tensor's
# two states in 8 bits only when it has at least `min_8bit_size` = 4096 elements (smaller ones: two fp32 states, 8 B
# per element), with one fp32 absmax per block of 256 elements for each state; the 256-entry fp32 quantization maps
# (2 KiB per optimizer) are left out. A paged optimizer keeps the same states in CUDA unified memory that the driver
# may evict to the host under pressure; the planner counts them on the device, as if never evicted.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
GRAD_BYTES = 4
ADAM_8BIT_MIN_SIZE = 4096
ADAM_8BIT_BLOCK = 256
ADAM_8BIT_STATE_BYTES = 2 * 1  # exp_avg, exp_avg_sq: one byte each
ADAM_8BIT_ABSMAX_BYTES = 2 * 4  # one fp32 absmax per block, per state

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

_QUANT_ALIASES = {
    "4bit": "4bit", "nf4": "4bit", "4-bit": "4bit",
    "8bit": "8bit", "int8": "8bit", "8-bit": "8bit",
    "none": "none", "bf16": "none", "fp16": "none", "fp32": "none",
}


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterSpec:
    """The LoRA adapters and scalar heads living on the shared base."""

    r: int = 16
    targets: str | tuple[str, ...] = ALL_LINEAR
    n_trainable: int = 2  # policy, value
    n_frozen: int = 2  # sft (the reference), reward
    n_trainable_heads: int = 1  # value head
    n_frozen_heads: int = 1  # reward head
    optim: str = "adamw"  # ppo.optim: what the trained adapters' optimizer keeps per parameter
    frozen_param_bytes: int = ADAPTER_PARAM_BYTES  # lora.frozen_dtype: 4 (float32) or the compute dtype's bytes

    def __post_init__(self):
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optim!r}: use one of {', '.join(OPTIMIZERS)}")

    def head_params(self, shape: ModelShape) -> int:
        return sum(self.head_tensor_sizes(shape))

    def head_tensor_sizes(self, shape: ModelShape) -> list[int]:
        return [shape.hidden_size, 1]  # Linear(hidden, 1): weight and bias

    def param_bytes(self, shape: ModelShape) -> int:
        """Weights of every adapter and head: trained ones fp32, frozen ones (sft, reward + its head) in
        ``frozen_param_bytes``."""
        adapter, head = lora_params(shape, self.r, self.targets), self.head_params(shape)
        trained = adapter * self.n_trainable + head * self.n_trainable_heads
        frozen = adapter * self.n_frozen + head * self.n_frozen_heads
        return trained * ADAPTER_PARAM_BYTES + frozen * self.frozen_param_bytes

    def optimizer_bytes(self, shape: ModelShape) -> int:
        """fp32 gradient + the two AdamW states of every trained adapter and head, tensor by tensor."""
        tensors = (lora_tensor_sizes(shape, self.r, self.targets) * self.n_trainable
                   + self.head_tensor_sizes(shape) * self.n_trainable_heads)
        return sum(optimizer_state_bytes(n, self.optim) for n in tensors)


def optimizer_state_bytes(numel: int, optim: str = "adamw") -> int:
    """Gradient + AdamW states of one trained tensor of ``numel`` elements (see OPTIMIZERS above)."""
    if optim == "adamw" or numel < ADAM_8BIT_MIN_SIZE:
        return numel * OPTIMIZER_BYTES_PER_TRAINED_PARAM
    blocks = math.ceil(numel / ADAM_8BIT_BLOCK)
    return numel * (GRAD_BYTES + ADAM_8BIT_STATE_BYTES) + blocks * ADAM_8BIT_ABSMAX_BYTES


def logits_tokens(micro_batch: int, response_len: int, logits_chunk_tokens: int = 0) -> int:
    """Response tokens whose full-vocabulary logits exist at once: the micro-batch's, or at most a chunk of them
    (ppo.logits_chunk_tokens; 0 = no chunking)."""
    tokens = micro_batch * response_len
    return min(tokens, logits_chunk_tokens) if logits_chunk_tokens > 0 else tokens


def _adapters(lora: AdapterSpec | None) -> AdapterSpec:
    return lora if lora is not None else AdapterSpec(r=0, n_trainable=0, n_frozen=0,
                                                     n_trainable_heads=0, n_frozen_heads=0)


# --------------------------------------------------------------------------- weights


def quantization_kind(quantization: str | None) -> str:
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
    q = quantization_kind(quantization)
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
    if quantization_kind(quantization) == "none":
        return 0
    return max(i * o for i, o in linear_shapes(shape).values()) * dtype_bytes


# --------------------------------------------------------------------------- phase estimates


def static_floor(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                 dtype_bytes: int = 2, bases: int = 1) -> dict[str, int]:
    """What no micro-batch size can avoid: weights + adapters (+heads) + grads/AdamW states.

    ``total = bases*weight_bytes + (4*n_trainable + f*n_frozen)*P_lora + o*n_trainable*P_lora``
    (+ the same for the scalar heads), with ``P_lora = lora_params(shape, r, targets)``, ``f`` the frozen adapters'
    bytes per parameter (4, or the compute dtype's) and ``o`` the optimizer's (12 for adamw; about 6 for the 8-bit
    ones, tensor by tensor).
    """
    lora = _adapters(lora)
    parts = {
        "weights": bases * weight_bytes(shape, quantization, dtype_bytes),
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


def _floor_parts(shape, quantization, lora, dtype_bytes, bases) -> dict[str, int]:
    floor = static_floor(shape, quantization, lora, dtype_bytes, bases)
    floor.pop("total")
    return floor


def estimate_generate(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                      batch: int, prompt_len: int, response_len: int, dtype_bytes: int = 2,
                      *, flash_attention: bool = True, static_cache: bool = False,
                      bases: int = 1) -> dict[str, int]:
    """Peak of sampling ``batch`` responses: the larger of the prefill and the last decode step.

    Prefill runs one layer at a time over the whole prompt with the cache at prompt length (a
    ``static_cache`` is allocated at full length from the start); the last decode step holds the
    cache at full length, plus one layer's K and V twice while a growing cache is concatenated,
    plus the sampler's logits.
    """
    length = prompt_len + response_len
    parts = _floor_parts(shape, quantization, lora, dtype_bytes, bases)
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
                   *, flash_attention: bool = True, bases: int = 1, logits_chunk_tokens: int = 0) -> dict[str, int]:
    """Peak of one forward without grad over ``micro_batch`` full sequences (any role).

    Assumes the scorer runs the lm_head on the response positions only and takes a
    selective log-softmax in fp32 (DESIGN section 3), over at most ``logits_chunk_tokens`` of
    them at a time when that is set. The logits exist only after the last layer has freed
    its activations, so the peak is the larger of the two.
    """
    length = prompt_len + response_len
    parts = _floor_parts(shape, quantization, lora, dtype_bytes, bases)
    layer = micro_batch * length * _layer_forward_elems(shape) * dtype_bytes
    if not flash_attention:
        layer += _attention_scores(shape, micro_batch, length, dtype_bytes)
    logits = SCORE_LOGITS_COPIES * logits_tokens(micro_batch, response_len, logits_chunk_tokens) * shape.vocab_size * 4
    parts["activations" if layer >= logits else "logits"] = max(layer, logits)
    parts["dequant_workspace"] = _dequant_workspace(shape, quantization, dtype_bytes)
    parts["workspace"] = WORKSPACE_BYTES
    return _total(parts)


def estimate_train(shape: ModelShape, quantization: str | None, lora: AdapterSpec | None,
                   micro_batch: int, prompt_len: int, response_len: int, dtype_bytes: int = 2,
                   *, gradient_checkpointing: bool = True, flash_attention: bool = True,
                   bases: int = 1, logits_chunk_tokens: int = 0) -> dict[str, int]:
    """Peak of one PPO forward+backward over ``micro_batch`` sequences.

    The trainer runs one backward per forward (policy, then value; the shared critic is one
    forward), so one forward's activations are live at a time. Only the policy computes logits;
    it keeps them (for the entropy) while the value role runs. The trained adapters' new
    gradients exist beside the accumulated ones until they are added. With
    ``logits_chunk_tokens`` every logits term counts one chunk of response tokens (each chunk's
    logits are recomputed in its backward instead of kept).
    """
    lora = _adapters(lora)
    length = prompt_len + response_len
    tokens = micro_batch * length
    layer_saved = tokens * _layer_saved_elems(shape) * dtype_bytes
    if not flash_attention:
        layer_saved += _attention_scores(shape, micro_batch, length, dtype_bytes)
    logits_unit = logits_tokens(micro_batch, response_len, logits_chunk_tokens) * shape.vocab_size * 4
    parts = _floor_parts(shape, quantization, lora, dtype_bytes, bases)
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
    parts["new_gradients"] = GRAD_BYTES * lora.n_trainable * lora_params(shape, lora.r, lora.targets)
    parts["dequant_workspace"] = _dequant_workspace(shape, quantization, dtype_bytes)
    parts["workspace"] = WORKSPACE_BYTES
    return _total(parts)

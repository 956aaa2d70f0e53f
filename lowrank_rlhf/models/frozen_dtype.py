"""`lora.frozen_dtype: compute`: frozen adapters (the sft reference, the reward adapter) and the reward head stored in
the model's compute dtype (bf16 on a GPU), half their fp32 memory; trained ones stay fp32.

Stored low, computed in float32. PEFT casts a LoRA layer's input to its lora_A's dtype; a bf16 adapter would then run
its matmuls in bf16 while the fp32 policy runs them in fp32, and the reference and policy logprobs would differ even
while the policy equals sft (the path difference that gave peers negative KL). `UpcastLinear` keeps the bf16 weight
but upcasts weight and input for the matmul. The input reaching a LoRA layer is already in the compute dtype, so
PEFT's cast is a no-op and the upcast is exact: a frozen adapter computes exactly what an fp32 adapter holding the
same rounded values computes. A policy that starts as a copy of sft is rounded the same way (`round_to`), so KL at
step 0 stays exactly 0. PEFT and torch have no "store in one dtype, compute in another" for adapter weights (PEFT's
autocast_adapter_dtype only upcasts them for good), hence this small class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpcastLinear(nn.Linear):
    """A frozen nn.Linear whose weights are stored in a low-precision dtype and used in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def compact(linear: nn.Linear, dtype: torch.dtype) -> UpcastLinear:
    """An UpcastLinear holding `linear`'s weights rounded to `dtype`, frozen."""
    out = UpcastLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out.requires_grad_(False)


def compact_adapter(tuner_layers: list[nn.Module], adapter: str, dtype: torch.dtype) -> None:
    """Store `adapter`'s LoRA matrices in every layer as UpcastLinear in `dtype`; the state-dict keys stay PEFT's."""
    for layer in tuner_layers:
        for name in ("lora_A", "lora_B"):
            modules = getattr(layer, name, None)
            if modules is None or adapter not in modules:
                continue
            if type(modules[adapter]) is not nn.Linear:
                raise TypeError(f"lora.frozen_dtype=compute supports plain LoRA linears, got "
                                f"{type(modules[adapter]).__name__}; use lora.frozen_dtype=float32")
            modules[adapter] = compact(modules[adapter], dtype)


def round_to(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    """Round fp32 parameters to the values `dtype` can hold, keeping them fp32 (a trained copy of a compact one)."""
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(dtype).to(p.dtype))

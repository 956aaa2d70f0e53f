"""What every layout of one bench run shares: the recipe built from the flags, the model's shape, the budget, the
device, the prompts, and how to get a fresh base (random weights built in place, or loaded from a checkpoint)."""

from __future__ import annotations

import argparse
import json

import torch

from ..config import load_recipe
from ..memory.plan import resolve_budget
from ..memory.shapes import ModelShape
from ..models.builtin import tiny_llama_config
from ..models.loading import compute_dtype, load_base, resolve_device, resolve_model_path
from ..models.random_llama import RANDOM_MODELS, build_random_llama, llama_config
from .args import RANDOM_TINY, parse_layouts, parse_micro_batch

# the vocabulary of the random-tiny model (tiny-llama's shape with random weights, no tokenizer files)
RANDOM_TINY_VOCAB = 512


class Workload:
    """Everything the layouts share: the recipe, the shape, the budget, the device and the prompts."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.model_name = args.model or ("llama2-7b" if self.device.type == "cuda" else "tiny-llama")
        self.random = self.model_name in RANDOM_MODELS or self.model_name == RANDOM_TINY
        self.dtype = compute_dtype("auto", self.device)
        self.budget_bytes = resolve_budget(args.budget, self.device)
        self.micro_override = parse_micro_batch(args.micro_batch)
        self.layouts = parse_layouts(args.layouts)
        total_steps = args.warmup + args.steps
        q = json.dumps  # quoted: YAML would read on/off as booleans
        self.cfg = load_recipe(None, [
            f"model.name={q(self.model_name)}", f"model.quantization={q(args.quantization)}",
            f"model.device={q(self.device.type)}", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}",
            f"seed={args.seed}", f"memory.gradient_checkpointing={q(args.gradient_checkpointing)}",
            f"data.max_prompt_length={args.prompt_len}", f"ppo.rollout_batch_size={args.batch}",
            f"ppo.response_length={args.response_len}", f"ppo.total_steps={total_steps}",
            f"ppo.num_ppo_epochs={args.ppo_epochs}", f"ppo.num_mini_batches={args.mini_batches}",
            "ppo.temperature=1.0", "ppo.lr_scheduler_type=constant", f"ppo.decode={q(args.decode)}"])
        self.hf_config = self._hf_config()
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.bandwidth: float | None = None  # bytes/s, set by the run once the device is looked up

    def _hf_config(self):
        if self.random:
            return self._random_config()
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model_path(self.model_name))

    def _random_config(self):
        return tiny_llama_config(RANDOM_TINY_VOCAB) if self.model_name == RANDOM_TINY else llama_config(self.model_name)

    def load_base(self, index: int = 0):
        """A fresh base: random weights built in place, or loaded from a checkpoint."""
        if self.random:  # a fresh config each time: the build writes the quantization config onto it
            return build_random_llama(self._random_config(), self.args.quantization, self.device, self.dtype,
                                      seed=self.args.seed + index)
        return load_base(self.cfg.model)

    def prompts(self) -> list[list[int]]:
        """One distinct prompt per row and step, each exactly prompt_len random ids above the special tokens."""
        n = self.args.batch * (self.args.warmup + self.args.steps)
        low = min(3, self.hf_config.vocab_size - 1)
        g = torch.Generator().manual_seed(self.args.seed)
        return torch.randint(low, self.hf_config.vocab_size, (n, self.args.prompt_len), generator=g).tolist()

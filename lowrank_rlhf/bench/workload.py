"""What every layout of one bench run shares: the recipe built from the flags, the model's shape, the budget, the
device, the prompts, and how to get a fresh base (random weights built in place, or loaded from a checkpoint).

PPO's prompts are random token ids. The critic-free algorithms score text with a Python reward function, and TRL's
GRPOTrainer takes text prompts and tokenizes them itself, so their prompts are texts that the tokenizer turns into
exactly --prompt-len tokens, and our loop gets those very ids (prompt_texts)."""

from __future__ import annotations

import argparse
import json

import torch

from ..config import load_recipe
from ..memory.plan import resolve_budget
from ..models.builtin import BUILTIN_MODELS, tiny_llama_config
from ..models.loading import compute_dtype, load_base, resolve_device, resolve_model_path
from ..models.random_llama import RANDOM_MODELS, build_random_llama, random_config
from ..models.shapes import ModelShape
from ..rl.algorithms import has_critic
from .args import RANDOM_TINY, BenchArgumentError, parse_layouts, parse_micro_batch, resolve_defaults

# the vocabulary of the random-tiny model (tiny-llama's shape with random weights, no tokenizer files)
RANDOM_TINY_VOCAB = 512


class Workload:
    """Everything the layouts share: the recipe, the shape, the budget, the device and the prompts."""

    def __init__(self, args: argparse.Namespace):
        resolve_defaults(args)
        self.args = args
        self.critic = has_critic(args.algorithm)
        self.rows = args.batch * args.num_generations  # responses per step
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
            f"data.max_prompt_length={args.prompt_len}", f"ppo.rollout_batch_size={self.rows}",
            f"ppo.algorithm={args.algorithm}", f"ppo.num_generations={args.num_generations}", f"ppo.beta={args.beta}",
            f"ppo.response_length={args.response_len}", f"ppo.total_steps={total_steps}",
            f"ppo.num_ppo_epochs={args.ppo_epochs}", f"ppo.num_mini_batches={args.mini_batches}",
            f"ppo.logits_chunk_tokens={args.logits_chunk_tokens}", "ppo.temperature=1.0",
            "ppo.lr_scheduler_type=constant", f"ppo.decode={q(args.decode)}"])
        self.hf_config = self._hf_config()
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.bandwidth: float | None = None  # bytes/s, set by the run once the device is looked up
        self._texts: list[str] | None = None
        self._tokenizer = None
        # what a layout's peak_rss_bytes covers: the whole process so far, unless the layout ran in its own process
        self.rss_scope = "the whole process (includes the layouts before it)"

    def _hf_config(self):
        if self.random:
            return self._random_config()
        from transformers import AutoConfig

        try:  # local files only: no network at run time, and an unknown name fails at once, not after retries
            return AutoConfig.from_pretrained(resolve_model_path(self.model_name), local_files_only=True)
        except OSError:
            raise BenchArgumentError(
                f"--model: no model {self.model_name!r} on this machine; allowed: a local model directory, a hub id "
                f"already in the Hugging Face cache, a built-in ({', '.join(BUILTIN_MODELS)}) or a random-weight "
                f"shape ({', '.join(RANDOM_MODELS)}, {RANDOM_TINY})") from None

    def _random_config(self):
        if self.model_name == RANDOM_TINY:
            return tiny_llama_config(RANDOM_TINY_VOCAB)
        return random_config(self.model_name)

    def load_base(self, index: int = 0):
        """A fresh base: random weights built in place, or loaded from a checkpoint."""
        if self.random:  # a fresh config each time: the build writes the quantization config onto it
            return build_random_llama(self._random_config(), self.args.quantization, self.device, self.dtype,
                                      seed=self.args.seed + index)
        return load_base(self.cfg.model)

    def prompts(self) -> list[list[int]]:
        """One distinct prompt per prompt slot and step: PPO's exactly prompt_len random ids above the special tokens;
        the critic-free algorithms' the ids of prompt_texts()."""
        n = self.args.batch * (self.args.warmup + self.args.steps)
        if not self.critic:
            return self.tokenizer_ids(self.prompt_texts())
        low = min(3, self.hf_config.vocab_size - 1)
        g = torch.Generator().manual_seed(self.args.seed)
        return torch.randint(low, self.hf_config.vocab_size, (n, self.args.prompt_len), generator=g).tolist()

    def reward_function(self):
        """The --reward function, loaded once: our scorer and TRL's GRPOTrainer call the same object."""
        if not hasattr(self, "_reward"):
            from ..rewards import load_reward_function

            self._reward = load_reward_function(self.args.reward)
        return self._reward

    # ---- text prompts (critic-free algorithms, trl-grpo) -------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.random:
                from ..models.random_llama import random_tokenizer

                self._tokenizer = random_tokenizer(self.hf_config.vocab_size)
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.model_name))
        return self._tokenizer

    def tokenizer_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids TRL's GRPOTrainer gets for plain-text prompts: `processing_class(text=prompts)["input_ids"]`."""
        return [list(ids) for ids in self.tokenizer(text=texts)["input_ids"]]

    def prompt_texts(self) -> list[str]:
        """batch x (warmup + steps) distinct texts, each tokenized to exactly prompt_len ids, seeded."""
        if self._texts is None:
            n = self.args.batch * (self.args.warmup + self.args.steps)
            self._texts = exact_length_texts(self.tokenizer, n, self.args.prompt_len, self.args.seed)
        return self._texts


def exact_length_texts(tokenizer, n: int, length: int, seed: int, tries: int = 200) -> list[str]:
    """`n` texts that `tokenizer(text=...)` turns into exactly `length` ids each: random tokens that decode to a
    word (preferably one with a leading space, which BPE keeps as one token), joined and checked by round trip.
    Written here because no library makes text of an exact token length."""
    import random
    import re

    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = tokenizer.batch_decode([[i] for i in ids])
    encoded = tokenizer(text=words, add_special_tokens=False)["input_ids"]
    single = [(i, w) for i, w, e in zip(ids, words, encoded) if e == [i] and w.strip() and w.isprintable()]
    spaced = [i for i, w in single if re.fullmatch(r" [A-Za-z]+", w)]
    letters = [i for i, w in single if re.fullmatch(r"[A-Za-z]+", w.strip())]
    pool = spaced if len(spaced) >= 100 else letters if len(letters) >= 20 else [i for i, _ in single]
    if not pool:
        raise ValueError("bench: the tokenizer has no token that round-trips through text; cannot make text prompts")
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n * tries):
        text = tokenizer.decode(rng.choices(pool, k=length))
        if len(tokenizer(text=text)["input_ids"]) == length and text not in texts:
            texts.append(text)
            if len(texts) == n:
                return texts
    raise ValueError(f"bench: could not make {n} text prompts of exactly {length} tokens with this tokenizer")

"""One quantized base, many roles: LoRA adapters named policy, value, reward and sft on a single PeftModel.

Why not PEFT's `set_adapter`? It sets requires_grad=False on every inactive adapter, and PyTorch's AccumulateGrad
then silently drops their gradients: policy forward -> switch to value -> value forward -> one backward would
leave the policy untrained with no error. We switch roles by writing the active-adapter state of each LoRA layer
directly, so trainability is decided once (`_apply_trainability`) and never touched by a switch.

The reference policy is the `sft` adapter when one exists (policy starts as an exact copy of it); without one it is
the base with adapters disabled. Policy and reference logprobs go through the same code path and dtype, so KL is
exactly zero while the policy equals the reference.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import LoraConfig
from ..run.checkpoint import verify_adapter, write_manifest
from ..run.metadata import META_FILE, check_base, read_run_metadata, run_metadata, warn_on_compute_dtype_change
from .frozen_dtype import compact, compact_adapter, round_to
from .lm_head import token_logprobs
from .runner import MicroBatchRunner
from .shapes import lora_targets

log = logging.getLogger(__name__)

ROLES = ("policy", "value", "reward", "sft")
REFERENCE = "reference"  # a virtual role: sft if present, else the base with adapters disabled
BASE = "base"  # a virtual role: the base with every adapter disabled
HEAD_FILES = {"value": "value_head.safetensors", "reward": "reward_head.safetensors"}


def peft_lora_config(lora: LoraConfig) -> peft.LoraConfig:
    targets = lora.target_modules
    target = lora_targets(targets)
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                           bias="none", task_type="CAUSAL_LM")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row; works for left, right or both-sides padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


class RoleModel(nn.Module):
    """The shared base with its role adapters and scalar heads.

    `roles` are the adapters to create; `trainable` the ones an optimizer may update. With `critic="shared"` there
    is no value adapter: the value head reads the policy adapter's last hidden state.
    """

    def __init__(self, base: nn.Module, tokenizer, lora: LoraConfig, roles=("policy", "value", "reward"),
                 trainable=("policy", "value"), base_name: str = "", quantization: str = "none",
                 sources: dict | None = None, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.lora = lora
        self.critic = lora.critic
        wants_value = "value" in roles
        roles = tuple(r for r in roles if not (r == "value" and self.critic == "shared"))
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; allowed roles: {', '.join(ROLES)}")
        self.roles = roles
        self.trainable_roles = tuple(r for r in trainable if r in roles or r == "value")
        self.base_name = base_name or getattr(base.config, "name_or_path", "")
        self.quantization = quantization
        self.peft = None
        sources = sources or {}
        self.heads = nn.ModuleDict()
        hidden = base.config.hidden_size
        # Adapters and heads start from `seed` alone, not from the global RNG: identical on every rank of a
        # data-parallel run and in every run of a test, whatever ran before.
        with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for role in roles:
                self._add_adapter(base, role, sources.get(role))
            for head in ("value", "reward"):
                if head == "reward" and "reward" not in roles or head == "value" and not wants_value:
                    continue
                # nn.Linear's default init, not zeros: a zero head would give the value adapter zero gradient.
                self.heads[head] = nn.Linear(hidden, 1).to(device=base.device, dtype=torch.float32)
        self._tuner_layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        if lora.frozen_dtype == "compute":
            self._store_frozen_in(base.get_input_embeddings().weight.dtype, sources)
        self._apply_trainability()

    # ---- building -------------------------------------------------------------------------------------------
    def _add_adapter(self, base: nn.Module, role: str, source: str | Path | None) -> None:
        if self.peft is None:
            if source is None:
                self.peft = peft.get_peft_model(base, peft_lora_config(self.lora), adapter_name=role)
            else:
                self.peft = peft.PeftModel.from_pretrained(base, str(source), adapter_name=role, is_trainable=True)
        elif source is None:
            self.peft.add_adapter(role, peft_lora_config(self.lora))
        else:
            # is_trainable=True: PEFT's default (False) would freeze a resumed policy for good.
            self.peft.load_adapter(str(source), adapter_name=role, is_trainable=True)

    def _store_frozen_in(self, dtype: torch.dtype, sources: dict) -> None:
        """lora.frozen_dtype=compute: sft and reward adapters and the reward head in `dtype` (the dtype the hidden
        states flow in), computed in fp32 (frozen_dtype.py); a policy loaded from sft's files is rounded alike, so
        it starts as an exact copy of the reference."""
        if dtype == torch.float32:
            return
        frozen = [r for r in ("sft", "reward") if r in self.roles and r not in self.trainable_roles]
        for role in frozen:
            compact_adapter(self._tuner_layers, role, dtype)
        if "reward" in frozen and "reward" in self.heads:
            self.heads["reward"] = compact(self.heads["reward"], dtype)
        policy_is_sft_copy = sources.get("sft") is not None and sources.get("policy") == sources["sft"]
        if "sft" in frozen and "policy" in self.roles and policy_is_sft_copy:
            round_to([p for n, p in self.peft.named_parameters() if self._role_of_param(n) == "policy"], dtype)

    def _apply_trainability(self) -> None:
        """The one place that decides requires_grad: trainable roles' LoRA weights and the value head."""
        for name, param in self.peft.named_parameters():
            role = self._role_of_param(name)
            param.requires_grad_(role is not None and role in self.trainable_roles)
        for head, module in self.heads.items():
            module.requires_grad_(head == "value" and "value" in self.trainable_roles)

    def _role_of_param(self, name: str) -> str | None:
        if "lora_" not in name:
            return None
        for role in self.roles:
            if f".{role}." in name or name.endswith(f".{role}"):
                return role
        return None

    # ---- switching --------------------------------------------------------------------------------------------
    def adapter_for(self, role: str) -> str | None:
        """The adapter that plays `role`; None means 'adapters disabled' (the reference without an sft adapter)."""
        if role == REFERENCE:
            return "sft" if "sft" in self.roles else None
        if role == BASE:
            return None
        if role == "value" and self.critic == "shared":
            return "policy"
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not loaded; loaded roles: {', '.join(self.roles)}, {REFERENCE}")
        return role

    def activate(self, role: str) -> None:
        """Route every LoRA layer to `role`'s adapter without touching requires_grad (see the module docstring)."""
        adapter = self.adapter_for(role)
        for layer in self._tuner_layers:
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.peft.base_model.active_adapter = adapter or self.roles[0]

    @property
    def causal_lm(self) -> nn.Module:
        return self.peft.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.causal_lm.device

    # ---- forwards ---------------------------------------------------------------------------------------------
    def hidden_states(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state under `role`. Positions come from the mask, as in generate(), so padding is neutral."""
        self.activate(role)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False)
        return out.last_hidden_state

    def response_logprobs(self, role: str, input_ids, attention_mask, response_start: int, temperature: float = 1.0,
                          with_values: bool = False, with_logits: bool = False, with_entropy: bool = False,
                          chunk_tokens: int = 0) -> dict:
        """Logprobs of the response tokens (columns response_start:) under `role`.

        Logits are taken only at the positions that predict response tokens, in float32, divided by the sampling
        temperature; `chunk_tokens` > 0 makes them for that many tokens at a time (lm_head.py; ppo.logits_chunk_tokens).
        with_entropy adds the per-token entropy (no grad); with_logits the full logits (unchunked, for inspection).
        With the shared critic the same forward also yields the values.
        """
        hidden = self.hidden_states(role, input_ids, attention_mask)
        h = hidden[:, response_start - 1:-1]
        out = token_logprobs(self.causal_lm.lm_head, h, input_ids[:, response_start:], temperature,
                             chunk_tokens, with_entropy)
        if with_logits:
            out["logits"] = self.causal_lm.lm_head(h).float() / temperature
        if with_values:
            out["values"] = self.heads["value"](h.float()).squeeze(-1)
        return out

    def token_values(self, input_ids, attention_mask, response_start: int) -> torch.Tensor:
        """Per-token values V(s_t) for the state before each response token."""
        hidden = self.hidden_states("value", input_ids, attention_mask)
        return self.heads["value"](hidden[:, response_start - 1:-1].float()).squeeze(-1)

    def sequence_rewards(self, input_ids, attention_mask) -> torch.Tensor:
        """One scalar per sequence from the reward adapter and head, read at the last non-pad token."""
        hidden = self.hidden_states("reward", input_ids, attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.heads["reward"](last.float()).squeeze(-1)

    # ---- micro-batched, no-grad versions for scoring a rollout ----------------------------------------------------
    @torch.no_grad()
    def _batched(self, fn, n: int, micro_batch: int | None, runner: MicroBatchRunner | None, phase: str):
        runner = runner or MicroBatchRunner(phase, micro_batch or n)
        parts = runner.run(n, fn)
        return torch.cat(parts, dim=0)

    def logprobs(self, role, input_ids, attention_mask, response_start, temperature=1.0, micro_batch=None,
                 runner=None, chunk_tokens: int = 0) -> torch.Tensor:
        def fn(a, b):
            return self.response_logprobs(role, input_ids[a:b], attention_mask[a:b], response_start,
                                          temperature, chunk_tokens=chunk_tokens)["logprobs"]
        return self._batched(fn, len(input_ids), micro_batch, runner, "score")

    def values(self, input_ids, attention_mask, response_start, micro_batch=None, runner=None) -> torch.Tensor:
        def fn(a, b):
            return self.token_values(input_ids[a:b], attention_mask[a:b], response_start)
        return self._batched(fn, len(input_ids), micro_batch, runner, "score")

    def rewards(self, input_ids, attention_mask, micro_batch=None, runner=None) -> torch.Tensor:
        def fn(a, b):
            return self.sequence_rewards(input_ids[a:b], attention_mask[a:b])
        return self._batched(fn, len(input_ids), micro_batch, runner, "score")

    # ---- generation ---------------------------------------------------------------------------------------------
    @contextmanager
    def generation_mode(self):
        """Eval mode, KV cache on and gradient checkpointing off: checkpointing disables the cache and makes
        decoding quadratic."""
        model = self.causal_lm
        was_training, was_ckpt = model.training, model.is_activation_checkpointing  # transformers 5 names
        if was_ckpt:
            model.activation_checkpointing_disable()
        model.eval()
        try:
            yield
        finally:
            if was_ckpt:
                self.set_gradient_checkpointing(True)
            model.train(was_training)

    @torch.no_grad()
    def generate(self, role: str, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        with self.generation_mode():
            self.activate(role)
            if "generation_config" not in kwargs:
                kwargs = {"use_cache": True, "pad_token_id": self.tokenizer.pad_token_id, **kwargs}
            return self.causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Checkpointing only acts in train mode in transformers; dropout is 0 so train mode is otherwise neutral."""
        model = self.causal_lm
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        else:
            model.activation_checkpointing_disable()
            model.eval()

    # ---- parameters -------------------------------------------------------------------------------------------
    def role_parameters(self, role: str) -> list[nn.Parameter]:
        """The parameters an optimizer for `role` updates: its LoRA weights, and the value head for the critic."""
        adapter = self.adapter_for(role)
        params = [p for n, p in self.peft.named_parameters() if self._role_of_param(n) == adapter]
        if role == "value" or (role == "policy" and self.critic == "shared"):
            params += list(self.heads["value"].parameters())
        if role == "reward":
            params += list(self.heads["reward"].parameters())
        return params

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- save / load ------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return run_metadata(self.causal_lm.config, self.base_name, self.quantization, self.causal_lm.dtype,
                            self.roles, self.critic, self.heads, self.lora)

    def save(self, run_dir: str | Path, roles=None) -> None:
        """Each adapter in RUN/<role> in plain PEFT format; heads as safetensors beside their adapter; a JSON."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        roles = list(roles or self.roles)
        for role in roles:
            self.peft.save_pretrained(str(run_dir), selected_adapters=[role])
        for head, module in self.heads.items():
            owner = self.adapter_for(head)
            if owner not in roles:
                continue
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(state, str(run_dir / owner / HEAD_FILES[head]))
        for role in roles:  # every file of the role (adapter, config, head) with its SHA-256, checked on load
            write_manifest(run_dir / role)
        (run_dir / META_FILE).write_text(json.dumps(self.metadata(), indent=2))

    def load_adapter_weights(self, role: str, source: str | Path) -> None:
        """Replace `role`'s LoRA weights with a saved adapter of the same shape (a PEFT directory, e.g. RUN/best/
        policy): one loaded base then answers as either policy, without a second PeftModel on the same modules."""
        verify_adapter(Path(source))
        state = load_file(str(Path(source) / "adapter_model.safetensors"), device=str(self.device))
        loaded = peft.set_peft_model_state_dict(self.peft, state, adapter_name=role)
        if loaded.unexpected_keys:
            raise ValueError(f"{source} does not fit the {role} adapter: {loaded.unexpected_keys[0]} has no place")

    @classmethod
    def load(cls, base: nn.Module, tokenizer, run_dir: str | Path, lora: LoraConfig, base_name: str = "",
             quantization: str = "none", roles=("policy", "value", "reward"), trainable=("policy", "value"),
             seed: int = 0):
        """Rebuild the roles from a run directory. `policy` falls back to a copy of `sft` when the run has none."""
        run_dir = Path(run_dir)
        meta = read_run_metadata(run_dir)
        check_base(meta, base.config, base_name, run_dir)
        if meta.get("quantization") not in (None, quantization):
            log.warning("%s was trained on a %s base but is loaded on %s", run_dir, meta["quantization"],
                        quantization)
        warn_on_compute_dtype_change(meta, base.dtype, run_dir)
        sources = {}
        for role in roles:
            src = run_dir / role
            if role == "policy" and not src.is_dir() and (run_dir / "sft").is_dir():
                src = run_dir / "sft"
            if (src / "adapter_config.json").is_file():
                verify_adapter(src)
                sources[role] = src
        model = cls(base, tokenizer, lora, roles=roles, trainable=trainable, base_name=base_name,
                    quantization=quantization, sources=sources, seed=seed)
        for head in model.heads:
            path = run_dir / model.adapter_for(head) / HEAD_FILES[head]
            if path.is_file():
                model.heads[head].load_state_dict(load_file(str(path), device=str(model.device)))
        model._apply_trainability()
        return model

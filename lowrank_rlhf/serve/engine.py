"""One quantized base, a run's adapters, and generation for the server: the model named in a request picks the
adapter (base = adapters off, sft, policy, best), per request, on the one loaded base.

Requests are served one at a time under a lock (the queue is the lock's waiters): one 4-bit base on a consumer card
has no memory for a second batch of KV caches, and a request's adapter must stay active for its whole generation.
Generation is transformers' own `generate` (sampling, top_p, seeded), streamed through its TextIteratorStreamer;
the encoding of a chat is data.chat's, the run's own, and greedy decoding stops where `generate` and eval stop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .. import data
from ..commands.inference import context_length, load_run, run_recipe
from ..models.roles import BASE
from ..rl.rollout import neutral_generation_config, stop_token_ids


class RequestError(ValueError):
    """A request the server refuses: its message goes to the client as an OpenAI error with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class Cancelled(StoppingCriteria):
    """Ends a generation whose client went away, freeing the lock for the next request."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    """The run's base and adapters, and what the API needs of them."""

    def __init__(self, run_dir: Path, max_tokens_limit: int = 512):
        self.run_dir = Path(run_dir)
        self.cfg = run_recipe(self.run_dir)
        self.model = load_run(self.run_dir, roles=("policy", "sft"))
        self.tokenizer = self.model.tokenizer
        self.context = context_length(self.model, self.cfg.model.max_length)
        self.max_tokens_limit = min(max_tokens_limit, self.context - 1)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.causal_lm.generation_config, ["eos"])
        self.lock = threading.Lock()
        self._policy_weights = None  # the final policy, kept while RUN/best sits in the policy slot
        self._slot = "policy"
        self.models = ["base"] + [r for r in ("sft", "policy") if r in self.model.roles]
        if (self.run_dir / "best" / "policy" / "adapter_config.json").is_file():
            self.models.append("best")

    # ---- requests -> token ids -----------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict]) -> list[int]:
        for i, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise RequestError(f"messages[{i}].content: expected a string", param=f"messages[{i}].content")
        try:
            return data.prompt_ids(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages],
                                   name="messages")
        except data.DataError as err:
            raise RequestError(str(err), param="messages") from None

    def text_ids(self, prompt: str) -> list[int]:
        return data.prompt_ids(self.tokenizer, prompt, name="prompt")

    def check(self, model: str, ids: list[int], max_tokens: int | None) -> int:
        if model not in self.models:
            raise RequestError(f"The model '{model}' does not exist; available: {', '.join(self.models)}", 404,
                               "model", "model_not_found")
        max_tokens = self.max_tokens_limit if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens: {max_tokens} is out of range; allowed range: [1, {self.max_tokens_limit}]",
                               param="max_tokens")
        if len(ids) + max_tokens > self.context:
            raise RequestError(f"This model's maximum context length is {self.context} tokens; the prompt has "
                               f"{len(ids)} and max_tokens asks for {max_tokens} more", param="messages",
                               code="context_length_exceeded")
        return max_tokens

    # ---- generation ------------------------------------------------------------------------------------------
    def _use(self, model: str) -> str:
        """The role to activate for `model`; RUN/best goes into the policy slot (and the final policy back out)."""
        if model == "base":
            return BASE
        if model in ("best", "policy") and self._slot != model:
            if model == "best":
                self._policy_weights = {n: p.detach().clone() for n, p in self.model.peft.named_parameters()
                                        if ".policy." in n}
                self.model.load_adapter_weights("policy", self.run_dir / "best" / "policy")
            else:
                params = dict(self.model.peft.named_parameters())
                with torch.no_grad():
                    for name, value in self._policy_weights.items():
                        params[name].copy_(value)
            self._slot = model
        return "policy" if model == "best" else model

    def generate(self, model: str, ids: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, streamer=None,
                 cancelled: Cancelled | None = None) -> Generation:
        """One completion under the lock; greedy at temperature 0. `streamer` gets the text as it is made."""
        kwargs = dict(max_new_tokens=max_tokens, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                      do_sample=temperature > 0, use_cache=True)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if cancelled is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([cancelled])
        input_ids = torch.tensor([ids], device=self.model.device)
        with self.lock:
            role = self._use(model)
            if seed is not None:
                torch.manual_seed(seed)
            with self.model.generation_mode(), neutral_generation_config(self.model.causal_lm):
                self.model.activate(role)
                out = self.model.causal_lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                    **kwargs)
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
        return Generation(text, "stop" if stopped or len(new) < max_tokens else "length", len(ids), len(new))

    def streamer(self) -> TextIteratorStreamer:
        return TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)

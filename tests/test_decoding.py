"""The static-cache decode loop (ppo.decode=static / static-compiled) samples exactly what generate() samples."""

import pytest
import torch
from test_trainer import make_trainer, recipe

from lowrank_rlhf.rl.decoding import StaticDecoder
from lowrank_rlhf.rl.sampling import KeyedGumbelSampler, row_keys

# Temperature 30 makes the random tiny model's tokens near-uniform, so some of 8 rows emit eos within 40 tokens
# and some do not: both the stop handling and the full-length rows are exercised.
SETTINGS = ("ppo.response_length=40", "ppo.temperature=30", "ppo.rollout_batch_size=8")


def rollout(tmp_path, decode, *overrides, force=False):
    trainer = make_trainer(recipe(tmp_path / decode, f"ppo.decode={decode}", *SETTINGS, *overrides),
                           micro_batches={"generate": 4}, force_response_length=force)
    return trainer.rollout()


@pytest.mark.parametrize("stop_token, force", [("eos", False), ("eos", True), ("none", False)])
def test_static_cache_samples_the_same_tokens_as_generate(tmp_path, stop_token, force):
    reference = rollout(tmp_path / "a", "generate", f"ppo.stop_token={stop_token}", force=force)
    static = rollout(tmp_path / "b", "static", f"ppo.stop_token={stop_token}", force=force)
    assert torch.equal(static.input_ids, reference.input_ids)
    assert torch.equal(static.attention_mask, reference.attention_mask)
    stopped = reference.has_stop
    if stop_token == "eos" and not force:
        assert stopped.any() and not stopped.all()  # the case really mixes stopped and full-length rows
    else:
        assert not stopped.any() and reference.response_mask.all()


def test_compiled_decode_samples_the_same_tokens_as_generate(tmp_path):
    """torch.compile on the CPU (inductor, no CUDA graphs): the compiled step computes what the eager one does,
    also on the next rollout, which reuses the kept cache after a reset."""
    trainers = {decode: make_trainer(recipe(tmp_path / decode, f"ppo.decode={decode}", *SETTINGS),
                                     micro_batches={"generate": 4}) for decode in ("generate", "static-compiled")}
    for step in range(2):
        outs = {}
        for decode, trainer in trainers.items():
            trainer.step = step  # new prompts and sampling keys
            outs[decode] = trainer.rollout()
        assert torch.equal(outs["static-compiled"].input_ids, outs["generate"].input_ids)
        assert torch.equal(outs["static-compiled"].attention_mask, outs["generate"].attention_mask)
    assert trainers["static-compiled"].decoder._cache is not None  # kept for the next rollout


def test_out_of_memory_mid_decode_releases_the_kept_cache(tmp_path):
    """The compiled decoder keeps its cache between rollouts; an OOM must drop it, or halving cannot free it."""
    trainer = make_trainer(recipe(tmp_path, *SETTINGS))
    model = trainer.model
    decoder = StaticDecoder(model.causal_lm, compiled=True)
    tok = model.tokenizer
    query = torch.tensor([tok("hello")["input_ids"]] * 2)
    sampler = KeyedGumbelSampler(row_keys(0, 0, torch.arange(2)), 1.0)

    def out_of_memory(*args):
        assert decoder._cache is not None  # the prefill filled the kept cache
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    decoder.step = out_of_memory
    with model.generation_mode(), pytest.raises(torch.OutOfMemoryError):
        decoder.sample(query, torch.ones_like(query), sampler, 5, [tok.eos_token_id], tok.pad_token_id)
    assert decoder._cache is None

"""Loading the shared base: a built-in model's 4-bit quantization is done once and kept in the model cache."""

import bitsandbytes.functional
import pytest
import torch

from lowrank_rlhf.config import ModelConfig
from lowrank_rlhf.models.builtin import prequantized_dir
from lowrank_rlhf.models.loading import load_base


def test_a_builtin_4bit_base_is_quantized_once_and_loads_back_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_RLHF_CACHE", str(tmp_path))
    cfg = ModelConfig(name="tiny-llama", quantization="4bit", device="cpu")
    fresh, tok = load_base(cfg)
    saved = prequantized_dir("tiny-llama", "4bit", torch.float32, torch.device("cpu"))
    assert saved.parent.parent == tmp_path and (saved / "config.json").is_file()

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the second load quantized again")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_quantizing)
    cached, _ = load_base(cfg)
    first, second = fresh.state_dict(), cached.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # packed weights and quantization states alike
    ids = tok("a question about the sky", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, cached(ids).logits)
    assert cached.config.name_or_path == fresh.config.name_or_path  # adapters record the model, not the copy
    assert not any(p.requires_grad for p in cached.parameters()) and not cached.training


@pytest.mark.parametrize("name, quantization", [("tiny-llama", "8bit"), ("tiny-llama", "none"),
                                                ("/models/llama-2-7b", "4bit")])
def test_only_builtin_4bit_bases_are_kept_quantized(name, quantization):
    assert prequantized_dir(name, quantization, torch.float32, torch.device("cpu")) is None

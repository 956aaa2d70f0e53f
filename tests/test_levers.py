"""Issue 16's memory levers at run time, on tiny-llama in 4-bit and 8-bit: ppo.optim (bitsandbytes' 8-bit AdamW),
lora.frozen_dtype=compute (frozen adapters in bf16) and ppo.logits_chunk_tokens (logits a chunk of tokens at a time)."""

import sys

import bitsandbytes as bnb
import pytest
import torch
from test_roles import randomize
from test_trainer import adapter_weights, assert_same, letter_share, make_trainer, recipe

from conftest import make_batch
from lowrank_rlhf.config import ConfigError, LoraConfig, ModelConfig, PPOConfig
from lowrank_rlhf.models.frozen_dtype import UpcastLinear
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.models.roles import REFERENCE, RoleModel
from lowrank_rlhf.rl.optim import build_optimizer
from lowrank_rlhf.rl.trainer import PPOTrainer

QUANTIZED = ["4bit", "8bit"]


# ------------------------------------------------------------------------------------------ ppo.optim
@pytest.mark.parametrize("quantization", QUANTIZED)
@pytest.mark.parametrize("optim, cls", [("adamw_8bit", bnb.optim.AdamW8bit),
                                        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit)])
def test_8bit_optimizers_train_with_8bit_states_and_resume_exactly(tmp_path, quantization, optim, cls):
    # lora.r=64: tiny-llama's LoRA matrices reach bitsandbytes' min_8bit_size (4096), so the states really are 8-bit
    args = (f"model.quantization={quantization}", f"ppo.optim={optim}", "lora.r=64", "ppo.total_steps=2",
            "ppo.num_ppo_epochs=1", "ppo.weight_decay=0.01")
    straight = make_trainer(recipe(tmp_path / "a", *args))
    assert type(straight.optimizer) is cls
    assert [g["lr"] for g in straight.optimizer.param_groups] == [1e-3, 1e-3]  # policy, value: their own groups
    assert {(g["eps"], g["weight_decay"]) for g in straight.optimizer.param_groups} == {(1e-5, 0.01)}
    before = adapter_weights(straight)
    straight.train()
    after = adapter_weights(straight)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    dtypes = {v.dtype for s in straight.optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    assert torch.uint8 in dtypes  # 8-bit moments
    interrupted = make_trainer(recipe(tmp_path / "b", *args))
    interrupted.train_step()
    interrupted.save_checkpoint()
    resumed = make_trainer(recipe(tmp_path / "b", *args, "ppo.resume=true"))
    resumed.train()
    assert resumed.step == 2
    assert_same(after, adapter_weights(resumed), atol=0)


def test_8bit_optimizer_steps_differ_from_fp32_adamw(tmp_path):
    """The key is not ignored: the same step with 8-bit states lands elsewhere than with fp32 AdamW."""
    args = ("lora.r=64", "ppo.total_steps=1", "ppo.num_ppo_epochs=1")
    fp32, eight = (make_trainer(recipe(tmp_path / o, *args, f"ppo.optim={o}")) for o in ("adamw", "adamw_8bit"))
    fp32.train_step(), eight.train_step()
    a, b = adapter_weights(fp32), adapter_weights(eight)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_8bit_optimizer_without_bitsandbytes_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    ppo = PPOConfig(optim="adamw_8bit")
    with pytest.raises(ConfigError, match=r"ppo.optim=adamw_8bit needs bitsandbytes.*allowed: adamw, adamw_8bit"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}], ppo)
    assert isinstance(build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}],
                                      PPOConfig(optim="adamw")), torch.optim.AdamW)


# ------------------------------------------------------------------------------------------ ppo.logits_chunk_tokens
def chunked_forward(model, ids, mask, start, chunk):
    """Logprobs, entropy and the policy adapter's gradient of a weighted logprob sum, one forward."""
    params = [p for p in model.role_parameters("policy")]
    out = model.response_logprobs("policy", ids, mask, start, temperature=0.7, with_entropy=True, chunk_tokens=chunk)
    weights = torch.linspace(-1.0, 2.0, out["logprobs"].numel()).reshape(out["logprobs"].shape)
    grads = torch.autograd.grad((out["logprobs"] * weights).sum(), params)
    return out["logprobs"].detach(), out["entropy"], grads


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_chunked_logits_give_the_same_logprobs_entropy_and_gradients(quantization, load_tiny, lora_cfg):
    base, tok = load_tiny(quantization)
    model = RoleModel(base, tok, lora_cfg, roles=("policy",))
    randomize(model, "policy")
    ids, mask, start = make_batch(tok)  # 3 rows x 5 response tokens = 15 tokens
    logprobs, entropy, grads = chunked_forward(model, ids, mask, start, 0)
    assert entropy.shape == logprobs.shape == (3, 5) and not entropy.requires_grad
    for chunk in (4, 15, 64):  # smaller than (and not dividing), equal to, larger than the response tokens
        c_logprobs, c_entropy, c_grads = chunked_forward(model, ids, mask, start, chunk)
        torch.testing.assert_close(c_logprobs, logprobs, rtol=0, atol=1e-6)
        torch.testing.assert_close(c_entropy, entropy, rtol=0, atol=1e-6)
        for g, c in zip(grads, c_grads):  # chunks sum the gradient in another order: fp32 rounding, ~1e-5 relative
            torch.testing.assert_close(c, g, rtol=1e-4, atol=1e-5)
    # scoring's path (no grad): the same numbers chunked and not
    scored = {c: model.logprobs("policy", ids, mask, start, temperature=0.7, chunk_tokens=c) for c in (0, 4)}
    torch.testing.assert_close(scored[4], scored[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_chunked_logits_never_exist_for_the_whole_micro_batch(quantization, load_tiny, lora_cfg):
    """lm_head never outputs more than a chunk (forward and the backward's recomputation), and no tensor kept for
    the backward holds more than a chunk of logits."""
    base, tok = load_tiny(quantization)
    model = RoleModel(base, tok, lora_cfg, roles=("policy",))
    vocab = model.causal_lm.config.vocab_size
    ids, mask, start = make_batch(tok)
    largest = {"output": 0, "saved": 0}

    def on_output(module, args, output):
        largest["output"] = max(largest["output"], output.numel())

    def pack(t):  # logits carry grad; lm_head's weight (also vocab-wide, expanded for the matmul) does not
        if t.dim() and t.shape[-1] == vocab and t.requires_grad:
            largest["saved"] = max(largest["saved"], t.numel())
        return t

    hook = model.causal_lm.lm_head.register_forward_hook(on_output)
    try:
        for chunk, expected in ((0, 15 * vocab), (4, 4 * vocab)):
            largest.update(output=0, saved=0)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model.response_logprobs("policy", ids, mask, start, with_entropy=True, chunk_tokens=chunk)
            out["logprobs"].sum().backward()
            assert largest["output"] == expected, chunk
            assert largest["saved"] == (expected if chunk == 0 else 0), chunk  # checkpointed chunks keep no logits
    finally:
        hook.remove()


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_chunked_training_step_matches_the_unchunked_one_and_kl_starts_at_zero(tmp_path, quantization):
    args = (f"model.quantization={quantization}", "ppo.total_steps=1", "ppo.num_ppo_epochs=1")
    plain = make_trainer(recipe(tmp_path / "a", *args))
    chunked = make_trainer(recipe(tmp_path / "b", *args, "ppo.logits_chunk_tokens=5"))
    exp = chunked.score(chunked.rollout())
    assert exp.kl.abs().max().item() == 0.0  # policy and reference: the same chunked path
    m_plain, m_chunked = plain.train_step(), chunked.train_step()
    for key in ("objective/kl", "objective/entropy", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg"):
        assert m_chunked[key] == pytest.approx(m_plain[key], abs=1e-5), key
    assert_same(adapter_weights(plain), adapter_weights(chunked), atol=1e-6)


# ------------------------------------------------------------------------------------------ lora.frozen_dtype
def bf16_base(quantization):
    return load_base(ModelConfig(name="tiny-llama", quantization=quantization, device="cpu", dtype="bfloat16"))


def sft_and_reward_run(tmp_path, quantization, lora):
    """A run directory with a random (non-zero) sft adapter, a reward adapter and a reward head, all fp32."""
    base, tok = bf16_base(quantization)
    run = RoleModel(base, tok, lora, roles=("sft", "reward"), trainable=(), base_name="tiny-llama",
                    quantization=quantization)
    randomize(run, "sft", seed=1)
    randomize(run, "reward", seed=2)
    run.save(tmp_path)
    return tmp_path


def load_roles(run_dir, quantization, frozen_dtype):
    base, tok = bf16_base(quantization)
    lora = LoraConfig(r=4, alpha=8, frozen_dtype=frozen_dtype)
    return RoleModel.load(base, tok, run_dir, lora, base_name="tiny-llama", quantization=quantization,
                          roles=("policy", "value", "sft", "reward"))


def role_params(model, role):
    return [p for n, p in model.peft.named_parameters() if model._role_of_param(n) == role]


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_frozen_adapters_in_bf16_halve_their_bytes_and_keep_kl_exactly_zero(tmp_path, quantization, lora_cfg):
    run_dir = sft_and_reward_run(tmp_path, quantization, lora_cfg)
    full, compact = (load_roles(run_dir, quantization, d) for d in ("float32", "compute"))
    for role in ("sft", "reward"):
        assert {p.dtype for p in role_params(compact, role)} == {torch.bfloat16}
        assert not any(p.requires_grad for p in role_params(compact, role))
        nbytes = [sum(p.nbytes for p in role_params(m, role)) for m in (full, compact)]
        assert nbytes[1] * 2 == nbytes[0]
    assert isinstance(compact.heads["reward"], UpcastLinear) and compact.heads["reward"].weight.dtype == torch.bfloat16
    for role in ("policy", "value"):  # trained: fp32 and trainable
        assert {p.dtype for p in role_params(compact, role)} == {torch.float32}
        assert all(p.requires_grad for p in role_params(compact, role))
    assert compact.heads["value"].weight.dtype == torch.float32
    ids, mask, start = make_batch(compact.tokenizer)
    # the frozen roles: unchanged within bf16 rounding of their weights (and changed: the rounding is real)
    ref = {m: m.logprobs(REFERENCE, ids, mask, start) for m in (full, compact)}
    assert 0 < (ref[compact] - ref[full]).abs().max().item() < 0.05
    rewards = {m: m.rewards(ids, mask) for m in (full, compact)}
    assert 0 < (rewards[compact] - rewards[full]).abs().max().item() < 0.05
    # the policy starts from sft's rounded values, computed the same way: KL exactly 0
    for p, s in zip(role_params(compact, "policy"), role_params(compact, "sft")):
        assert p.dtype == torch.float32 and torch.equal(p, s.float())
    assert torch.equal(compact.logprobs("policy", ids, mask, start), ref[compact])


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_frozen_bf16_reference_gives_exactly_zero_kl_in_a_training_step(tmp_path, quantization, lora_cfg):
    run_dir = sft_and_reward_run(tmp_path / "run", quantization, lora_cfg)
    cfg = recipe(tmp_path / "ppo", f"model.quantization={quantization}", "model.dtype=bfloat16",
                 "lora.frozen_dtype=compute", "ppo.total_steps=1", "ppo.num_ppo_epochs=1",
                 "ppo.logits_chunk_tokens=7")
    model = load_roles(run_dir, quantization, "compute")
    prompts = [model.tokenizer(f"prompt {i}")["input_ids"] for i in range(4)]
    trainer = PPOTrainer(model, cfg, prompts, letter_share(model.tokenizer), show_progress=False)
    sft_before = [p.detach().clone() for p in role_params(model, "sft")]
    policy_before = [p.detach().clone() for p in role_params(model, "policy")]
    metrics = trainer.train_step()
    assert metrics["objective/kl"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(sft_before, role_params(model, "sft")))  # frozen stays
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, role_params(model, "policy")))  # policy trains

"""The shared base and its role adapters: who trains, who never changes, exact reference, save/load."""

import peft
import pytest
import torch

from conftest import QUANTIZATIONS, make_batch
from lowrank_rlhf.config import LoraConfig
from lowrank_rlhf.models.roles import REFERENCE, RoleModel
from lowrank_rlhf.run.metadata import BaseMismatchError


def snapshot(model: torch.nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def changed(model: torch.nn.Module, before: dict) -> set:
    after = model.state_dict()
    return {name for name, t in before.items() if not torch.equal(t, after[name])}


def lora_names(model: RoleModel, adapter: str) -> set:
    return {n for n in model.state_dict() if "lora_" in n and f".{adapter}." in n}


def step(model: RoleModel, loss: torch.Tensor) -> None:
    """One AdamW step over *every* trainable parameter, so the test sees where gradients really went."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    opt.step()


def policy_loss(model, ids, mask, start):
    return -model.response_logprobs("policy", ids, mask, start)["logprobs"].mean()


def value_loss(model, ids, mask, start):
    return model.token_values(ids, mask, start).pow(2).mean()


@pytest.fixture
def roles_model(load_tiny, lora_cfg, request):
    base, tok = load_tiny(request.param)
    return RoleModel(base, tok, lora_cfg, roles=("policy", "value", "reward", "sft"), base_name="tiny-llama",
                     quantization=request.param)


@pytest.mark.parametrize("roles_model", QUANTIZATIONS, indirect=True)
def test_value_step_changes_only_value_adapter_and_head(roles_model):
    ids, mask, start = make_batch(roles_model.tokenizer)
    before = snapshot(roles_model)
    step(roles_model, value_loss(roles_model, ids, mask, start))
    expected = lora_names(roles_model, "value") | {"heads.value.weight", "heads.value.bias"}
    assert changed(roles_model, before) == expected


@pytest.mark.parametrize("roles_model", QUANTIZATIONS, indirect=True)
def test_policy_step_changes_only_policy_adapter(roles_model):
    ids, mask, start = make_batch(roles_model.tokenizer)
    before = snapshot(roles_model)
    step(roles_model, policy_loss(roles_model, ids, mask, start))
    # reward, sft, both heads but value's, and every base weight (quantized or not) stay bit-identical
    assert changed(roles_model, before) == lora_names(roles_model, "policy")


@pytest.mark.parametrize("roles_model", QUANTIZATIONS, indirect=True)
def test_two_roles_in_one_backward_both_get_gradients(roles_model):
    ids, mask, start = make_batch(roles_model.tokenizer)
    loss = policy_loss(roles_model, ids, mask, start)  # policy forward, then switch to value, then ONE backward
    loss = loss + value_loss(roles_model, ids, mask, start)
    loss.backward()
    for role in ("policy", "value"):
        grads = [p.grad for p in roles_model.role_parameters(role)]
        assert all(g is not None for g in grads), role
        assert sum(g.abs().sum().item() for g in grads) > 0, role
    frozen = roles_model.role_parameters("reward") + roles_model.role_parameters("sft")
    assert all(p.grad is None and not p.requires_grad for p in frozen)


@pytest.mark.parametrize("roles_model", ["4bit", "8bit"], indirect=True)
def test_reference_equals_policy_at_init_without_sft(roles_model, load_tiny, lora_cfg):
    base, tok = load_tiny(roles_model.quantization)
    model = RoleModel(base, tok, lora_cfg, roles=("policy", "value"), quantization=roles_model.quantization)
    assert model.adapter_for(REFERENCE) is None  # adapters disabled
    ids, mask, start = make_batch(tok)
    policy = model.logprobs("policy", ids, mask, start, micro_batch=2)
    reference = model.logprobs(REFERENCE, ids, mask, start, micro_batch=2)
    assert (policy - reference).abs().max().item() <= 1e-6


def randomize(model: RoleModel, adapter: str, seed: int = 1) -> None:
    """Give an adapter non-zero lora_B so it differs from the base (a fresh LoRA is an exact no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_policy_starts_as_exact_copy_of_sft(quantization, load_tiny, lora_cfg, tmp_path):
    base, tok = load_tiny(quantization)
    sft_only = RoleModel(base, tok, lora_cfg, roles=("sft",), trainable=(), base_name="tiny-llama",
                         quantization=quantization)
    randomize(sft_only, "sft")
    sft_only.save(tmp_path)
    base, tok = load_tiny(quantization)
    model = RoleModel.load(base, tok, tmp_path, lora_cfg, base_name="tiny-llama", quantization=quantization,
                           roles=("policy", "value", "sft"))
    assert model.adapter_for(REFERENCE) == "sft"
    ids, mask, start = make_batch(tok)
    policy = model.logprobs("policy", ids, mask, start)
    reference = model.logprobs(REFERENCE, ids, mask, start)
    kl = (policy - reference).mean().item()
    assert abs(kl) <= 1e-6 and (policy - reference).abs().max().item() <= 1e-6
    # ... and the sft adapter really is in use: the base alone gives different logprobs
    model.roles = tuple(r for r in model.roles if r != "sft")
    assert (model.logprobs(REFERENCE, ids, mask, start) - policy).abs().max().item() > 1e-3


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_save_load_round_trip_reproduces_logits_exactly(quantization, load_tiny, lora_cfg, tmp_path):
    base, tok = load_tiny(quantization)
    model = RoleModel(base, tok, lora_cfg, roles=("policy", "value", "reward"), base_name="tiny-llama",
                      quantization=quantization)
    for i, adapter in enumerate(model.roles):
        randomize(model, adapter, seed=i + 1)
    ids, mask, start = make_batch(tok)
    with torch.no_grad():
        expected = {r: model.response_logprobs(r, ids, mask, start, with_logits=True)["logits"] for r in model.roles}
        expected_values = model.token_values(ids, mask, start)
        expected_rewards = model.sequence_rewards(ids, mask)
    model.save(tmp_path)
    base, tok = load_tiny(quantization)
    loaded = RoleModel.load(base, tok, tmp_path, lora_cfg, base_name="tiny-llama", quantization=quantization)
    with torch.no_grad():
        for role in loaded.roles:
            got = loaded.response_logprobs(role, ids, mask, start, with_logits=True)["logits"]
            assert torch.equal(got, expected[role]), role
        assert torch.equal(loaded.token_values(ids, mask, start), expected_values)
        assert torch.equal(loaded.sequence_rewards(ids, mask), expected_rewards)
    # a resumed run must be able to keep training the policy and value roles
    assert all(p.requires_grad for p in loaded.role_parameters("policy") + loaded.role_parameters("value"))
    assert not any(p.requires_grad for p in loaded.role_parameters("reward"))


def test_run_dir_loads_with_plain_peft(load_tiny, lora_cfg, tmp_path):
    base, tok = load_tiny("none")
    model = RoleModel(base, tok, lora_cfg, roles=("policy", "value"), base_name="tiny-llama")
    randomize(model, "policy")
    ids, mask, start = make_batch(tok)
    with torch.no_grad():
        expected = model.response_logprobs("policy", ids, mask, start, with_logits=True)["logits"]
    model.save(tmp_path)
    fresh, _ = load_tiny("none")
    plain = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "policy"))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, start - 1:-1]
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=1e-5)
    assert (tmp_path / "value" / "value_head.safetensors").is_file()


def lora_formula(config, r: int, adapters: int) -> int:
    """r * (in + out) for each of the seven LLaMA linears, per layer, per adapter."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return adapters * r * per_layer * config.num_hidden_layers


@pytest.mark.parametrize("critic, adapters", [("separate", 2), ("shared", 1)])
@pytest.mark.parametrize("r", [2, 8])
def test_trainable_parameters_match_lora_formula(load_tiny, critic, adapters, r):
    base, tok = load_tiny("4bit")
    model = RoleModel(base, tok, LoraConfig(r=r, critic=critic), roles=("policy", "value", "reward", "sft"))
    value_head = base.config.hidden_size + 1
    assert model.num_trainable_parameters() == lora_formula(base.config, r, adapters) + value_head


def test_shared_critic_gives_logits_and_values_from_one_forward(load_tiny, lora_cfg):
    base, tok = load_tiny("4bit")
    model = RoleModel(base, tok, LoraConfig(r=4, critic="shared"), roles=("policy", "value", "reward"))
    assert "value" not in model.roles and model.adapter_for("value") == "policy"
    ids, mask, start = make_batch(tok)
    out = model.response_logprobs("policy", ids, mask, start, with_values=True)
    torch.testing.assert_close(out["values"], model.token_values(ids, mask, start), rtol=0, atol=0)
    out["values"].pow(2).mean().backward()
    assert all(p.grad is not None for p in model.role_parameters("policy"))


def test_loading_onto_mismatched_base_fails_with_message(load_tiny, lora_cfg, tmp_path):
    base, tok = load_tiny("none")
    RoleModel(base, tok, lora_cfg, roles=("policy",), base_name="tiny-llama").save(tmp_path)
    other, tok = load_tiny("none")
    other.config.num_hidden_layers = 3  # pretend a different architecture
    with pytest.raises(BaseMismatchError) as err:
        RoleModel.load(other, tok, tmp_path, lora_cfg, base_name="other-llama", roles=("policy",))
    message = str(err.value)
    assert "\n" not in message
    assert "trained on base 'tiny-llama' (llama, 2 layers" in message
    assert "loaded base is 'other-llama' (llama, 3 layers" in message


def test_reward_is_read_at_last_non_pad_token(load_tiny, lora_cfg):
    base, tok = load_tiny("none")
    model = RoleModel(base, tok, lora_cfg, roles=("policy", "reward"))
    ids, mask, _ = make_batch(tok)
    padded_ids = torch.cat([ids, torch.full((len(ids), 3), tok.pad_token_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(len(ids), 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.rewards(padded_ids, padded_mask, micro_batch=1),
                                   model.rewards(ids, mask, micro_batch=3), rtol=0, atol=1e-5)


def test_adapters_used_over_another_compute_dtype_load_with_a_warning(tmp_path, lora_cfg, caplog):
    """A CPU-trained (float32) adapter served over bf16 compute answered 23-24 held-out SQL questions instead of 33:
    the run records its compute dtype and loading over another one warns, naming both and the recipe fix."""
    import json
    import logging

    from lowrank_rlhf.config import ModelConfig
    from lowrank_rlhf.models.loading import load_base

    def load(dtype):
        return load_base(ModelConfig(name="tiny-llama", quantization="4bit", device="cpu", dtype=dtype))

    base, tok = load("float32")
    RoleModel(base, tok, lora_cfg, roles=("policy",), base_name="tiny-llama", quantization="4bit").save(tmp_path)
    meta = json.loads((tmp_path / "lowrank_rlhf.json").read_text())
    assert meta["compute_dtype"] == "float32"
    logger = "lowrank_rlhf.run.metadata"
    with caplog.at_level(logging.WARNING, logger=logger):
        RoleModel.load(*load("float32"), tmp_path, lora_cfg, base_name="tiny-llama", quantization="4bit",
                       roles=("policy",))
    assert not [r for r in caplog.records if r.name == logger]
    with caplog.at_level(logging.WARNING, logger=logger):
        RoleModel.load(*load("bfloat16"), tmp_path, lora_cfg, base_name="tiny-llama", quantization="4bit",
                       roles=("policy",))
    assert (f"adapters in {tmp_path} were trained over float32 compute and now run over bfloat16: their answers "
            "can differ (set model.dtype=float32 to match)") in caplog.text
    caplog.clear()
    del meta["compute_dtype"]  # a run written before the field existed: nothing to compare, no warning
    (tmp_path / "lowrank_rlhf.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger=logger):
        RoleModel.load(*load("bfloat16"), tmp_path, lora_cfg, base_name="tiny-llama", quantization="4bit",
                       roles=("policy",))
    assert not [r for r in caplog.records if r.name == logger]

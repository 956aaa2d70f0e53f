"""A critic that can learn (issue 'RL that measurably improves the model', finding 5): a separate critic starts
from the reward model's adapter and head (lora.critic_init: reward, as TRL's PPOv2 and OpenRLHF), not from a random
head that would need many steps to follow the returns."""

import torch
from peft import get_peft_model_state_dict

from lowrank_rlhf.config import load_recipe
from lowrank_rlhf.models.loading import load_base
from lowrank_rlhf.models.roles import RoleModel
from lowrank_rlhf.pipeline import load_roles


def reward_run(tmp_path, cfg):
    """A run directory holding a reward adapter and head that are not at their initial values."""
    base, tok = load_base(cfg.model)
    model = RoleModel(base, tok, cfg.lora, roles=("policy", "reward"), base_name=cfg.model.name,
                      quantization=cfg.model.quantization)
    with torch.no_grad():
        for name, param in model.peft.named_parameters():
            if ".reward." in name and "lora_B" in name:
                param.normal_()
        model.heads["reward"].weight.normal_()
    model.save(tmp_path, roles=["reward"])
    return get_peft_model_state_dict(model.peft, adapter_name="reward"), model.heads["reward"].weight.clone()


def test_separate_critic_starts_as_the_reward_model(tmp_path):
    overrides = ["model.device=cpu", "model.quantization=4bit", "lora.r=4", f"run_dir={tmp_path}"]
    cfg = load_recipe(None, overrides)
    assert cfg.lora.critic_init == "reward"
    adapter, head = reward_run(tmp_path, cfg)
    model = load_roles(cfg, tmp_path)
    value = get_peft_model_state_dict(model.peft, adapter_name="value")
    assert set(value) == set(adapter) and all(torch.equal(value[k], adapter[k]) for k in adapter)
    assert torch.equal(model.heads["value"].weight, head)
    assert all(p.requires_grad for p in model.role_parameters("value"))  # a copy, still trainable
    assert not any(p.requires_grad for p in model.heads["reward"].parameters())
    fresh = load_roles(load_recipe(None, overrides + ["lora.critic_init=fresh"]), tmp_path)
    value = get_peft_model_state_dict(fresh.peft, adapter_name="value")
    assert all(not v.any() for k, v in value.items() if "lora_B" in k)  # a new adapter: B = 0
    assert not torch.equal(fresh.heads["value"].weight, head)

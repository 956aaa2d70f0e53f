"""SFT and reward stages on tiny-llama in 4-bit on CPU: they train, save plain PEFT adapters + our head format, and
what PPO loads (RoleModel) reproduces what TRL trained."""

import copy
import json

import datasets
import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch
from lowrank_rlhf import data, stages
from lowrank_rlhf.config import LoraConfig, ModelConfig, RecipeConfig
from lowrank_rlhf.models.loading import load_base, load_tokenizer
from lowrank_rlhf.models.roles import REFERENCE, RoleModel, last_token_index

ALL_ROLES = ("policy", "value", "reward", "sft")
RAMBLE = "well, it is hard to say, there are many sides to this and I would rather not commit"


pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


def recipe() -> RecipeConfig:
    cfg = RecipeConfig(model=ModelConfig(name="tiny-llama", quantization="4bit", device="cpu"),
                       lora=LoraConfig(r=8, alpha=16))
    cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.learning_rate = 4, 4, 1e-3
    cfg.reward_model.max_steps, cfg.reward_model.batch_size, cfg.reward_model.learning_rate = 20, 8, 1e-3
    return cfg


def sft_data(n=16) -> datasets.Dataset:
    words = ["yes", "no", "maybe", "fine"]
    return datasets.Dataset.from_list([{"prompt": f"say {w}", "completion": w} for w in words * (n // 4)])


def toy_pairs(n, offset=0) -> datasets.Dataset:
    """Trivially separable: chosen is always 'yes', rejected always a long ramble."""
    return datasets.Dataset.from_list([{"prompt": f"question {i}?", "chosen": "yes", "rejected": RAMBLE}
                                       for i in range(offset, offset + n)])


def load_roles(cfg, run_dir, roles=ALL_ROLES):
    base, tok = load_base(cfg.model)
    return RoleModel.load(base, tok, run_dir, cfg.lora, base_name=cfg.model.name,
                          quantization=cfg.model.quantization, roles=roles)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def sft_run(run_dir):
    cfg = recipe()
    return cfg, stages.train_sft(cfg, sft_data(), run_dir)


# ---- rendering ----------------------------------------------------------------------------------------------------

def test_examples_are_encoded_as_a_ppo_rollout_lays_them_out(tiny_path):
    """Prompt ids exactly as PPO encodes its prompts, then the answer, ending with eos and nothing after it."""
    tok = load_tokenizer(str(tiny_path))
    user, answer = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yes"}]

    def text(prompt, completion):
        return tok.decode(data.encode_example(tok, prompt, completion))
    assert text(user, answer) == "user: hi</s>\nassistant: yes</s>"
    assert text("", user + answer) == "user: hi</s>\nassistant: yes</s>"  # implicit prompt
    assert text("hi ", "yes") == "hi yes</s>"  # plain text stays plain
    for prompt, completion in [(user, answer), ("hi ", "yes"), (user, "yes")]:
        ids = data.encode_example(tok, prompt, completion)
        prompt_ids = data.encode_prompts([prompt], tok, max_prompt_length=1000)[0]
        assert ids[:len(prompt_ids)] == prompt_ids
        assert tok.decode(ids[len(prompt_ids):]) == "yes</s>" and ids[-1] == tok.eos_token_id


def test_pooling_pad_id_avoids_a_pad_that_ends_sequences(tiny_path):
    """pad == eos (LLaMA-2) with eos-terminated sequences would make TRL score the token before eos."""
    tok = load_tokenizer(str(tiny_path))
    assert stages.pooling_pad_id(tok, [[5, 6, tok.eos_token_id]]) == tok.pad_token_id
    tok.pad_token = tok.eos_token
    pad = stages.pooling_pad_id(tok, [[5, 6, tok.eos_token_id], [7, tok.unk_token_id]])
    assert pad not in (tok.eos_token_id, tok.unk_token_id)


def rollout_layout(tok, queries: list[list[int]], answers: list[str], length: int = 100):
    """(input_ids, attention_mask) as a PPO rollout holds prompts and responses: prompts left-padded
    (data.left_pad), responses of `length` tokens right-padded, the mask ending at the first eos (the rollout's
    response mask). A response is the answer's tokens followed by eos, as the policy would sample them."""
    query, query_mask = data.left_pad(queries, tok.pad_token_id)
    responses = torch.full((len(answers), length), tok.pad_token_id)
    response_mask = torch.zeros_like(responses)
    for i, answer in enumerate(answers):
        ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        responses[i, :len(ids)], response_mask[i, :len(ids)] = torch.tensor(ids), 1
    return torch.cat([query, responses], dim=1), torch.cat([query_mask, response_mask], dim=1)


def pooled_positions(model, input_ids, attention_mask) -> list[int]:
    """Where a sequence-classification model really reads its score: the position whose per-token score (caught
    at the `score` module) equals the pooled output."""
    seen = {}
    hook = model.base_model.model.score.register_forward_hook(lambda mod, args, out: seen.update(tokens=out))
    try:
        with torch.no_grad():
            pooled = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    finally:
        hook.remove()
    positions = []
    for row, value in zip(seen["tokens"][..., 0], pooled):
        hits = (row == value).nonzero().flatten().tolist()
        assert len(hits) == 1, hits
        positions.append(hits[0])
    return positions


@pytest.mark.parametrize("fmt,pad_is_eos", [("conversation", False), ("conversation", True), ("text", True)])
def test_reward_is_trained_and_read_at_the_token_ppo_scores(fmt, pad_is_eos, tmp_path, monkeypatch, tiny_path):
    """The reward stage trains on exactly a PPO rollout's tokens, and TRL's model reads the score at the token
    RoleModel.sequence_rewards reads in the rollout (eos), with the same tokens before it. tiny-llama's template
    puts a newline after eos (as ChatML does): encoding it would add a token PPO never scores. pad == eos
    (LLaMA-2) with TRL's own pad choice would make the classifier read the token before eos."""
    def tokenizer(*args, **kwargs):
        tok = load_tokenizer(*args, **kwargs)
        if pad_is_eos:
            tok.pad_token = tok.eos_token
        return tok
    monkeypatch.setattr(stages.reward, "load_tokenizer", tokenizer)
    ppo_tok = tokenizer(str(tiny_path))  # PPO's own tokenizer (the reward trainer sets its tokenizer's pad)
    questions = ["is water wet?", "say yes"]
    prompts = ([[{"role": "user", "content": q}] for q in questions] if fmt == "conversation"
               else [f"Q: {q} A: " for q in questions])
    pairs = datasets.Dataset.from_list([{"prompt": p, "chosen": "yes", "rejected": RAMBLE} for p in prompts])
    trainer = stages.reward_trainer(recipe(), pairs, tmp_path)
    tok = trainer.processing_class
    assert (ppo_tok.pad_token_id == ppo_tok.eos_token_id) == pad_is_eos
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]

    # 1. the trained ids are the rollout's ids: prompt ids as PPO encodes them, then the response, ending in eos
    queries = data.encode_prompts(pairs, ppo_tok, max_prompt_length=1000)
    answers = ["yes"] * len(rows) + [RAMBLE] * len(rows)  # the collator's order: chosen rows, then rejected
    trained = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    for ids, query, answer in zip(trained, queries * 2, answers):
        assert ids == query + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    # 2. TRL reads at its sequences' eos, RoleModel at the rollout's last attended token: same token, same prefix
    batch = trainer.data_collator(rows)
    assert (batch["attention_mask"] == 0).any()  # right padding is really there
    trainer.model.eval()
    trl_read = pooled_positions(trainer.model, batch["input_ids"], batch["attention_mask"])
    rollout_ids, rollout_mask = rollout_layout(ppo_tok, queries * 2, answers)
    ppo_read = last_token_index(rollout_mask).tolist()
    for b, (t, p) in enumerate(zip(trl_read, ppo_read)):
        trl_seen = batch["input_ids"][b, :t + 1]
        ppo_seen = rollout_ids[b, :p + 1][rollout_mask[b, :p + 1].bool()]
        assert trl_seen.tolist() == ppo_seen.tolist() == trained[b]
        assert trl_seen[-1] == tok.eos_token_id


# ---- SFT ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "conversational", "messages", "plain"])
def test_sft_loss_is_on_the_completion_only(fmt, run_dir, tiny_path):
    """SFT trains on the PPO rollout layout (data.encode_example): the loss on the (last) assistant turn with its
    eos and nothing after it (tiny-llama's template adds a newline there), no prompt tokens."""
    user = [{"role": "user", "content": "say yes"}]
    rows = {"text": {"prompt": "say yes", "completion": "yes"},
            "conversational": {"prompt": user, "completion": [{"role": "assistant", "content": "yes"}]},
            "messages": {"messages": [{"role": "user", "content": "say no"}, {"role": "assistant", "content": "no"},
                                      {"role": "user", "content": "say yes"},
                                      {"role": "assistant", "content": "yes"}]},
            "plain": {"text": "say yes"}}[fmt]
    trainer = stages.sft_trainer(recipe(), datasets.Dataset.from_list([rows]), run_dir / f"scratch-{fmt}")
    ex = trainer.train_dataset[0]
    tok = trainer.processing_class
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    # plain text stays plain, conversations are templated
    assert tok.decode(trained) == {"plain": "say yes</s>"}.get(fmt, "yes</s>")
    assert tok.decode(ex["input_ids"]).endswith("say yes" + ("yes</s>" if fmt == "text" else
                                                             "</s>\nassistant: yes</s>" if fmt != "plain" else "</s>"))
    prompt, completion = {"text": ("say yes", "yes"), "conversational": (user, "yes"), "plain": ("", "say yes"),
                          "messages": ([], rows.get("messages"))}[fmt]  # an empty prompt splits the conversation
    assert ex["input_ids"] == data.encode_example(tok, prompt, completion)


def test_sft_trains_and_saves_plain_peft(sft_run, run_dir, load_tiny):
    cfg, metrics = sft_run
    assert metrics["steps"] == 4 and metrics["seconds"] > 0
    assert metrics["train_loss_first"] > 0 and metrics["train_loss_last"] > 0
    weights = load_file(str(run_dir / "sft" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it trained
    base, _ = load_tiny("4bit")
    model = peft.PeftModel.from_pretrained(base, str(run_dir / "sft"))  # plain PEFT, no code of ours
    state = peft.get_peft_model_state_dict(model)
    assert set(state) == set(weights)
    assert all(torch.equal(state[k].float(), weights[k].float()) for k in weights)
    meta = json.loads((run_dir / "lowrank_rlhf.json").read_text())
    assert "sft" in meta["roles"] and meta["quantization"] == "4bit" and meta["base"]["name"] == "tiny-llama"


def test_policy_starts_as_sft_with_zero_kl(sft_run, run_dir):
    cfg, _ = sft_run
    model = load_roles(cfg, run_dir)
    ids, mask, start = make_batch(model.tokenizer)
    with torch.no_grad():
        policy = model.response_logprobs("policy", ids, mask, start)["logprobs"]
        reference = model.response_logprobs(REFERENCE, ids, mask, start)["logprobs"]
        model.activate("policy")
        with model.peft.disable_adapter():
            plain = model.causal_lm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(policy, reference)
    assert ((policy - reference) * mask[:, start:]).sum().item() == 0.0  # k1 KL at step 0
    model.activate("policy")
    with torch.no_grad():
        tuned = model.causal_lm(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(tuned, plain)  # the sft adapter is really there, not a fresh one


# ---- reward model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_run(sft_run, run_dir):
    """The stage's building blocks, so the test can compare TRL's trained model with what RoleModel loads."""
    cfg, _ = sft_run
    trainer = stages.reward_trainer(cfg, toy_pairs(16), run_dir / "scratch-reward", run_dir)  # starts from sft
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    stages.save_reward(trainer, cfg, run_dir)
    return cfg, trainer, result, trainable


def test_reward_trainer_keeps_trainables_in_compute_dtype(reward_run):
    """TRL 1.16 casts LoRA + score to bf16 on a quantized model; on CPU that breaks the score matmul."""
    _, trainer, result, trainable = reward_run
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert result.global_step == 20


def test_reward_saves_causal_adapter_and_head(reward_run, run_dir):
    cfg, trainer, _, _ = reward_run
    folder = run_dir / "reward"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all("lora_" in k and k.startswith("base_model.model.model.layers.") for k in weights)
    head = load_file(str(folder / "reward_head.safetensors"))
    hidden = trainer.model.config.hidden_size
    assert head["weight"].shape == (1, hidden) and head["weight"].dtype == torch.float32
    assert torch.equal(head["bias"], torch.zeros(1))
    meta = json.loads((run_dir / "lowrank_rlhf.json").read_text())
    assert {"sft", "reward"} <= set(meta["roles"]) and "reward" in meta["heads"]
    # the LoRA keys land on the causal LM: every reward LoRA weight loads with the trained value
    model = load_roles(cfg, run_dir)
    loaded = peft.get_peft_model_state_dict(model.peft, adapter_name="reward")
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert torch.equal(model.heads["reward"].weight.detach(), head["weight"])


def test_role_model_reward_equals_trl_score(reward_run, run_dir):
    cfg, trainer, _, _ = reward_run
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)  # TRL pads on the right: chosen rows first, then rejected
    assert (batch["attention_mask"] == 0).any()
    trainer.model.eval()
    with torch.no_grad():
        trl_scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = load_roles(cfg, run_dir, roles=("policy", "reward"))
    sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ours = stages.score_sequences(model, sequences)  # left-padded, read at the last attended token
    torch.testing.assert_close(ours, trl_scores.squeeze(-1).float(), atol=1e-4, rtol=1e-4)
    alone = stages.score_sequences(model, sequences[:1])  # no padding at all
    torch.testing.assert_close(alone, ours[:1], atol=1e-5, rtol=1e-5)


def test_train_reward_separates_a_toy_preference_set(tmp_path):
    cfg = recipe()
    held = datasets.Dataset.from_list([{**row, "kind": "format"} for row in toy_pairs(16, offset=100)])
    metrics = stages.train_reward(cfg, toy_pairs(32), tmp_path, eval_dataset=held)
    saved = json.loads((tmp_path / "reward" / "eval.json").read_text())
    assert saved["accuracy"] == metrics["eval_accuracy"] and saved["format"]["pairs"] == 16
    assert isinstance(metrics["eval_accuracy"], float) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["steps"] == 20 and metrics["eval_pairs"] == 16 and metrics["seconds"] > 0
    assert (tmp_path / "reward" / "reward_head.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch dirs are cleaned up


def test_reward_init_sft_starts_from_the_sft_adapter(sft_run, run_dir):
    """reward_model.init=sft (the default): the reward adapter's LoRA weights start as RUN/sft's exactly (TRL's bf16
    round trip undone), the score head is trainable and fresh; the saved adapter loads as the causal `reward`."""
    cfg, _ = sft_run
    cfg = copy.deepcopy(cfg)
    cfg.reward_model.max_steps = 2
    assert cfg.reward_model.init == "sft"
    trainer = stages.reward_trainer(cfg, toy_pairs(16), run_dir / "scratch-reward-sft", run_dir)
    sft = load_file(str(run_dir / "sft" / "adapter_model.safetensors"))
    start = {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(trainer.model).items()
             if "lora_" in k}
    assert set(start) == set(sft) and all(torch.equal(start[k], sft[k]) for k in sft)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()
    stages.save_reward(trainer, cfg, run_dir / "reward-from-sft")
    weights = load_file(str(run_dir / "reward-from-sft" / "reward" / "adapter_model.safetensors"))
    assert set(weights) == set(sft) and not all(torch.equal(weights[k], sft[k]) for k in sft)
    fresh = copy.deepcopy(cfg)
    fresh.reward_model.init = "fresh"
    trainer = stages.reward_trainer(fresh, toy_pairs(16), run_dir / "scratch-reward-fresh", run_dir)
    start = {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(trainer.model).items()
             if "lora_B" in k}
    assert all(not v.any() for v in start.values())  # a fresh LoRA adapter: B = 0


def test_pairwise_stats_per_kind_and_answer_dependence(reward_run, run_dir):
    cfg, _, _, _ = reward_run
    model = load_roles(cfg, run_dir, roles=("policy", "reward"))
    pairs = datasets.Dataset.from_list([{"prompt": f"q{i}", "chosen": "yes", "rejected": RAMBLE if i % 2 else "no",
                                         "kind": "format" if i % 2 else "label"} for i in range(6)])
    stats = stages.pairwise_stats(model, pairs, 128)
    assert stats["pairs"] == 6 and stats["label"]["pairs"] == stats["format"]["pairs"] == 3
    assert stats["format"]["accuracy"] == 1.0 and stats["format"]["margin"] > 0  # the toy reward rejects rambling
    assert stats["accuracy"] == pytest.approx((3 * stats["format"]["accuracy"] + 3 * stats["label"]["accuracy"]) / 6)
    prompts = datasets.Dataset.from_list([{"prompt": f"q{i}", "label": "yes" if i % 2 else "no"} for i in range(4)])
    dep = stages.answer_dependence(model, prompts)
    # the toy reward prefers "yes" whatever the prompt: the gap has the same sign for both labels
    assert dep["gap_yes"] > 0 and dep["gap_no"] > 0 and dep["reads_prompt"] is False
    assert 0.0 <= dep["label_accuracy"] <= 1.0

"""The rollout samples from the distribution PPO assumes (issue: 'RL that measurably improves the model', findings
3, 6, 8, 10): whatever the model's own generation_config says, with every stop token, several samples per prompt."""

import pytest
import torch
from test_trainer import make_trainer, recipe

from lowrank_rlhf.config import ConfigError
from lowrank_rlhf.rl.rollout import end_of_turn_id, response_mask, stop_token_ids

SETTINGS = ("ppo.response_length=40", "ppo.temperature=30", "ppo.rollout_batch_size=8", "ppo.num_ppo_epochs=1",
            "ppo.num_mini_batches=1")
# Each of these changes what generate() samples when left to the model's own generation_config.
SHIPPED = dict(repetition_penalty=5.0, no_repeat_ngram_size=1, suppress_tokens=list(range(40, 80)),
               bad_words_ids=[[90], [91]], min_length=80, min_new_tokens=45, top_k=3, top_p=0.1)


def test_rollout_ignores_the_generation_settings_the_model_ships(tmp_path):
    static = make_trainer(recipe(tmp_path / "static", "ppo.decode=static", *SETTINGS), micro_batches={"generate": 4})
    shipped = make_trainer(recipe(tmp_path / "generate", *SETTINGS), micro_batches={"generate": 4})
    for key, value in SHIPPED.items():
        setattr(shipped.model.causal_lm.generation_config, key, value)
    expected, got = static.rollout(), shipped.rollout()
    assert got.has_stop.any()  # min_length was not applied: some rows stop early
    assert torch.equal(got.input_ids, expected.input_ids)  # the static loop never reads generation_config
    assert shipped.model.causal_lm.generation_config.repetition_penalty == 5.0  # the model's config is restored
    metrics = shipped.train_step()
    assert metrics["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # one epoch, one minibatch: the policy is the old


def test_stop_tokens_are_every_eos_id_and_the_template_end_of_turn(tmp_path):
    trainer = make_trainer(recipe(tmp_path))
    tok, config = trainer.model.tokenizer, trainer.model.causal_lm.generation_config
    eos, unk = tok.eos_token_id, tok.unk_token_id
    # tiny-llama's template ends a turn with eos; a Llama-3-like template ends it with another special token
    assert end_of_turn_id(tok) == eos
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "<unk>")
    assert end_of_turn_id(tok) == unk
    config.eos_token_id = [eos, 7]
    assert stop_token_ids(tok, config, ["eos"]) == sorted({eos, unk, 7})
    assert stop_token_ids(tok, config, ["none"]) == []
    assert stop_token_ids(tok, config, ["<s>"]) == [tok.bos_token_id]
    with pytest.raises(ConfigError, match="ppo.stop_token: 'NOPE' is not a token"):
        stop_token_ids(tok, config, ["NOPE"])
    responses = torch.tensor([[5, 9, unk, 3], [5, 7, 9, 9], [5, 5, 5, 5]])
    mask, stopped = response_mask(responses, [eos, unk, 7])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]] and stopped.tolist() == [True, True, False]


def test_several_samples_per_prompt_differ_and_do_not_depend_on_micro_batches(tmp_path):
    overrides = (*SETTINGS, "ppo.num_generations=4")
    one = make_trainer(recipe(tmp_path / "a", *overrides), micro_batches={"generate": 1})
    eight = make_trainer(recipe(tmp_path / "b", *overrides), micro_batches={"generate": 8})
    a, b = one.rollout(), eight.rollout()
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.prompt_index.tolist() == [a.prompt_index[0].item()] * 4 + [a.prompt_index[4].item()] * 4
    assert a.sample_index.tolist() == [0, 1, 2, 3] * 2
    responses = a.responses[:4]
    assert len({tuple(r.tolist()) for r in responses}) == 4  # same prompt, four different samples
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size \(8\) must be divisible by ppo.num_generations"):
        make_trainer(recipe(tmp_path / "c", *SETTINGS, "ppo.num_generations=3"))


def test_shared_critic_head_trains_at_value_learning_rate_without_weight_decay(tmp_path):
    trainer = make_trainer(recipe(tmp_path, "ppo.learning_rate=1e-4", "ppo.value_learning_rate=3e-2"), "shared")
    head = list(trainer.model.heads["value"].parameters())
    groups = trainer.optimizer.param_groups
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert all(group_of[id(p)]["lr"] == 3e-2 for p in head)
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert not any(p is h for p in groups[0]["params"] for h in head)


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_forced_length_samples_stop_tokens_as_plain_tokens(tmp_path, decode):
    """The bench forces every response to full length. Blocking the stop tokens (min_new_tokens) would sample
    from a distribution other than the softmax the scoring assumes; they are drawn and kept as plain tokens."""
    free = make_trainer(recipe(tmp_path / "a", f"ppo.decode={decode}", *SETTINGS, "ppo.stop_token=[none]"))
    drawn = free.rollout()
    stop = int(drawn.responses[0, 3])  # a token the sampler drew: make it a stop token
    forced = make_trainer(recipe(tmp_path / "b", f"ppo.decode={decode}", *SETTINGS), force_response_length=True)
    forced.stop_ids = [stop]
    rollout = forced.rollout()
    assert torch.equal(rollout.input_ids, drawn.input_ids)
    assert rollout.response_mask.all() and not rollout.has_stop.any()


def test_the_reward_model_reads_any_stop_token_as_the_eos_it_was_trained_on():
    from types import SimpleNamespace

    from lowrank_rlhf.rewards import Scorer
    from lowrank_rlhf.rl.experience import Rollout

    eos, other, pad = 2, 7, 0
    ids = torch.tensor([[5, 9, other, pad], [5, 9, 9, 9], [5, eos, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    rollout = Rollout(input_ids=ids, attention_mask=mask, response_start=1, response_mask=mask[:, 1:],
                      prompt_index=torch.arange(3), has_stop=torch.tensor([True, False, True]))
    seen = {}

    def rewards(input_ids, attention_mask, runner=None):  # a "reward model" that records what it reads
        seen["ids"] = input_ids
        return torch.zeros(len(input_ids))

    model = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=eos, pad_token_id=pad), rewards=rewards)
    Scorer(model, 1.0, {}, [], {}).parts(rollout, None)
    assert seen["ids"].tolist() == [[5, 9, eos, pad], [5, 9, 9, 9], [5, eos, pad, pad]]
    assert rollout.input_ids[0, 2] == other  # the policy's own tokens are left as sampled

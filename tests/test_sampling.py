"""The keyed sampler (rl/sampling.py): an exact draw from softmax(logits / T), fixed by (row key, position, token)."""

import math

import torch

from lowrank_rlhf.rl.sampling import KeyedGumbelSampler, row_keys


def test_draws_follow_softmax_of_logits_over_temperature_and_never_pick_a_masked_token():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    temperature, n = 0.7, 40_000
    sampler = KeyedGumbelSampler(row_keys(3, 0, torch.arange(n)), temperature)
    chosen = sampler.choose(logits.expand(n, -1), position=17)
    counts = torch.bincount(chosen, minlength=5).double()
    probs = torch.softmax(logits.double() / temperature, dim=0)
    assert counts[4] == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert torch.all((counts[:4] - n * probs[:4]).abs() < 4 * sigma[:4]), (counts, n * probs)


def test_the_tail_of_a_large_vocabulary_keeps_its_mass():
    """Half the mass on token 0, the rest spread over 49k tokens: every token id gets its own noise."""
    vocab, n = 49_152, 1_000
    logits = torch.zeros(vocab)
    logits[0] = math.log(vocab - 1)  # p(token 0) = 1/2
    chosen = KeyedGumbelSampler(row_keys(5, 1, torch.arange(n)), 1.0).choose(logits.expand(n, -1), position=3)
    share = (chosen == 0).double().mean().item()
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)
    assert (chosen >= vocab // 2).double().mean().item() > 0.15  # the far half of the tail is reached (1/4 expected)


def test_a_row_draws_the_same_token_in_any_batch_and_any_order():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    keys = row_keys(0, 4, torch.arange(6))
    whole = KeyedGumbelSampler(keys, 0.9).choose(logits, position=40)
    part = KeyedGumbelSampler(keys[[4, 1]], 0.9).choose(logits[[4, 1]], position=40)
    assert torch.equal(part, whole[[4, 1]])


def test_the_key_and_the_position_change_the_draw():
    logits = torch.zeros(64, 1000)  # uniform: two independent draws agree with probability 1/1000
    keys = row_keys(0, 0, torch.arange(64))
    sampler = KeyedGumbelSampler(keys, 1.0)
    at_10, at_11 = sampler.choose(logits, 10), sampler.choose(logits, 11)
    other_step = KeyedGumbelSampler(row_keys(0, 1, torch.arange(64)), 1.0).choose(logits, 10)
    assert (at_10 == at_11).sum() <= 2 and (at_10 == other_step).sum() <= 2
    assert torch.equal(sampler.choose(logits, 10), at_10)


def test_as_a_logits_processor_greedy_argmax_picks_the_drawn_token():
    torch.manual_seed(1)
    scores = torch.randn(4, 50)
    sampler = KeyedGumbelSampler(row_keys(2, 0, torch.arange(4)), 0.8)
    processed = sampler(torch.zeros(4, 9, dtype=torch.long), scores)
    assert torch.equal(processed.argmax(dim=-1), sampler.choose(scores, 9))


def test_a_small_change_in_the_logits_rarely_changes_the_draw():
    """What an out-of-memory retry at another micro-batch size does to the logits (another summation order, and in
    later steps weights that differ in the last bits): the drawn token must almost always survive it. Inverting the
    CDF at one uniform per row changed 12 of these 256 draws (every boundary moves by the summed error before it)."""
    torch.manual_seed(2)
    rows, vocab = 256, 49_152
    logits = torch.randn(rows, vocab) * 2
    nudged = logits + 1e-4 * torch.randn_like(logits)
    sampler = KeyedGumbelSampler(row_keys(0, 0, torch.arange(rows)), 1.0)
    assert (sampler.choose(logits, 5) != sampler.choose(nudged, 5)).sum() <= 1

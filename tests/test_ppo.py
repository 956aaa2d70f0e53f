"""PPO math on hand-computed tensors. Expected numbers are written out in the
comments next to each case so a reader can check them without running code."""

import math

import pytest
import torch

from lowrank_rlhf.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_and_clip_scores,
    policy_loss,
    selective_log_softmax,
    token_rewards,
    value_loss,
)

T = torch.tensor


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


# --------------------------------------------------------------------------- masked stats
def test_masked_mean_all_and_per_dim():
    x = T([[1.0, 2.0], [3.0, 4.0]])
    mask = T([[1.0, 0.0], [1.0, 1.0]])
    # (1 + 3 + 4) / 3
    close(masked_mean(x, mask), 8 / 3)
    # row 0: 1/1, row 1: (3 + 4)/2
    close(masked_mean(x, mask, dim=1), [1.0, 3.5])
    # a bool mask means the same thing
    close(masked_mean(x, mask.bool()), 8 / 3)


def test_masked_mean_ignores_nonfinite_padding():
    x = T([[1.0, float("inf"), float("nan")]])
    mask = T([[1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), 1.0)


def test_masked_var_biased_and_unbiased():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1, 1, 1, 0]])
    # masked values 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_var(x, mask), 1.0)  # 2 / (3 - 1)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, T([[1, 0, 0, 0]]))


def test_masked_whiten_hand_values_and_padding_zeroed():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1, 1, 1, 0]])
    # mean 2, unbiased var 1 -> (x - 2) / 1 on real tokens; padding comes back as 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: (x - 2) / 1 + 2
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_masked_whiten_random_mean0_var1_on_masked_positions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 5 + 3
    mask = torch.ones(4, 7)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    x[mask == 0] = 1e6  # padding must not affect the statistics
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0, atol=1e-4)
    assert (w[mask == 0] == 0).all()


# --------------------------------------------------------------------------- KL + rewards
def test_kl_k1_and_k3_hand_values():
    lp = T([math.log(0.5), math.log(0.25), math.log(0.3)])
    ref = T([math.log(0.25), math.log(0.5), math.log(0.3)])
    # k1 = lp - ref: [log 2, -log 2, 0]
    close(kl_penalty(lp, ref, "k1"), [math.log(2), -math.log(2), 0.0])
    # k3 = exp(ref - lp) - 1 - (ref - lp):
    #   [0.5 - 1 + log 2 = 0.19315, 2 - 1 - log 2 = 0.30685, 0]
    close(kl_penalty(lp, ref, "k3"), [0.5 - 1 + math.log(2), 1 - math.log(2), 0.0])


def test_k3_nonnegative_random():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(64, generator=g) * 5
    ref = -torch.rand(64, generator=g) * 5
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert (kl_penalty(lp, ref, "k1") < 0).any()  # k1 is not sign-definite per token


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(T([0.0]), T([0.0]), "k2")


def test_token_rewards_score_on_last_real_token():
    scores = T([10.0, 20.0])
    kl = T([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    rewards, non_score = token_rewards(scores, kl, mask, kl_coef=0.1)
    # non-score = -0.1 * kl on real tokens, 0 on padding
    close(non_score, [[-0.1, -0.2, -0.3], [-0.1, -0.2, 0.0]])
    # score added at index 2 for row 0 and index 1 (last real) for row 1
    close(rewards, [[-0.1, -0.2, 9.7], [-0.1, 19.8, 0.0]])


def test_token_rewards_empty_row_raises():
    with pytest.raises(ValueError, match="no real response token"):
        token_rewards(T([1.0]), T([[0.0, 0.0]]), T([[0, 0]]), kl_coef=0.1)


# --------------------------------------------------------------------------- GAE
def test_gae_gamma1_lam1():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: returns are reward-to-go [6, 5, 3]; advantages = returns - V = [5, 4, 2]
    close(ret, [[6.0, 5.0, 3.0]])
    close(adv, [[5.0, 4.0, 2.0]])


def test_gae_gamma_half_lam_half():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # deltas: t2 = 3 + 0 - 1 = 2; t1 = 2 + 0.5*1 - 1 = 1.5; t0 = 1 + 0.5*1 - 1 = 0.5
    # A2 = 2; A1 = 1.5 + 0.25*2 = 2; A0 = 0.5 + 0.25*2 = 1
    close(adv, [[1.0, 2.0, 2.0]])
    close(ret, [[2.0, 3.0, 3.0]])  # A + V


def test_gae_right_padding_rows_of_different_length():
    rewards = T([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    values = T([[1.0, 1.0, 1.0], [1.0, 1.0, 99.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 1 ends at t=1, bootstraps from 0 (not from the padded 99):
    #   A1 = 2 + 0 - 1 = 1; A0 = (1 + 1 - 1) + 1 = 2; returns [3, 2]
    close(adv, [[5.0, 4.0, 2.0], [2.0, 1.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])
    # the padded row must equal the same row computed alone, unpadded
    adv_alone, _ = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma=1.0, lam=1.0)
    close(adv[1, :2], adv_alone[0])


def test_gae_outputs_zero_wherever_mask_is_zero():
    # a masked position mid-row (index 1) is an episode boundary and outputs 0
    rewards = T([[1.0, 5.0, 3.0]])
    values = T([[1.0, 5.0, 1.0]])
    mask = T([[1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t2: 3 - 1 = 2; t1 masked: 0; t0: 1 + 0 - 1 = 0 (next value is masked -> 0)
    close(adv, [[0.0, 0.0, 2.0]])
    close(ret, [[1.0, 0.0, 3.0]])


# --------------------------------------------------------------------------- losses
def test_policy_loss_clipped_positive_advantage():
    # lp - old = 1, so ratio is [e, e, e]; clipped to 1.2 with cliprange 0.2
    lp, old = torch.ones(1, 3), torch.zeros(1, 3)
    adv = torch.ones(1, 3)
    loss, stats = policy_loss(lp, old, adv, torch.ones(1, 3), cliprange=0.2)
    # max(-1*e, -1*1.2) = -1.2 per token
    close(loss, -1.2)
    close(stats["clipfrac"], 1.0)
    close(stats["ratio"], math.e)
    close(stats["approxkl"], 0.5)  # 0.5 * 1^2


def test_policy_loss_unclipped():
    # ratio is [1, 1, 1]: clipping changes nothing
    lp = old = T([[-1.0, -2.0, -3.0]])
    adv = T([[1.0, -2.0, 3.0]])
    loss, stats = policy_loss(lp, old, adv, torch.ones(1, 3), cliprange=0.2)
    close(loss, (-1.0 + 2.0 - 3.0) / 3)
    close(stats["clipfrac"], 0.0)
    close(stats["ratio"], 1.0)
    close(stats["approxkl"], 0.0)


def test_policy_loss_mixed_and_masked():
    # ratios [e, e, <garbage>]; A = [1, -1, 5]; third token is padding
    lp = T([[1.0, 1.0, 50.0]])
    old = T([[0.0, 0.0, -50.0]])
    adv = T([[1.0, -1.0, 5.0]])
    mask = T([[1, 1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, cliprange=0.2)
    # token 0: max(-e, -1.2) = -1.2 (clipped); token 1: max(e, 1.2) = e (not clipped, pessimistic)
    close(loss, (-1.2 + math.e) / 2)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], math.e)


def test_policy_loss_gradient_zero_when_clipped():
    lp = torch.ones(1, 2, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 2), T([[1.0, -1.0]]), torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    # token 0 clipped -> no gradient; token 1 unclipped: d/dlp (e^lp * 1) / 2 = e / 2
    close(lp.grad, [[0.0, math.e / 2]])


def test_value_loss_clipped():
    # v = 1.5, old = 1.0, R = 2.0, c = 0.2: clip(v) = 1.2
    # (v - R)^2 = 0.25, (1.2 - R)^2 = 0.64 -> 0.5 * 0.64 = 0.32
    loss, stats = value_loss(T([[1.5]]), T([[1.0]]), T([[2.0]]), torch.ones(1, 1), cliprange_value=0.2)
    close(loss, 0.32)
    close(stats["clipfrac"], 1.0)


def test_value_loss_unclipped():
    # inside the clip range: v = 1.1, old = 1.0 -> both terms (1.1 - 2)^2 = 0.81 -> 0.405
    # outside the range but moving away from R doesn't count as clipped:
    #   v = 1.5, old = 1.0, R = 1.0: (0.5)^2 = 0.25 vs (0.2)^2 = 0.04 -> 0.25
    values = T([[1.1, 1.5, 7.0]])
    old = T([[1.0, 1.0, 0.0]])
    returns = T([[2.0, 1.0, 0.0]])
    mask = T([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * (0.81 + 0.25) / 2)
    close(stats["clipfrac"], 0.0)


# --------------------------------------------------------------------------- logits
def test_entropy_hand_values():
    logits = T(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4
            [0.0, math.log(3.0), -math.inf, -math.inf],  # p = [0.25, 0.75]: 0.56233
            [5.0, -math.inf, -math.inf, -math.inf],  # one-hot: 0, and no nan from 0 * -inf
        ]
    )
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    close(entropy_from_logits(logits), expected)


def test_entropy_matches_categorical_bf16_and_chunked():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    out = entropy_from_logits(logits, chunk_size=3)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    close(out, expected)
    out_bf16 = entropy_from_logits(logits.bfloat16())
    assert out_bf16.dtype == torch.float32
    close(out_bf16, torch.distributions.Categorical(logits=logits.bfloat16().float()).entropy())


def test_selective_log_softmax_hand_value():
    # two equal logits: log 0.5; [log 3, 0] picks 0.75 and 0.25
    logits = T([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    close(selective_log_softmax(logits, T([0, 0, 1])), [math.log(0.5), math.log(0.75), math.log(0.25)])


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_selective_log_softmax_matches_full_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 17, generator=g) * 4
    index = torch.randint(0, 17, (3, 5), generator=g)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    close(out, expected)


def test_selective_log_softmax_bf16_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 6, 50, generator=g) * 4).bfloat16()
    index = torch.randint(0, 50, (4, 6), generator=g)
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    close(out, expected)


# --------------------------------------------------------------------------- KL controllers
def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 256)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_kl_controller_direction_and_values():
    up = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    up.update(12.0, n_steps=256)
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2 -> mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert up.value == pytest.approx(0.1 * 1.00512)
    down = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    down.update(3.0, n_steps=256)
    # error = clip(3/6 - 1) = clip(-0.5) = -0.2 -> mult = 0.99488
    assert down.value == pytest.approx(0.1 * 0.99488)
    small = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    small.update(6.6, n_steps=100)
    # unclipped error 0.1 -> mult = 1 + 0.1 * 100 / 10000 = 1.001
    assert small.value == pytest.approx(0.1 * 1.001)
    on_target = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    on_target.update(torch.tensor(6.0), n_steps=256)
    assert on_target.value == pytest.approx(0.1)


def test_adaptive_kl_controller_state_dict_round_trip():
    a = AdaptiveKLController(init_kl_coef=0.2, target=4.0, horizon=500)
    a.update(10.0, n_steps=64)
    b = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.target, b.horizon) == (a.value, 4.0, 500.0)
    a.update(1.0, 64)
    b.update(1.0, 64)
    assert b.value == a.value


# --------------------------------------------------------------------------- score normalisation
def test_running_moments_merge_equals_concatenation():
    rm = RunningMoments()
    batch_mean, batch_std = rm.update(T([1.0, 2.0, 3.0]))
    assert (batch_mean, batch_std) == pytest.approx((2.0, 1.0))
    batch_mean, batch_std = rm.update(T([4.0, 5.0]))
    assert (batch_mean, batch_std) == pytest.approx((4.5, math.sqrt(0.5)))
    # all of 1..5: mean 3, unbiased var (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    assert rm.count == 5
    assert rm.mean == pytest.approx(3.0)
    assert rm.var == pytest.approx(2.5)
    assert rm.std == pytest.approx(math.sqrt(2.5))


def test_running_moments_state_dict_round_trip():
    rm = RunningMoments()
    rm.update(T([1.0, 5.0, 9.0]))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    rm.update(T([2.0]))
    other.update(T([2.0]))
    assert (other.count, other.mean, other.var) == (rm.count, rm.mean, rm.var)
    assert other.count == 4 and other.mean == pytest.approx(17 / 4)


def test_normalize_and_clip_scores():
    s = T([-3.0, 0.5, 3.0])
    out = normalize_and_clip_scores(s, None, None)
    close(out, s)
    assert out is not s
    close(normalize_and_clip_scores(s, None, 1.0), [-1.0, 0.5, 1.0])
    # running stats include the batch first: mean 2, std 1 -> [-1, 0, 1]
    rm = RunningMoments()
    close(normalize_and_clip_scores(T([1.0, 2.0, 3.0]), rm, None), [-1.0, 0.0, 1.0])
    # next batch normalised by 1..5 stats: (5 - 3) / sqrt(2.5) = 1.2649, clipped to 1.0
    close(normalize_and_clip_scores(T([4.0, 5.0]), rm, 1.0), [(4 - 3) / math.sqrt(2.5), 1.0])
    with pytest.raises(ValueError):
        normalize_and_clip_scores(s, None, 0.0)


def test_normalize_scores_learns_its_moments_from_the_pooled_scores_of_every_rank():
    mine, pooled = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0, 10.0, 20.0])
    running = RunningMoments()
    out = normalize_and_clip_scores(mine, running, None, pooled)
    assert running.count == 4 and running.mean == pytest.approx(8.5)
    torch.testing.assert_close(out, (mine - 8.5) / (pooled.std() + torch.finfo(torch.float32).eps))

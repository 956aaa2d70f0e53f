"""Did RL help, or was it lucky? Paired statistics of RL vs SFT on one held-out set, over seeds.

Every seed's policy answers the same held-out prompts as the one SFT adapter it started from, so each prompt gives a
paired difference (RL score - SFT score). Two sources of luck are in a gain: which prompts the held-out set happens to
hold, and which seed the RL stage drew (prompt order, sampling keys). The interval of the mean gain resamples both.

    per seed   gain, a 95% paired bootstrap interval over prompts (scipy.stats.bootstrap), McNemar's exact test
               on the prompts the two answered differently (binomial over the discordant pairs)
    overall    mean gain over seeds, a 95% interval resampling seeds and prompts together, the sign test over seeds
"""

from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


def paired_interval(diff: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(diff) over prompts (one seed's RL - SFT differences)."""
    if np.all(diff == diff[0]):  # no spread: the bootstrap has nothing to resample (scipy warns and returns nan)
        return float(diff[0]), float(diff[0])
    res = stats.bootstrap((diff,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def seeds_and_prompts_interval(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean gain over seeds [S, N]: each draw resamples seeds and, independently, prompts.

    By hand because scipy.stats.bootstrap resamples one axis of a sample; here the seeds are one level of luck and
    the prompts another, and an interval over either alone would hide the other."""
    n_seeds, n_prompts = diffs.shape
    rng = np.random.default_rng(seed)
    per_prompt_means = np.empty(RESAMPLES)
    for k in range(RESAMPLES):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_prompts, n_prompts)
        per_prompt_means[k] = diffs[np.ix_(rows, cols)].mean()
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(per_prompt_means, tail)), float(np.quantile(per_prompt_means, 1 - tail))


def mcnemar_p(sft: np.ndarray, rl: np.ndarray) -> float:
    """Exact McNemar: of the prompts exactly one of the two got right, is RL's share different from 1/2?"""
    rl_only = int(np.sum(rl > sft))
    sft_only = int(np.sum(sft > rl))
    if rl_only + sft_only == 0:
        return 1.0
    return float(stats.binomtest(rl_only, rl_only + sft_only, 0.5).pvalue)


def sign_test_p(gains: np.ndarray) -> float:
    """Two-sided sign test over seeds: are gains above 0 more (or less) common than chance? Ties are dropped."""
    up, down = int(np.sum(gains > 0)), int(np.sum(gains < 0))
    if up + down == 0:
        return 1.0
    return float(stats.binomtest(up, up + down, 0.5).pvalue)


def compare_scores(sft: np.ndarray, rl: np.ndarray) -> dict:
    """sft [N] and rl [S, N] per-prompt scores (1 = right) -> per-seed and overall statistics of RL - SFT."""
    rl = np.atleast_2d(np.asarray(rl, dtype=float))
    sft = np.asarray(sft, dtype=float)
    if rl.shape[1] != sft.shape[0]:
        raise ValueError(f"every seed must answer the same {sft.shape[0]} prompts as SFT, got {rl.shape[1]}")
    diffs = rl - sft[None, :]
    seeds = []
    for s, row in enumerate(rl):
        low, high = paired_interval(diffs[s], seed=s)
        seeds.append({"score": float(row.mean()), "gain": float(diffs[s].mean()), "ci95": [low, high],
                      "mcnemar_p": mcnemar_p(sft, row), "rl_only_right": int(np.sum(row > sft)),
                      "sft_only_right": int(np.sum(sft > row))})
    gains = diffs.mean(axis=1)
    low, high = seeds_and_prompts_interval(diffs)
    return {"sft": float(sft.mean()), "seeds": seeds, "mean_gain": float(gains.mean()), "ci95": [low, high],
            "seeds_better": int(np.sum(gains > 0)), "seeds_worse": int(np.sum(gains < 0)),
            "sign_test_p": sign_test_p(gains), "prompts": int(sft.shape[0])}

"""Reward functions: loading specs, checked calls, the weighted sum and the built-in examples."""

import math
import textwrap

import numpy as np
import pytest
import torch

from lowrank_rlhf.rewards import (
    RewardFunctionError,
    brevity,
    call_reward_function,
    clickbait_accuracy,
    combine_scores,
    exact_yes_no,
    load_reward_function,
    load_reward_functions,
)

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["yes", "No.", "well, maybe"]


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        NOT_CALLABLE = 3

        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]

        def with_label(prompts, completions, label):
            return [float(c == y) for c, y in zip(completions, label)]
    """))
    return path


# ----------------------------------------------------------------------------------------------------------- loading
def test_load_builtin_by_module_spec():
    assert load_reward_function("lowrank_rlhf.rewards:exact_yes_no") is exact_yes_no
    assert load_reward_function(" lowrank_rlhf.rewards:brevity ") is brevity


def test_load_from_file(reward_file):
    fn = load_reward_function(f"{reward_file}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    assert load_reward_function(f"{reward_file}:length") is fn  # imported once


@pytest.mark.parametrize("spec", ["lowrank_rlhf.rewards", "lowrank_rlhf.rewards:", ":exact_yes_no", "a:b c"])
def test_bad_spec_shows_expected_form(spec):
    with pytest.raises(RewardFunctionError) as err:
        load_reward_function(spec)
    text = one_line(err)
    assert f"{spec.strip()!r} is not a reward function spec" in text
    assert "expected module:function or path/to/file.py:function" in text


def test_import_failure_names_module_and_error():
    with pytest.raises(RewardFunctionError) as err:
        load_reward_function("no_such_module_xyz:score")
    text = one_line(err)
    assert "cannot import module 'no_such_module_xyz'" in text and "ModuleNotFoundError" in text


def test_file_import_failure_and_missing_file(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import os\nraise RuntimeError('bad setup\\nsecond line')\n")
    with pytest.raises(RewardFunctionError) as err:
        load_reward_function(f"{broken}:score")
    text = one_line(err)
    assert f"cannot import {broken}" in text and "RuntimeError: bad setup" in text and "second line" not in text
    with pytest.raises(RewardFunctionError, match="file not found"):
        load_reward_function(f"{tmp_path / 'absent.py'}:score")


def test_missing_attribute_lists_functions(reward_file):
    with pytest.raises(RewardFunctionError) as err:
        load_reward_function(f"{reward_file}:lenght")
    text = one_line(err)
    assert "has no attribute 'lenght'" in text and "functions found: length, with_label" in text
    with pytest.raises(RewardFunctionError, match="module 'lowrank_rlhf.rewards' has no attribute 'nope'"):
        load_reward_function("lowrank_rlhf.rewards:nope")


def test_not_callable(reward_file):
    with pytest.raises(RewardFunctionError) as err:
        load_reward_function(f"{reward_file}:NOT_CALLABLE")
    assert "is not callable (it is a int)" in one_line(err)


def test_load_reward_functions_weights():
    loaded = load_reward_functions(["lowrank_rlhf.rewards:exact_yes_no", "lowrank_rlhf.rewards:brevity"])
    assert [w for _, w in loaded.values()] == [1.0, 1.0]
    loaded = load_reward_functions(["lowrank_rlhf.rewards:brevity"], [0.5])
    assert loaded["lowrank_rlhf.rewards:brevity"] == (brevity, 0.5)
    with pytest.raises(RewardFunctionError) as err:
        load_reward_functions(["lowrank_rlhf.rewards:brevity"], [1.0, 2.0])
    assert one_line(err).startswith("rewards.function_weights: 2 weights for 1 functions")


# ----------------------------------------------------------------------------------------------------------- calling
def test_call_returns_float32_tensor():
    scores = call_reward_function(exact_yes_no, PROMPTS, COMPLETIONS, "exact")
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 1.0, 0.0]
    as_numpy = call_reward_function(lambda prompts, completions: np.array([1, 2, 3]), PROMPTS, COMPLETIONS, "np")
    assert as_numpy.tolist() == [1.0, 2.0, 3.0]
    as_tensor = call_reward_function(lambda prompts, completions: torch.ones(3, dtype=torch.bfloat16), PROMPTS,
                                     COMPLETIONS, "t")
    assert as_tensor.dtype == torch.float32


def test_columns_reach_functions_that_accept_them(reward_file):
    fn = load_reward_function(f"{reward_file}:with_label")
    scores = call_reward_function(fn, PROMPTS, ["a", "b", "c"], "with_label", label=["a", "x", "c"], other=[1, 2, 3])
    assert scores.tolist() == [1.0, 0.0, 1.0]
    # a function without **kwargs and without the column's parameter just does not get it
    assert call_reward_function(lambda prompts, completions: [0] * 3, PROMPTS, COMPLETIONS, "x",
                                label=["a"] * 3).tolist() == [0.0] * 3


def test_wrong_length_names_expected_and_got():
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(lambda prompts, completions: [1.0, 2.0], PROMPTS, COMPLETIONS, "short")
    assert one_line(err) == "reward function short returned 2 scores for 3 completions; expected 3"


@pytest.mark.parametrize("bad,shown", [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
def test_non_finite_names_the_index(bad, shown):
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(lambda prompts, completions: [0.0, 1.0, bad], PROMPTS, COMPLETIONS, "nanny")
    assert one_line(err) == f"reward function nanny returned a non-finite score ({shown}) at index 2"
    with pytest.raises(RewardFunctionError, match="at index 1"):
        call_reward_function(lambda prompts, completions: torch.tensor([0.0, math.nan, 1.0]), PROMPTS, COMPLETIONS,
                             "t")


@pytest.mark.parametrize("result,expected", [
    ([1.0, "high", 0.0], "non-numeric score at index 1: 'high' (str)"),
    ([1.0, None, 0.0], "non-numeric score at index 1: None (NoneType)"),
    (0.5, "returned float; expected a list of 3 floats"),
    ("yes", "returned str; expected a list of 3 floats"),
    (torch.zeros(3, 2), "returned a tensor of shape (3, 2)"),
])
def test_non_numeric(result, expected):
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(lambda prompts, completions: result, PROMPTS, COMPLETIONS, "odd")
    assert expected in one_line(err)


def test_function_exception_is_one_line():
    def boom(prompts, completions):
        raise KeyError("label")

    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(boom, PROMPTS, COMPLETIONS, "boom")
    assert one_line(err) == "reward function boom raised KeyError: 'label'"


# ----------------------------------------------------------------------------------------------------------- combine
def test_combine_scores_weighted_sum():
    parts = {"learned": torch.tensor([1.0, -2.0, 0.5]), "exact": torch.tensor([1.0, 0.0, 1.0])}
    total = combine_scores(parts, {"learned": 0.5, "exact": 2.0})
    # 0.5 * [1, -2, 0.5] + 2 * [1, 0, 1] = [2.5, -1.0, 2.25]
    torch.testing.assert_close(total, torch.tensor([2.5, -1.0, 2.25]))
    assert total.dtype == torch.float32


def test_combine_scores_checks():
    with pytest.raises(RewardFunctionError, match="parts: a; weights: b"):
        combine_scores({"a": torch.ones(2)}, {"b": 1.0})
    with pytest.raises(RewardFunctionError, match=r"part 'b' has shape \(3,\), expected \(2,\)"):
        combine_scores({"a": torch.ones(2), "b": torch.ones(3)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(RewardFunctionError, match="no reward sources"):
        combine_scores({}, {})


# ---------------------------------------------------------------------------------------------------------- built-ins
def test_exact_yes_no():
    assert exact_yes_no([], ["yes", " No.", "Yes!</s>", "yes, it is", "maybe", ""]) == [1, 1, 1, 0, 0, 0]


def test_brevity():
    # 1 / words; empty -> 0
    assert brevity([], ["yes", "no thanks", "one two three four", "", "  "]) == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_clickbait_accuracy():
    completions = ["yes", "No.", "yes", "It depends"]
    assert clickbait_accuracy([], completions, label=["yes", "no", "no", "no"]) == [1.0, 1.0, 0.0, 0.0]
    scores = call_reward_function(load_reward_function("lowrank_rlhf.rewards:clickbait_accuracy"), ["p"] * 4,
                                  completions, "acc", label=["yes", "yes", "yes", "yes"])
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(RewardFunctionError) as err:
        call_reward_function(clickbait_accuracy, ["p"], ["yes"], "acc")
    assert "needs a 'label' column in data.prompts" in one_line(err)

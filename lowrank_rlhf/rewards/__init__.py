"""Python reward functions for online RL, and the scorer that sums them with the learned reward.

A reward function follows TRL's convention:

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]

`kwargs` carries the prompt dataset's other columns for the batch (e.g. `label`, one value per completion). A
function that does not take **kwargs gets only the columns it names as parameters. Built in (recipes name them as
`lowrank_rlhf.rewards:NAME`): exact_yes_no, brevity, clickbait_accuracy, sql_execution, sql_runs, and the
partial-credit terms sql_columns, sql_row_count, sql_tables.

    errors.py    RewardFunctionError, the one-line error
    loading.py   specs -> functions (with a time limit), calling them with checks, the weighted sum
    builtin.py   the clickbait and format examples
    sql.py       the sandboxed text-to-SQL execution reward
    scorer.py    Scorer: the learned reward adapter + the functions, per rollout response
    timeout.py   a time limit for one call (SIGALRM in the main thread, a worker thread elsewhere)
"""

from .builtin import brevity, clickbait_accuracy, exact_yes_no
from .errors import RewardFunctionError
from .loading import (
                      SPEC_FORM,
                      bounded,
                      call_reward_function,
                      combine_scores,
                      load_reward_function,
                      load_reward_functions,
)
from .scorer import Scorer, short_name
from .sql import sql_columns, sql_execution, sql_row_count, sql_runs, sql_tables

__all__ = [
    "SPEC_FORM", "RewardFunctionError", "Scorer", "bounded", "brevity", "call_reward_function", "clickbait_accuracy",
    "combine_scores", "exact_yes_no", "load_reward_function", "load_reward_functions", "short_name",
    "sql_columns", "sql_execution", "sql_row_count", "sql_runs", "sql_tables",
]

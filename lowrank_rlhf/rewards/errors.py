"""The reward functions' one error: a problem reported in one line that names the function and what was expected."""


class RewardFunctionError(ValueError):
    """A reward-function problem, reported in one line that names the function and what was expected."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__

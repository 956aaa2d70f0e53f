"""The one exception type of the data package, shared by table loading and the chat encoding."""


class DataError(ValueError):
    """A data problem, reported in one line that starts with the recipe key (data.sft, data.prompts, ...)."""

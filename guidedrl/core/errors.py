"""User-facing errors. The CLI prints these without a traceback and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, model path, reward function)."""

    exit_code = 2


class ConfigError(UserError):
    """A bad recipe, override or config value; the message names the dotted key."""


class DataError(UserError):
    """A bad data file or row; the message names file:line."""


class ModelError(UserError):
    """A model or tokenizer that cannot be loaded from what the user gave."""


class RewardError(UserError):
    """A reward function raised; the message names the sample id and holds its traceback."""

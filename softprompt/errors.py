"""Errors a user can fix. The CLI prints each as one line and exits with code 2."""


class SoftPromptError(Exception):
    """A problem with the user's input or environment, described well enough to fix."""

    exit_code = 2


class ConfigError(SoftPromptError):
    """An option or config file value is wrong."""


class DataError(SoftPromptError):
    """The dataset cannot be used as given."""


class ModelError(SoftPromptError):
    """The model cannot be found or loaded, or does not fit the soft prompt."""


class FormatError(SoftPromptError):
    """A soft prompt file is unreadable, unsafe or not what it claims to be."""


class RunError(SoftPromptError):
    """The output folder or a checkpoint does not allow this run."""

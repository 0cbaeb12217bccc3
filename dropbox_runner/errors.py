"""Domain exceptions raised by the core and turned into one-sentence CLI errors.

Core code raises these; only `cli.py` converts them to click errors and exit codes.
"""


class RunnerError(Exception):
    """A failure a user can act on; its message is one clear sentence."""


class ConfigError(RunnerError):
    """models.yaml is missing or invalid."""


class LockHeld(RunnerError):
    """Another daemon holds the root."""


class JobNotFound(RunnerError):
    """No job matches the given name or id."""

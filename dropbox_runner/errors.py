"""Domain exceptions raised by the core and turned into one-sentence CLI errors.

Core code raises these; only the `cli` package (`cli.base.root_option`) turns them into one sentence
and an exit code.
"""

import errno
import os

# Failures of the machine, not of a drop or a job: the daemon pauses and tries again later.
ENVIRONMENTAL_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}
)


def is_environmental(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENTAL_ERRNOS


class RunnerError(Exception):
    """A failure a user can act on; its message is one clear sentence."""


class ConfigError(RunnerError):
    """models.yaml is missing or invalid."""


class LockHeld(RunnerError):
    """Another daemon holds the root."""


class JobNotFound(RunnerError):
    """No job matches the given name or id."""


def fault_point(step: str, name: str = "") -> None:
    """Test hook: DROPBOX_RUNNER_FAULT_AT=<step>[:<job name>] raises here, as an unexpected bug would."""
    wanted = os.environ.get("DROPBOX_RUNNER_FAULT_AT")
    if wanted and wanted in (step, f"{step}:{name}"):
        raise RuntimeError(f"injected fault at {step}")

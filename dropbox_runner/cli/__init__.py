"""The `dropbox-runner` command line: `main`, the group of commands.py that `python -m dropbox_runner`
and the `dropbox-runner` script run, and its commands by concern in root (init, models), service
(run, serve, service), status, and jobs (submit, cancel, retry, validate).
"""

from dropbox_runner.cli.commands import main

__all__ = ["main"]

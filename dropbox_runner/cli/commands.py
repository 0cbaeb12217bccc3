"""The `dropbox-runner` command line (section 5 of the contract, shared/CONTRACT.md): the group that
holds the commands of each concern (root, service, status, jobs).
"""

from __future__ import annotations

import click

from dropbox_runner.cli.jobs import cancel, retry, submit, validate
from dropbox_runner.cli.root import init, models
from dropbox_runner.cli.service import run, serve, service
from dropbox_runner.cli.status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dropbox-runner")
def main() -> None:
    """A crash-safe batch runner around vLLM, driven by folders.

    Drop OpenAI Batch JSONL files into inbox/<model>/; results appear in outbox/<name>/.
    """


for command in (init, models, run, serve, service, status, submit, cancel, retry, validate):
    main.add_command(command)

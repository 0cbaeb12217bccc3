"""What every command shares: the --root and --debug options (errors become one sentence and an exit
code here, the only place that does it), the HTTP address options, and models.yaml loaded lazily.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dropbox_runner.errors import RunnerError
from dropbox_runner.layout import Layout, resolve_root

EXIT_FAILURE = 1
EXIT_USAGE = 2  # also: `submit --wait --timeout` ran out


def load_registry(root: Path):
    """models.yaml (imported here, not at the top: `status` must start fast without pydantic)."""
    from dropbox_runner.config import load_registry as load

    return load(root)


def address_options(f: Callable) -> Callable:
    f = click.option("--port", type=int, default=4080, show_default=True, help="Port of the HTTP API.")(f)
    return click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        help="Address of the HTTP API (not loopback: an API key is required).",
    )(f)


def serve_options(f: Callable) -> Callable:
    f = address_options(f)
    return click.option("--serve", is_flag=True, help="Also serve the HTTP API and status page.")(f)


def root_option(f: Callable) -> Callable:
    @click.option(
        "--root",
        "root",
        type=click.Path(file_okay=False),
        default=None,
        help="The root folder (default: $DROPBOX_RUNNER_ROOT, else the current directory).",
    )
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @functools.wraps(f)
    def wrapper(root: str | None, debug: bool, **kwargs: Any) -> Any:
        layout = Layout(resolve_root(root))
        try:
            return f(layout, **kwargs)
        except RunnerError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_FAILURE)
        except OSError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc.strerror or exc} ({exc.filename or ''}).", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper

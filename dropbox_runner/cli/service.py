"""The commands that run a root: `run` (the daemon, with the HTTP API beside it if asked), `serve`
(the HTTP API alone) and `service` (the systemd unit that runs the daemon).
"""

from __future__ import annotations

import sys

import click

from dropbox_runner.cli.base import address_options, load_registry, root_option, serve_options
from dropbox_runner.errors import RunnerError
from dropbox_runner.layout import Layout


@click.command()
@root_option
@click.option("--once", is_flag=True, help="Process what the inbox and queue hold, then exit 0.")
@click.option("--poll", is_flag=True, help="Poll the inbox instead of using inotify.")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=None, help="Seconds between polls.")
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds a file must stay unchanged before it is taken (settle_seconds).",
)
@serve_options
def run(
    layout: Layout,
    once: bool,
    poll: bool,
    poll_interval: float | None,
    settle: float | None,
    serve: bool,
    host: str,
    port: int,
) -> None:
    """Run the daemon: take drops, run them model by model, publish results."""
    from dropbox_runner.daemon.loop import Daemon
    from dropbox_runner.daemon.snapshot import setup_logging

    registry = load_registry(layout.root)
    if poll:
        registry.settings.poll = True
    if poll_interval is not None:
        registry.settings.poll_interval = poll_interval
    if settle is not None:
        registry.settings.settle_seconds = settle
    layout.state.mkdir(parents=True, exist_ok=True)
    setup_logging(layout)
    if serve:
        start_server(layout, registry, host, port, background=True)
    sys.exit(Daemon(layout, registry, once=once).run())


def start_server(layout: Layout, registry, host: str, port: int, *, background: bool) -> None:
    """The HTTP API and status page; refuses a non-loopback address without an API key."""
    import threading

    import uvicorn

    from dropbox_runner.api.server import create_app, is_loopback, resolve_api_key

    key = resolve_api_key(registry)
    if not is_loopback(host) and not key:
        raise RunnerError(
            f"serving on {host} needs an API key: set settings.api_key in models.yaml or "
            "$DROPBOX_RUNNER_API_KEY."
        )
    config = uvicorn.Config(
        create_app(layout, registry, api_key=key), host=host, port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    if background:
        server.install_signal_handlers = lambda: None  # the daemon owns SIGINT/SIGTERM
        threading.Thread(target=server.run, name="http", daemon=True).start()
    else:
        server.run()


@click.command()
@root_option
@address_options
def serve(layout: Layout, host: str, port: int) -> None:
    """Serve the OpenAI-compatible Batch API and the status page over this root (no models run here)."""
    start_server(layout, load_registry(layout.root), host, port, background=False)


@click.command()
@root_option
@click.option("--user", default=None, help="Run the daemon as this user (User= in the unit).")
def service(layout: Layout, user: str | None) -> None:
    """Print a systemd unit (Type=notify, with a watchdog) that runs the daemon for this root."""
    from dropbox_runner.daemon.systemd import unit_text, watchdog_seconds

    if not layout.models_yaml.exists():
        raise RunnerError(f"{layout.models_yaml} does not exist; run `dropbox-runner init` first.")
    registry = load_registry(layout.root)
    inboxes = [layout.inbox, *(layout.model_inbox(m) for m in registry.models)]
    watchdog = watchdog_seconds(inboxes, layout.state, registry.settings.max_file_bytes)
    click.echo(unit_text(layout.root, watchdog=watchdog, user=user), nl=False)

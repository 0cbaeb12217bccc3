"""`dropbox-runner status`: every job, or one in detail, as text or JSON, once or redrawn each second.

It imports no pydantic: it reads plain JSON (status.view) and answers in a fraction of a second.
"""

from __future__ import annotations

import sys
import time

import click
import orjson

from dropbox_runner.cli.base import root_option
from dropbox_runner.errors import JobNotFound
from dropbox_runner.layout import Layout
from dropbox_runner.queue import catalog
from dropbox_runner.status import view
from dropbox_runner.status.render import render_detail, render_table


@click.command()
@root_option
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable document.")
@click.option("--watch", is_flag=True, help="Redraw every second until interrupted.")
@click.option("--all", "show_all", is_flag=True, help="Show every finished job, not only the recent ones.")
def status(layout: Layout, ref: str | None, as_json: bool, watch: bool, show_all: bool) -> None:
    """Every job with its models, progress, tokens/s and ETA; with NAME|ID, one job in detail."""

    def render() -> str:
        if ref:
            job_id = catalog.find_job(layout, ref)
            job = view.job_view(layout, job_id, time.time()) if job_id else None
            if job is None:
                raise JobNotFound(f"no job is named {ref!r}; `dropbox-runner status` lists them.")
            return orjson.dumps(job, option=orjson.OPT_INDENT_2).decode() if as_json else render_detail(job)
        doc = view.collect(layout, show_all=show_all, with_history=as_json)
        return (
            orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
            if as_json
            else render_table(doc, bars=watch)
        )

    if not watch:
        click.echo(render())
        return
    tty = sys.stdout.isatty()
    try:
        while True:
            text = render()
            if tty:
                click.echo("\x1b[H\x1b[2J" + text, nl=True)
            else:
                click.echo(text + "\n")
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass

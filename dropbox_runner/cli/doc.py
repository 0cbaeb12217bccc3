"""Renders docs/cli.md, the reference of every command, from the commands' own --help.

`make docs` writes it; a test checks that it is current.
"""

from __future__ import annotations

import click

from dropbox_runner.cli.commands import main


def render() -> str:
    parts = [
        "# dropbox-runner command reference",
        "",
        "Generated from `--help` by `make docs`; do not edit by hand.",
        "",
    ]
    ctx = click.Context(main, info_name="dropbox-runner", terminal_width=100, **main.context_settings)
    parts += ["## dropbox-runner", "", "```", main.get_help(ctx), "```", ""]
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=100)
        parts += [f"## dropbox-runner {name}", "", "```", cmd.get_help(sub), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")

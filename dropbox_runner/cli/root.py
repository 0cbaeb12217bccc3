"""The commands that set up a root: `init` (folders and a starter models.yaml) and `models` (the
entries of models.yaml, checked without loading them).
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

import click

from dropbox_runner.cli.base import EXIT_FAILURE, load_registry, root_option
from dropbox_runner.layout import Layout


def starter_yaml() -> str:
    return importlib.resources.files("dropbox_runner").joinpath("models.default.yaml").read_text("utf-8")


@click.command()
@root_option
def init(layout: Layout) -> None:
    """Make the folder layout and a starter models.yaml (never overwrites)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    if layout.models_yaml.exists():
        click.echo(f"{layout.models_yaml} exists; left as it is.")
    else:
        layout.models_yaml.write_text(starter_yaml(), encoding="utf-8")
        click.echo(f"wrote {layout.models_yaml}")
    registry = load_registry(layout.root)
    layout.make(list(registry.models))
    click.echo(f"ready: drop files into {layout.inbox}/<model>/ ({', '.join(registry.models)})")


@click.command()
@root_option
@click.option("--check", is_flag=True, help="Verify each entry without loading it.")
def models(layout: Layout, check: bool) -> None:
    """List the models of models.yaml."""
    from dropbox_runner.config import resolve_model_path
    from dropbox_runner.slot.loadable import model_problem
    from dropbox_runner.slot.memory import weight_bytes

    registry = load_registry(layout.root)
    failed = 0
    for name, m in registry.models.items():
        line = f"{name:<20} engine={m.engine.value:<5} task={m.task.value:<8} path={m.path or '-'}"
        if m.base is not None:
            line = f"{name:<20} LoRA adapter of {m.base}: {m.adapter}"
        if check:
            problem = model_problem(layout.root, name, m, registry)
            if problem:
                failed += 1
                line += f"  FAIL: {problem}"
            elif m.base is not None:
                line += "  ok"
            else:
                resolved = resolve_model_path(layout.root, m)
                folder = Path(resolved) if resolved else None
                size = weight_bytes(folder, m.engine_args.get("dtype")) if folder and folder.is_dir() else 0
                line += f"  ok{f' ({size / 2**20:.1f} MiB of weights)' if size else ''}"
        click.echo(line)
    if failed:
        sys.exit(EXIT_FAILURE)

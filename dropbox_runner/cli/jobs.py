"""The commands about jobs: `submit` (safely into the inbox, and follow them with --wait), `cancel`,
`retry`, and `validate` (a file checked offline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dropbox_runner.cli.base import EXIT_FAILURE, EXIT_USAGE, load_registry, root_option
from dropbox_runner.errors import RunnerError
from dropbox_runner.intake.submit import submit_file
from dropbox_runner.layout import Layout


def parse_metadata(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    from dropbox_runner.intake.manifest import metadata_problem

    bad = next((p for p in pairs if "=" not in p or p.startswith("=")), None)
    if bad is not None:
        raise click.BadParameter(f"{bad!r} is not key=value")
    metadata = dict(p.split("=", 1) for p in pairs)
    problem = metadata_problem(metadata)
    if problem:
        raise click.BadParameter(problem)
    return metadata


def parse_window(ctx: click.Context, param: click.Parameter, window: str | None) -> str | None:
    from dropbox_runner.intake.manifest import window_seconds

    if window is not None and window_seconds(window) is None:
        raise click.BadParameter(f'{window!r} is not a duration; give "24h", "30m", "90s" or seconds')
    return window


@click.command()
@root_option
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--model", "model", default=None, help="Run every line with this model.")
@click.option("--models", "models", default=None, help="Run every line with each of these models (a,b).")
@click.option(
    "--priority", type=click.IntRange(-100_000, 100_000), default=None, help="Higher runs first (default 0)."
)
@click.option(
    "--metadata", multiple=True, callback=parse_metadata, help="key=value for batch.json (repeatable)."
)
@click.option(
    "--completion-window", callback=parse_window, help='Expire unfinished lines after this ("24h", "30m").'
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Default max_tokens of a line.")
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit 0 if every model completed.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="With --wait: give up after S s.")
def submit(
    layout: Layout,
    files: tuple[Path, ...],
    model: str | None,
    models: str | None,
    priority: int | None,
    metadata: dict[str, str],
    completion_window: str | None,
    max_tokens: int | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Put files into the inbox safely: manifest first, then the file under a hidden name, then a rename.

    With --wait, follow each file's batch.json (by the submit_id written into its metadata, so it
    works on a shared root whose daemon runs elsewhere); exit 0 when every model completed, 1 when
    a job failed, expired or was cancelled, 2 when --timeout runs out.
    """
    from dropbox_runner.intake.submit import Followed, new_submit_id

    if bool(model) == bool(models):
        raise click.UsageError("give exactly one of --model M or --models A,B.")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait.")
    registry = load_registry(layout.root)
    names = [model] if model else [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in registry.models]
    if unknown:
        raise RunnerError(f"unknown model {unknown[0]!r}; known models: {', '.join(registry.models)}.")
    layout.make(list(registry.models))
    followed = []
    for src in files:
        stem = src.name[: -len(".jsonl")] if src.name.endswith(".jsonl") else src.stem
        submit_id = new_submit_id()
        target = submit_file(
            layout,
            src,
            names,
            one_model_folder=bool(model),
            stem=stem,
            priority=priority,
            metadata={**metadata, "submit_id": submit_id},
            completion_window=completion_window,
            defaults={"max_tokens": max_tokens} if max_tokens else None,
        )
        stem = target.name[: -len(".jsonl")]
        followed.append(Followed(stem, submit_id))
        click.echo(
            f"submitted {src} as {target.relative_to(layout.root)} for {', '.join(names)} "
            f"(submit_id {submit_id}); results: outbox/{stem}/ (or outbox/{stem}.N/ if that name is taken)"
        )
    if wait:
        sys.exit(wait_for_jobs(layout, followed, timeout))


def wait_for_jobs(layout: Layout, followed: list, timeout: float | None) -> int:
    from dropbox_runner.intake.submit import follow

    ended = follow(layout, followed, timeout, click.echo, sys.stdout.isatty())
    for job in followed:
        for line in job.summary():
            click.echo(line)
    if not ended:
        click.echo(f"timed out after {timeout:g}s; the jobs go on (`dropbox-runner status`)", err=True)
    for job in followed:
        click.echo(f"outbox/{job.folder}/" if job.folder else f"{job.name}: not taken yet")
    if not ended:
        return EXIT_USAGE
    return 0 if all(job.succeeded() for job in followed) else EXIT_FAILURE


def _job_operation(layout: Layout, ref: str, op: str) -> None:
    from dropbox_runner.jobs.operations import operate
    from dropbox_runner.queue.journal import Journal

    journal = Journal(layout)
    spec = journal.find(ref)
    done, models = operate(journal, spec, op)
    if not done:
        click.echo(f"{op} of {spec.name} ({spec.id}) requested; the running daemon carries it out.")
    elif op == "cancel":
        click.echo(f"cancelled {spec.name} ({spec.id}): {', '.join(models) or 'nothing was left to run'}.")
    else:
        what = f"failed lines of {', '.join(models)} queued" if models else "no line had failed"
        click.echo(f"retry of {spec.name} ({spec.id}): {what}.")


@click.command()
@root_option
@click.argument("ref")
def cancel(layout: Layout, ref: str) -> None:
    """Cancel a job: what is done is published, the rest fails as batch_cancelled."""
    _job_operation(layout, ref, "cancel")


@click.command()
@root_option
@click.argument("ref")
def retry(layout: Layout, ref: str) -> None:
    """Re-run only the failed lines of a finished job, then republish."""
    _job_operation(layout, ref, "retry")


@click.command()
@root_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(layout: Layout, file: Path) -> None:
    """Check a JSONL file offline: one line per problem; exit 1 if any."""
    from dropbox_runner.lines.parse import summarize

    summary = summarize(file, keep_errors=None, whole=True)
    for e in summary.errors:
        click.echo(f"line {e.line}: {e.message}")
    problems = len(summary.errors)
    if summary.total == 0:
        click.echo("the file has no request line")
        problems += 1
    click.echo(f"{summary.total} lines, {summary.valid} valid, {problems} problems")
    if problems:
        sys.exit(EXIT_FAILURE)

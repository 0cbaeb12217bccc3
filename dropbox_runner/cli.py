"""The `dropbox-runner` command line (section 5 of the contract, shared/CONTRACT.md).

Core code raises RunnerError; only this module turns errors into one sentence and an exit code.
"""

from __future__ import annotations

import functools
import importlib.resources
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson

from dropbox_runner.errors import JobNotFound, RunnerError
from dropbox_runner.intake.submit import submit_file
from dropbox_runner.layout import Layout, resolve_root
from dropbox_runner.queue import catalog

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dropbox-runner")
def main() -> None:
    """A crash-safe batch runner around vLLM, driven by folders.

    Drop OpenAI Batch JSONL files into inbox/<model>/; results appear in outbox/<name>/.
    """


def starter_yaml() -> str:
    return importlib.resources.files("dropbox_runner").joinpath("models.default.yaml").read_text("utf-8")


@main.command()
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


@main.command()
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
    from dropbox_runner.daemon import Daemon, setup_logging

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


@main.command()
@root_option
@address_options
def serve(layout: Layout, host: str, port: int) -> None:
    """Serve the OpenAI-compatible Batch API and the status page over this root (no models run here)."""
    start_server(layout, load_registry(layout.root), host, port, background=False)


@main.command()
@root_option
@click.option("--user", default=None, help="Run the daemon as this user (User= in the unit).")
def service(layout: Layout, user: str | None) -> None:
    """Print a systemd unit (Type=notify, with a watchdog) that runs the daemon for this root."""
    from dropbox_runner.systemd import unit_text, watchdog_seconds

    if not layout.models_yaml.exists():
        raise RunnerError(f"{layout.models_yaml} does not exist; run `dropbox-runner init` first.")
    registry = load_registry(layout.root)
    inboxes = [layout.inbox, *(layout.model_inbox(m) for m in registry.models)]
    watchdog = watchdog_seconds(inboxes, layout.state, registry.settings.max_file_bytes)
    click.echo(unit_text(layout.root, watchdog=watchdog, user=user), nl=False)


@main.command()
@root_option
@click.argument("ref", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable document.")
@click.option("--watch", is_flag=True, help="Redraw every second until interrupted.")
@click.option("--all", "show_all", is_flag=True, help="Show every finished job, not only the recent ones.")
def status(layout: Layout, ref: str | None, as_json: bool, watch: bool, show_all: bool) -> None:
    """Every job with its models, progress, tokens/s and ETA; with NAME|ID, one job in detail."""
    from dropbox_runner.status import view as st

    def render() -> str:
        if ref:
            job_id = catalog.find_job(layout, ref)
            job = st.job_view(layout, job_id, time.time()) if job_id else None
            if job is None:
                raise JobNotFound(f"no job is named {ref!r}; `dropbox-runner status` lists them.")
            return (
                orjson.dumps(job, option=orjson.OPT_INDENT_2).decode() if as_json else st.render_detail(job)
            )
        doc = st.collect(layout, show_all=show_all, with_history=as_json)
        return (
            orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
            if as_json
            else st.render_table(doc, bars=watch)
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


@main.command()
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


@main.command()
@root_option
@click.argument("ref")
def cancel(layout: Layout, ref: str) -> None:
    """Cancel a job: what is done is published, the rest fails as batch_cancelled."""
    _job_operation(layout, ref, "cancel")


@main.command()
@root_option
@click.argument("ref")
def retry(layout: Layout, ref: str) -> None:
    """Re-run only the failed lines of a finished job, then republish."""
    _job_operation(layout, ref, "retry")


@main.command()
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


@main.command()
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

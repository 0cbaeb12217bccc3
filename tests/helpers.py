"""Plain functions the tests share: lines and files, bounded waits, models.yaml, daemons.

Fixtures live in conftest.py; everything here is imported (`from helpers import ...`).
A daemon runs in-process (`run_once`, through click's CliRunner) where nothing is killed, and as a
real subprocess (`Daemon`, `run_once(..., subprocess=True)`) where a test kills it, sends it a
signal, or needs its own environment.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import queue
import signal
import subprocess as sp
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from dropbox_runner import protocol as p

ECHO_YAML = """
settings:
  settle_seconds: 0.2
  rescan_seconds: 5
  commit_interval_ms: 50
  manifest_grace_seconds: 1
models:
  echo: {engine: echo}
  echo2: {engine: echo}
  slow: {engine: echo, engine_args: {delay_ms: 2, max_in_flight: 64}}
  paced: {engine: echo, engine_args: {delay_ms: 10, max_in_flight: 16}}
  crashy: {engine: echo, engine_args: {crash_on: POISON, max_in_flight: 8}}
"""
ECHO_MODELS = ("echo", "echo2", "slow", "crashy", "paced", "gated")

# A job of the `gated` model whose last line says GATE cannot end until the test calls open_gate:
# it runs at `paced`'s pace, and its gated line is answered only once the gate file exists. A test
# that needs a job still running holds it so, instead of counting on the CPU being slow.
GATE = "GATE"
HARD_STOP_GRACE_SECONDS = 120  # after run_once's SIGTERM, before the suite gives up on it


# -- lines and files ------------------------------------------------------------------------------
def chat_line(i: int, text: str | None = None, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"q-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": text or f"question number {i}"}], **body},
    }


def write_jsonl(path: Path, lines: Iterable[dict[str, Any] | str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def gated_job(n: int) -> list[dict[str, Any]]:
    """n lines for the `gated` model; the last one waits for open_gate."""
    return [chat_line(i) for i in range(n - 1)] + [chat_line(n - 1, GATE)]


def open_gate(root: Path) -> None:
    (root / "gate.open").touch()


def answers(path: Path) -> list[tuple]:
    """What an output file says, without the ids and times that differ between runs."""
    out = []
    for x in read_jsonl(path):
        body = (x["response"] or {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        out.append(
            (x["custom_id"], (choice.get("message") or {}).get("content"), body.get("usage"), x["error"])
        )
    return out


# -- what the daemon wrote ------------------------------------------------------------------------
def wait_for(pred: Callable[[], Any], timeout: float = 60, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


def batch_json(root: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((root / "outbox" / name / "batch.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def completed(root: Path, name: str, model: str) -> int:
    """Lines of a job's model that succeeded so far, as batch.json says (0 before it exists)."""
    models = (batch_json(root, name) or {}).get("models", {})
    return models.get(model, {}).get("request_counts", {}).get("completed", 0)


def finished(root: Path, name: str) -> bool:
    b = batch_json(root, name)
    return bool(b and b["status"] in ("completed", "failed", "cancelled", "expired"))


def snapshot(root: Path) -> dict[str, Any]:
    """The daemon's status snapshot, or {} before it wrote one."""
    try:
        return json.loads((root / "state/status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# -- models.yaml ----------------------------------------------------------------------------------
def make_root(r: Path) -> Path:
    """A root with the echo models (ECHO_YAML and `gated`), its inbox folders, outbox and state."""
    r.mkdir(parents=True, exist_ok=True)
    gate = f"gate_on: {GATE}, gate_file: {r / 'gate.open'}"
    gated = f"  gated: {{engine: echo, engine_args: {{delay_ms: 10, max_in_flight: 16, {gate}}}}}\n"
    (r / "models.yaml").write_text(ECHO_YAML + gated)
    for d in [f"inbox/{m}" for m in ECHO_MODELS] + ["outbox", "state"]:
        (r / d).mkdir(parents=True, exist_ok=True)
    return r


def models_yaml(
    root: Path,
    *,
    text: str | None = None,
    settings: dict[str, Any] | None = None,
    models: dict[str, str] | str | None = None,
    replace: dict[str, str] | None = None,
) -> str:
    """The one way tests write models.yaml: `text` is the whole file (else the current one is kept);
    `settings` adds `key: value` lines (values as YAML text) at the top of `settings:`; `models`
    adds entries (name -> YAML flow text, or a block of lines) at the end; `replace` swaps a piece
    of text that must be there. Returns what it wrote."""
    path = root / "models.yaml"
    yaml = path.read_text() if text is None else text
    for old, new in (replace or {}).items():
        assert old in yaml, f"{old!r} is not in models.yaml"
        yaml = yaml.replace(old, new)
    if settings:
        assert "settings:\n" in yaml, "models.yaml has no settings: block to add to"
        lines = "".join(f"  {k}: {v}\n" for k, v in settings.items())
        yaml = yaml.replace("settings:\n", "settings:\n" + lines, 1)
    if isinstance(models, dict):
        models = "".join(f"  {name}: {entry}\n" for name, entry in models.items())
    if models:
        yaml = (yaml if yaml.endswith("\n") else yaml + "\n") + models
    path.write_text(yaml)
    return yaml


# -- daemons --------------------------------------------------------------------------------------
def daemon_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dropbox_runner", "run", "--root", str(root), *args]


def run_once(
    root: Path, *args: str, timeout: float = 120, env: dict | None = None, subprocess: bool = False
) -> Any:
    """`run --once` on the root; asserts it exits 0 and returns what it said (.stdout, .stderr).

    In-process through CliRunner unless `env` or `subprocess=True` asks for a process of its own
    (the model process is a subprocess either way). A run past `timeout` is stopped with SIGTERM,
    as a user would, and fails the test with what the daemon said."""
    if env is not None or subprocess:
        return _run_once_process(root, args, timeout, env)
    from dropbox_runner.cli import main

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    level = logging.getLogger("dropbox_runner").level
    main_thread = threading.get_ident()
    timer = _Timer(timeout, signal.pthread_kill, (main_thread, signal.SIGTERM))
    timer.start()
    # a daemon that ignores the SIGTERM (stuck in a step) must not hang the suite: past a grace
    # period every thread's stack is printed and the test run ends, failing
    faulthandler.dump_traceback_later(timeout + HARD_STOP_GRACE_SECONDS, exit=True)
    try:
        result = CliRunner().invoke(main, ["run", "--root", str(root), "--once", *args])
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()
        timer.join()  # a SIGTERM it sent lands while the daemon's handler is still there
        for s, handler in previous.items():
            signal.signal(s, handler)
        _drop_log_handlers()
        logging.getLogger("dropbox_runner").setLevel(level)
    said = result.stderr + result.stdout
    if timer.fired:
        raise AssertionError(f"run --once still running after {timeout}s; it said:\n{said[-4000:]}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, said[-3000:]
    return result


class _Timer(threading.Timer):
    """A timer that remembers whether it went off (cancel() before the deadline leaves it False)."""

    fired = False

    def run(self) -> None:
        self.finished.wait(self.interval)
        if not self.finished.is_set():
            self.fired = True
            self.function(*self.args, **self.kwargs)
        self.finished.set()


def _drop_log_handlers() -> None:
    """The in-process daemon's log handlers (its file, CliRunner's closed stream) go with it."""
    logger = logging.getLogger("dropbox_runner")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def _run_once_process(root: Path, args: tuple, timeout: float, env: dict | None) -> sp.CompletedProcess:
    try:
        proc = sp.run(
            daemon_cmd(root, "--once", *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except sp.TimeoutExpired as exc:  # say what the daemon was doing, not only that it ran long
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"run --once still running after {timeout}s; it said:\n{said[-4000:]}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def descendants(pid: int) -> list[int]:
    """The processes below pid (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def end_tree(proc: sp.Popen) -> None:
    """SIGKILL a process, its group and every process below it (model processes have their own
    session), then reap it: what a finalizer does, whatever the test did before."""
    below = descendants(proc.pid) if proc.poll() is None else []
    for pid in [proc.pid, *below]:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=30)
    except sp.TimeoutExpired:
        pass


class Daemon:
    """A daemon started in the background, as a subprocess in a process group of its own.

    Start it through the `daemon` fixture, whose finalizer ends it (and what it started) even when
    an assert fails; a test still stops it with kill() when stopping is what it tests."""

    def __init__(self, root: Path, *args: str, env: dict | None = None) -> None:
        self.root = root
        self.log = open(root / "daemon.test.log", "ab")
        self.proc = sp.Popen(
            daemon_cmd(root, *args),
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return (self.root / "daemon.test.log").read_text(errors="replace")

    def end(self) -> None:
        end_tree(self.proc)
        self.log.close()


# -- copies (tests/test_copies_shared.py, tests/test_ray.py) ---------------------------------------
def tasks_on_copies(root: Path) -> list[set[str]]:
    """For each copy in the status snapshot, the jobs whose shards it holds."""
    return [{s[0].split("/")[0] for s in c.get("shards", [])} for c in snapshot(root).get("copies") or []]


def served_together(root: Path, ids: list[str]) -> bool:
    """Every job of `ids` runs, and the copies hold shards of all of them at once."""
    running = {r["job_id"] for r in snapshot(root).get("running") or []}
    held = set().union(*tasks_on_copies(root)) if tasks_on_copies(root) else set()
    return set(ids) <= running and set(ids) <= held


def expected(n: int) -> list[tuple]:
    return [(f"q-{i}", f"echo: question number {i}" if i < n - 1 else "echo: GATE") for i in range(n)]


# -- an in-process daemon whose steps a test calls (tests/test_reliability.py) ------------------
def core_for(root: Path) -> Any:
    """A daemon, in-process and not looping: a test calls its steps (a new one is a restart)."""
    from dropbox_runner.config import load_registry
    from dropbox_runner.daemon.loop import Daemon as Core
    from dropbox_runner.layout import Layout

    registry = load_registry(root)
    registry.settings.settle_seconds = 0
    core = Core(Layout(root), registry)
    core.layout.make(list(registry.models))
    return core


def take(core: Any, rel: str, lines: list, manifest: dict | None = None) -> Any:
    """A drop taken by the in-process daemon (`core_for`), as the loop would; its JobSpec."""
    from dropbox_runner.intake.scanner import Drop

    path = write_jsonl(core.layout.inbox / rel, lines)
    sidecar = None
    if manifest is not None:
        sidecar = path.with_name(path.name[: -len(".jsonl")] + ".manifest.json")
        sidecar.write_text(json.dumps(manifest))
    folder = rel.split("/")[0] if "/" in rel else None
    core.claimer.claim(Drop(path, folder, sidecar))
    return core.journal.find(path.name[: -len(".jsonl")])


# -- Ray copies (tests/test_ray.py, tests/test_ray_files.py) ----------------------------------------
def ray_models(root: Path, address: str) -> None:
    models_yaml(
        root,
        settings={"ray_address": f"'{address}'"},
        models={
            "rr": "{engine: echo, replicas: 3, executor: ray, engine_args: {delay_ms: 5, max_in_flight: 16}}"
        },
    )
    (root / "inbox/rr").mkdir()


# -- an in-process model process (tests/test_window_staging.py, tests/test_first_commit.py) --------
class Events:
    """The pipe to the daemon, as a list."""

    def __init__(self) -> None:
        self.seen: list[p.Message] = []

    def send(self, ev: p.Message) -> None:
        self.seen.append(ev)

    offer = send


class Commands:
    """The daemon's side of stdin."""

    def __init__(self) -> None:
        self.commands: queue.Queue[p.Message] = queue.Queue()
        self.logs: set = set()

    def die(self) -> None:
        raise AssertionError("the model process was to die")


def task_order(tmp: Path, name: str, texts: list[str]) -> p.TaskOrder:
    inp = tmp / f"{name}.jsonl"
    inp.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"{name}{i}",
                    "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": t}]},
                }
            )
            + "\n"
            for i, t in enumerate(texts)
        )
    )
    return p.TaskOrder(
        job_id=name,
        model="m",
        input=str(inp),
        log=str(tmp / f"{name}.log"),
        total=len(texts),
        defaults=[],
        commit_interval_ms=50,
        task_id=f"{name}/m",
        group=name,
    )

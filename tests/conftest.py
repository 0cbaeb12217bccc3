"""Shared fixtures: a fresh root per test (echo models), helpers to drop files and run the daemon.

The daemon runs as a real subprocess (`python -m dropbox_runner run`), as users run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

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


def daemon_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dropbox_runner", "run", "--root", str(root), *args]


def run_once(
    root: Path, *args: str, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            daemon_cmd(root, "--once", *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:  # say what the daemon was doing, not only that it ran long
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"run --once still running after {timeout}s; it said:\n{said[-4000:]}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class Daemon:
    """A daemon started in the background for the length of a test."""

    def __init__(self, root: Path, *args: str, env: dict | None = None) -> None:
        self.root = root
        self.log = open(root / "daemon.test.log", "ab")
        self.proc = subprocess.Popen(
            daemon_cmd(root, *args), stdout=self.log, stderr=self.log, env={**os.environ, **(env or {})}
        )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return (self.root / "daemon.test.log").read_text(errors="replace")


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


# A job of the `gated` model whose last line says GATE cannot end until the test calls open_gate:
# it runs at `paced`'s pace, and its gated line is answered only once the gate file exists. A test
# that needs a job still running holds it so, instead of counting on the CPU being slow.
GATE = "GATE"


def gated_job(n: int) -> list[dict[str, Any]]:
    """n lines for the `gated` model; the last one waits for open_gate."""
    return [chat_line(i) for i in range(n - 1)] + [chat_line(n - 1, GATE)]


def open_gate(root: Path) -> None:
    (root / "gate.open").touch()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    gate = f"gate_on: {GATE}, gate_file: {r / 'gate.open'}"
    gated = f"  gated: {{engine: echo, engine_args: {{delay_ms: 10, max_in_flight: 16, {gate}}}}}\n"
    (r / "models.yaml").write_text(ECHO_YAML + gated)
    for d in ("inbox/echo", "inbox/echo2", "inbox/slow", "inbox/crashy", "inbox/paced", "inbox/gated"):
        (r / d).mkdir(parents=True)
    for d in ("outbox", "state"):
        (r / d).mkdir(parents=True)
    monkeypatch.setenv("DROPBOX_RUNNER_ROOT", str(r))
    return r


def snapshot(root: Path) -> dict[str, Any]:
    """The daemon's status snapshot, or {} before it wrote one."""
    try:
        return json.loads((root / "state/status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}

"""Crash points (issue 23): webhook events journaled before the final batch.json, and only for a
receiver.

Most tests drive the daemon's own parts in-process, so a crash can be injected between two steps
(an exception no boundary catches, as a kill would stop it there); recovery is a new daemon's.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import free_port

from dropbox_runner import webhooks
from dropbox_runner.config import load_registry
from dropbox_runner.daemon import Daemon as Core
from dropbox_runner.intake.scanner import Drop
from dropbox_runner.journal import JobSpec
from dropbox_runner.layout import Layout
from dropbox_runner.results import batchfile

from conftest import batch_json, chat_line, run_once, write_jsonl

FINAL = ("completed", "failed", "cancelled", "expired")


class Crash(BaseException):
    """The daemon dies here: no `except Exception` boundary catches it."""


def die(*args, **kwargs):
    raise Crash


def hooks_yaml(root: Path, events: str = "") -> None:
    secret = "whsec_" + __import__("base64").b64encode(b"0123456789abcdef0123456789abcdef").decode()
    url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: events stay in the journal
    extra = f", events: [{events}]" if events else ""
    yaml = (root / "models.yaml").read_text()
    (root / "models.yaml").write_text(
        yaml.replace("settings:\n", f"settings:\n  webhooks: [{{url: '{url}', secret: '{secret}'{extra}}}]\n")
    )


def events(root: Path) -> list[dict]:
    return [json.loads(p.read_text())["event"] for p in sorted((root / "state/webhooks").glob("evt_*.json"))]


def core_for(root: Path) -> Core:
    """A daemon, in-process and not looping: a test calls its steps (a new one is a restart)."""
    registry = load_registry(root)
    registry.settings.settle_seconds = 0
    core = Core(Layout(root), registry)
    core.layout.make(list(registry.models))
    return core


def take(core: Core, rel: str, lines: list, manifest: dict | None = None) -> JobSpec:
    path = write_jsonl(core.layout.inbox / rel, lines)
    sidecar = None
    if manifest is not None:
        sidecar = path.with_name(path.name[: -len(".jsonl")] + ".manifest.json")
        sidecar.write_text(json.dumps(manifest))
    folder = rel.split("/")[0] if "/" in rel else None
    core.claimer.claim(Drop(path, folder, sidecar))
    return core.journal.find(path.name[: -len(".jsonl")])


def crash_after_final_batch_json(monkeypatch: pytest.MonkeyPatch) -> None:
    real = batchfile.write_json

    def write_then_die(path: Path, obj, **kwargs) -> None:
        real(path, obj, **kwargs)
        if path.name == "batch.json" and obj["status"] in FINAL:
            raise Crash

    monkeypatch.setattr(batchfile, "write_json", write_then_die)


# -- item 4: the event is journaled before the final batch.json is visible --------------------------
def test_a_crash_right_after_a_final_batch_json_keeps_its_event_and_recovery_replays_the_same(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    spec = take(core, "echo/a.jsonl", [chat_line(0)])
    crash_after_final_batch_json(monkeypatch)
    with pytest.raises(Crash):
        core.jobs.cancelled(spec)
    assert batch_json(root, "a")["status"] == "cancelled"
    before = events(root)
    assert [e["type"] for e in before] == ["batch.cancelled"], "the final batch.json came before its event"
    monkeypatch.undo()
    core_for(root)._recover()
    assert events(root) == before, "a replay is the same event, journaled once"
    assert (root / "state/archive" / spec.id).is_dir()


def test_a_crash_right_after_a_rejected_drops_batch_json_keeps_its_event(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    write_jsonl(root / "inbox/echo/bad.jsonl", ["not json"])
    crash_after_final_batch_json(monkeypatch)
    with pytest.raises(Crash):
        core.claimer.claim(Drop(root / "inbox/echo/bad.jsonl", "echo", None))
    assert batch_json(root, "bad")["status"] == "failed"
    before = events(root)
    assert [e["type"] for e in before] == ["batch.failed"]
    monkeypatch.undo()
    core_for(root)._recover()  # the claim is finished again: same job, same event
    assert events(root) == before
    assert (root / "state/archive" / batch_json(root, "bad")["id"]).is_dir()


def test_a_full_disk_while_journaling_an_event_is_retried_after_the_pause_not_lost(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    spec = take(core, "echo/full.jsonl", [chat_line(0)])

    def full(path: Path, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(webhooks, "write_json", full)
    with pytest.raises(OSError):
        core.jobs.cancelled(spec)
    assert events(root) == []
    assert batch_json(root, "full")["status"] != "cancelled", "no final batch.json without its event"
    monkeypatch.undo()
    core._recover()  # what the daemon does when its pause ends
    assert [e["type"] for e in events(root)] == ["batch.cancelled"]
    assert batch_json(root, "full")["status"] == "cancelled"


# -- item 13: no receiver, no event ----------------------------------------------------------------
def test_no_event_is_journaled_for_a_type_no_receiver_takes(root: Path) -> None:
    write_jsonl(root / "inbox/echo/ok.jsonl", [chat_line(0)])
    run_once(root, timeout=60)
    assert events(root) == []
    status = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "status", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert "webhook events" not in status.stdout
    hooks_yaml(root, events="batch.failed")
    write_jsonl(root / "inbox/echo/ok2.jsonl", [chat_line(1)])
    write_jsonl(root / "inbox/echo/bad.jsonl", ["not json"])
    run_once(root, timeout=60)
    assert [e["data"]["name"] for e in events(root)] == ["bad"]

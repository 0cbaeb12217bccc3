"""Faults the nemesis (bench/nemesis.py) found, each kept as a plain test."""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from dropbox_runner import fsutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from helpers import (
    batch_json,
    chat_line,
    core_for,
    finished,
    gated_job,
    models_yaml,
    open_gate,
    read_jsonl,
    run_once,
    take,
    wait_for,
    write_jsonl,
)


def outbox_folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "outbox").iterdir() if (p / "batch.json").exists())


def test_a_drop_named_with_non_utf8_bytes_is_taken_and_answered(root: Path) -> None:
    # Found by the nemesis (seed 2): the intent record cannot hold the name, the claim fails before
    # anything is written, so the drop is retried every second with a traceback, never quarantined.
    name = os.fsencode(root / "inbox/echo") + b"/caf\xe9\xff.jsonl"
    with open(name, "wb") as f:
        f.write(b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}\n')
    run_once(root, timeout=60)
    assert not os.path.exists(name), "the drop is still in the inbox"
    assert len(outbox_folders(root)) == 1


def test_a_drop_named_255_bytes_in_a_model_folder_leaves_the_daemon_up(root: Path, daemon) -> None:
    write_jsonl(root / "inbox/echo" / ("n" * 249 + ".jsonl"), [chat_line(0)])
    write_jsonl(root / "inbox/echo/after.jsonl", [chat_line(1)])
    d = daemon(root)
    try:
        wait_for(lambda: (root / "outbox/after/batch.json").exists() or not d.alive(), what="the next drop")
        assert d.alive(), d.output()[-2000:]
    finally:
        if d.alive():
            d.kill(signal.SIGTERM)
    assert len(outbox_folders(root)) == 2


def test_a_receiver_answering_garbage_does_not_stop_the_next_receivers_delivery(tmp_path: Path) -> None:
    # Found by the nemesis's flapping receiver in its `garbage` mode: BadStatusLine is not an
    # OSError, so it escapes the delivery loop before the attempt is recorded.
    from nemesis_receiver import WEBHOOK_SECRET, Receiver

    from dropbox_runner.config import Webhook
    from dropbox_runner.layout import Layout
    from dropbox_runner.results import webhooks

    layout = Layout(tmp_path)
    layout.state.mkdir()
    bad, good = Receiver(), Receiver()
    bad.set_mode("garbage")
    hooks = [Webhook(url=r.url, secret=WEBHOOK_SECRET) for r in (bad, good)]
    batch = {"id": "batch_1", "status": "completed", "output_folder": "x", "request_counts": {"total": 1}}
    webhooks.announce(layout, batch, hooks=hooks)
    record = next(webhooks.folder(layout).glob("evt_*.json"))
    sender = webhooks.Sender(layout, hooks, retry_hours=1, interval=0.05)
    sender.start()
    try:
        wait_for(lambda: good.events, timeout=30, what="the healthy receiver's event")
        bad_key = webhooks.entry_keys(hooks)[0]
        wait_for(
            lambda: (fsutil.read_json(record)["deliveries"].get(bad_key) or {}).get("attempts", 0) >= 1,
            timeout=30,
            what="the failed attempt recorded",
        )
    finally:
        sender.stop()
    assert [e["data"]["id"] for e in good.events.values()] == ["batch_1"]


def test_a_disk_still_full_after_the_pause_does_not_fail_the_running_job(
    root: Path, tmp_path: Path, daemon
) -> None:
    # The daemon pauses 5 s on ENOSPC, then runs its start-up recovery again; an ENOSPC there is
    # taken for an unexpected error, and the job fails with internal_error (in the nemesis run, a
    # finished job whose publishing was interrupted: all 706 results lost to `failed`). Here the job
    # cannot even be failed (the disk is full), so it is quarantined and never finishes.
    full = tmp_path / "disk-full"
    write_jsonl(root / "inbox/paced/job.jsonl", [chat_line(i) for i in range(3000)])
    d = daemon(root, env={fsutil.TEST_ENOSPC_ENV: str(full)})
    log = root / "state/daemon.log"
    try:
        wait_for(lambda: "progress" in log.read_text() if log.exists() else False, what="progress")
        full.touch()
        wait_for(
            lambda: log.read_text().count("paused for") >= 2 or "recovery at start failed" in log.read_text(),
            what="the daemon's second look at the full disk",
        )
        full.unlink()
        quarantine = root / "state/quarantine"
        wait_for(
            lambda: finished(root, "job") or (quarantine.exists() and any(quarantine.iterdir())),
            timeout=120,
            what="the job to finish (or be quarantined)",
        )
    finally:
        d.kill(signal.SIGTERM)
    assert not (quarantine.exists() and any(quarantine.iterdir())), "the job was quarantined"
    assert batch_json(root, "job")["status"] == "completed", batch_json(root, "job")["errors"]
    assert [x["custom_id"] for x in read_jsonl(root / "outbox/job/paced.jsonl")] == [
        f"q-{i}" for i in range(3000)
    ]


def peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmHWM:"))


def test_long_duplicate_ids_on_two_copies_keep_the_daemon_under_150_mb(root: Path, daemon) -> None:
    # The nemesis's `fat_ids` (seed 303): 3,000 lines sharing one 16 KB custom_id on `replicas: 2`.
    from nemesis_kit import fat_lines

    models_yaml(root, models={"rep": "{engine: echo, replicas: 2}"})
    (root / "inbox/rep").mkdir()
    (root / "inbox/rep/fat.jsonl").write_text("\n".join(fat_lines("j0000")) + "\n")
    d = daemon(root)
    peak = 0.0
    deadline = time.monotonic() + 180
    try:
        while not finished(root, "fat") and d.alive() and time.monotonic() < deadline:
            peak = max(peak, peak_mb(d.proc.pid))
            time.sleep(0.1)
        assert finished(root, "fat"), d.output()[-2000:]
    finally:
        d.kill(signal.SIGTERM)
    assert peak < 150, f"the daemon's peak memory was {peak:.0f} MB"


def test_a_daemon_started_on_a_full_disk_waits_for_space_then_finishes_the_job(
    root: Path, tmp_path: Path, daemon
) -> None:
    # Found by the nemesis (seed 202, 28 minutes): a daemon restarted while the disk was full
    # exited by itself with "No space left on device ()" (its info file, before any recovery).
    full = tmp_path / "disk-full"
    env = {fsutil.TEST_ENOSPC_ENV: str(full)}
    write_jsonl(root / "inbox/gated/job.jsonl", gated_job(200))  # held open by its last line
    log = root / "state/daemon.log"
    first = daemon(root, env=env)
    try:
        wait_for(lambda: list(root.glob("state/jobs/*/gated.marker")), what="a first commit")
    finally:
        first.kill(signal.SIGKILL)  # a crash mid-job: the next start has a task to recover
    full.touch()
    d = daemon(root, env=env)
    try:
        wait_for(lambda: "paused for" in log.read_text() or not d.alive(), what="the pause at start")
        assert d.alive(), d.output()[-2000:]
        full.unlink()
        open_gate(root)
        wait_for(lambda: finished(root, "job") or not d.alive(), timeout=120, what="the job to finish")
        assert d.alive(), d.output()[-2000:]
    finally:
        if d.alive():
            d.kill(signal.SIGTERM)
    assert log.read_text().count("paused for") == 1, "the pause at start is logged once"
    assert batch_json(root, "job")["status"] == "completed", batch_json(root, "job")["errors"]
    assert [x["custom_id"] for x in read_jsonl(root / "outbox/job/gated.jsonl")] == [
        f"q-{i}" for i in range(200)
    ]


def test_a_daemon_stopped_while_it_waits_for_space_at_start_stops_cleanly(
    root: Path, tmp_path: Path, daemon
) -> None:
    full = tmp_path / "disk-full"
    full.touch()
    d = daemon(root, env={fsutil.TEST_ENOSPC_ENV: str(full)})
    log = root / "state/daemon.log"
    wait_for(lambda: log.exists() and "paused for" in log.read_text() or not d.alive(), what="the pause")
    assert d.kill(signal.SIGTERM) == 0, d.output()[-2000:]
    assert "Traceback" not in d.output(), d.output()[-2000:]


def test_the_nemesis_skips_a_write_the_full_disk_has_no_room_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the nemesis (seed 202, 28 minutes): it died itself writing a hostile drop into a full
    # inbox. Its writes now find no room as on a full disk (each staged file is made, its data goes
    # to /dev/full, which answers ENOSPC): the fault is skipped and counted, nothing is left behind.
    import nemesis_faults
    import nemesis_kit

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        real_open(path, mode).close()
        return real_open("/dev/full", mode)

    monkeypatch.setattr(nemesis_kit, "open", full_open, raising=False)
    monkeypatch.setattr(nemesis_faults, "HOSTILE_KINDS", ("bad_json", "bad_manifest", "unknown_model"))

    class Thrower(nemesis_faults.Faults):
        skipped = {k for k in nemesis_faults.FAULTS if k != "hostile_drop"}
        rng = random.Random(1)
        root, outside = tmp_path / "root", tmp_path / "outside"
        faults, disk_skips = collections.Counter(), collections.Counter()
        rejects: list = []

    n = Thrower()
    (n.root / "inbox/e1").mkdir(parents=True)
    for _ in range(6):
        n.throw()
    assert (n.disk_skips["hostile_drop"], n.faults["hostile_drop"], n.rejects) == (6, 0, [])
    job = nemesis_kit.Job("j0001", "manifest", ["e1"], ['{"custom_id": "j0001-0"}'], b"j0001.jsonl")
    with pytest.raises(nemesis_kit.DiskFull):
        nemesis_kit.drop_file(n.root / "inbox", job)
    assert [p for p in (n.root / "inbox").rglob("*") if p.is_file()] == [], "a write left a file behind"


def test_a_full_disk_as_copies_start_leaves_the_tasks_result_log_unlocked(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the nemesis (seed 202, 30 minutes, on trust2 at 003c19a): the fat-ids job on two
    # copies ended `failed: BlockingIOError: [Errno 11] Resource temporarily unavailable`. A full
    # disk while the copies' run starts (its recovery, its marker, the duplicates it commits) left
    # the result log open with its lock held, so the task's next start could not take it (EAGAIN).
    import errno

    from dropbox_runner.results.log import ResultLog

    models_yaml(root, models={"two": "{engine: echo, replicas: 2}"})
    core = core_for(root)
    spec = take(core, "two/job.jsonl", [chat_line(i) for i in range(10)])

    def full(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResultLog, "mark_started", full)
    with pytest.raises(OSError):
        core._start_next()
    monkeypatch.undo()
    ResultLog(core.journal.log_path(spec.id, "two"), spec.total, blocking_lock=False).close()

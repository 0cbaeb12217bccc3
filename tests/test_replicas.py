"""Several copies of a model on one job (`replicas: N`): same outputs, faults contained."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from dropbox_runner.config import load_registry
from dropbox_runner.errors import ConfigError
from dropbox_runner.slot.supervisor import group_members

from helpers import (
    answers,
    batch_json,
    chat_line,
    completed,
    finished,
    models_yaml,
    read_jsonl,
    run_once,
    snapshot,
    wait_for,
    write_jsonl,
)

COPIES = """
  rep: {engine: echo, replicas: 3, engine_args: {delay_ms: 2, max_in_flight: 16}}
  repslow: {engine: echo, replicas: 3, engine_args: {delay_ms: 20, max_in_flight: 16}}
  repcrash: {engine: echo, replicas: 2, engine_args: {crash_on: POISON, max_in_flight: 8}}
"""


@pytest.fixture
def rroot(root: Path) -> Path:
    models_yaml(root, models=COPIES)
    for name in ("rep", "repslow", "repcrash"):
        (root / "inbox" / name).mkdir()
    return root


def test_three_copies_give_the_same_file_as_one(rroot: Path) -> None:
    lines = [chat_line(i) for i in range(2000)] + ["not json", chat_line(5)]  # a bad line, a duplicate id
    write_jsonl(rroot / "inbox/rep/many.jsonl", lines)
    write_jsonl(rroot / "inbox/slow/one.jsonl", lines)
    proc = run_once(rroot, timeout=120)
    assert "loading 3 copies of rep" in proc.stderr
    assert answers(rroot / "outbox/many/rep.jsonl") == answers(rroot / "outbox/one/slow.jsonl")
    assert batch_json(rroot, "many")["request_counts"] == batch_json(rroot, "one")["request_counts"]


def test_a_copy_killed_mid_job_loses_and_duplicates_nothing(rroot: Path, daemon) -> None:
    lines = [chat_line(i) for i in range(30000)]  # about 12 s on three copies at 800 requests/s each
    write_jsonl(rroot / "inbox/repslow/big.jsonl", lines)
    d = daemon(rroot)
    try:
        copies = wait_for(lambda: len(snapshot(rroot).get("copies") or []) == 3 and snapshot(rroot)["copies"])
        wait_for(lambda: completed(rroot, "big", "repslow") > 2000)
        os.kill(copies[1]["pid"], signal.SIGKILL)
        wait_for(lambda: finished(rroot, "big"), timeout=120, what="the job after a copy died")
    finally:
        d.kill(signal.SIGTERM)
    out = read_jsonl(rroot / "outbox/big/repslow.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(30000)]
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert "copy 1 of repslow killed by SIGKILL" in (rroot / "state/daemon.log").read_text()


def test_a_poison_line_with_copies_fails_alone(rroot: Path) -> None:
    lines = [chat_line(i) for i in range(400)]
    lines[123] = chat_line(123, "POISON here")
    write_jsonl(rroot / "inbox/repcrash/p.jsonl", lines)
    said = run_once(rroot, timeout=120).stderr
    out = read_jsonl(rroot / "outbox/p/repcrash.jsonl")
    failed = [i for i, x in enumerate(out) if x["response"] is None]
    assert (
        failed == [123] and out[123]["error"]["code"] == "engine_crash" and out[123]["custom_id"] == "q-123"
    )
    assert "killed two copies; halving them" in said  # crashes.halves, as with one process


def test_kill_9_of_the_daemon_takes_its_copies_and_the_restart_resumes(rroot: Path, daemon) -> None:
    lines = [chat_line(i) for i in range(30000)]
    write_jsonl(rroot / "inbox/repslow/k.jsonl", lines)
    d = daemon(rroot)
    copies = wait_for(lambda: len(snapshot(rroot).get("copies") or []) == 3 and snapshot(rroot)["copies"])
    wait_for(lambda: completed(rroot, "k", "repslow") > 1000)
    d.kill(signal.SIGKILL)
    wait_for(lambda: not any(group_members(c["pid"]) for c in copies), timeout=15, what="the copies to end")
    run_once(rroot, timeout=120)
    assert [x["custom_id"] for x in read_jsonl(rroot / "outbox/k/repslow.jsonl")] == [
        f"q-{i}" for i in range(30000)
    ]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{engine: echo, replicas: 0}", "models.x.replicas"),
        ("{engine: echo, executor: spark}", "models.x.executor"),
        ("{engine: echo, replicas: 2, devices: ['0']}", "models.x.devices: 1 devices for 2 replicas"),
    ],
)
def test_wrong_copy_settings_stop_the_daemon_naming_the_key(
    tmp_path: Path, entry: str, expected: str
) -> None:
    models_yaml(tmp_path, text=f"models:\n  x: {entry}\n")
    with pytest.raises(ConfigError) as err:
        load_registry(tmp_path)
    assert expected in str(err.value)
    json.dumps(str(err.value))


def test_the_daemon_imports_no_engine_and_no_ray_until_a_model_asks(rroot: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dropbox_runner.config import load_registry\n"
        "from dropbox_runner.daemon.loop import Daemon\n"
        "from dropbox_runner.layout import Layout\n"
        f"Daemon(Layout(Path({str(rroot)!r})), load_registry(Path({str(rroot)!r})), once=True).run()\n"
        "heavy = [m for m in ('ray', 'vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    write_jsonl(rroot / "inbox/rep/light.jsonl", [chat_line(0)])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "heavy: []" in out.stdout, out.stderr[-2000:]
    assert batch_json(rroot, "light")["status"] == "completed"


def test_a_dead_copys_shard_resumes_after_what_it_sent() -> None:
    """Issue 23 item 9: the lines a copy sent before it died are not leased again."""
    from collections import deque
    from types import SimpleNamespace

    from dropbox_runner.slot.copies.shards import Shard, ShardedTask

    run = object.__new__(ShardedTask)
    done = bytearray(100)
    done[:60] = b"\x01" * 60  # the copy sent lines 0-59, then died
    run.log, run.queue = SimpleNamespace(done=done), deque()
    run.give_back(Shard(0, 100))
    assert [(s.start, s.end, s.crashes) for s in run.queue] == [(60, 100, 1)]


def _peak_mb(pid: int) -> float:
    """The highest resident size a process reached (VmHWM), in MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    return next(int(x.split()[1]) for x in text.splitlines() if x.startswith("VmHWM:")) / 1024


def test_copies_of_one_fat_repeated_id_keep_the_daemon_small(root: Path, daemon) -> None:
    """Issue 23 item 2: 3,000 lines sharing one 16 KB custom_id on two copies, the daemon stays small."""
    models = "  rep: {engine: echo, replicas: 2}\n  one: {engine: echo}\n"
    models_yaml(root, models=models)
    fat_lines = [{**chat_line(i), "custom_id": "x" * 16384} for i in range(3000)]
    write_jsonl(root / "inbox/rep/fat.jsonl", fat_lines)
    d = daemon(root)
    peak = 0.0
    try:
        deadline = time.monotonic() + 180
        while not finished(root, "fat"):
            assert time.monotonic() < deadline, "timed out waiting for the fat job"
            peak = max(peak, _peak_mb(d.proc.pid))
            time.sleep(0.1)
        peak = max(peak, _peak_mb(d.proc.pid))
        write_jsonl(root / "inbox/one/fatone.jsonl", fat_lines)
        wait_for(lambda: finished(root, "fatone"), timeout=180, what="the one-copy fat job")
    finally:
        d.kill(signal.SIGTERM)
    assert peak < 150, f"the daemon peaked at {peak:.0f} MB"

    def summary(path: Path) -> list[tuple]:
        out = []
        for x in read_jsonl(path):
            error = x["error"] or ((x["response"] or {}).get("body") or {}).get("error") or {}
            out.append(
                (
                    x["custom_id"],
                    (x["response"] or {}).get("status_code"),
                    error.get("code"),
                    error.get("message"),
                )
            )
        return out

    got = summary(root / "outbox/fat/rep.jsonl")
    assert got == summary(root / "outbox/fatone/one.jsonl")
    assert len(got) == 3000 and got[0][1:3] == (200, None)
    assert got[2][1:] == (400, "invalid_request", f'line 3: duplicate custom_id "{"x" * 196}...')

"""Crash safety: kill -9 of the daemon or the model process loses and duplicates nothing."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

from dropbox_runner.results.log import read_fed_mark
from dropbox_runner.slot.supervisor import group_members

from helpers import batch_json, chat_line, finished, models_yaml, read_jsonl, run_once, wait_for, write_jsonl


def normalized(path: Path) -> list[dict]:
    """Output lines without the parts that differ between runs (ids and times)."""
    lines = read_jsonl(path)
    for x in lines:
        x.pop("id", None)
        if x.get("response"):
            x["response"].pop("request_id", None)
            body = x["response"].get("body") or {}
            body.pop("id", None)
            body.pop("created", None)
    return lines


def committed(root: Path, model: str) -> int:
    try:
        return json.loads(next((root / "state/jobs").glob(f"*/{model}.marker")).read_text())["count"]
    except (StopIteration, FileNotFoundError, json.JSONDecodeError):
        return 0


def reference(tmp_path: Path, lines: list[dict], model: str) -> list[dict]:
    ref = tmp_path / "ref"
    ref.mkdir()
    models_yaml(ref, text=(tmp_path / "root/models.yaml").read_text())
    write_jsonl(ref / f"inbox/{model}/job.jsonl", lines)
    run_once(ref)
    return normalized(ref / f"outbox/job/{model}.jsonl")


def test_daemon_killed_25_times_gives_the_uninterrupted_outbox(root: Path, tmp_path: Path, daemon) -> None:
    lines = [chat_line(i, max_tokens=1 + i % 5) for i in range(5000)]
    lines[1234] = {"custom_id": "broken"}  # a bad line keeps its place through every crash
    expected = reference(tmp_path, lines, "slow")
    # The job outlasts 25 lives by its pace, not by the CPU's slowness: at 8 requests per 50 ms
    # (160/s), 25 lives of at most 0.6 s answer at most 2,400 of its 5,000 lines.
    fast_yaml = (root / "models.yaml").read_text()
    held = "slow: {engine: echo, engine_args: {delay_ms: 50, max_in_flight: 8}}"
    models_yaml(root, text=re.sub(r"slow: \{.*\}", held, fast_yaml))
    write_jsonl(root / "inbox/slow/job.jsonl", lines)
    rng = random.Random(7)
    kills = 0
    while kills < 25 and not finished(root, "job"):
        d = daemon(root)
        time.sleep(rng.uniform(0.05, 0.6))
        if d.alive():
            d.kill(signal.SIGKILL)
            kills += 1
    assert kills == 25, "the job ended before 25 kills"
    assert not finished(root, "job")
    models_yaml(root, text=fast_yaml)  # the rest at the shipped pace: the same answers
    run_once(root, timeout=300)
    got = normalized(root / "outbox/job/slow.jsonl")
    assert got == expected
    ids = [x["custom_id"] for x in got]
    assert len(ids) == 5000 and len(set(ids)) == 5000


def test_model_process_killed_mid_job_is_restarted_and_resumes(root: Path, tmp_path: Path, daemon) -> None:
    lines = [chat_line(i) for i in range(4000)]
    expected = reference(tmp_path, lines, "paced")
    write_jsonl(root / "inbox/paced/job.jsonl", lines)
    d = daemon(root)
    try:
        fed = 0
        for _ in range(3):
            # Kill only once the restarted process is past the lines fed at the previous kill:
            # two crashes over the same lines would make it hunt for a culprit.
            wait_for(lambda f=fed: committed(root, "paced") > f + 50, what="progress")
            fed = read_fed_mark(next((root / "state/jobs").glob("*/paced.log")))
            pid = json.loads((root / "state/status.json").read_text())["model_pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda p=pid: (
                    json.loads((root / "state/status.json").read_text())["model_pid"] not in (p, None)
                ),
                what="a new model process",
            )
        wait_for(lambda: finished(root, "job"), timeout=120, what="job end")
        assert d.alive(), "the daemon survives its model process"
    finally:
        d.kill(signal.SIGTERM)
    assert normalized(root / "outbox/job/paced.jsonl") == expected
    assert d.output().count("killed by SIGKILL") == 3


def test_model_process_never_outlives_the_daemon(root: Path, daemon) -> None:
    write_jsonl(root / "inbox/slow/job.jsonl", [chat_line(i) for i in range(20000)])
    d = daemon(root)
    wait_for(lambda: committed(root, "slow") > 100, what="progress")
    pid = wait_for(
        lambda: json.loads((root / "state/status.json").read_text())["model_pid"], what="model pid"
    )
    d.kill(signal.SIGKILL)
    wait_for(lambda: not group_members(pid), timeout=5, what="the model process to exit")
    size = next((root / "state/jobs").glob("*/slow.log")).stat().st_size
    time.sleep(0.5)
    assert next((root / "state/jobs").glob("*/slow.log")).stat().st_size == size, "no byte after death"


def test_power_cut_recomputes_exactly_what_was_past_the_marker(root: Path) -> None:
    write_jsonl(root / "inbox/echo/job.jsonl", [chat_line(i) for i in range(200)])
    run_once(root)
    job = next((root / "state/archive").iterdir())
    log, marker = job / "echo.log", job / "echo.marker"
    data = log.read_bytes().splitlines(keepends=True)
    kept = b"".join(data[:150])
    m = json.loads(marker.read_text())
    # Put the job back as a power cut at line 150 would have left it: 50 results never reached the disk.
    log.write_bytes(kept + b"".join(data[150:160]))  # 10 records written but past the marker
    m.update(bytes=len(kept), count=150, failed=0)
    marker.write_text(json.dumps(m))
    os.rename(job, root / "state/jobs" / job.name)
    task = json.loads((root / f"state/jobs/{job.name}/echo.task.json").read_text())
    task.update(status="in_progress", outcome=None, completed_at=None)
    (root / f"state/jobs/{job.name}/echo.task.json").write_text(json.dumps(task))
    (root / "outbox/job/echo.jsonl").unlink()
    proc = run_once(root)
    assert "dropped" in proc.stderr and "uncommitted" in proc.stderr
    assert "after 150 committed results" in proc.stderr
    out = read_jsonl(root / "outbox/job/echo.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(200)]
    assert (
        json.loads(
            marker.read_text()
            if marker.exists()
            else (root / f"state/archive/{job.name}/echo.marker").read_text()
        )["count"]
        == 200
    )


def test_a_request_that_kills_the_model_twice_fails_alone(root: Path) -> None:
    lines = [chat_line(i) for i in range(60)]
    lines[17] = chat_line(17, text="please POISON the model")
    write_jsonl(root / "inbox/crashy/p.jsonl", lines)
    proc = run_once(root)
    out = read_jsonl(root / "outbox/p/crashy.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(60)]
    assert out[17]["response"] is None
    assert out[17]["error"]["code"] == "engine_crash"
    assert all(x["response"]["status_code"] == 200 for i, x in enumerate(out) if i != 17)
    assert batch_json(root, "p")["request_counts"] == {"total": 60, "completed": 59, "failed": 1}
    assert "halving them" in proc.stderr
    assert "line 17 of" in proc.stderr and "fails with engine_crash" in proc.stderr

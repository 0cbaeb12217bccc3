"""The command line as users meet it: exit codes, messages and the files left behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from click.testing import CliRunner

from dropbox_runner.cli import main

from helpers import (
    batch_json,
    chat_line,
    finished,
    gated_job,
    models_yaml,
    read_jsonl,
    run_once,
    wait_for,
    write_jsonl,
)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_init_makes_the_layout_and_never_overwrites(tmp_path: Path) -> None:
    r = tmp_path / "new"
    result = invoke("init", "--root", str(r))
    assert result.exit_code == 0, result.output
    assert (r / "models.yaml").exists() and (r / "inbox/tiny-llama").is_dir() and (r / "state").is_dir()
    models_yaml(r, models="\n# mine\n")
    result = invoke("init", "--root", str(r))
    assert result.exit_code == 0 and "left as it is" in result.output
    assert (r / "models.yaml").read_text().endswith("# mine\n")


def test_submit_one_model_and_several(root: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "mine.jsonl", [chat_line(i) for i in range(5)])
    result = invoke("submit", str(src), "--model", "echo")
    assert result.exit_code == 0, result.output
    assert "outbox/mine/" in result.output
    assert (root / "inbox/echo/mine.jsonl").read_bytes() == src.read_bytes()
    result = invoke("submit", str(src), "--models", "echo,echo2", "--priority", "5")
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "inbox/mine.manifest.json").read_text())
    assert manifest["metadata"]["submit_id"].startswith("sub_")
    assert manifest == {"priority": 5, "models": ["echo", "echo2"], "metadata": manifest["metadata"]}
    assert not [p for p in (root / "inbox").rglob(".*")], "no hidden temporary file is left"
    run_once(root)
    models = sorted(sorted(batch_json(root, n)["models"]) for n in ("mine", "mine.2"))
    assert models == [["echo"], ["echo", "echo2"]]
    assert len(read_jsonl(root / "outbox/mine.2/echo.jsonl")) == 5


def test_submit_errors(root: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "x.jsonl", [chat_line(0)])
    result = invoke("submit", str(src), "--model", "nope")
    assert result.exit_code == 1 and "unknown model 'nope'" in result.output
    result = invoke("submit", str(src))
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = invoke("submit", str(tmp_path / "missing.jsonl"), "--model", "echo")
    assert result.exit_code == 2


def test_validate_lists_each_problem_with_its_line(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [chat_line(0), chat_line(1)])
    result = invoke("validate", str(good))
    assert result.exit_code == 0 and "2 lines, 2 valid, 0 problems" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat_line(0), "{oops", "", chat_line(0), b"\xff\xfe"])
    result = invoke("validate", str(bad))
    assert result.exit_code == 1
    assert "line 2: line is not valid JSON" in result.output
    assert 'line 4: duplicate custom_id "q-0"' in result.output
    assert "line 5: not UTF-8 text" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = invoke("validate", str(empty))
    assert result.exit_code == 1 and "no request line" in result.output


def test_models_lists_and_checks(root: Path) -> None:
    models_yaml(
        root, text="models:\n  echo: {engine: echo}\n  gone: {path: models/tiny-llama-gone-away-x/y/z}\n"
    )
    result = invoke("models")  # a model that cannot run here is not an error of the file
    assert result.exit_code == 0 and "gone" in result.output
    result = invoke("models", "--check")
    assert result.exit_code == 1 and "gone" in result.output and "does not exist" in result.output
    assert "echo" in result.output.split("gone")[0] and "ok" in result.output
    models_yaml(root, text="models:\n  echo: {engine: echo}\n  tiny-llama: {path: models/tiny-llama}\n")
    result = invoke("models", "--check")
    assert "echo" in result.output and "tiny-llama" in result.output
    assert result.exit_code == 0, result.output


def test_status_of_one_job_and_json(root: Path) -> None:
    write_jsonl(root / "inbox/echo/s.jsonl", [chat_line(0), "bad"])
    run_once(root)
    result = invoke("status", "s")
    assert result.exit_code == 0
    assert "s (batch_" in result.output and "outbox/s/echo.jsonl" in result.output
    assert "outbox/s/echo.errors.jsonl" in result.output and "line 2:" in result.output
    doc = json.loads(invoke("status", "--json").output)
    row = doc["jobs"][0]["models"][0]
    assert {"model", "status", "done", "total", "failed", "tokens_per_second", "eta_seconds"} <= set(row)
    assert row["model"] == "echo" and row["status"] == "completed" and row["total"] == 2
    assert doc["jobs"][0]["models"][0]["done"] == 2 and doc["jobs"][0]["models"][0]["failed"] == 1
    assert doc["daemon"]["running"] is False
    result = invoke("status", "nothing-like-this")
    assert result.exit_code == 1 and "no job is named" in result.output and "Traceback" not in result.output


def test_cancel_a_running_job_publishes_what_is_done(root: Path, daemon) -> None:
    write_jsonl(root / "inbox/gated/big.jsonl", gated_job(20000))  # cannot end before the cancel
    d = daemon(root)
    try:
        wait_for(
            lambda: (batch_json(root, "big") or {}).get("request_counts", {}).get("completed", 0) > 100,
            what="progress",
        )
        result = invoke("cancel", "big")
        assert result.exit_code == 0 and "requested" in result.output
        wait_for(lambda: finished(root, "big"), what="cancelled")
    finally:
        d.kill(signal.SIGTERM)
    batch = batch_json(root, "big")
    assert batch["status"] == "cancelled"
    out = read_jsonl(root / "outbox/big/gated.jsonl")
    assert len(out) == 20000
    cancelled = [x for x in out if x["response"] is None]
    assert cancelled and all(x["error"]["code"] == "batch_cancelled" for x in cancelled)
    assert cancelled[-1]["custom_id"] == "q-19999"
    assert batch["request_counts"]["completed"] + batch["request_counts"]["failed"] == 20000
    assert batch["request_counts"]["completed"] == 20000 - len(cancelled)


def test_cancel_a_queued_job_without_daemon(root: Path) -> None:
    write_jsonl(root / "inbox/echo/q.jsonl", [chat_line(i) for i in range(3)])
    # take the drop, but do not run it: claim it through the daemon's own code
    from dropbox_runner.config import load_registry
    from dropbox_runner.daemon.loop import Daemon as Core
    from dropbox_runner.intake.scanner import Drop
    from dropbox_runner.layout import Layout

    core = Core(Layout(root), load_registry(root))
    core.layout.make(["echo"])
    core.claimer.claim(Drop(root / "inbox/echo/q.jsonl", "echo", None))
    assert batch_json(root, "q")["status"] == "queued"
    result = invoke("cancel", "q")
    assert result.exit_code == 0 and "cancelled q" in result.output
    assert batch_json(root, "q")["status"] == "cancelled"
    assert [x["error"]["code"] for x in read_jsonl(root / "outbox/q/echo.jsonl")] == ["batch_cancelled"] * 3


def test_retry_reruns_only_failed_lines(root: Path) -> None:
    lines = [chat_line(i) for i in range(30)]
    lines[4] = chat_line(4, text="POISON here")
    write_jsonl(root / "inbox/crashy/r.jsonl", lines)
    run_once(root)
    assert batch_json(root, "r")["request_counts"]["failed"] == 1
    models_yaml(root, replace={"crash_on: POISON": "crash_on: NEVER"})
    job = next((root / "state/archive").iterdir())
    before = {r.split(b" ", 1)[0] for r in (job / "crashy.log").read_bytes().splitlines()}
    result = invoke("retry", "r")
    assert result.exit_code == 0 and "crashy queued" in result.output
    proc = run_once(root)
    assert "resuming" in proc.stderr and "after 29 committed results" in proc.stderr
    batch = batch_json(root, "r")
    assert batch["status"] == "completed" and batch["request_counts"] == {
        "total": 30,
        "completed": 30,
        "failed": 0,
    }
    out = read_jsonl(root / "outbox/r/crashy.jsonl")
    assert out[4]["response"]["body"]["choices"][0]["message"]["content"] == "echo: POISON here"
    assert not (root / "outbox/r/crashy.errors.jsonl").exists()
    assert len(before) == 30
    result = invoke("retry", "r")
    assert "no line had failed" in result.output


def test_cli_reference_is_current() -> None:
    from dropbox_runner.cli.doc import render

    doc = Path(__file__).resolve().parents[1] / "docs/cli.md"
    assert doc.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_status_watch_in_a_terminal_shows_a_moving_bar(root: Path, daemon) -> None:
    import os
    import pty
    import re
    import select
    import subprocess
    import sys
    import time

    write_jsonl(root / "inbox/gated/w.jsonl", gated_job(20000))  # moves for 12 s, then waits
    d = daemon(root)
    try:
        wait_for(lambda: (batch_json(root, "w") or {}).get("status") == "in_progress", what="job running")
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dropbox_runner", "status", "--watch", "--root", str(root)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
        )
        os.close(slave)
        screen = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(set(re.findall(rb"\[#*\.*\]", screen))) < 2:
            if select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        os.close(master)
    finally:
        d.kill(signal.SIGTERM)
    assert b"\x1b[2J" in screen, "redraws in place"
    bars = re.findall(rb"\[(#*)\.*\]", screen)
    assert len({len(b) for b in bars}) >= 2, "the bar moves"


def make_finished_jobs(root: Path, n: int) -> None:
    """n finished one-line jobs, made through the daemon's own claim and publish code."""
    from dropbox_runner.config import load_registry
    from dropbox_runner.intake.claim import Claimer
    from dropbox_runner.intake.scanner import Drop
    from dropbox_runner.jobs.operations import Jobs
    from dropbox_runner.layout import Layout
    from dropbox_runner.queue.journal import Journal
    from dropbox_runner.queue.lifecycle import Status
    from dropbox_runner.results.log import ResultLog

    journal = Journal(Layout(root))
    journal.layout.make(["echo"])
    jobs = Jobs(journal)
    claimer = Claimer(jobs, load_registry(root))
    for i in range(n):
        src = write_jsonl(root / f"inbox/echo/j{i:04d}.jsonl", [chat_line(i)])
        claimer.claim(Drop(src, "echo", None))
        spec = journal.find(f"j{i:04d}")
        log = ResultLog(journal.log_path(spec.id, "echo"), 1)
        log.recover()
        log.append(0, True, 3, 4, b'{"custom_id": "q"}')
        log.commit()
        log.close()
        task = journal.task(spec.id, "echo")
        jobs.started(spec, task)
        jobs.finalized(spec, task, Status.COMPLETED)


def test_status_with_a_thousand_finished_jobs_and_one_running(root: Path, daemon) -> None:
    make_finished_jobs(root, 1000)
    write_jsonl(root / "inbox/gated/running.jsonl", gated_job(100))
    d = daemon(root)
    try:
        wait_for(lambda: (batch_json(root, "running") or {}).get("status") == "in_progress", what="running")
        doc = json.loads(invoke("status", "--json").output)
        assert doc["jobs"][0]["name"] == "running" and doc["jobs"][0]["status"] == "in_progress"
        assert len(doc["jobs"]) == 21 and doc["hidden_finished"] == 980
        assert [j["name"] for j in doc["jobs"][1:4]] == ["j0999", "j0998", "j0997"], "newest first"
        everything = json.loads(invoke("status", "--json", "--all").output)
        assert len(everything["jobs"]) == 1001
        assert all(j["status"] == "completed" and j["models"][0]["done"] == 1 for j in everything["jobs"][1:])
        table = invoke("status").output
        assert "980 older finished jobs (--all shows them)" in table
    finally:
        d.kill(signal.SIGTERM)

"""Containment: a bad value fails its line, an internal error fails its job, a sick model process is
replaced. One test per fault of issue 11, each through the daemon as users meet it where it can be.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dropbox_runner.config import load_registry
from dropbox_runner.fsutil import staged
from dropbox_runner.intake.claim import Claimer
from dropbox_runner.intake.scanner import Scanner
from dropbox_runner.intake.watcher import scan_due
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.layout import Layout, acquire_root
from dropbox_runner.queue.journal import Journal

from helpers import (
    batch_json,
    chat_line,
    finished,
    models_yaml,
    read_jsonl,
    run_once,
    snapshot,
    wait_for,
    write_jsonl,
)


def add_models(root: Path, text: str, settings: str = "") -> None:
    models_yaml(root, replace={"settings:\n": f"settings:\n{settings}"} if settings else None, models=text)
    for name in [
        line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ") and ":" in line
    ]:
        (root / "inbox" / name).mkdir(exist_ok=True)


def statuses(out: list[dict]) -> list:
    return [x["response"]["status_code"] if x["response"] else x["error"]["code"] for x in out]


# -- line boundary ----------------------------------------------------------------------------------
def test_a_list_url_fails_its_line_and_the_daemon_keeps_every_team_running(root: Path) -> None:
    """The reported crash: `url` as a list killed the daemon, and every restart died on the same claim."""
    bad = chat_line(0)
    bad["url"] = ["/v1/chat/completions"]
    schema = chat_line(1, response_format={"type": "json_schema", "json_schema": "not an object"})
    write_jsonl(root / "inbox/echo/team-a.jsonl", [bad, schema, chat_line(2)])
    write_jsonl(root / "inbox/echo2/team-b.jsonl", [chat_line(i) for i in range(5)])
    run_once(root, timeout=60)
    out = read_jsonl(root / "outbox/team-a/echo.jsonl")
    assert statuses(out) == [400, 400, 200]
    assert out[0]["response"]["body"]["error"]["param"] == "url"
    assert "line 1" in out[0]["response"]["body"]["error"]["message"]
    assert out[1]["response"]["body"]["error"]["param"] == "response_format"
    assert batch_json(root, "team-b")["status"] == "completed"
    assert not list((root / "state/claims").iterdir())


# -- model process boundary -------------------------------------------------------------------------
def test_model_process_killed_while_loading_is_started_again(root: Path, daemon) -> None:
    add_models(root, "  slowload: {engine: echo, engine_args: {load_delay_ms: 3000}}\n")
    write_jsonl(root / "inbox/slowload/l.jsonl", [chat_line(i) for i in range(10)])
    d = daemon(root)
    try:
        pid = wait_for(
            lambda: snapshot(root).get("loading_model") == "slowload" and snapshot(root)["model_pid"]
        )
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: finished(root, "l"), what="the job after a reload")
        assert d.alive()
    finally:
        d.kill(signal.SIGTERM)
    assert statuses(read_jsonl(root / "outbox/l/slowload.jsonl")) == [200] * 10
    assert "while loading; loading it again" in (root / "state/daemon.log").read_text()


def test_a_request_that_raises_in_the_engine_fails_alone(root: Path) -> None:
    add_models(root, "  raisy: {engine: echo, engine_args: {raise_on: BOOM}}\n")
    lines = [chat_line(i) for i in range(20)]
    lines[7] = chat_line(7, text="BOOM goes the engine")
    write_jsonl(root / "inbox/raisy/r.jsonl", lines)
    run_once(root, timeout=60)
    out = read_jsonl(root / "outbox/r/raisy.jsonl")
    assert statuses(out) == [200] * 7 + [500] + [200] * 12
    assert out[7]["response"]["body"]["error"]["code"] == "engine_error"


def test_a_request_that_hangs_the_engine_is_found_by_the_stall_timeout_and_fails_alone(root: Path) -> None:
    add_models(
        root,
        "  hangy: {engine: echo, engine_args: {hang_on: HANG, max_in_flight: 4}}\n",
        settings="  stall_timeout_seconds: 1.5\n",
    )
    lines = [chat_line(i) for i in range(30)]
    lines[12] = chat_line(12, text="HANG here")
    write_jsonl(root / "inbox/hangy/h.jsonl", lines)
    proc = run_once(root, timeout=120)
    out = read_jsonl(root / "outbox/h/hangy.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(30)]
    assert statuses(out) == [200] * 12 + ["engine_crash"] + [200] * 17
    assert "hung (no result for 1.5s)" in proc.stderr


def test_two_poison_lines_fail_exactly_those_two(root: Path) -> None:
    lines = [chat_line(i) for i in range(80)]
    for i in (10, 50):
        lines[i] = chat_line(i, text="POISON pill")
    write_jsonl(root / "inbox/crashy/two.jsonl", lines)
    run_once(root, timeout=120)
    out = read_jsonl(root / "outbox/two/crashy.jsonl")
    failed = [i for i, x in enumerate(out) if x["response"] is None]
    assert failed == [10, 50]
    assert all(out[i]["error"]["code"] == "engine_crash" for i in failed)
    assert batch_json(root, "two")["request_counts"] == {"total": 80, "completed": 78, "failed": 2}


def test_a_request_over_request_timeout_seconds_fails_alone(root: Path) -> None:
    add_models(root, "  slowone: {engine: echo, request_timeout_seconds: 1, engine_args: {slow_on: SLOW}}\n")
    lines = [chat_line(i) for i in range(10)]
    lines[3] = chat_line(3, text="SLOW one")
    write_jsonl(root / "inbox/slowone/t.jsonl", lines)
    run_once(root, timeout=60)
    out = read_jsonl(root / "outbox/t/slowone.jsonl")
    assert statuses(out) == [200] * 3 + ["request_timeout"] + [200] * 6


# -- job boundary -----------------------------------------------------------------------------------
def test_an_internal_error_fails_its_job_alone_and_the_next_job_runs(root: Path) -> None:
    write_jsonl(root / "inbox/echo/broken.jsonl", [chat_line(i) for i in range(5)])
    write_jsonl(root / "inbox/echo2/fine.jsonl", [chat_line(i) for i in range(5)])
    run_once(root, timeout=60, env={"DROPBOX_RUNNER_FAULT_AT": "publish:broken"})
    batch = batch_json(root, "broken")
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "internal_error"
    assert "injected fault at publish" in batch["errors"]["data"][0]["message"]
    assert (root / "state/archive" / batch["id"] / "input.jsonl").exists(), "the original is kept"
    assert batch_json(root, "fine")["status"] == "completed"


def test_a_drop_whose_taking_fails_twice_is_quarantined_once_and_shown(root: Path) -> None:
    write_jsonl(root / "inbox/echo/cursed.jsonl", [chat_line(0)])
    write_jsonl(root / "inbox/echo2/fine.jsonl", [chat_line(0)])
    run_once(root, timeout=60, env={"DROPBOX_RUNNER_FAULT_AT": "claim:cursed"})
    quarantined = list((root / "state/quarantine").iterdir())
    assert len(quarantined) == 1
    assert (quarantined[0] / "input.jsonl").exists()
    assert "failed 2 times" in (quarantined[0] / "reason.txt").read_text()
    assert not list((root / "state/claims").iterdir()) and not (root / "inbox/echo/cursed.jsonl").exists()
    assert batch_json(root, "fine")["status"] == "completed"
    run_once(root, timeout=60)  # never replayed at the next start
    assert len(list((root / "state/quarantine").iterdir())) == 1
    status = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "status", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert f"quarantined state/quarantine/{quarantined[0].name}/" in status.stdout


def test_an_outbox_name_taken_by_a_file_gets_the_next_folder(root: Path) -> None:
    (root / "outbox/clash").write_text("a user's file, not a folder\n")
    write_jsonl(root / "inbox/echo/clash.jsonl", [chat_line(0)])
    run_once(root, timeout=60)
    assert (root / "outbox/clash").read_text() == "a user's file, not a folder\n"
    assert batch_json(root, "clash.2")["status"] == "completed"


# -- intake: what is taken is what was checked ------------------------------------------------------
def claimer_for(root: Path) -> tuple[Claimer, Scanner]:
    layout = Layout(root)
    registry = load_registry(root)
    layout.make(list(registry.models))
    registry.settings.settle_seconds = 0
    return Claimer(Jobs(Journal(layout)), registry), Scanner(
        layout.inbox, registry.settings, list(registry.models)
    )


def test_a_symlink_swapped_in_between_scan_and_claim_is_not_followed(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [chat_line(0, text="the secret")])
    claimer, scanner = claimer_for(root)
    drop = root / "inbox/echo/swap.jsonl"
    write_jsonl(drop, [chat_line(0)])
    scanner.scan()
    [found] = scanner.scan()
    drop.unlink()
    drop.symlink_to(secret)
    claimer.claim(found)
    batch = batch_json(root, "swap")
    assert batch["status"] == "failed" and "not a regular file" in batch["errors"]["data"][0]["message"]
    assert secret.read_text().count("the secret") == 1
    assert not any("the secret" in p.read_text() for p in (root / "outbox/swap").iterdir())


def test_a_fifo_swapped_in_between_scan_and_claim_is_not_waited_on(root: Path) -> None:
    claimer, scanner = claimer_for(root)
    drop = root / "inbox/echo/fifo.jsonl"
    manifest = root / "inbox/echo/fifo.manifest.json"
    write_jsonl(drop, [chat_line(0)])
    manifest.write_text('{"priority": 1}')
    scanner.scan()
    [found] = scanner.scan()
    manifest.unlink()
    os.mkfifo(manifest)
    done = threading.Event()
    threading.Thread(target=lambda: (claimer.claim(found), done.set()), daemon=True).start()
    assert done.wait(10), "the claim waited on a FIFO"
    batch = batch_json(root, "fifo")
    assert batch["status"] == "failed" and "not a regular file" in json.dumps(batch["errors"])


def test_a_crash_between_the_cross_filesystem_copy_and_the_removal_makes_one_job(root: Path) -> None:
    inbox = root / "inbox"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(inbox)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        write_jsonl(inbox / "echo/x.jsonl", [chat_line(i) for i in range(10)])
        crashed = subprocess.run(
            [sys.executable, "-m", "dropbox_runner", "run", "--once", "--root", str(root)],
            env={**os.environ, "DROPBOX_RUNNER_CRASH_AT": "after_copy"},
            capture_output=True,
            timeout=60,
        )
        assert crashed.returncode == 137
        assert (inbox / "echo/x.jsonl").exists(), "the crash came after the copy, before the removal"
        proc = run_once(root, timeout=60)
        assert "its copy was taken before a crash" in proc.stderr
        assert [p.name for p in (root / "outbox").iterdir()] == ["x"]
        assert not (inbox / "echo/x.jsonl").exists()
        assert len(read_jsonl(root / "outbox/x/echo.jsonl")) == 10
    finally:
        subprocess.run(["umount", "-l", str(inbox)], capture_output=True)


def test_staged_writes_never_follow_a_planted_symlink_and_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    victim = tmp_path / "victim"
    victim.write_text("untouched")
    tokens = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens))
    (tmp_path / f".out.jsonl.{os.getpid()}.aaaa.tmp").symlink_to(victim)
    with staged(tmp_path / "out.jsonl") as f:
        f.write(b"data\n")
    assert victim.read_text() == "untouched"
    assert (tmp_path / "out.jsonl").read_bytes() == b"data\n"
    monkeypatch.setattr(secrets, "token_hex", lambda n: "cccc")
    with pytest.raises(RuntimeError), staged(tmp_path / "other.jsonl") as f:
        f.write(b"half")
        raise RuntimeError("the writer failed")
    assert not (tmp_path / "other.jsonl").exists()
    assert not list(tmp_path.glob(".other*")), "the staging file is cleaned up"


# -- dedupe -----------------------------------------------------------------------------------------
def test_dedupe_runs_again_when_defaults_or_the_model_entry_change(root: Path) -> None:
    lines = [chat_line(i, text="one two three four five six") for i in range(3)]
    write_jsonl(root / "inbox/echo/d.jsonl", lines)
    run_once(root)
    (root / "inbox/echo/d.manifest.json").write_text('{"defaults": {"max_tokens": 2}}')
    write_jsonl(root / "inbox/echo/d.jsonl", lines)
    proc = run_once(root)
    assert "byte-identical" not in proc.stderr
    short = read_jsonl(root / "outbox/d.2/echo.jsonl")[0]["response"]["body"]["usage"]["completion_tokens"]
    assert short == 2
    models_yaml(root, replace={"  echo: {engine: echo}": "  echo: {engine: echo, defaults: {max_tokens: 3}}"})
    write_jsonl(root / "inbox/echo/d.jsonl", lines)
    proc = run_once(root)
    assert "byte-identical" not in proc.stderr
    assert (
        read_jsonl(root / "outbox/d.3/echo.jsonl")[0]["response"]["body"]["usage"]["completion_tokens"] == 3
    )
    write_jsonl(root / "inbox/echo/d.jsonl", lines)
    proc = run_once(root)
    assert "byte-identical" in proc.stderr


def test_dedupe_copies_results_so_a_retry_of_the_source_leaves_the_copy_alone(root: Path) -> None:
    lines = [chat_line(i) for i in range(6)] + ['{"custom_id": "bad", "url": 5}']
    write_jsonl(root / "inbox/echo/src.jsonl", lines)
    run_once(root)
    write_jsonl(root / "inbox/echo/twin.jsonl", lines)
    proc = run_once(root)
    assert "byte-identical" in proc.stderr
    twin_dir = next(
        p
        for p in (root / "state/archive").iterdir()
        if json.loads((p / "spec.json").read_text())["name"] == "twin"
    )
    twin_log = (twin_dir / "echo.log").read_bytes()
    src_id = batch_json(root, "src")["id"]
    assert (
        os.stat(twin_dir / "echo.log").st_ino != os.stat(root / "state/archive" / src_id / "echo.log").st_ino
    )
    retry = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "retry", "src", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert retry.returncode == 0, retry.stderr
    run_once(root)
    assert (twin_dir / "echo.log").read_bytes() == twin_log
    assert len(read_jsonl(root / "outbox/twin/echo.jsonl")) == 7


# -- the pipe, the scan, the lock -------------------------------------------------------------------
def test_progress_events_never_block_a_commit_when_the_daemon_does_not_read(tmp_path: Path) -> None:
    from dropbox_runner import protocol as p
    from dropbox_runner.engine.worker import Channel

    read_fd, write_fd = os.pipe()
    channel = Channel(write_fd)
    t0 = time.monotonic()
    for i in range(200_000):  # far more than a pipe holds
        channel.offer(p.Progress(i, 0, i, 1.0, 2.0))
    assert time.monotonic() - t0 < 30
    first = os.read(read_fd, 1 << 16).split(b"\n")[0]
    assert isinstance(p.decode(first, p.EVENTS), p.Progress)
    os.close(read_fd)
    os.close(write_fd)


def test_the_inbox_is_rescanned_every_rescan_seconds_not_every_quarter_second() -> None:
    assert not scan_due(changed=False, busy_intake=False, since_last=5.0, rescan_seconds=30)
    assert scan_due(changed=False, busy_intake=False, since_last=30.0, rescan_seconds=30)
    assert scan_due(changed=True, busy_intake=False, since_last=0.0, rescan_seconds=30)
    assert scan_due(changed=False, busy_intake=True, since_last=0.3, rescan_seconds=30)


def test_a_status_lock_probe_does_not_make_a_starting_daemon_refuse(root: Path) -> None:
    layout = Layout(root)
    layout.state.mkdir(exist_ok=True)
    layout.lock.touch()
    fd = os.open(layout.lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what `status` does for an instant
    threading.Timer(0.15, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))).start()
    lock = acquire_root(layout)
    lock.release()


def test_status_reads_a_job_that_is_archived_while_it_reads(root: Path) -> None:
    from dropbox_runner.queue import catalog

    write_jsonl(root / "inbox/echo/moving.jsonl", [chat_line(0)])
    run_once(root)
    job_id = batch_json(root, "moving")["id"]
    layout = Layout(root)
    real = layout.job_dir
    calls = []

    def job_dir_then_archive(j: str) -> Path:  # the first look finds it live, then it is gone
        calls.append(j)
        return layout.jobs / j if len(calls) == 1 else real(j)

    object.__setattr__(layout, "job_dir", job_dir_then_archive)
    job = catalog.read_job(layout, job_id)
    assert job is not None and job.spec["name"] == "moving" and len(calls) == 2


# -- configuration ----------------------------------------------------------------------------------
def test_a_model_that_cannot_run_here_fails_its_drops_with_the_reason_and_the_rest_runs(root: Path) -> None:
    add_models(root, "  missing: {path: package:no_such_package_here/model}\n")
    write_jsonl(root / "inbox/missing/m.jsonl", [chat_line(0)])
    write_jsonl(root / "inbox/echo/e.jsonl", [chat_line(0)])
    proc = run_once(root, timeout=60)
    assert "model missing cannot run here" in proc.stderr
    assert batch_json(root, "e")["status"] == "completed"
    batch = batch_json(root, "m")
    assert batch["status"] == "failed" and "cannot be resolved" in batch["models"]["missing"]["error"]
    out = read_jsonl(root / "outbox/m/missing.jsonl")
    assert "cannot be resolved" in out[0]["error"]["message"]


@pytest.mark.skipif(os.environ.get("DROPBOX_RUNNER_SKIP_VENV_TEST") == "1", reason="asked to skip")
def test_init_and_run_with_the_base_install_only(tmp_path: Path) -> None:
    """No vLLM, no test extra: init writes the shipped models.yaml and the daemon runs the echo model."""
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "-q",
            "--no-build-isolation",
            "-c",
            str(repo / "constraints.txt"),
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0 and "setuptools" in pip.stderr:
        pip = subprocess.run(
            [str(venv / "bin/pip"), "install", "-q", "-c", str(repo / "constraints.txt"), str(repo)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import vllm"], capture_output=True)
    assert probe.returncode != 0, "the base install must not bring vLLM"
    site = tmp_path / "site"
    site.mkdir()
    exe = str(venv / "bin/dropbox-runner")
    env = {
        k: v for k, v in os.environ.items() if k not in ("DROPBOX_RUNNER_ROOT", "PYTHONPATH", "VIRTUAL_ENV")
    }
    init = subprocess.run(
        [exe, "init", "--root", str(site)], capture_output=True, text=True, env=env, timeout=60
    )
    assert init.returncode == 0, init.stderr
    check = subprocess.run(
        [exe, "models", "--check", "--root", str(site)], capture_output=True, text=True, env=env
    )
    assert check.returncode == 1 and "vLLM is not installed" in check.stdout
    write_jsonl(site / "inbox/echo/hello.jsonl", [chat_line(0)])
    write_jsonl(
        site / "inbox/minilm/embed.jsonl",
        [{"custom_id": "e", "url": "/v1/embeddings", "body": {"input": "x"}}],
    )
    run = subprocess.run(
        [exe, "run", "--once", "--settle", "0.1", "--root", str(site)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((site / "outbox/hello/batch.json").read_text())["status"] == "completed"
    embed = json.loads((site / "outbox/embed/batch.json").read_text())
    assert embed["status"] == "failed" and "vLLM is not installed" in embed["models"]["minilm"]["error"]


def test_disk_errors_are_told_apart_from_bugs() -> None:
    from dropbox_runner.errors import is_environmental

    assert is_environmental(OSError(errno.ENOSPC, "full"))
    assert not is_environmental(OSError(errno.EACCES, "denied"))
    assert not is_environmental(RuntimeError("bug"))

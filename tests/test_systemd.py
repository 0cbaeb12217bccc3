"""Under systemd: the unit `service` prints, and the notify protocol spoken to a real datagram socket
standing in for systemd (READY after the inbox is watched, STATUS, watchdog pings that stop when the
loop hangs, STOPPING on SIGTERM)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dropbox_runner.cli import main
from dropbox_runner.daemon.systemd import WORST_BLOCK_SECONDS, watchdog_seconds

from helpers import chat_line, write_jsonl


def test_service_prints_a_notify_unit_with_a_watchdog_for_the_root(root: Path) -> None:
    result = CliRunner().invoke(main, ["service", "--root", str(root), "--user", "batch"])
    assert result.exit_code == 0, result.output
    unit = result.output
    fields = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert fields["Type"] == "notify" and fields["KillMode"] == "mixed" and fields["Restart"] == "on-failure"
    assert fields["WatchdogSec"] == str(3 * WORST_BLOCK_SECONDS) and fields["User"] == "batch"
    exe, *args = fields["ExecStart"].split(" ")
    assert os.path.isabs(exe) and os.access(exe, os.X_OK), exe
    assert args == ["run", "--root", str(root.resolve())]
    assert fields["WorkingDirectory"] == str(root.resolve())
    if shutil.which("systemd-analyze"):
        (root / "dropbox-runner.service").write_text(unit)
        check = subprocess.run(["systemd-analyze", "verify", str(root / "dropbox-runner.service")], text=True)
        assert check.returncode == 0


def test_service_refuses_a_folder_that_is_no_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["service", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "dropbox-runner init" in result.output


def test_an_inbox_on_another_filesystem_lengthens_the_watchdog(root: Path) -> None:
    # A folder on a filesystem other than the root's (the root itself may be on /dev/shm: conftest)
    others = [p for p in map(Path, ("/dev/shm", "/var/tmp", "/tmp")) if p.is_dir()]
    other = next((p for p in others if os.stat(p).st_dev != os.stat(root).st_dev), None)
    if other is None:
        pytest.skip("no second filesystem here")
    elsewhere = Path(other / f"inbox-{secrets.token_hex(4)}")
    elsewhere.mkdir()
    try:
        same, _ = watchdog_seconds([root / "inbox"], root / "state", 10 * 2**30)
        far, why = watchdog_seconds([root / "inbox", elsewhere], root / "state", 10 * 2**30)
    finally:
        elsewhere.rmdir()
    assert same == 3 * WORST_BLOCK_SECONDS
    assert far > 3 * 10 * 10 and "another filesystem" in why  # 10 GiB at over 10 s a GiB, times 3


class FakeSystemd:
    """An abstract-namespace datagram socket, as systemd's $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"dropbox-runner-test-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.seen: list[str] = []

    def next(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.seen.append(message)
        return message

    def wait(self, field: str, timeout: float = 60) -> str:
        """The next message holding `field` (a whole line, or a line starting with it if it ends in =)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            lines = message.split("\n") if message is not None else []
            if any(x == field or (field.endswith("=") and x.startswith(field)) for x in lines):
                return message
        raise AssertionError(f"no {field} within {timeout}s; saw {self.seen[-5:]}")

    def quiet(self, field: str, seconds: float) -> bool:
        """True if no message holding `field` arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is not None and field in message.split("\n"):
                return False
        return True


def test_the_daemon_speaks_the_notify_protocol_and_stops_pinging_when_its_loop_hangs(
    root: Path, tmp_path: Path, daemon
) -> None:
    systemd = FakeSystemd()
    gate = tmp_path / "hang"
    env = {
        "NOTIFY_SOCKET": "@" + systemd.name,
        "WATCHDOG_USEC": "400000",
        "DROPBOX_RUNNER_HANG_WHILE": str(gate),
    }
    daemon = daemon(root, env=env)
    try:
        ready = systemd.wait("READY=1")
        assert systemd.seen[0] == ready, "nothing comes before READY"
        assert "watching " in daemon.output(), "READY is sent once the inbox is watched"
        assert f"MAINPID={daemon.proc.pid}" in ready.split("\n")
        for _ in range(3):
            systemd.wait("WATCHDOG=1", timeout=30)
        write_jsonl(root / "inbox/paced/long.jsonl", [chat_line(i) for i in range(20000)])
        status = systemd.wait("STATUS=", timeout=60)
        while "paced, running batch_" not in status:
            status = systemd.wait("STATUS=", timeout=60)
        assert status.endswith("; 0 tasks queued"), status  # the running task is not counted as queued

        gate.touch()  # the loop blocks at its next turn
        drained = time.monotonic() + 30
        while not systemd.quiet("WATCHDOG=1", 1.5):  # pings already on their way drain first
            assert time.monotonic() < drained, "the pings never stopped"
        assert systemd.quiet("WATCHDOG=1", 3.0), "a hung loop sends no ping"
        gate.unlink()
        systemd.wait("WATCHDOG=1", timeout=30)
        assert "the loop was blocked" in daemon.output()

        daemon.proc.send_signal(signal.SIGTERM)
        systemd.wait("STOPPING=1", timeout=30)
        assert daemon.proc.wait(timeout=60) == 0
    finally:
        gate.unlink(missing_ok=True)
        if daemon.alive():
            daemon.kill()
        systemd.sock.close()


def test_a_socket_path_works_and_a_watchdog_meant_for_another_pid_is_ignored() -> None:
    import tempfile

    from dropbox_runner.daemon.systemd import Notifier

    folder = tempfile.mkdtemp(prefix="drn-", dir="/tmp")  # short: a socket path is at most 107 bytes
    try:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}).ready("up")
            assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=up"]
            other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
            other.alive()
            mine = Notifier(
                {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
            )
            mine.alive()
            assert sock.recv(4096) == b"WATCHDOG=1"  # the first ping is `mine`'s: `other` sent none
            Notifier({}).ready("nobody listens")  # no $NOTIFY_SOCKET: nothing happens
    finally:
        shutil.rmtree(folder)

"""Running under systemd: the unit `dropbox-runner service` prints, and sd_notify's datagram protocol
(READY=1, STATUS=, WATCHDOG=1, STOPPING=1) spoken to $NOTIFY_SOCKET without any library.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dropbox_runner.daemon.systemd")

# The longest the daemon's loop is known to block (ending a model: about 25 s, issue 25); systemd
# ends a service that pings less often than WatchdogSec, and we ping from the loop, so WatchdogSec
# is three times that block (the contract: no step blocks longer than a third of it).
WORST_BLOCK_SECONDS = 30
# Taking a drop whose inbox is on another filesystem than state/ copies, fsyncs and verifies it on
# the loop: 10.3 s for 1 GiB measured (2 cores, ext4 from tmpfs, 2026-12-01); 12 s a GiB allowed.
COPY_SECONDS_PER_GIB = 12
HANG_GATE_ENV = "DROPBOX_RUNNER_HANG_WHILE"  # test hook: the loop blocks while this file exists


class Notifier:
    """Talks to systemd if $NOTIFY_SOCKET is set; every method is a no-op otherwise.

    A failed send is logged once and never stops the daemon: supervision is systemd's job, not ours.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # "@": abstract
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.ping_every = int(usec) / 1e6 / 4 if enabled else None  # systemd advises half; a quarter
        self.watchdog_seconds = int(usec) / 1e6 if enabled else None
        self.last_ping = self.last_turn = 0.0
        self.last_status: str | None = None
        self.failed = self.stopped = False
        self.gate = env.get(HANG_GATE_ENV)

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self.failed:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
            self.failed = True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, make_text: Callable[[], str]) -> None:
        """STATUS= when it changed; the text is made only when someone listens."""
        if self.sock is None:
            return
        text = make_text()
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def alive(self) -> None:
        """Called once per turn of the main loop: a watchdog ping when one is due."""
        now = time.monotonic()
        if self.watchdog_seconds and self.last_turn and now - self.last_turn > self.watchdog_seconds / 3:
            log.warning(
                "the loop was blocked %.1f s, over a third of the watchdog's %.0f s",
                now - self.last_turn,
                self.watchdog_seconds,
            )
        self.last_turn = now
        if self.gate:
            while os.path.exists(self.gate):  # a loop that hangs, on purpose, for the tests
                time.sleep(0.05)
        if self.ping_every is not None and now - self.last_ping >= self.ping_every:
            self.last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.send("STOPPING=1", "STATUS=stopping")


def status_line(describe: dict, queue: Path) -> str:
    """STATUS= text: the loaded model, what runs, and the queue."""
    entries = sum(1 for name in os.listdir(queue) if not name.startswith("."))
    running = describe.get("running") or []  # the tasks the model process holds (section 12)
    queue_length = max(0, entries - len(running))  # a running task keeps its queue entry
    model = describe.get("loaded_model") or (
        f"loading {describe['loading_model']}" if describe.get("loading_model") else "no model loaded"
    )
    jobs = ", ".join(r["job_id"] for r in running[:3]) + (", ..." if len(running) > 3 else "")
    doing = f", running {jobs}" if len(running) == 1 else f", running {len(running)} tasks ({jobs})"
    doing = doing if running else ""
    return f"{model}{doing}; {queue_length} task{'s' if queue_length != 1 else ''} queued"


def executable() -> str:
    """The `dropbox-runner` of this venv, by its absolute path (not resolved: a venv's python is a link)."""
    script = Path(os.path.abspath(sys.executable)).parent / "dropbox-runner"
    if script.exists():
        return systemd_arg(str(script))
    return f"{systemd_arg(os.path.abspath(sys.executable))} -m dropbox_runner"


def watchdog_seconds(inbox_folders: list[Path], state: Path, max_file_bytes: int) -> tuple[int, str]:
    """WatchdogSec for a root, three times the longest block of the loop, and what that block is."""
    devices = {os.stat(p).st_dev for p in inbox_folders if p.is_dir()}
    if devices <= {os.stat(state).st_dev}:
        return 3 * WORST_BLOCK_SECONDS, f"about {WORST_BLOCK_SECONDS} s, ending a model"
    copy = int(max_file_bytes / 2**30 * COPY_SECONDS_PER_GIB) + 1
    block = max(WORST_BLOCK_SECONDS, copy)
    return (
        3 * block,
        f"{block} s: the inbox is on another filesystem than state/, so taking a drop of max_file_bytes copies it",
    )


def systemd_arg(text: str) -> str:
    """One word of ExecStart= (systemd's own quoting; % is its specifier character)."""
    text = text.replace("%", "%%").replace("$", "$$")
    if any(c in text for c in " \"\\'\t"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_text(
    root: Path, *, watchdog: tuple[int, str], user: str | None = None, stop_seconds: int = 120
) -> str:
    """A systemd service unit for the daemon of `root`."""
    root, path = root.resolve(), str(root.resolve()).replace("%", "%%")
    who = f"User={user}\n" if user else ""
    seconds, block = watchdog
    return f"""# dropbox-runner for {root}: save as /etc/systemd/system/dropbox-runner.service (or
# ~/.config/systemd/user/ without User=), then: systemctl daemon-reload && systemctl enable --now dropbox-runner
[Unit]
Description=dropbox-runner batch daemon for {path}
After=network-online.target
Wants=network-online.target
RequiresMountsFor={path}

[Service]
Type=notify
NotifyAccess=main
{who}WorkingDirectory={path}
ExecStart={executable()} run --root {systemd_arg(str(root))}
Environment=PYTHONUNBUFFERED=1
# The loop pings from every turn; WatchdogSec is three times its longest block ({block})
WatchdogSec={seconds}
# A first SIGTERM to the daemon alone (it commits and ends its model process), SIGKILL to all after
KillMode=mixed
TimeoutStopSec={stop_seconds}
# Loading models happens after READY; starting is recovery and the first scan
TimeoutStartSec=300
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""

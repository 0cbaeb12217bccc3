"""The daemon's handle on one model process: start it, send commands, read its events, end it.

Never imports vLLM: the model lives in `python -m dropbox_runner.engine.worker`, in its own process
group so that ending it ends every process vLLM started.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from dropbox_runner import protocol as p
from dropbox_runner.config import ModelConfig, is_embedded_path, resolve_model_path
from dropbox_runner.layout import Layout

log = logging.getLogger("dropbox_runner.slot.supervisor")


def start_message(layout: Layout, name: str, config: ModelConfig, event_fd: int) -> p.Start:
    """What a model process (or a Ray copy) needs to load `name`."""
    return p.Start(
        event_fd=event_fd,
        model=name,
        engine=config.engine.value,
        task=config.task.value,
        path=resolve_model_path(layout.root, config),
        engine_args=config.engine_args,
        feed_order=config.feed_order,
        adapters=config.lora_adapters,
        build=Path(config.path).name if config.path and is_embedded_path(layout.root, config.path) else None,
    )


class ModelProcess:
    """One model process. It owns what it reports: loaded, capacity, load time, the hunts' parts running."""

    def __init__(
        self, layout: Layout, name: str, config: ModelConfig, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.loaded = False
        self.load_seconds: float | None = None
        self.capacity = 0
        self.trials: dict[str, list[int]] = {}  # task id -> the part of its culprit hunt running alone
        self.engine_preemptions: int | None = None  # vLLM's own (KV cache full), from Progress events
        self.started_at = time.monotonic()
        self.last_event_at = self.started_at
        read_fd, write_fd = os.pipe()
        env = {**os.environ, **(env or {})}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        with open(layout.engine_log, "ab") as engine_log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dropbox_runner.engine.worker"],
                stdin=subprocess.PIPE,
                stdout=engine_log,
                stderr=engine_log,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=env,
                cwd=layout.root,
            )
        os.close(write_fd)
        self._events = os.fdopen(read_fd, "rb", buffering=0)
        self._buffer = bytearray()
        self._newline = False  # the buffer holds a complete event
        self.send(start_message(layout, name, config, write_fd))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        """The events pipe, for select()."""
        return self._events.fileno()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, command: p.Message) -> bool:
        try:
            self.proc.stdin.write(command.encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _read(self, timeout: float) -> bool | None:
        """Add what the pipe holds within `timeout` to the buffer: True if data, False if none, None at EOF."""
        try:
            ready, _, _ = select.select([self._events], [], [], timeout)
        except ValueError:  # closed
            return None
        if not ready:
            return False
        chunk = os.read(self._events.fileno(), 1 << 16)
        if not chunk:
            return None
        self._buffer += chunk
        self._newline = self._newline or b"\n" in chunk
        return True

    def _complete_events(self) -> list[p.Message]:
        if not self._newline:  # a long event arrives in many reads: split it once, when whole
            return []
        end = self._buffer.rfind(b"\n")
        lines = bytes(self._buffer[:end]).split(b"\n")
        del self._buffer[: end + 1]
        self._newline = False
        events = []
        for line in lines:
            if not line:
                continue
            try:
                ev = p.decode(line, p.EVENTS)
            except p.ProtocolError as exc:
                log.error("model process %d: %s", self.pid, exc)
                continue
            self._note(ev)
            events.append(ev)
        if lines:
            self.last_event_at = time.monotonic()
        return events

    def _note(self, ev: p.Message) -> None:
        if isinstance(ev, p.Loaded):
            self.loaded, self.load_seconds, self.capacity = True, ev.load_seconds, ev.capacity
        elif isinstance(ev, p.Progress) and ev.engine_preemptions is not None:
            self.engine_preemptions = ev.engine_preemptions
        elif isinstance(ev, p.Running) and ev.index is not None:
            self.trials[ev.task_id] = [ev.index, ev.index if ev.last is None else ev.last]
        elif isinstance(ev, (p.Running, p.TaskDone)):
            self.trials.pop(ev.task_id, None)

    def events(self, timeout: float) -> list[p.Message]:
        """Events that arrived within `timeout` seconds (none at EOF: check `alive`)."""
        if self._read(timeout) is None:
            self.proc.wait()
        return self._complete_events()

    def drain(self) -> list[p.Message]:
        """Every event still in the pipe of a process that has ended (it may have written just before)."""
        while self._read(0.5):
            pass
        return self._complete_events()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_event_at

    def trouble(self, settings, busy: bool) -> str | None:
        """Why this process (or copy) must be treated as dead, or None: it exited, it did not load
        within load_timeout_seconds, or it said nothing for stall_timeout_seconds while `busy`."""
        return trouble(self, settings, busy)

    def describe(self) -> dict:
        """For the status snapshot."""
        return {
            "model_pid": self.pid,
            "model_rss_mb": round(group_rss_bytes(self.pid) / 2**20, 1),
            "engine_preemptions": self.engine_preemptions,  # vLLM's own (its KV cache full)
        }

    def exit_description(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def end(self, timeout: float) -> float:
        """Ask, then terminate, then kill the whole group; returns when every process of it is gone."""
        t0 = time.monotonic()
        if self.alive():
            self.send(p.Stop())
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait()
        self._signal_group(signal.SIGKILL)  # vLLM's engine processes, if any outlived the worker
        self._wait_group_gone()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._events.close()
        if self.engine_preemptions is not None:
            log.info(
                "%s (pid %d): the engine preempted %d requests", self.name, self.pid, self.engine_preemptions
            )
        return time.monotonic() - t0

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and group_members(self.proc.pid):
            time.sleep(0.05)


def trouble(proc, settings, busy: bool) -> str | None:
    """The one supervision check of a model process or a Ray copy (see `ModelProcess.trouble`)."""
    if not proc.alive():
        return proc.exit_description()
    if not proc.loaded and proc.silent_for() > settings.load_timeout_seconds:
        log.error("%s did not load within load_timeout_seconds; ending it", proc.name)
        return f"did not load in {settings.load_timeout_seconds:g}s"
    if busy and proc.loaded and proc.silent_for() > settings.stall_timeout_seconds:
        log.error(
            "no result from %s for %.0fs with requests in flight; ending it", proc.name, proc.silent_for()
        )
        return f"hung (no result for {settings.stall_timeout_seconds:g}s)"
    return None


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process of a group (the model process and vLLM's engine processes)."""
    total = 0
    for pid in group_members(pgid):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def group_members(pgid: int) -> list[int]:
    """Pids still alive in a process group (zombies excluded), read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members

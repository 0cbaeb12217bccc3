"""Copies of a model as Ray actors (`executor: ray`): the same engine and feeding code as the local
model process, driven through the same shard protocol (see pool.py and shards.py). Imported only when a model
asks for Ray.

The daemon is the Ray driver: actors are not detached, so they end with it; with `ray_address:
local` the Ray instance is its own (loopback only) and ends with it too; its files (sessions,
logs, spilled objects, the actors' shard files) live under `state/ray` where the socket paths allow
(docs/replicas.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from dropbox_runner import protocol as p
from dropbox_runner.config import ModelConfig
from dropbox_runner.layout import Layout
from dropbox_runner.slot.supervisor import start_message, trouble

log = logging.getLogger("dropbox_runner.daemon")


def ensure_ray(address: str, state: Path | None = None) -> None:
    """Start (local, its files under `state`) or join (auto, host:port) Ray once per daemon."""
    if ray.is_initialized():
        return
    t0 = time.monotonic()
    options: dict[str, Any] = {
        "log_to_driver": False,
        "configure_logging": False,
        "include_dashboard": False,
        "namespace": "dropbox_runner",
    }
    options.pop("include_dashboard")
    if address == "local":
        address = _start_private_ray(state)
    elif ":" in address:  # host:port: say at once if nothing listens there (ray.init would retry long)
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"nothing answers at {address}: {exc}") from None
    ray.init(address=address, **options)
    log.info("Ray ready (%s) in %.1fs: %s", address, time.monotonic() - t0, ray.cluster_resources())


_lifeline: subprocess.Popen | None = None
_shards: str | None = None  # where the private head's actors stage their shards' lines
# What Ray adds to its temp folder (`<ours>/t`) for its longest socket path (a pid of up to 7
# digits), and AF_UNIX's limit on such a path (108 bytes with the NUL): Ray refuses to start past it.
SOCKET_TAIL = len("/t/session_2026-12-01_11-34-10_123456_4194304/sockets/plasma_store.99")
SOCKET_PATH_MAX = 107


def ray_folder(state: Path | None) -> Path:
    """The private head's folder: `state/ray` when Ray's socket paths fit under it, else a short
    folder of this root's own in /tmp (a fresh one if someone else made that name first). It is
    this user's, mode 0700: Ray makes its temp folder `t` inside it open to all (0777), this keeps
    other users out. Only one daemon runs per root, so what an earlier one left is removed."""
    if state is not None and len(os.fsencode(state / "ray")) + SOCKET_TAIL <= SOCKET_PATH_MAX:
        folder = state / "ray"
    else:
        digest = hashlib.blake2b(os.fsencode(state or ""), digest_size=5).hexdigest()
        folder = Path("/tmp") / f"dropbox-runner-ray-{os.getuid()}-{digest}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            folder = Path(tempfile.mkdtemp(prefix="drr-ray-", dir="/tmp"))
    for old in folder.iterdir():  # the sessions of earlier daemons of this root: all ended
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return folder


def _start_private_ray(state: Path | None) -> str:
    """A Ray head of this daemon's own, in a process group that ends when the daemon does."""
    global _lifeline, _shards
    # Loopback only and owned by this daemon: no token (Ray would keep one in ~/.ray, outside the root).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    folder = ray_folder(state)
    (folder / "shards").mkdir()
    _shards = str(folder / "shards")
    _lifeline = subprocess.Popen(
        [sys.executable, "-m", "dropbox_runner.slot.copies.lifeline", str(folder / "t")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    line = _lifeline.stdout.readline().decode().strip()
    if not line:
        raise ConnectionError("the private Ray instance did not start (see the daemon's log)")
    return line


def stop() -> None:
    """End the private Ray instance, if this daemon started one."""
    if ray.is_initialized():
        ray.shutdown()
    if _lifeline is not None:
        _lifeline.stdin.close()
        _lifeline.wait(timeout=30)
    if _shards is not None:  # state/ray keeps Ray's logs until the next start; a folder in /tmp goes whole
        folder = Path(_shards).parent
        shutil.rmtree(folder if folder.name != "ray" else _shards, ignore_errors=True)


class _Outbox:
    """The actor's side of the pipe: commands wait here for its feeding loop, events until the daemon
    polls. A shard's lines sent by the daemon live in a file of this host until the shard ends."""

    def __init__(self) -> None:
        self.events: deque[bytes] = deque()
        self.commands: queue.Queue[p.Message] = queue.Queue()
        self.logs: set = set()
        self.files: dict[str, str] = {}  # shard id -> its lines' file

    def send(self, event: p.Message) -> None:
        if isinstance(event, p.TaskDone) and event.task_id in self.files:
            os.unlink(self.files.pop(event.task_id))
        self.events.append(event.encode())

    offer = send

    def die(self) -> None:
        os._exit(1)


class CopyActor:
    """One copy of a model in a Ray worker process: one feeding loop for every shard it holds."""

    def __init__(self, start: dict[str, Any]) -> None:
        from dropbox_runner.engine.feeding import Worker
        from dropbox_runner.engine.worker import make_engine

        t0 = time.time()
        self.engine = make_engine(p.Start(**start))
        self.load_seconds = round(time.time() - t0, 3)
        self.outbox = _Outbox()
        worker = Worker(self.engine, self.outbox, self.outbox, None)
        threading.Thread(target=worker.serve, name="feeding", daemon=True).start()

    def ready(self) -> list:
        return [self.load_seconds, self.engine.capacity, os.getpid()]

    def command(self, line: bytes, lines: bytes | None = None, folder: str | None = None) -> None:
        cmd = p.decode(line, p.COMMANDS)
        if isinstance(cmd, p.Run) and lines is not None:  # the shard's lines: read from a file of this host,
            # under the private head's folder (the root), else this host's temp folder
            folder = folder if folder and os.path.isdir(folder) else None
            with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False, dir=folder) as f:
                f.write(lines)
            order = cmd.task
            self.outbox.files[order.task_id] = f.name
            order.input, order.shard_at = f.name, [0, order.shard_at[1], order.shard_at[2]]
        self.outbox.commands.put(cmd)

    def poll(self) -> list[bytes]:
        events = list(self.outbox.events)
        for _ in events:
            self.outbox.events.popleft()
        return events


class RayCopy:
    """The daemon's handle on one actor, with the interface of `ModelProcess` that pool.py uses."""

    def __init__(self, layout: Layout, name: str, config: ModelConfig) -> None:
        self.name = name
        self.loaded = False
        self.load_seconds: float | None = None
        self.pid = 0
        self.started_at = self.last_event_at = time.monotonic()
        self._dead: str | None = None
        start = asdict(start_message(layout, name, config, event_fd=-1))
        gpus = 1 if config.engine.value == "vllm" and ray.cluster_resources().get("GPU") else 0
        actor_cls = ray.remote(num_cpus=0.25, num_gpus=gpus, max_restarts=0)(CopyActor)
        self.actor = actor_cls.remote(start)
        self._ready = self.actor.ready.remote()
        self._poll: Any = None

    def alive(self) -> bool:
        return self._dead is None

    def exit_description(self) -> str:
        return self._dead or "still running"

    def silent_for(self) -> float:
        return time.monotonic() - self.last_event_at

    def trouble(self, settings, busy: bool) -> str | None:
        return trouble(self, settings, busy)

    def fileno(self) -> int:
        raise OSError("a Ray copy has no pipe: wait on refs()")

    def send(self, command: p.Message) -> bool:
        self.actor.command.remote(command.encode())
        return True

    def send_with_lines(self, command: p.Run, lines: bytes) -> bool:
        self.actor.command.remote(command.encode(), lines, _shards)
        return True

    def refs(self) -> list:
        """What the daemon waits on: the load, or the next poll of events."""
        if self._dead is not None:
            return []
        if not self.loaded:
            return [self._ready]
        if self._poll is None:
            self._poll = self.actor.poll.remote()
        return [self._poll]

    def events(self, timeout: float = 0) -> list[p.Message]:
        refs = self.refs()
        if not refs:
            return []
        done, _ = ray.wait(refs, timeout=timeout)
        if not done:
            return []
        try:
            value = ray.get(done[0])
        except RayActorError as exc:
            self._dead = f"lost its Ray actor ({type(exc).__name__})"
            return []
        except RayError as exc:
            self._dead = f"failed in Ray ({exc})"[:300]
            return []
        if not self.loaded or value:  # an empty poll is no sign of life: a hung copy answers those too
            self.last_event_at = time.monotonic()
        if not self.loaded:
            self.loaded, self.load_seconds, self.pid = True, value[0], value[2]
            return [p.Loaded(load_seconds=value[0], capacity=value[1])]
        self._poll = None
        return [p.decode(line, p.EVENTS) for line in value]

    def drain(self) -> list[p.Message]:
        return []

    def end(self, timeout: float = 0) -> float:
        t0 = time.monotonic()
        try:
            ray.kill(self.actor, no_restart=True)
        except RayError:
            pass
        self._dead = self._dead or "ended"
        return time.monotonic() - t0


def wait_any(copies: list[RayCopy], timeout: float) -> None:
    """Block until some copy has something to say, or `timeout` seconds."""
    refs = [r for c in copies for r in c.refs()]
    if refs:
        ray.wait(refs, num_returns=1, timeout=timeout)
    else:
        time.sleep(timeout)

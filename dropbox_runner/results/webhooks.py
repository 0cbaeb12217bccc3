"""Webhooks: `batch.completed|failed|expired|cancelled` events, signed as Standard Webhooks sign,
delivered at least once from a journal under state/webhooks/.

`announce` (called where a job ends) writes one file per event; the daemon's sender posts it to
every configured receiver, each from its own worker (a broken or hung receiver delays only itself),
retries with exponential backoff on the monotonic clock, survives restarts (the files stay until
every receiver answered 2xx) and gives up after `webhook_retry_hours` of backoff with a line in the
log. The loop and the commits never wait for it. docs/http-edge.md has the decisions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from dropbox_runner.fsutil import read_json_or_none, write_json
from dropbox_runner.layout import Layout

log = logging.getLogger("dropbox_runner.results.webhooks")

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
MAX_BACKOFF_SECONDS = 3600.0
STOP_WAIT_SECONDS = 2.0
POST_TIMEOUT_SECONDS = 10.0  # the whole attempt: connect, send, and the answer's status and headers


def folder(layout: Layout) -> Path:
    return layout.webhooks


def announce(
    layout: Layout, batch: dict[str, Any], generation: int = 0, hooks: list[Any] | None = None
) -> None:
    """Journal the event of a job that ended (`batch` is its final batch.json document).

    Called before that document is written: its id comes from the job, its final status and
    `generation` (how often it was retried), so announcing again after a crash writes the same
    event once. Nothing is journaled when no receiver takes this type (`hooks`: the configured
    receivers; None reads them from models.yaml).
    """
    kind = f"batch.{batch['status']}"
    if kind not in EVENT_TYPES or not _wanted(layout, kind, hooks):
        return
    digest = hashlib.blake2b(f"{batch['id']}/{kind}/{generation}".encode(), digest_size=12).hexdigest()
    event_id = f"evt_{digest}"
    path = layout.webhook_event(event_id)
    if path.exists():  # journaled before a crash: its delivery state stays as it is
        return
    event = {
        "object": "event",
        "id": event_id,
        "type": kind,
        "created_at": int(time.time()),
        "data": {
            "id": batch["id"],
            "name": batch["output_folder"],
            "status": batch["status"],
            "request_counts": batch["request_counts"],
        },
    }
    folder(layout).mkdir(exist_ok=True)
    write_json(path, {"event": event, "deliveries": {}})


def _wanted(layout: Layout, kind: str, hooks: list[Any] | None) -> bool:
    """Whether some receiver takes events of this type."""
    if hooks is None:
        from dropbox_runner.config import load_registry
        from dropbox_runner.errors import ConfigError

        try:
            hooks = load_registry(layout.root).settings.webhooks
        except ConfigError:  # settings unreadable now: journal it rather than lose it
            return True
    return any(kind in hook.events for hook in hooks)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(mac).decode()}"


def entry_keys(hooks: list[Any]) -> list[str]:
    """The key of each configured entry in an event's `deliveries`: a digest of its url, secret and
    events, and its rank among equal entries (two entries with one URL keep apart states)."""
    seen: Counter[str] = Counter()
    keys = []
    for hook in hooks:
        digest = hashlib.blake2b(
            orjson.dumps([hook.url, hook.secret, sorted(hook.events)]), digest_size=8
        ).hexdigest()
        keys.append(f"{digest}.{seen[digest]}")
        seen[digest] += 1
    return keys


def redacted(url: str) -> str:
    """What the log says of a receiver: scheme, host and port. Paths and queries often hold tokens."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    return f"{parts.scheme}://{host}{port}/..."


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST once and return the answer's status. Redirects are not followed (a 3xx is an answer like
    any other); a watchdog ends the whole attempt after `timeout`, however slowly the receiver talks."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=timeout)
    watchdog = threading.Timer(timeout, _abort, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(
            "POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers
        )
        return connection.getresponse().status
    finally:
        watchdog.cancel()
        connection.close()


def _abort(connection: http.client.HTTPConnection) -> None:
    if connection.sock is not None:
        with suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)


def _well_formed(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("event"), dict)
        and isinstance(record["event"].get("type"), str)
        and isinstance(record["event"].get("id"), str)
        and isinstance(record.get("deliveries"), dict)
    )


class Sender:
    """Delivers journaled events: a dispatcher thread hands each due (event, receiver) pair to that
    receiver's own worker thread. `stop` waits for them for STOP_WAIT_SECONDS at most.

    The journal is rewritten only when a delivery's state changes (an attempt, giving up); when the
    next attempt is due is kept in memory on the monotonic clock, and in the file as Unix seconds
    (`next_at`) for the next start.
    """

    def __init__(self, layout: Layout, hooks: list[Any], retry_hours: float, interval: float = 1.0) -> None:
        self.layout, self.hooks, self.keys = layout, list(hooks), entry_keys(list(hooks))
        self.retry_seconds, self.interval = retry_hours * 3600, interval
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one read-modify-write of a journal file at a time
        self._due: dict[str, dict[int, float]] = {}  # file name: receiver: monotonic time of its next try
        self._busy: set[tuple[str, int]] = set()  # handed to a worker, not yet recorded
        self._bad: set[str] = set()  # files that are not events: left alone, logged once
        self._queues: list[queue.Queue[str | None]] = [queue.Queue() for _ in self.hooks]
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"webhook-{i}", daemon=True)
            for i in range(len(self.hooks))
        ]

    def start(self) -> None:
        self._thread.start()
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        for q in self._queues:
            q.put(None)
        # a post still in flight is left to its daemon thread: unrecorded, it is sent again next time
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for thread in (self._thread, *self._workers):
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.deliver_due()
            except Exception:  # a dispatcher that dies delivers nothing: log and go on
                log.exception("webhook dispatch failed")

    # -- the dispatcher ----------------------------------------------------------------------------
    def deliver_due(self) -> None:
        """One pass over the journal: every due (event, receiver) goes to the receiver's queue."""
        directory = folder(self.layout)
        try:
            names = sorted(n for n in os.listdir(directory) if n.startswith("evt_") and n.endswith(".json"))
        except FileNotFoundError:
            return
        with self._lock:
            self._due = {name: self._due[name] for name in names if name in self._due}
        now = time.monotonic()
        for name in names:
            if self._stop.is_set():
                return
            with self._lock:
                waiting = bool(self._due.get(name)) and min(self._due[name].values()) > now
            if name in self._bad or waiting:  # nothing due: the file need not even be read
                continue
            for i in self._plan(directory / name, now):
                self._busy.add((name, i))
                self._queues[i].put(name)

    def _plan(self, path: Path, now: float) -> list[int]:
        """The receivers due for the event at `path`; gives up on the ones out of time and removes the
        event once no receiver is left."""
        with self._lock:
            record = read_json_or_none(path)
            if record is None:
                return []
            if not _well_formed(record):
                self._bad.add(path.name)
                log.error("%s is not a webhook event; left in place", path)
                return []
            due, changed, wall = [], False, time.time()
            for i in self._receivers(record):
                state = record["deliveries"].get(self.keys[i]) or {}
                if state.get("waited", 0) >= self.retry_seconds:
                    state["done"] = "gave_up"
                    record["deliveries"][self.keys[i]] = state
                    self._due.get(path.name, {}).pop(i, None)
                    changed = True
                    log.error(
                        "gave up on %s of %s to webhooks[%d] %s after %d attempts",
                        record["event"]["id"],
                        record["event"]["type"],
                        i,
                        redacted(self.hooks[i].url),
                        state.get("attempts", 0),
                    )
                    continue
                known = self._due.setdefault(path.name, {})
                if i not in known:  # first seen since the start: the file's time, bounded
                    wait = min(max(0.0, float(state.get("next_at", 0)) - wall), MAX_BACKOFF_SECONDS)
                    known[i] = now + wait
                if known[i] <= now and (path.name, i) not in self._busy:
                    due.append(i)
            if not due and not any((path.name, i) in self._busy for i in range(len(self.hooks))):
                self._save(path, record, changed)
            elif changed:
                write_json(path, record)
            return due

    def _receivers(self, record: dict[str, Any]) -> list[int]:
        """The receivers that want this event and have not had it (or been given up on)."""
        return [
            i
            for i, hook in enumerate(self.hooks)
            if record["event"]["type"] in hook.events
            and not (record["deliveries"].get(self.keys[i]) or {}).get("done")
        ]

    def _save(self, path: Path, record: dict[str, Any], changed: bool) -> None:
        """Remove the event once every receiver is done, else write it if it changed (under the lock)."""
        if not self._receivers(record):
            path.unlink(missing_ok=True)
            self._due.pop(path.name, None)
        elif changed:
            write_json(path, record)

    # -- the workers -------------------------------------------------------------------------------
    def _work(self, i: int) -> None:
        while (name := self._queues[i].get()) is not None:
            try:
                self._attempt(i, folder(self.layout) / name)
            except Exception:  # a worker that dies delivers nothing more to its receiver
                log.exception("webhook delivery to webhooks[%d] failed", i)
            finally:
                self._busy.discard((name, i))

    def _attempt(self, i: int, path: Path) -> None:
        """One POST of the event at `path` to receiver `i`, then its state recorded."""
        record = read_json_or_none(path)
        if not _well_formed(record):
            return
        hook, event = self.hooks[i], record["event"]
        failure = self._post(hook, event)
        with self._lock:
            record = read_json_or_none(path)
            if not _well_formed(record):
                return
            state = record["deliveries"].setdefault(self.keys[i], {"attempts": 0, "done": False})
            state["attempts"] = state.get("attempts", 0) + 1
            if failure is None:
                state["done"] = True
                self._due.get(path.name, {}).pop(i, None)
                log.info(
                    "delivered %s (%s) to webhooks[%d] %s", event["id"], event["type"], i, redacted(hook.url)
                )
            else:
                delay = min(2.0 ** state["attempts"], MAX_BACKOFF_SECONDS)
                state["next_at"] = round(time.time() + delay, 3)
                state["waited"] = state.get("waited", 0) + delay
                self._due.setdefault(path.name, {})[i] = time.monotonic() + delay
                log.warning(
                    "webhook %s to webhooks[%d] %s failed (attempt %d, next in %d s): %s",
                    event["id"],
                    i,
                    redacted(hook.url),
                    state["attempts"],
                    delay,
                    failure,
                )
            self._save(path, record, changed=True)

    def _post(self, hook: Any, event: dict[str, Any]) -> str | None:
        """None on a 2xx answer, else why not (never the URL: it may hold a token)."""
        body = orjson.dumps(event)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(hook.secret, event["id"], timestamp, body),
        }
        try:
            status = post(hook.url, body, headers, POST_TIMEOUT_SECONDS)
        except Exception as exc:  # refused, timed out, not HTTP, a bad URL: all a failed attempt
            parts = urlsplit(hook.url)
            why = f"{type(exc).__name__}: {exc}"[:300]
            for secret in (hook.url, parts.path, parts.query):
                why = why.replace(secret, "...") if secret else why
            return why
        return None if 200 <= status < 300 else f"HTTP {status}"

"""Webhooks: `batch.completed|failed|expired|cancelled` events, signed as Standard Webhooks sign,
delivered at least once from a journal under state/webhooks/.

`announce` (called where a job ends) writes one file per event; the daemon's sender thread posts it
to every configured URL, retries with exponential backoff, survives restarts (the files stay until
every URL answered 2xx) and gives up after `webhook_retry_hours` with a line in the log. The loop
and the commits never wait for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from dropbox_runner.fsutil import read_json_or_none, write_json
from dropbox_runner.layout import Layout

log = logging.getLogger("dropbox_runner.webhooks")

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
MAX_BACKOFF_SECONDS = 3600.0
POST_TIMEOUT_SECONDS = 10.0


def folder(layout: Layout) -> Path:
    return layout.state / "webhooks"


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
    path = folder(layout) / f"{event_id}.json"
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


def hook_key(url: str) -> str:
    return hashlib.blake2b(url.encode(), digest_size=8).hexdigest()


class Sender:
    """The thread that delivers journaled events; `stop` ends it between two posts."""

    def __init__(self, layout: Layout, hooks: list[Any], retry_hours: float, interval: float = 1.0) -> None:
        self.layout, self.hooks, self.retry_seconds, self.interval = (
            layout,
            hooks,
            retry_hours * 3600,
            interval,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=POST_TIMEOUT_SECONDS + 2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.deliver_due()
            except Exception:  # a sender that dies delivers nothing: log and go on
                log.exception("webhook delivery failed")

    def deliver_due(self) -> None:
        for path in sorted(folder(self.layout).glob("evt_*.json")):
            if self._stop.is_set():
                return
            record = read_json_or_none(path)
            if not isinstance(record, dict):
                continue
            if self._deliver(record):
                path.unlink(missing_ok=True)
            else:
                write_json(path, record)

    def _deliver(self, record: dict[str, Any]) -> bool:
        """Try every URL that is due; True once no URL is left to try."""
        event, deliveries = record["event"], record["deliveries"]
        now = time.time()
        pending = False
        for hook in self.hooks:
            if event["type"] not in hook.events:
                continue
            state = deliveries.setdefault(hook_key(hook.url), {"attempts": 0, "next_at": 0, "done": False})
            if state["done"]:
                continue
            if now - event["created_at"] > self.retry_seconds:
                log.error(
                    "gave up on %s of %s to %s after %d attempts",
                    event["id"],
                    event["type"],
                    hook.url,
                    state["attempts"],
                )
                state["done"] = "gave_up"
                continue
            if now < state["next_at"]:
                pending = True
                continue
            state["attempts"] += 1
            if self._post(hook, event):
                state["done"] = True
                log.info("delivered %s (%s) to %s", event["id"], event["type"], hook.url)
            else:
                state["next_at"] = now + min(2 ** state["attempts"], MAX_BACKOFF_SECONDS)
                pending = True
        return not pending

    def _post(self, hook: Any, event: dict[str, Any]) -> bool:
        body = orjson.dumps(event)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(hook.secret, event["id"], timestamp, body),
        }
        request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT_SECONDS) as answer:
                return 200 <= answer.status < 300
        except OSError as exc:  # refused, timed out, or an HTTP error status
            log.warning("webhook %s to %s failed: %s", event["id"], hook.url, exc)
            return False

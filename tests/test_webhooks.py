"""Webhook delivery against hostile and broken receivers: each receiver is on its own, every attempt
is recorded with its backoff, the journal is written only when a delivery's state changes."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import types
from pathlib import Path

import pytest

from dropbox_runner.config import Webhook
from dropbox_runner.layout import Layout
from dropbox_runner.results import webhooks

from helpers import wait_for
from servers import SECRET, Receiver

OTHER_SECRET = "whsec_" + __import__("base64").b64encode(b"another secret, thirty-two bytes").decode()


class RawReceiver:
    """A TCP server on 127.0.0.1 that reads a request, then answers `reply` (or nothing, if None) and
    holds the connection until the client closes it; `open` counts connections not yet closed."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply, self.open, self.seen = reply, 0, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        self.open += 1
        self.seen += 1
        try:
            conn.recv(65536)
            if self.reply is not None:
                conn.sendall(self.reply)
            while conn.recv(65536):  # until the client closes its end
                pass
        except OSError:
            pass
        finally:
            self.open -= 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def announce_one(root: Path, status: str = "completed") -> Path:
    layout = Layout(root)
    layout.state.mkdir(parents=True, exist_ok=True)
    webhooks.announce(
        layout,
        {
            "id": "job_1",
            "status": status,
            "output_folder": "x",
            "request_counts": {"total": 1, "completed": 1, "failed": 0},
        },
        hooks=[Webhook(url="http://127.0.0.1:9/any", secret=SECRET)],  # some receiver takes it: journaled
    )
    return next((root / "state/webhooks").glob("evt_*.json"))


def record(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def started():
    senders: list[webhooks.Sender] = []

    def start(root: Path, hooks: list[Webhook], interval: float = 0.05) -> webhooks.Sender:
        sender = webhooks.Sender(Layout(root), hooks, 24, interval=interval)
        senders.append(sender)
        sender.start()
        return sender

    yield start
    for sender in senders:
        sender.stop()


def test_a_receiver_that_answers_garbage_does_not_stop_a_healthy_one(root: Path, started, caplog) -> None:
    garbage, healthy = RawReceiver(b"HELLO, I AM NOT HTTP\r\n\r\n"), Receiver()
    caplog.set_level(logging.INFO, logger="dropbox_runner.results.webhooks")
    try:
        path = announce_one(root)
        started(root, [Webhook(url=garbage.url, secret=SECRET), Webhook(url=healthy.url, secret=SECRET)])
        wait_for(lambda: healthy.got, timeout=30, what="the healthy receiver's event")
        wait_for(lambda: garbage.seen >= 1 and path.exists(), timeout=30, what="the garbage attempt")
        states = wait_for(
            lambda: [s for s in record(path)["deliveries"].values() if not s["done"] and s["attempts"]],
            timeout=30,
            what="the garbage attempt recorded",
        )
        assert states[0]["attempts"] == 1 and states[0]["next_at"] > time.time(), "recorded with a backoff"
        assert not [r for r in caplog.records if r.exc_info], (
            "a bad answer is a failed attempt, not a traceback"
        )
    finally:
        garbage.close()
        healthy.close()


def test_a_hung_receiver_does_not_hold_up_another(root: Path, started) -> None:
    hung, healthy = RawReceiver(None), Receiver()
    try:
        announce_one(root)
        started(root, [Webhook(url=hung.url, secret=SECRET), Webhook(url=healthy.url, secret=SECRET)])
        wait_for(lambda: hung.open, timeout=30, what="the hung receiver's connection")
        wait_for(lambda: healthy.got, timeout=30, what="the healthy receiver's event")
        assert hung.open, "the healthy receiver got its event while the hung one still held its attempt"
    finally:
        hung.close()
        healthy.close()


def test_undelivered_events_are_written_only_when_their_state_changes(root: Path, monkeypatch) -> None:
    down = Receiver()
    down.up = False
    writes: list[Path] = []
    real = webhooks.write_json
    path = announce_one(root)
    monkeypatch.setattr(webhooks, "write_json", lambda p, obj, **kw: (writes.append(p), real(p, obj, **kw)))
    sender = webhooks.Sender(Layout(root), [Webhook(url=down.url, secret=SECRET)], 24, interval=0.01)
    passes = []
    real_pass = sender.deliver_due
    sender.deliver_due = lambda: (passes.append(1), real_pass())
    sender.start()
    try:
        wait_for(lambda: len(passes) > 50, timeout=60, what="fifty passes")
    finally:
        sender.stop()
        down.close()
    attempts = sum(s["attempts"] for s in record(path)["deliveries"].values())
    assert attempts >= 1
    assert len([p for p in writes if p == path]) == attempts, "one write per attempt, none per pass"


def test_two_entries_with_one_url_each_get_the_event_signed_with_their_own_secret(
    root: Path, started
) -> None:
    from standardwebhooks.webhooks import Webhook as Verifier

    receiver = Receiver()
    try:
        path = announce_one(root)
        started(
            root, [Webhook(url=receiver.url, secret=SECRET), Webhook(url=receiver.url, secret=OTHER_SECRET)]
        )
        wait_for(lambda: len(receiver.got) >= 2, timeout=30, what="two deliveries")
        wait_for(lambda: not path.exists(), timeout=30, what="the event to leave the journal")
    finally:
        receiver.close()
    assert len(receiver.got) == 2
    verified = []
    for headers, body in receiver.got:
        for secret in (SECRET, OTHER_SECRET):
            try:
                Verifier(secret).verify(body, headers)
                verified.append(secret)
            except Exception:
                pass
    assert sorted(verified) == sorted([SECRET, OTHER_SECRET])


def test_failure_lines_name_the_receiver_without_its_query_or_path(root: Path, started, caplog) -> None:
    down = Receiver()
    down.up = False
    caplog.set_level(logging.INFO, logger="dropbox_runner.results.webhooks")
    try:
        path = announce_one(root)
        url = down.url.replace("/hook", "/hook/T0KEN-IN-PATH?token=S3CRET-IN-QUERY")
        started(root, [Webhook(url=url, secret=SECRET)])
        wait_for(lambda: any(s["attempts"] for s in record(path)["deliveries"].values()), what="an attempt")
        wait_for(lambda: "failed" in caplog.text, what="the failure line")
    finally:
        down.close()
    assert "S3CRET-IN-QUERY" not in caplog.text and "T0KEN-IN-PATH" not in caplog.text
    assert f"127.0.0.1:{down.server.server_port}" in caplog.text


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(root: Path, started) -> None:
    elsewhere = Receiver()
    redirect = RawReceiver(
        f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url}\r\nContent-Length: 0\r\n\r\n".encode()
    )
    seen: list[str] = []
    import http.server

    class Any(http.server.BaseHTTPRequestHandler):  # records any method the redirect may turn into
        def do_GET(self) -> None:  # noqa: N802
            seen.append("GET")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    elsewhere.server.RequestHandlerClass = Any
    try:
        path = announce_one(root)
        started(root, [Webhook(url=redirect.url, secret=SECRET)])
        wait_for(lambda: any(s["attempts"] for s in record(path)["deliveries"].values()), what="an attempt")
    finally:
        redirect.close()
        elsewhere.close()
    state = next(iter(record(path)["deliveries"].values()))
    assert state["done"] is False and state["attempts"] >= 1
    assert seen == [] and elsewhere.got == [], "the redirect's target got nothing"


def test_backoff_is_measured_on_a_monotonic_clock(root: Path, started, monkeypatch) -> None:
    receiver = Receiver()
    receiver.up = False
    try:
        path = announce_one(root)
        started(root, [Webhook(url=receiver.url, secret=SECRET)])
        wait_for(lambda: any(s["attempts"] for s in record(path)["deliveries"].values()), what="an attempt")
        # the wall clock jumps an hour back; the next attempt is still due two seconds after the first
        jumped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        jumped.time = lambda: time.time() - 3600
        jumped.time_ns = lambda: time.time_ns() - 3600 * 10**9
        monkeypatch.setattr(webhooks, "time", jumped)
        receiver.up = True
        wait_for(lambda: receiver.got, timeout=30, what="the retry after the jump")
    finally:
        receiver.close()


def test_a_receiver_down_past_the_retry_window_is_given_up_with_a_line_in_the_log(root: Path, caplog) -> None:
    down = Receiver()
    down.up = False
    caplog.set_level(logging.INFO, logger="dropbox_runner.results.webhooks")
    path = announce_one(root)
    sender = webhooks.Sender(Layout(root), [Webhook(url=down.url, secret=SECRET)], 1 / 3600, interval=0.05)
    sender.start()  # one hour-second of backoff: the first failure's 2 s wait exhausts it
    try:
        wait_for(lambda: not path.exists(), timeout=30, what="the event given up")
    finally:
        sender.stop()
        down.close()
    assert "gave up on" in caplog.text and "after 1 attempts" in caplog.text

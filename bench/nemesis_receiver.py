"""The nemesis's webhook receiver (Standard Webhooks, on 127.0.0.1) that flaps between answering,
failing, refusing connections and answering garbage; `bench/nemesis.py` drives it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"nemesis-secret-0123456789abcdef").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """Standard Webhooks receiver on 127.0.0.1: `mode` is ok, error (500), down (refuses) or garbage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.events: dict[str, dict] = {}  # event id -> event, once answered 2xx with a good signature
        self.bad_signatures = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._listen()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        s.settimeout(0.2)
        self._sock = s

    def set_mode(self, mode: str) -> None:
        with self._lock:
            if mode == "down" and self._sock is not None:
                self._sock.close()
                self._sock = None
            elif mode != "down" and self._sock is None:
                self._listen()
            self.mode = mode

    def _serve(self) -> None:
        while True:
            with self._lock:
                sock = self._sock
            if sock is None:
                time.sleep(0.1)
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(
                line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line
            )
            headers = {k.lower(): v for k, v in headers.items()}
            length = int(headers.get("content-length", 0))
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            mode = self.mode
            if mode == "garbage":
                conn.sendall(b"this is not HTTP\r\n\r\n")
                return
            if mode == "error":
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                return
            if self._signed(headers, body):
                event = json.loads(body)
                self.events[event["id"]] = event
            else:
                self.bad_signatures += 1
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    @staticmethod
    def _signed(headers: dict[str, str], body: bytes) -> bool:
        key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
        msg = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
        want = "v1," + base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()
        return hmac.compare_digest(want, headers.get("webhook-signature", ""))

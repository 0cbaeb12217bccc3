"""HTTP the tests stand up: the API server (`dropbox-runner serve`, a subprocess), its official
client, and a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from helpers import wait_for

SECRET = "whsec_" + __import__("base64").b64encode(b"a secret of thirty-two bytes!!!!").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.log = open(root / "serve.test.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dropbox_runner",
                "serve",
                "--root",
                str(root),
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, **(env or {})},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_up(self) -> None:
        def up() -> bool:
            try:
                return urllib.request.urlopen(self.url + "/healthz", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, what="the HTTP server")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)


def client(server: Server, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def wait_batch(c, batch_id: str, statuses=("completed", "failed", "cancelled")):
    return wait_for(lambda: (b := c.batches.retrieve(batch_id)).status in statuses and b, what=batch_id)


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it gets; `up` decides whether it answers 2xx."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, bytes]] = []
        self.up = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.up:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204 if outer.up else 503)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

"""The HTTP edge against a hostile browser and client: Host and Origin, the key, streamed uploads,
and what /healthz and /api/status read per request."""

from __future__ import annotations

import errno
import fcntl
import http.client
import json
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropbox_runner.layout import Layout, daemon_running
from dropbox_runner.status import view as status

from helpers import chat_line, models_yaml, wait_for
from servers import Server

BOUNDARY = "b0undary"


@pytest.fixture
def serve(root: Path):
    servers: list[Server] = []

    def start(settings: str = "", env: dict | None = None) -> Server:
        models_yaml(root, replace={"settings:\n": f"settings:\n{settings}"})
        server = Server(root, env=env)
        servers.append(server)
        server.wait_up()
        return server

    yield start
    for server in servers:
        server.stop()


def ask(server: Server, method: str, path: str, headers: dict, body: bytes | None = None):
    """One request with exactly these headers (`Host` included); values may be bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def test_only_the_hosts_the_server_serves_are_answered(serve) -> None:
    server = serve()
    port = server.port
    hostile = ("rebind.attacker.example", f"rebind.attacker.example:{port}", "127.0.0.1.attacker.example")
    for host in (*hostile, "[", "127.0.0.1:x", "user@127.0.0.1", ""):
        code, _, body = ask(server, "GET", "/api/status", {"Host": host})
        assert code == 400 and json.loads(body)["error"]["code"] == "host_not_allowed", host
    assert ask(server, "GET", "/healthz", {"Host": "rebind.attacker.example"})[0] == 400
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert ask(server, "GET", "/api/status", {"Host": host})[0] == 200, host


def test_settings_allowed_hosts_adds_the_names_a_proxy_or_a_dns_name_brings(serve) -> None:
    server = serve("  allowed_hosts: [batch.example.org]\n")
    assert ask(server, "GET", "/api/status", {"Host": f"BATCH.example.org:{server.port}"})[0] == 200
    assert ask(server, "GET", "/api/status", {"Host": "batch.example.org"})[0] == 200
    assert ask(server, "GET", "/api/status", {"Host": "other.example.org"})[0] == 400


def test_a_state_change_from_another_origin_is_refused_and_one_without_origin_passes(serve) -> None:
    server = serve()
    own = {"Host": f"127.0.0.1:{server.port}"}
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port}", "http://127.0.0.1:1"):
        code, _, body = ask(server, "POST", "/api/jobs/nope/cancel", {**own, "Origin": origin}, b"")
        assert code == 403 and json.loads(body)["error"]["code"] == "cross_origin", origin
    assert ask(server, "POST", "/v1/files", {**own, "Origin": "http://evil.example"}, b"")[0] == 403
    assert ask(server, "POST", "/api/jobs/nope/cancel", own, b"")[0] == 404  # curl, the CLI, an SDK
    same = {**own, "Origin": f"http://127.0.0.1:{server.port}"}
    assert ask(server, "POST", "/api/jobs/nope/cancel", same, b"")[0] == 404  # the page itself
    assert ask(server, "GET", "/api/status", {**own, "Origin": "http://evil.example"})[0] == 200


def test_a_key_that_is_not_ascii_is_a_401_not_a_500(serve) -> None:
    server = serve(env={"DROPBOX_RUNNER_API_KEY": "sekrit"})
    own = {"Host": f"127.0.0.1:{server.port}"}
    for headers in (
        {"Authorization": "Bearer sékrit".encode()},
        {"Authorization": b"Bearer \xff\xfe"},
        {"Cookie": "dropbox_runner_key=sékrit".encode()},
    ):
        code, _, body = ask(server, "GET", "/v1/files", {**own, **headers})
        assert code == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", headers
    bad_host = {"Host": "rebind.attacker.example", "Authorization": "Bearer sekrit"}
    assert ask(server, "GET", "/v1/files", bad_host)[0] == 400, "a key does not make a host served"
    assert ask(server, "GET", "/v1/files", {**own, "Authorization": "Bearer sekrit"})[0] == 200


def test_the_page_trades_the_key_in_its_url_for_a_cookie_and_a_clean_url(serve) -> None:
    server = serve(env={"DROPBOX_RUNNER_API_KEY": "sekrit"})
    own = {"Host": f"127.0.0.1:{server.port}"}
    code, headers, _ = ask(server, "GET", "/?key=sekrit", own)
    assert code == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie == "dropbox_runner_key=sekrit" and "httponly" in headers["set-cookie"].lower()
    assert ask(server, "GET", "/", {**own, "Cookie": cookie})[0] == 200
    assert ask(server, "GET", "/?key=wrong", own)[0] == 401


# -- uploads ---------------------------------------------------------------------------------------
def form_head(fields: dict[str, bytes], filename: str = "in.jsonl") -> bytes:
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
        for k, v in fields.items()
    )
    file_head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    )
    return parts + file_head.encode()


FORM_END = f"\r\n--{BOUNDARY}--\r\n".encode()


class ChunkedUpload:
    """A POST /v1/files sent by hand with chunked transfer encoding, one chunk at a time."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )

    def send(self, data: bytes) -> None:
        self.sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def finish(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")

    def answer(self) -> tuple[int, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:  # bounded by the socket's timeout
            got = self.sock.recv(65536)
            if not got:
                break
            data += got
        return int(data.split(b" ", 2)[1]), data

    def close(self) -> None:
        self.sock.close()


def test_a_chunked_upload_past_the_limit_is_refused_while_it_streams(serve) -> None:
    server = serve("  max_upload_bytes: 2000\n")
    upload = ChunkedUpload(server)
    try:
        upload.send(form_head({"purpose": b"batch"}))
        for _ in range(8):
            try:
                upload.send(b"x" * 8192)
            except OSError:  # the server answered and closed while we were still sending
                break
        code, _ = upload.answer()  # the body is not finished: only a streaming limit answers now
    finally:
        upload.close()
    assert code == 413
    assert list((server_root(server) / "state/api/files").iterdir()) == [], "nothing kept, not even staged"


def server_root(server: Server) -> Path:
    return Path(server.log.name).parent


def test_a_large_form_field_that_is_not_the_file_is_refused(serve) -> None:
    server = serve()
    body = form_head({"purpose": b"batch", "junk": b"j" * (100 * 1024)}) + json.dumps(chat_line(0)).encode()
    headers = {
        "Host": f"127.0.0.1:{server.port}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    code, _, answer = ask(server, "POST", "/v1/files", headers, body + FORM_END)
    assert code == 413 and b"65536 bytes" in answer
    small = form_head({"purpose": b"batch", "note": b"n" * 1000}) + json.dumps(chat_line(0)).encode()
    code, _, answer = ask(server, "POST", "/v1/files", headers, small + FORM_END)
    assert code == 200 and json.loads(answer)["bytes"] == len(json.dumps(chat_line(0)))
    wrong = form_head({"purpose": b"fine-tune"}) + b"{}"
    assert ask(server, "POST", "/v1/files", headers, wrong + FORM_END)[0] == 400


def open_paths(pid: int) -> list[str]:
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return paths


def test_an_upload_is_staged_under_the_root_never_the_system_temp_folder(serve, tmp_path: Path) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    server = serve(env={"TMPDIR": str(system_tmp)})
    files = server_root(server) / "state/api/files"
    line = json.dumps(chat_line(0)).encode() + b"\n"
    upload = ChunkedUpload(server)
    try:
        upload.send(form_head({"purpose": b"batch"}))
        for _ in range(3 * 1024 * 1024 // (64 * len(line)) + 1):  # 3 MB, past any in-memory spool
            upload.send(line * 64)
        held = wait_for(
            lambda: [p for p in open_paths(server.proc.pid) if str(system_tmp) in p or str(files) in p],
            timeout=30,
            what="the upload's open file",
        )
        assert all(p.startswith(str(files)) for p in held), held
        upload.send(line + FORM_END)
        upload.finish()
        code, data = upload.answer()
    finally:
        upload.close()
    assert code == 200, data
    assert not list(system_tmp.iterdir())


def test_first_models_caps_every_read_at_the_daemon_s_line_limit(tmp_path: Path, monkeypatch) -> None:
    import tracemalloc

    from dropbox_runner.api.batches import first_models
    from dropbox_runner.lines import parse as lines

    monkeypatch.setattr(lines, "MAX_LINE_BYTES", 1024 * 1024)  # the cap, made small for the test
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"body": {"model": "huge", "x": "' + b"x" * (20 * 1024 * 1024) + b'"}}\n')
        f.write(json.dumps({**chat_line(0), "body": {"model": "echo"}}).encode() + b"\n")
    tracemalloc.start()
    try:
        assert first_models(path) == {"echo"}, "the over-long line is skipped, as the daemon skips it"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, "never the whole 20 MB line"


# -- what status reads -----------------------------------------------------------------------------
def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("rchar:"))


def test_the_daemon_s_last_words_come_from_the_end_of_its_log(root: Path) -> None:
    layout = Layout(root)
    with open(layout.log, "w") as f:
        for i in range(200_000):
            f.write(f"2026-12-01 08:00:00 INFO line {i} of a long log\n")
        f.write("2026-12-01 08:00:01 ERROR the last words\n")
    assert layout.log.stat().st_size > 9_000_000
    before = bytes_read()
    state = status.daemon_state(layout)
    assert state["running"] is False and state["last_words"].endswith("ERROR the last words")
    assert bytes_read() - before < 1024 * 1024


def test_the_lock_probe_works_where_flock_refuses_an_exclusive_lock_on_a_read_only_file(
    root: Path, monkeypatch
) -> None:
    real = fcntl.flock

    def nfs_flock(fd: int, operation: int) -> None:
        """NFS emulates flock with fcntl locks: an exclusive one needs a descriptor open for writing."""
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    layout = Layout(root)
    layout.lock.write_text("")
    assert status.daemon_state(layout)["running"] is False
    holder = os.open(layout.lock, os.O_RDWR)
    try:
        real(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the daemon holds it
        assert status.daemon_state(layout)["running"] is True
    finally:
        os.close(holder)
    assert daemon_running(layout) is False


def test_api_status_sends_only_the_history_points_a_page_has_not_seen(serve, root: Path) -> None:
    points = [{"t": 1000.0 + i, "models": {"echo": {"requests": i, "tokens": 3 * i}}} for i in range(6)]
    loads = [{"model": "echo", "start": 999.0, "end": 1000.5}]
    (root / "state/history.json").write_text(json.dumps({"points": points, "loads": loads, "swaps": []}))
    server = serve()
    own = {"Host": f"127.0.0.1:{server.port}"}

    def history(query: str) -> dict:
        code, _, body = ask(server, "GET", f"/api/status{query}", own)
        assert code == 200
        return json.loads(body)["history"]

    whole = history("")
    assert whole["full"] is True and whole["points"] == points
    newer = history("?since=1003.0")
    assert newer["full"] is False and newer["points"] == points[4:] and newer["loads"] == loads
    assert history("?since=1005.0")["points"] == []
    again = history("?since=5000")  # newer than every point: the history began again
    assert again["full"] is True and again["points"] == points


# -- total functions -------------------------------------------------------------------------------
class CountingStore:
    """store.save_upload's contract: consume the chunks, ValueError past the limit."""

    def save_upload(self, chunks, filename, purpose, limit):
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ValueError("too large")
        return {"bytes": size, "filename": filename}


form_pieces = st.lists(
    st.sampled_from(
        [
            form_head({"purpose": b"batch"}),
            form_head({}),
            form_head({"purpose": b"x" * 70000}),
            b'{"custom_id": "a"}\n',
            FORM_END,
            f"--{BOUNDARY}\r\n".encode(),
            b"\r\n",
        ]
    )
    | st.binary(max_size=40),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    form_pieces,
    st.sampled_from([f"multipart/form-data; boundary={BOUNDARY}", "text/plain", "", "multipart/form-data"]),
)
def test_any_upload_body_is_saved_or_refused_with_a_4xx(pieces: list[bytes], content_type: str) -> None:
    from dropbox_runner.api.uploads import Form, UploadRefused

    try:
        saved = Form(content_type, 100).save(iter(pieces), CountingStore())
    except UploadRefused as exc:
        assert 400 <= exc.status < 500
    else:
        assert saved["bytes"] <= 100


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40) | st.none())
def test_any_host_and_origin_are_judged_without_an_exception(host: str, origin: str | None) -> None:
    from dropbox_runner.api.edge import Edge, same_origin, split_host

    edge = Edge(None, api_key=None, allowed_hosts=["batch.example.org"])
    assert isinstance(edge.serves(host, ("127.0.0.1", 4080)), bool)
    assert split_host(host) is None or isinstance(split_host(host)[0], str)
    if origin is not None:
        assert isinstance(same_origin(origin, host), bool)

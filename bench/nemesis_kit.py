"""The nemesis's parts: the jobs it drops, its hostile drops, the API client, and the process and
memory probes (the flapping webhook receiver is in `nemesis_receiver`). `bench/nemesis.py` drives them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nemesis_receiver import WEBHOOK_SECRET

# One echo model per pace; `rep` runs on two copies. The reference run uses the same names with no
# delay and one copy: the contract says the files are the same.
MODELS = {
    "e1": {"delay_ms": 20, "max_in_flight": 8},
    "e2": {"delay_ms": 10, "max_in_flight": 16},
    "e3": {"delay_ms": 40, "max_in_flight": 8},
    "rep": {"delay_ms": 20, "max_in_flight": 8, "replicas": 2},
}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def models_yaml(webhook_url: str | None, reference: bool = False) -> str:
    settings = [
        "  settle_seconds: 0.2",
        "  rescan_seconds: 2",
        "  commit_interval_ms: 50",
        "  manifest_grace_seconds: 1",
    ]
    if webhook_url:
        settings.append(f"  webhooks: [{{url: '{webhook_url}', secret: '{WEBHOOK_SECRET}'}}]")
    models = []
    for name, args in MODELS.items():
        replicas = 1 if reference else args.get("replicas", 1)
        delay = 0 if reference else args["delay_ms"]
        models.append(
            f"  {name}: {{engine: echo, replicas: {replicas}, "
            f"engine_args: {{delay_ms: {delay}, max_in_flight: {args['max_in_flight']}}}}}"
        )
    return "settings:\n" + "\n".join(settings) + "\nmodels:\n" + "\n".join(models) + "\n"


@dataclass
class Job:
    """A drop whose results must equal the reference run's: every line is tagged with the job."""

    tag: str
    kind: str  # folder | manifest | api
    models: list[str]
    lines: list[str]
    name: bytes  # the file name as dropped (bytes: names need not be UTF-8)
    batch_ids: list[str] = field(default_factory=list)  # the API's batch ids (api jobs)

    def data(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def make_lines(rng: random.Random, tag: str, count: int, chat_only: bool = False) -> list[str]:
    lines = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if chat_only or rng.random() < 0.5:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1 + i % 7}
            url = "/v1/chat/completions"
        else:
            body, url = {"prompt": text, "max_tokens": 1 + i % 5}, "/v1/completions"
        lines.append(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": url, "body": body}))
    if count > 10 and rng.random() < 0.3:  # a bad line and a duplicate id fail in place
        lines[rng.randrange(count)] = "{not json"
        lines[rng.randrange(count)] = json.dumps(
            {"custom_id": f"{tag}-0", "url": "/v1/completions", "body": {}}
        )
    return lines


def fat_lines(tag: str, count: int = 3000, id_bytes: int = 16384) -> list[str]:
    """Lines sharing one long custom_id: all but the first fail in place as duplicates."""
    line = {"custom_id": f"{tag}-" + "i" * id_bytes, "url": "/v1/completions", "body": {"prompt": "x"}}
    return [json.dumps(line)] * count


def hostile_name(rng: random.Random, tag: str) -> bytes:
    """A long name (up to 255 bytes) or one that is not UTF-8, with the tag kept readable."""
    if rng.random() < 0.6:  # 248-255 bytes: its sidecar's name would pass NAME_MAX
        size = rng.randint(248, 255) if rng.random() < 0.6 else rng.randint(100, 247)
        return f"{tag}-".encode() + b"n" * (size - len(tag) - 7) + b".jsonl"
    return f"{tag}-caf".encode() + bytes([0xE9, 0xFF]) + b"-\xc3(.jsonl"


class DiskFull(Exception):
    """The nemesis could not write into the root: the disk is full (nothing of the write is left)."""


def put_files(files: list[tuple[bytes, bytes]]) -> None:
    """Write each (path, data) under a hidden name in its folder, then rename them in order, as
    `submit` does; on a full disk remove what was staged and raise DiskFull."""
    staged = []
    try:
        for path, data in files:
            folder, _, name = path.rpartition(b"/")
            tmp = folder + b"/.nemesis-" + hashlib.blake2b(name, digest_size=6).hexdigest().encode() + b".tmp"
            staged.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
    except OSError as exc:
        for tmp in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(str(exc)) from exc
        raise
    for tmp, (path, _) in zip(staged, files, strict=True):
        os.rename(tmp, path)


def drop_file(inbox: Path, job: Job) -> None:
    """Put a job into the inbox as `submit` would (a root-level job's manifest first)."""
    folder = os.fsencode(inbox / job.models[0]) if job.kind == "folder" else os.fsencode(inbox)
    files = [(folder + b"/" + job.name, job.data())]
    if job.kind == "manifest":
        manifest = folder + b"/" + job.name.removesuffix(b".jsonl") + b".manifest.json"
        files.insert(0, (manifest, json.dumps({"models": job.models}).encode()))
    put_files(files)


# -- hostile drops that must be rejected (or ignored) with the daemon staying up -------------------
HOSTILE_KINDS = ("bad_json", "bad_manifest", "unknown_model", "symlink")


def hostile_drop(inbox: Path, outside: Path, kind: str, tag: str) -> str | None:
    """Drop one hostile file; returns the outbox name whose batch.json must end `failed` (None: ignored).
    Raises DiskFull, leaving nothing behind, when the root has no space for it."""
    name = f"{tag}-{kind}"
    line = json.dumps({"custom_id": "x", "body": {"prompt": "a"}}).encode() + b"\n"
    at = os.fsencode(inbox)
    if kind == "bad_json":
        put_files([(at + f"/e1/{name}.jsonl".encode(), b'{"custom_id": \n\xff\xfe garbage\n[1,2\n')])
    elif kind in ("bad_manifest", "unknown_model"):
        manifest = (
            b"{models: [e1"
            if kind == "bad_manifest"
            else json.dumps({"models": ["e1", "no-such-model"]}).encode()
        )
        put_files(
            [(at + f"/{name}.manifest.json".encode(), manifest), (at + f"/{name}.jsonl".encode(), line)]
        )
    elif kind == "symlink":
        target = outside / f"{name}.jsonl"
        target.write_text(json.dumps({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "a"}}))
        try:
            (inbox / "e2" / f"{name}.jsonl").symlink_to(target)
        except OSError as exc:  # a long target takes a block of the root
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(exc)) from exc
            raise
        return None
    return name


# -- the API, as a client uses it ----------------------------------------------------------------
class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> tuple:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            return 0, str(exc).encode()

    def upload(self, data: bytes, filename: str) -> tuple:
        boundary = uuid.uuid4().hex
        parts = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.call("POST", "/v1/files", parts, f"multipart/form-data; boundary={boundary}")

    def submit(self, job: Job) -> str | None:
        """Upload and create the batch; None with the reason when the API refused."""
        status, body = self.upload(job.data(), job.name.decode())
        if status != 200:
            return f"upload: {status} {body[:200]!r}"
        payload = {
            "input_file_id": json.loads(body)["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"models": ",".join(job.models)},
        }
        status, body = self.call("POST", "/v1/batches", json.dumps(payload).encode(), "application/json")
        if status != 200:
            return f"create: {status} {body[:200]!r}"
        b = json.loads(body)
        job.batch_ids = (b["metadata"].get("linked_batches") or b["id"]).split(",")
        return None


class Poller:
    """A page and a monitoring scraper using the API all along: what is not a 2xx is kept."""

    ROUTES = ("/api/status", "/v1/batches?limit=100", "/metrics", "/healthz", "/v1/files")

    def __init__(self, api: Api) -> None:
        self.api, self.calls, self.bad = api, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for route in self.ROUTES:
                status, body = self.api.call("GET", route)
                self.calls += 1
                if not 200 <= status < 300:
                    self.bad.append(f"GET {route}: {status} {body[:200]!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# -- processes ---------------------------------------------------------------------------------------
MARKER = "DROPBOX_NEMESIS_DAEMON"


def marked_processes(value: str, among: list[int] | None = None) -> list[int]:
    """Live processes (of `among`, or all) whose environment has MARKER=value: a daemon and its own."""
    needle = f"{MARKER}={value}\0".encode()
    found = []
    for entry in map(str, among) if among is not None else os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read() + b"\0"
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if needle in env and not zombie:
            found.append(int(entry))
    return found


def describe(pids: list[int]) -> str:
    """pid: command line, for a failure message."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:120]}")
        except OSError:
            out.append(f"{pid}: gone")
    return "; ".join(out)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process, in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def daemon_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dropbox_runner", *args, "--root", str(root)]


def start_process(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=out, env={**os.environ, **env}, start_new_session=True
        )

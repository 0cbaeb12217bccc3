"""Torture: a corpus of hostile input, a disk that fills up, an inbox on a second mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import batch_json, chat_line, finished, read_jsonl, run_once, wait_for, write_jsonl

BAD_LINES = {  # line -> the status code its output line must have
    "truncated": ('{"custom_id": "t", "url": "/v1/chat/completions", "body": {"messa', 400),
    "nul": ('{"custom_id": "n\x00", "url": "/v1/completions", "body": {"prompt": "a"}}\x00', 400),
    "deep": ('{"custom_id": "d", "body": ' + "[" * 100000 + "]" * 100000 + "}", 400),
    "huge_n": (json.dumps(chat_line(1, n=100000)), 400),
    "neg_max": (json.dumps(chat_line(2, max_tokens=-5)), 400),
    "unknown_url": ('{"custom_id": "u", "url": "/v1/images/generations", "body": {"prompt": "x"}}', 400),
    "array": ("[1, 2, 3]", 400),
    "null": ("null", 400),
    "id_number": ('{"custom_id": 7, "url": "/v1/completions", "body": {"prompt": "x"}}', 400),
    "body_string": ('{"custom_id": "b", "url": "/v1/completions", "body": "prompt"}', 400),
    "messages_obj": (
        '{"custom_id": "m", "url": "/v1/chat/completions", "body": {"messages": {"a": 1}}}',
        400,
    ),
    "prompt_int": ('{"custom_id": "p", "url": "/v1/completions", "body": {"prompt": 5}}', 400),
    "get": ('{"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', 400),
    "stream": (json.dumps(chat_line(3, stream=True)), 400),
    "tools": (json.dumps(chat_line(4, tools=[{"type": "function", "function": {"name": "f"}}])), 400),
    "rf_yaml": (json.dumps(chat_line(5, response_format={"type": "yaml"})), 400),
    "temp_str": (json.dumps(chat_line(6, temperature="hot")), 400),
    "dup": (json.dumps(chat_line(0)), 400),  # duplicates the first good line's custom_id
    "ten_mb": (json.dumps(chat_line(7, "x" * (10 * 1024 * 1024), max_tokens=2)), 200),
    "long_id": (json.dumps({**chat_line(8), "custom_id": "i" * 1_000_000}), 200),
    "unicode": (json.dumps(chat_line(9, "héllo 世界 \U0001f600")), 200),
}


def test_hostile_lines_each_get_the_contract_answer_in_place(root: Path) -> None:
    lines = [json.dumps(chat_line(0))] + [line for line, _ in BAD_LINES.values()]
    data = ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogatepass")
    (root / "inbox/echo/hostile.jsonl").write_bytes(b"\xef\xbb\xbf" + data)
    run_once(root)
    out = (root / "outbox/hostile/echo.jsonl").read_bytes().splitlines()
    assert len(out) == len(lines)
    codes = [json.loads(x)["response"]["status_code"] for x in out]
    assert codes == [200] + [code for _, code in BAD_LINES.values()]
    for raw in out:
        x = json.loads(raw)
        if x["response"]["status_code"] != 200:
            assert x["response"]["body"]["error"]["message"].startswith("line ")


def test_hostile_files_and_names_are_answered_and_the_daemon_stays_up(
    root: Path, tmp_path: Path, daemon
) -> None:
    inbox = root / "inbox"
    good = [chat_line(i) for i in range(200)]
    write_jsonl(inbox / "echo/good.jsonl", good)
    (inbox / "echo/invalid-utf8.jsonl").write_bytes(b'{"custom_id": "a\xff\xfe"}\n')
    (inbox / "echo/empty.jsonl").write_bytes(b"")
    (inbox / "echo/blank.jsonl").write_bytes(b"\n" * 100_000)
    (inbox / "echo/blanks-then-one.jsonl").write_bytes(
        b"\n" * 100_000 + json.dumps(chat_line(0)).encode() + b"\n"
    )
    (inbox / "echo/random.jsonl").write_bytes(os.urandom(4096))
    (inbox / "echo/...jsonl").write_text("hidden: ignored\n")
    (inbox / "echo/a..b.jsonl").write_text(json.dumps(chat_line(0)) + "\n")
    (inbox / "echo/loop.jsonl").symlink_to(inbox / "echo/loop.jsonl")
    os.mkfifo(inbox / "echo/fifo.jsonl")
    (inbox / "echo/dir.jsonl").mkdir()
    (inbox / "missing.manifest.json").write_text(json.dumps({"models": ["no-such-model"]}))
    write_jsonl(inbox / "missing.jsonl", [chat_line(0)])
    (inbox / "escape.manifest.json").write_text(json.dumps({"models": ["../../etc"]}))
    write_jsonl(inbox / "escape.jsonl", [chat_line(0)])
    (inbox / "notjson.manifest.json").write_text("models: [echo]")
    write_jsonl(inbox / "notjson.jsonl", [chat_line(0)])
    (inbox / "badyaml.manifest.yaml").write_text("models: [echo\n")
    write_jsonl(inbox / "badyaml.jsonl", [chat_line(0)])
    (inbox / "extra.manifest.json").write_text(json.dumps({"models": ["echo"], "colour": "red"}))
    write_jsonl(inbox / "extra.jsonl", [chat_line(0)])
    (inbox / "nomodels.manifest.json").write_text(json.dumps({"models": []}))
    write_jsonl(inbox / "nomodels.jsonl", [chat_line(0)])
    (inbox / "yamlok.manifest.yaml").write_text("models: [echo, echo2]\npriority: 3\n")
    write_jsonl(inbox / "yamlok.jsonl", [chat_line(0)])
    d = daemon(root, "--settle", "0.5")
    try:
        # a file replaced while it settles: the replacement is what is taken, whole
        write_jsonl(inbox / "echo/replaced.jsonl", [chat_line(i) for i in range(5)])
        staged = write_jsonl(tmp_path / "new.jsonl", [chat_line(i) for i in range(7)])
        os.replace(staged, inbox / "echo/replaced.jsonl")
        names = [
            "good",
            "invalid-utf8",
            "empty",
            "blank",
            "blanks-then-one",
            "random",
            "a..b",
            "missing",
            "escape",
            "notjson",
            "badyaml",
            "extra",
            "nomodels",
            "yamlok",
            "replaced",
        ]
        for name in names:
            wait_for(lambda n=name: finished(root, n), what=name)
        assert d.alive()
    finally:
        d.kill(signal.SIGTERM)
    status = {n: batch_json(root, n)["status"] for n in names}
    assert status == {
        **{n: "failed" for n in names},
        "good": "completed",
        "blanks-then-one": "completed",
        "a..b": "completed",
        "yamlok": "completed",
        "replaced": "completed",
    }
    assert len(read_jsonl(root / "outbox/good/echo.jsonl")) == 200
    assert len(read_jsonl(root / "outbox/blanks-then-one/echo.jsonl")) == 1
    assert len(read_jsonl(root / "outbox/replaced/echo.jsonl")) == 7
    assert "unknown model '../../etc'" in batch_json(root, "escape")["errors"]["data"][0]["message"]
    assert not (root.parent / "etc").exists()
    assert (inbox / "echo/fifo.jsonl").exists() and (inbox / "echo/loop.jsonl").is_symlink()
    assert (inbox / "echo/...jsonl").exists()


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def test_disk_full_stops_the_job_keeps_what_is_committed_and_finishes_later(root: Path, daemon) -> None:
    state = root / "state"
    mount_tmpfs(state, "3m")
    try:
        lines = [chat_line(i) for i in range(12000)]
        write_jsonl(root / "inbox/paced/big.jsonl", lines)  # 1.3 MB in, about 5 MB of results
        d = daemon(root)
        try:
            wait_for(
                lambda: (
                    "No space left" in (state / "daemon.log").read_text(errors="replace")
                    if (state / "daemon.log").exists()
                    else False
                ),
                timeout=120,
                what="disk full",
            )
            assert d.alive()
            assert not finished(root, "big")
            subprocess.run(["mount", "-o", "remount,size=64m", str(state)], check=True)
            wait_for(lambda: finished(root, "big"), timeout=180, what="the job after space was freed")
        finally:
            d.kill(signal.SIGTERM)
        out = read_jsonl(root / "outbox/big/paced.jsonl")
        assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(12000)]
        assert all(x["response"]["status_code"] == 200 for x in out)
        assert "nothing committed is lost" in d.output()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_inbox_on_a_second_mount_written_by_another_process_in_polling_mode(
    root: Path, tmp_path: Path, daemon
) -> None:
    shared = tmp_path / "share"
    (shared / "echo").mkdir(parents=True)
    inbox = root / "inbox"
    proc = subprocess.run(["mount", "--bind", str(shared), str(inbox)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.decode().strip()}")
    try:
        d = daemon(root, "--poll", "--poll-interval", "0.2")
        try:
            writer = subprocess.run(
                [
                    "python3",
                    "-c",
                    "import json,sys\nwith open(sys.argv[1], 'w') as f:\n"
                    " [f.write(json.dumps({'custom_id': f'w{i}', 'url': '/v1/completions', 'body': {'prompt': 'x'}})"
                    " + '\\n') for i in range(300)]",
                    str(shared / "echo/remote.jsonl"),
                ],
                check=True,
            )
            assert writer.returncode == 0
            wait_for(lambda: finished(root, "remote"), what="the drop written through the other mount")
        finally:
            d.kill(signal.SIGTERM)
        out = read_jsonl(root / "outbox/remote/echo.jsonl")
        assert [x["custom_id"] for x in out] == [f"w{i}" for i in range(300)]
        assert not (shared / "echo/remote.jsonl").exists(), (
            "taken across the mount: copied, verified, removed"
        )
    finally:
        subprocess.run(["umount", "-l", str(inbox)], capture_output=True)

"""End-to-end runs of the daemon on the echo engine: outbox contents, order, batch.json, lifecycle."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from helpers import (
    batch_json,
    chat_line,
    gated_job,
    models_yaml,
    open_gate,
    read_jsonl,
    run_once,
    wait_for,
    write_jsonl,
)


def test_model_folder_drop_is_answered_in_input_order(root: Path) -> None:
    write_jsonl(root / "inbox/echo/qa.jsonl", [chat_line(i, max_tokens=4) for i in range(300)])
    run_once(root)
    out = read_jsonl(root / "outbox/qa/echo.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(300)]
    assert out[7]["response"]["body"]["choices"][0]["message"]["content"] == "echo: question number 7"
    assert out[7]["response"]["body"]["model"] == "echo"
    assert not (root / "outbox/qa/echo.errors.jsonl").exists()
    batch = batch_json(root, "qa")
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
    assert batch["models"]["echo"]["usage"]["completion_tokens"] == 300 * 4
    assert not list((root / "inbox/echo").iterdir()), "a taken file leaves the inbox"
    assert (root / "state/archive" / batch["id"] / "input.jsonl").exists(), "the original stays under state/"


def test_bad_lines_fail_in_place_and_the_rest_runs(root: Path) -> None:
    lines = [
        chat_line(0),
        "{not json",
        {"custom_id": "x", "url": "/v1/nope", "body": {}},
        chat_line(1),
        chat_line(1),
        chat_line(2, max_tokens=-3),
        "",
        {"url": "/v1/completions", "body": {"prompt": "a"}},
    ]
    write_jsonl(root / "inbox/echo/mixed.jsonl", lines)
    run_once(root)
    out = read_jsonl(root / "outbox/mixed/echo.jsonl")
    assert len(out) == 7, "blank lines are skipped, every other line keeps its place"
    codes = [x["response"]["status_code"] for x in out]
    assert codes == [200, 400, 400, 200, 400, 400, 400]
    messages = [x["response"]["body"].get("error", {}).get("message", "") for x in out]
    assert "not valid JSON" in messages[1]
    assert "unknown url" in messages[2]
    assert "duplicate custom_id" in messages[4]
    assert out[5]["response"]["body"]["error"]["param"] == "max_tokens"
    assert "custom_id" in messages[6]
    errors = read_jsonl(root / "outbox/mixed/echo.errors.jsonl")
    assert len(errors) == 5
    assert batch_json(root, "mixed")["request_counts"] == {"total": 7, "completed": 2, "failed": 5}


def test_manifest_fans_out_to_models_that_align_and_compare(root: Path) -> None:
    (root / "inbox/pair.manifest.json").write_text(
        json.dumps(
            {"models": ["echo", "echo2"], "defaults": {"max_tokens": 2}, "metadata": {"team": "search"}}
        )
    )
    write_jsonl(root / "inbox/pair.jsonl", [chat_line(0), "garbage", chat_line(2, max_tokens=3)])
    run_once(root)
    a = read_jsonl(root / "outbox/pair/echo.jsonl")
    b = read_jsonl(root / "outbox/pair/echo2.jsonl")
    assert [x["custom_id"] for x in a] == [x["custom_id"] for x in b] == ["q-0", None, "q-2"]
    assert a[0]["response"]["body"]["usage"]["completion_tokens"] == 2, "manifest defaults apply"
    assert a[2]["response"]["body"]["usage"]["completion_tokens"] == 3, "the line's body wins"
    assert b[0]["response"]["body"]["model"] == "echo2"
    compare = read_jsonl(root / "outbox/pair/compare.jsonl")
    assert compare[0] == {
        "custom_id": "q-0",
        "answers": {"echo": {"text": "echo: question"}, "echo2": {"text": "echo: question"}},
    }
    assert "error" in compare[1]["answers"]["echo"]
    batch = batch_json(root, "pair")
    assert batch["metadata"] == {"team": "search"}
    assert set(batch["models"]) == {"echo", "echo2"}
    assert batch["request_counts"] == {"total": 6, "completed": 4, "failed": 2}


def test_repeat_names_get_numbered_folders_and_identical_drops_are_deduped(root: Path) -> None:
    lines = [chat_line(i) for i in range(20)]
    write_jsonl(root / "inbox/echo/same.jsonl", lines)
    run_once(root)
    write_jsonl(root / "inbox/echo/same.jsonl", lines)
    proc = run_once(root)
    assert "byte-identical" in proc.stderr
    assert "loading echo" not in proc.stderr, "a deduped drop does not load the model"
    first = read_jsonl(root / "outbox/same/echo.jsonl")
    second = read_jsonl(root / "outbox/same.2/echo.jsonl")
    assert [x["response"]["body"]["choices"] for x in first] == [
        x["response"]["body"]["choices"] for x in second
    ]
    assert batch_json(root, "same.2")["status"] == "completed"
    assert batch_json(root, "same.2")["dedupe_of"] == batch_json(root, "same")["id"]


def test_rejected_files_say_why_and_keep_the_original(root: Path) -> None:
    (root / "inbox/echo/empty.jsonl").write_bytes(b"")
    (root / "inbox/echo/binary.jsonl").write_bytes(b"\xff\xfe\x00\x01garbage\x80\n")
    write_jsonl(root / "inbox/nomanifest.jsonl", [chat_line(0)])
    (root / "inbox/unknown").mkdir()
    write_jsonl(root / "inbox/unknown/x.jsonl", [chat_line(0)])
    (root / "inbox/badm.manifest.json").write_text("{not json")
    write_jsonl(root / "inbox/badm.jsonl", [chat_line(0)])
    (root / "inbox/ghost.manifest.json").write_text(json.dumps({"models": ["ghost"]}))
    write_jsonl(root / "inbox/ghost.jsonl", [chat_line(0)])
    run_once(root)
    time.sleep(1.2)  # past manifest_grace_seconds for the root-level file without manifest
    run_once(root)
    reasons = {}
    for name in ("empty", "binary", "nomanifest", "x", "badm", "ghost"):
        batch = batch_json(root, name)
        assert batch["status"] == "failed", name
        reasons[name] = batch["errors"]["data"][0]["message"]
        assert (root / "state/archive" / batch["id"] / "input.jsonl").exists(), name
    assert "no valid request line" in reasons["empty"]
    assert "not UTF-8" in reasons["binary"]
    assert "manifest" in reasons["nomanifest"] and "inbox/<model>/" in reasons["nomanifest"]
    assert "not a model of models.yaml" in reasons["x"] and "echo" in reasons["x"]
    assert "not valid JSON" in reasons["badm"]
    assert "unknown model 'ghost'" in reasons["ghost"]
    assert not [p for p in (root / "inbox").rglob("*") if p.is_file()], "nothing taken stays in the inbox"


def test_second_daemon_exits_naming_the_first(root: Path, daemon) -> None:
    import subprocess
    import sys

    first = daemon(root)
    try:
        wait_for(lambda: (root / "state/status.json").exists(), what="first daemon up")
        second = subprocess.run(
            [sys.executable, "-m", "dropbox_runner", "run", "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert f"pid {first.proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill(signal.SIGTERM)


def test_sigterm_stops_cleanly_and_the_next_start_resumes(root: Path, daemon) -> None:
    write_jsonl(root / "inbox/gated/long.jsonl", gated_job(10000))  # cannot end before the SIGTERM
    d = daemon(root)

    def committed() -> int:
        marker = next((root / "state/jobs").glob("*/gated.marker"), None)
        return json.loads(marker.read_text())["count"] if marker else 0

    wait_for(lambda: committed() > 200, what="progress")
    assert d.kill(signal.SIGTERM) == 0
    assert "stopped" in d.output()
    task = json.loads(next((root / "state/jobs").glob("*/gated.task.json")).read_text())
    assert task["status"] == "queued"
    marker = json.loads(next((root / "state/jobs").glob("*/gated.marker")).read_text())
    assert 0 < marker["count"] < 10000
    open_gate(root)
    proc = run_once(root)
    assert f"after {marker['count']} committed results" in proc.stderr
    out = read_jsonl(root / "outbox/long/gated.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(10000)]


def test_files_present_before_start_and_many_at_once(root: Path) -> None:
    for i in range(500):
        write_jsonl(root / f"inbox/echo/f{i:03d}.jsonl", [chat_line(i)])
    run_once(root, timeout=600)  # 500 jobs: a bound for a busy machine (120 s ran out at load 30)
    outs = sorted(p.parent.name for p in (root / "outbox").glob("*/echo.jsonl"))
    assert outs == [f"f{i:03d}" for i in range(500)]
    for i in (0, 250, 499):
        assert read_jsonl(root / f"outbox/f{i:03d}/echo.jsonl")[0]["custom_id"] == f"q-{i}"


def test_status_follows_a_running_job(root: Path, daemon) -> None:
    from click.testing import CliRunner

    from dropbox_runner.cli import main

    write_jsonl(root / "inbox/gated/watch.jsonl", gated_job(20000))
    d = daemon(root)
    try:

        def done() -> int:
            doc = json.loads(CliRunner().invoke(main, ["status", "--json"]).output)
            jobs = [j for j in doc["jobs"] if j["name"] == "watch"]
            return jobs[0]["models"][0]["done"] if jobs else 0

        first = wait_for(done, what="first progress")
        second = wait_for(lambda: done() > first and done(), what="more progress")
        assert second > first
        doc = json.loads(CliRunner().invoke(main, ["status", "--json"]).output)
        assert doc["daemon"]["running"] is True
        row = doc["jobs"][0]["models"][0]
        assert row["tokens_per_second"] > 0 and row["status"] == "in_progress"
    finally:
        d.kill(signal.SIGTERM)
    text = CliRunner().invoke(main, ["status"]).output
    assert text.startswith("The daemon is not running.")


def test_a_model_too_large_for_memory_is_refused_before_loading_with_the_numbers(root: Path) -> None:
    import struct

    big = root / "huge"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 16], "data_offsets": [0, 1 << 38]}}
    ).encode()
    with open(big / "model.safetensors", "wb") as f:  # 256 GiB of weights, as a sparse file
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 38))
    models_yaml(root, models={"huge": f"{{path: {big}}}"})
    write_jsonl(root / "inbox/huge/x.jsonl", [chat_line(0)])
    proc = run_once(root)
    batch = batch_json(root, "x")
    assert batch["status"] == "failed"
    error = batch["models"]["huge"]["error"]
    assert "256.0 GiB of weights" in error and "GiB of RAM is available" in error and "smaller" in error
    assert "loading huge" not in proc.stderr

"""Retention (`keep_finished_days`) removes only what the expiring job itself published, and the API
still answers for a removed batch with its final status (issue 23 items 3 and 10)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dropbox_runner.config import load_registry
from dropbox_runner.layout import Layout

from helpers import batch_json, chat_line, models_yaml, read_jsonl, run_once, write_jsonl


def age(root: Path, job_id: str, days: float) -> None:
    """Make an archived job look finished `days` ago."""
    for task in (root / "state/archive" / job_id).glob("*.task.json"):
        record = json.loads(task.read_text())
        record["completed_at"] = time.time() - days * 86400
        task.write_text(json.dumps(record))


def keep_one_day(root: Path) -> None:
    models_yaml(root, settings={"keep_finished_days": 1})


def test_retention_never_removes_an_outbox_folder_a_later_job_owns_now(root: Path) -> None:
    write_jsonl(root / "inbox/echo/x.jsonl", [chat_line(0)])
    run_once(root, timeout=60)
    first = batch_json(root, "x")["id"]
    shutil.rmtree(root / "outbox/x")  # the user collected the results
    write_jsonl(root / "inbox/echo/x.jsonl", [chat_line(i, text="the second drop") for i in range(3)])
    run_once(root, timeout=60)
    second = batch_json(root, "x")["id"]
    assert second != first
    age(root, first, 3)
    keep_one_day(root)
    run_once(root, timeout=60)
    assert not (root / "state/archive" / first).exists(), "the old job is removed"
    assert batch_json(root, "x")["id"] == second, "the folder it once had is someone else's now"
    assert len(read_jsonl(root / "outbox/x/echo.jsonl")) == 3
    log = (root / "state/daemon.log").read_text()
    assert f"removed {first} (its outbox folder is no longer its own)" in log


def test_after_retention_an_api_batch_keeps_its_final_status_and_its_files_answer_404(root: Path) -> None:
    from starlette.testclient import TestClient

    from dropbox_runner.api.server import create_app

    lines = [{**chat_line(i), "body": {**chat_line(i)["body"], "model": "echo"}} for i in range(4)]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    app = create_app(Layout(root), load_registry(root))
    with TestClient(app, base_url="http://127.0.0.1") as http:
        upload = http.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()
        body = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch_id = http.post("/v1/batches", json=body).json()["id"]
        run_once(root, timeout=60)
        done = http.get(f"/v1/batches/{batch_id}").json()
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 4
        output = f"/v1/files/{done['output_file_id']}/content"
        assert http.get(output).status_code == 200
        [job_id] = [p.name for p in (root / "state/archive").iterdir()]
        age(root, job_id, 3)
        keep_one_day(root)
        run_once(root, timeout=60)
        assert not (root / "state/archive" / job_id).exists()
        after = http.get(f"/v1/batches/{batch_id}").json()
        assert after["status"] == "completed", "not `validating` for ever"
        assert after["request_counts"] == done["request_counts"]
        assert after["completed_at"] is not None  # when it finished, as its records say
        assert http.get(output).status_code == 404
        assert http.get(f"/v1/files/{upload['id']}").status_code == 404
        assert http.get(f"/v1/files/{upload['id']}/content").status_code == 404
    assert not list((root / "state/api/files").iterdir()), "the upload is pruned with its job"

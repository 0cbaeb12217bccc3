"""References the filesystem cannot hold, and the scoring endpoints, at the CLI and the API's edge."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from dropbox_runner.cli import main
from dropbox_runner.config import load_registry
from dropbox_runner.layout import Layout

from helpers import models_yaml, read_jsonl, run_once


def test_status_and_cancel_of_a_reference_too_long_for_a_file_name_say_no_such_job(root: Path) -> None:
    Layout(root).make(["echo"])  # state/jobs/ exists: the lookup meets ENAMETOOLONG, not ENOENT
    for ref in ("batch_" + "x" * 300, "y" * 300):
        for command in (["status", ref], ["cancel", ref]):
            result = CliRunner().invoke(main, command)
            assert result.exit_code == 1, (command[0], result.output)
            assert "no job is named" in result.output and "Traceback" not in result.output


def test_a_batch_of_score_and_rerank_lines_through_the_api(root: Path) -> None:
    from starlette.testclient import TestClient

    from dropbox_runner.api.server import create_app

    models_yaml(root, models={"emb": "{engine: echo, task: embed}"})
    score = {"model": "emb", "text_1": "a cat", "text_2": ["a cat", "the stock market"]}
    lines = [{"custom_id": "s", "method": "POST", "url": "/v1/score", "body": score}]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    app = create_app(Layout(root), load_registry(root))
    with TestClient(app, base_url="http://127.0.0.1") as http:
        assert http.get("/outbox/" + "z" * 300 + "/emb.jsonl").status_code == 404
        upload = http.post("/v1/files", files={"file": ("s.jsonl", data)}, data={"purpose": "batch"}).json()
        body = {"input_file_id": upload["id"], "endpoint": "/v1/score", "completion_window": "24h"}
        made = http.post("/v1/batches", json=body)
        assert made.status_code == 200, made.text
        run_once(root, timeout=60)
        done = http.get(f"/v1/batches/{made.json()['id']}").json()
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 1
        out = http.get(f"/v1/files/{done['output_file_id']}/content").text
    [line] = [json.loads(x) for x in out.splitlines()]
    scores = [d["score"] for d in line["response"]["body"]["data"]]
    assert len(scores) == 2 and abs(scores[0] - 1.0) < 1e-6 and scores[1] < scores[0]
    assert read_jsonl(next((root / "outbox").glob("*/emb.jsonl")))[0]["custom_id"] == "s"

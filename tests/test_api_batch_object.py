"""OpenAI's whole batch object: `usage`, `output_expires_after` and the metadata limits, through the
official client, and the same limits on manifests."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.jobs.retention import retention_due
from dropbox_runner.layout import Layout
from dropbox_runner.queue.journal import Journal

from helpers import batch_json, chat_line, read_jsonl, run_once, write_jsonl
from servers import Server, client, wait_batch


@pytest.fixture
def served(root: Path, daemon):
    daemon = daemon(root)
    server = Server(root)
    server.wait_up()
    yield root, server, daemon
    server.stop()
    if daemon.alive():
        daemon.kill(signal.SIGTERM)


def upload(c, path: Path, model: str, n: int):
    lines = [{**chat_line(i), "body": {**chat_line(i)["body"], "model": model}} for i in range(n)]
    return c.files.create(file=open(write_jsonl(path, lines), "rb"), purpose="batch")


def test_the_official_client_reads_usage_and_the_outputs_expire_first(served, tmp_path: Path) -> None:
    import openai

    root, server, daemon = served
    c = client(server)
    f = upload(c, tmp_path / "u.jsonl", "echo", 20)
    short = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={f"k{i}": "v" * 512 for i in range(16)},
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    kept = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_batch(c, short.id)
    assert wait_batch(c, kept.id).status == done.status == "completed"
    output = c.files.content(done.output_file_id).text.splitlines()
    bodies = [json.loads(x)["response"]["body"] for x in output]
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    assert prompt > 0 and completion > 0
    assert isinstance(done.usage, openai.types.BatchUsage)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (prompt, completion)
    assert done.usage.total_tokens == prompt + completion
    assert done.usage.input_tokens_details.cached_tokens == 0
    assert done.usage.output_tokens_details.reasoning_tokens == 0
    batch = batch_json(root, short.id)
    assert batch["usage"]["input_tokens"] == prompt and batch["usage"]["output_tokens"] == completion
    model_usage = batch["models"]["echo"]["usage"]
    assert model_usage["prompt_tokens"] == prompt and model_usage["input_tokens"] == prompt  # both names
    assert model_usage["output_tokens_details"] == {"reasoning_tokens": 0}

    daemon.kill(signal.SIGTERM)  # retention is run here, at chosen times, instead of waiting an hour
    layout = Layout(root)
    jobs = Jobs(Journal(layout))
    finished_at = batch["completed_at"]
    assert jobs.pruned(30, finished_at + 3500) == []
    assert jobs.pruned(30, finished_at + 3601) == [batch["id"]]  # the earlier of the hour and 30 days
    assert not (root / "outbox" / short.id).exists() and (root / "outbox" / kept.id).is_dir()
    with pytest.raises(openai.NotFoundError):
        c.files.content(done.output_file_id)
    gone = c.batches.retrieve(short.id)  # section 14: the batch keeps its final status, its files go
    assert gone.status == "completed" and gone.usage.input_tokens == prompt
    assert c.batches.retrieve(kept.id).status == "completed"
    assert jobs.pruned(None, finished_at + 86400 * 365) == []  # no keep_finished_days: kept forever


@pytest.mark.parametrize(
    "fields, param, said",
    [
        ({"metadata": {f"k{i:02d}": "v" for i in range(17)}}, "metadata", '"k16" is pair 17'),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "longer than 64 characters"),
        ({"metadata": {"note": "v" * 513}}, "metadata", "metadata.note: the value is longer than 512"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after", "3600"),
        ({"output_expires_after": {"anchor": "now", "seconds": 3600}}, "output_expires_after", "anchor"),
        ({"output_expires_after": 3600}, "output_expires_after", "anchor"),
    ],
)
def test_create_refuses_what_openai_refuses_naming_the_key(
    served, tmp_path: Path, fields: dict, param: str, said: str
) -> None:
    import openai

    root, server, _ = served
    c = client(server)
    f = upload(c, tmp_path / "x.jsonl", "echo", 1)
    with pytest.raises(openai.BadRequestError) as err:
        c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **fields
        )
    assert err.value.body["param"] == param and said in err.value.body["message"], err.value.body
    assert c.batches.list().data == [] and not list((root / "inbox").glob("*.jsonl"))


@pytest.mark.parametrize(
    "manifest, said",
    [
        ({"metadata": {f"k{i:02d}": i for i in range(17)}}, '"k16" is pair 17'),
        ({"metadata": {"x" * 65: 1}}, "longer than 64 characters"),
        ({"metadata": {"team": "s" * 513}}, "metadata.team: the value is longer than 512"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 2592001}}, "2592001"),
    ],
)
def test_a_manifest_past_the_limits_is_rejected_naming_the_key(root: Path, manifest: dict, said: str) -> None:
    write_jsonl(root / "inbox/echo/big.jsonl", [chat_line(0)])
    (root / "inbox/echo/big.manifest.json").write_text(json.dumps(manifest))
    run_once(root)
    batch = batch_json(root, "big")
    assert batch["status"] == "failed", batch
    assert said in batch["errors"]["data"][0]["message"]
    assert not retention_due(Layout(root), None), "no job asked for output_expires_after"


def test_a_manifest_at_the_limits_runs_and_its_outputs_expire(root: Path) -> None:
    metadata = {"k" * 64: "v" * 512, **{f"k{i}": i for i in range(15)}, "submit_id": "sub_x"}
    write_jsonl(root / "inbox/echo/fine.jsonl", [chat_line(0)])
    (root / "inbox/echo/fine.manifest.json").write_text(
        json.dumps({"metadata": metadata, "output_expires_after": {"anchor": "created_at", "seconds": 7200}})
    )
    run_once(root)
    batch = batch_json(root, "fine")
    assert batch["status"] == "completed" and batch["metadata"] == metadata
    assert len(read_jsonl(root / "outbox/fine/echo.jsonl")) == 1
    assert retention_due(Layout(root), None), "the daemon's retention check now runs"
    jobs = Jobs(Journal(Layout(root)))
    assert jobs.pruned(None, batch["completed_at"] + 7100) == []
    assert jobs.pruned(None, batch["completed_at"] + 7201) == [batch["id"]]
    assert not (root / "outbox/fine").exists()


def test_batch_json_sums_the_usage_of_its_models(root: Path) -> None:
    write_jsonl(root / "inbox/two.jsonl", [chat_line(i) for i in range(3)])
    (root / "inbox/two.manifest.json").write_text(
        '{"models": ["echo", "echo2"], "defaults": {"max_tokens": 2}}'
    )
    run_once(root)
    batch = batch_json(root, "two")
    per_model = [batch["models"][m]["usage"] for m in ("echo", "echo2")]
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(u[key] for u in per_model) > 0
    assert batch["usage"]["output_tokens"] == 2 * 3 * 2
    assert batch["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    assert {"prompt_tokens", "completion_tokens", "prompt_tokens_details"} <= set(per_model[0]), "kept"

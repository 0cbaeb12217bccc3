"""OpenAI parity: Responses lines, cached tokens, completion windows, webhooks, metrics, retention."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import batch_json, chat_line, read_jsonl, run_once, write_jsonl


def response_line(i: int, **body) -> dict:
    return {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses", "body": body}


def test_responses_lines_answer_with_response_objects_and_refuse_what_they_cannot_honour(root: Path) -> None:
    from openai.types.responses import Response

    lines = [
        response_line(0, input="what is a drop folder"),
        response_line(
            1,
            instructions="answer briefly",
            input=[
                {"role": "developer", "content": "be kind"},
                {"role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
            ],
            max_output_tokens=3,
            temperature=0,
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        ),
        response_line(2, input="x", tools=[{"type": "web_search"}]),
        response_line(3, input="x", reasoning={"effort": "high"}),
        response_line(4, input="x", previous_response_id="resp_1"),
        response_line(5, input="x", background=True),
        response_line(6, input=[{"role": "wizard", "content": "x"}]),
        response_line(7, input="x", text={"format": {"type": "json_schema"}}),
    ]
    write_jsonl(root / "inbox/echo/resp.jsonl", lines)
    run_once(root)
    out = read_jsonl(root / "outbox/resp/echo.jsonl")
    first, second = (Response.model_validate(x["response"]["body"]) for x in out[:2])
    assert first.object == "response" and first.output_text == "echo: what is a drop folder"
    assert first.usage.output_tokens == 6 and first.usage.total_tokens == first.usage.input_tokens + 6
    assert second.output_text == "echo: hello there" and second.status == "completed"
    assert second.usage.input_tokens == 6  # instructions, developer and user messages all reached the model
    params = [x["response"]["body"]["error"]["param"] for x in out[2:]]
    assert params == [
        "tools",
        "reasoning",
        "previous_response_id",
        "background",
        "input[0].role",
        "text.format",
    ]
    assert all(x["response"]["status_code"] == 400 for x in out[2:])


def test_cached_tokens_are_in_every_body_and_summed_in_batch_json(root: Path) -> None:
    write_jsonl(
        root / "inbox/echo/c.jsonl",
        [chat_line(0), {"custom_id": "p", "url": "/v1/completions", "body": {"prompt": "a b"}}],
    )
    run_once(root)
    for x in read_jsonl(root / "outbox/c/echo.jsonl"):
        assert x["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    usage = batch_json(root, "c")["models"]["echo"]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    json.dumps(usage)


def test_a_job_past_its_completion_window_ends_expired_keeping_finished_lines(root: Path) -> None:
    (root / "inbox/paced/late.manifest.json").write_text('{"completion_window": "2s"}')
    write_jsonl(root / "inbox/paced/late.jsonl", [chat_line(i) for i in range(20000)])
    proc = run_once(root, timeout=60)
    batch = batch_json(root, "late")
    assert batch["status"] == "expired" and batch["expired_at"] and batch["completion_window"] == "2s"
    assert (
        batch["expires_at"] == int(batch["created_at"] + 2) or batch["expires_at"] == batch["created_at"] + 2
    )
    out = read_jsonl(root / "outbox/late/paced.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(20000)]
    done = [x for x in out if x["response"] is not None]
    expired = [x for x in out if x["response"] is None]
    assert done and expired and all(x["error"]["code"] == "batch_expired" for x in expired)
    assert batch["request_counts"] == {"total": 20000, "completed": len(done), "failed": len(expired)}
    assert "expire " in proc.stderr


def test_a_queued_job_that_expires_never_loads_its_model(root: Path) -> None:
    (root / "inbox/paced/first.manifest.json").write_text('{"priority": 5}')
    write_jsonl(root / "inbox/paced/first.jsonl", [chat_line(i) for i in range(6000)])
    (root / "inbox/echo2/waits.manifest.json").write_text('{"completion_window": 1}')
    write_jsonl(root / "inbox/echo2/waits.jsonl", [chat_line(i) for i in range(5)])
    proc = run_once(root, timeout=60)
    assert batch_json(root, "first")["status"] == "completed"
    batch = batch_json(root, "waits")
    assert batch["status"] == "expired" and batch["request_counts"]["failed"] == 5
    assert "loading echo2" not in proc.stderr
    assert all(x["error"]["code"] == "batch_expired" for x in read_jsonl(root / "outbox/waits/echo2.jsonl"))


def test_a_bad_completion_window_rejects_the_drop(root: Path) -> None:
    (root / "inbox/echo/w.manifest.json").write_text('{"completion_window": "soon"}')
    write_jsonl(root / "inbox/echo/w.jsonl", [chat_line(0)])
    run_once(root)
    batch = batch_json(root, "w")
    assert batch["status"] == "failed" and "completion_window" in batch["errors"]["data"][0]["message"]

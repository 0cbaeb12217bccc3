"""OpenAI parity: Responses lines, cached tokens, completion windows, webhooks, metrics, retention."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import batch_json, chat_line, gated_job, models_yaml, read_jsonl, run_once, write_jsonl
from servers import SECRET, Receiver


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
    # The gated last line keeps the job from completing, so it expires whatever the CPU's pace; the
    # window is long enough that lines are answered before it, however busy the machine.
    (root / "inbox/gated/late.manifest.json").write_text('{"completion_window": "6s"}')
    write_jsonl(root / "inbox/gated/late.jsonl", gated_job(20000))
    proc = run_once(root, timeout=60)
    batch = batch_json(root, "late")
    assert batch["status"] == "expired" and batch["expired_at"] and batch["completion_window"] == "6s"
    assert (
        batch["expires_at"] == int(batch["created_at"] + 6) or batch["expires_at"] == batch["created_at"] + 6
    )
    out = read_jsonl(root / "outbox/late/gated.jsonl")
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


def test_request_timeout_seconds_as_a_setting(root: Path) -> None:
    models_yaml(
        root,
        settings={"request_timeout_seconds": 1},
        models={"slowpoke": "{engine: echo, engine_args: {slow_on: SLOW}}"},
    )
    (root / "inbox/slowpoke").mkdir()
    lines = [chat_line(i) for i in range(6)]
    lines[2] = chat_line(2, text="SLOW request")
    write_jsonl(root / "inbox/slowpoke/t.jsonl", lines)
    run_once(root, timeout=60)
    out = read_jsonl(root / "outbox/t/slowpoke.jsonl")
    codes = [x["error"]["code"] if x["response"] is None else x["response"]["status_code"] for x in out]
    assert codes == [200, 200, "request_timeout", 200, 200, 200]


# -- webhooks -----------------------------------------------------------------------------------------
def hooks_yaml(root: Path, url: str) -> None:
    models_yaml(root, settings={"webhooks": f"[{{url: '{url}', secret: '{SECRET}'}}]"})


def test_webhooks_are_signed_and_delivered_at_least_once_across_a_restart(root: Path, daemon) -> None:
    import signal

    from standardwebhooks.webhooks import Webhook

    from helpers import finished, wait_for

    receiver = Receiver()
    hooks_yaml(root, receiver.url)
    receiver.up = False  # down when the event happens
    d = daemon(root)
    try:
        write_jsonl(root / "inbox/echo/ok.jsonl", [chat_line(0)])
        wait_for(lambda: finished(root, "ok"), what="ok")
        wait_for(lambda: list((root / "state/webhooks").glob("evt_*.json")), what="the journaled event")
        status = __import__("subprocess").run(
            [__import__("sys").executable, "-m", "dropbox_runner", "status", "--root", str(root)],
            capture_output=True,
            text=True,
        )
        assert "1 webhook events not yet delivered" in status.stdout
    finally:
        d.kill(signal.SIGKILL)
    assert receiver.got == []
    receiver.up = True
    d = daemon(root)
    try:
        write_jsonl(root / "inbox/echo/bad.jsonl", ["not json"])  # rejected: batch.failed
        (root / "inbox/paced/stop.manifest.json").write_text('{"completion_window": "1s"}')
        write_jsonl(root / "inbox/paced/stop.jsonl", [chat_line(i) for i in range(20000)])  # batch.expired
        write_jsonl(root / "inbox/paced/gone.jsonl", [chat_line(i) for i in range(5)])
        wait_for(lambda: finished(root, "bad") and finished(root, "stop"), timeout=60, what="bad and stop")
        # Wait for the events themselves, not for a count: the expiry's event may come last; and for
        # gone's too, or the daemon may stop with its event still in the journal (a busy machine).
        wanted = {"batch.completed", "batch.failed", "batch.expired"}
        wait_for(
            lambda: (
                wanted <= {json.loads(body)["type"] for _, body in receiver.got}
                and {"ok", "gone"} <= {json.loads(body)["data"]["name"] for _, body in receiver.got}
            ),
            timeout=60,
            what=f"the events {sorted(wanted)} and those of 'ok' and 'gone'",
        )
    finally:
        d.kill(signal.SIGTERM)
        receiver.close()
    verifier = Webhook(SECRET)
    events = [verifier.verify(body, headers) for headers, body in receiver.got]
    types = {e["type"]: e for e in events}
    assert {"batch.completed", "batch.failed", "batch.expired"} <= set(types)
    assert [e["data"]["name"] for e in events].count("ok") == 1, "delivered once the receiver was up"
    done = next(e for e in events if e["data"]["name"] == "ok")
    assert done["object"] == "event" and done["id"].startswith("evt_")
    assert done["data"]["name"] == "ok" and done["data"]["status"] == "completed"
    assert done["data"]["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert not list((root / "state/webhooks").glob("evt_*.json")), "delivered events leave the journal"


def test_a_cancelled_job_announces_batch_cancelled(root: Path) -> None:
    import subprocess
    import sys

    from standardwebhooks.webhooks import Webhook

    from helpers import wait_for

    receiver = Receiver()
    hooks_yaml(root, receiver.url)
    from dropbox_runner.config import load_registry
    from dropbox_runner.daemon.loop import Daemon as Core
    from dropbox_runner.intake.scanner import Drop
    from dropbox_runner.layout import Layout

    core = Core(Layout(root), load_registry(root))
    core.layout.make(["echo"])
    write_jsonl(root / "inbox/echo/q.jsonl", [chat_line(0)])
    core.claimer.claim(Drop(root / "inbox/echo/q.jsonl", "echo", None))
    cancel = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "cancel", "q", "--root", str(root)], capture_output=True
    )
    assert cancel.returncode == 0
    core.sender.start()
    try:
        wait_for(lambda: receiver.got, timeout=20, what="the cancelled event")
    finally:
        core.sender.stop()
        receiver.close()
    event = Webhook(SECRET).verify(receiver.got[0][1], receiver.got[0][0])
    assert event["type"] == "batch.cancelled"


# -- metrics, history, retention --------------------------------------------------------------------
def test_metrics_agree_with_status_json(root: Path) -> None:
    import subprocess
    import sys
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from servers import Server

    write_jsonl(root / "inbox/echo/m.jsonl", [chat_line(0), chat_line(1), "bad line"])
    write_jsonl(root / "inbox/echo2/n.jsonl", [chat_line(0)])
    run_once(root)
    server = Server(root)
    server.wait_up()
    try:
        text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    finally:
        server.stop()
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dropbox_runner", "status", "--json", "--all", "--root", str(root)],
            capture_output=True,
            text=True,
        ).stdout
    )
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("dropbox_runner_requests_total", (("model", "echo"), ("outcome", "succeeded")))] == 2
    assert samples[("dropbox_runner_requests_total", (("model", "echo"), ("outcome", "failed")))] == 1
    assert samples[("dropbox_runner_requests_total", (("model", "echo2"), ("outcome", "succeeded")))] == 1
    echo = [m for j in doc["jobs"] for m in j["models"] if m["model"] == "echo"]
    assert samples[("dropbox_runner_tokens_total", (("kind", "completion"), ("model", "echo")))] == sum(
        m["usage"]["completion_tokens"] for m in echo
    )
    assert samples[("dropbox_runner_jobs", (("status", "completed"),))] == 2
    assert samples[("dropbox_runner_queue_tasks", ())] == doc["queue_length"] == 0
    assert samples[("dropbox_runner_daemon_up", ())] == 0
    assert samples[("dropbox_runner_model_loads_total", (("model", "echo"),))] == 1
    assert ("dropbox_runner_model_load_seconds_count", (("model", "echo2"),)) in samples
    user = __import__("getpass").getuser()  # no team in the metadata: the dropped file's owner
    assert (
        samples[
            (
                "dropbox_runner_group_requests_total",
                (("group", user), ("model", "echo"), ("outcome", "succeeded")),
            )
        ]
        == 2
    )


def test_status_json_carries_a_bounded_history_of_points_loads_and_swaps(root: Path) -> None:
    import subprocess
    import sys

    write_jsonl(root / "inbox/echo/h.jsonl", [chat_line(i) for i in range(10)])
    write_jsonl(root / "inbox/echo2/g.jsonl", [chat_line(i) for i in range(4)])
    run_once(root)
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dropbox_runner", "status", "--json", "--root", str(root)],
            capture_output=True,
            text=True,
        ).stdout
    )
    history = doc["history"]
    last = history["points"][-1]
    assert (
        last["models"]["echo"] == {"requests": 10, "tokens": 40} and last["models"]["echo2"]["requests"] == 4
    )
    assert {x["model"] for x in history["loads"]} == {"echo", "echo2"}
    assert all(x["end"] >= x["start"] for x in history["loads"] + history["swaps"])
    assert history["swaps"], "the swap between the two models is there"


def test_history_stays_bounded_over_ten_thousand_points(tmp_path: Path) -> None:
    from dropbox_runner.layout import Layout
    from dropbox_runner.status.history import MAX_POINTS, History

    layout = Layout(tmp_path)
    layout.state.mkdir()
    clock = iter(range(0, 10**9, 10))
    history = History(layout, ticker=lambda: next(clock))
    sizes = []
    for i in range(10_000):
        history.done("tiny-llama", 3, 96)
        history.done("tiny-qwen", 1, 32)
        if i % 50 == 0:
            history.loaded("tiny-llama", i, 1.5)
        history.tick(save=i % 500 == 0)
        if i % 500 == 0:
            sizes.append((layout.state / "history.json").stat().st_size)
    history.save()
    sizes.append((layout.state / "history.json").stat().st_size)
    assert len(history.points) == MAX_POINTS
    full = sizes[MAX_POINTS // 500 + 1]  # once the window is full the file stops growing
    assert max(sizes) < 1_500_000 and all(size <= full * 1.01 for size in sizes)
    reopened = History(layout)
    assert len(reopened.points) == MAX_POINTS and reopened.totals["tiny-llama"]["requests"] == 30_000


def test_keep_finished_days_removes_old_finished_jobs_and_never_a_running_one(root: Path, daemon) -> None:
    import os
    import signal
    import time

    from helpers import wait_for

    write_jsonl(root / "inbox/echo/old.jsonl", [chat_line(0)])
    run_once(root)
    old_id = batch_json(root, "old")["id"]
    task = root / "state/archive" / old_id / "echo.task.json"
    record = json.loads(task.read_text())
    record["completed_at"] = time.time() - 3 * 86400  # finished three days ago
    task.write_text(json.dumps(record))
    models_yaml(root, settings={"keep_finished_days": 1})
    write_jsonl(root / "inbox/gated/running.jsonl", gated_job(100))  # runs until the test ends
    d = daemon(root)
    try:
        wait_for(lambda: not (root / "outbox/old").exists(), what="the old job removed")
        wait_for(lambda: not (root / "state/archive" / old_id).exists(), what="its state removed")
        running = wait_for(lambda: batch_json(root, "running"), what="the running job")
        assert running["status"] in ("queued", "in_progress")
        assert any(os.scandir(root / "state/jobs"))
    finally:
        d.kill(signal.SIGTERM)
    assert f"removed {old_id} (outbox/old/)" in (root / "state/daemon.log").read_text()

"""The OpenAI-compatible Batch API and the status page, through the official client and Chromium."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import chat_line, gated_job, models_yaml, wait_for, write_jsonl
from servers import Server, client, free_port, wait_batch

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def served(root: Path, daemon):
    daemon = daemon(root)
    server = Server(root)
    server.wait_up()
    yield root, server
    server.stop()
    daemon.kill(signal.SIGTERM)


def test_the_official_client_uploads_runs_and_downloads(served, tmp_path: Path) -> None:
    import openai

    root, server = served
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{**chat_line(i), "body": {**chat_line(i)["body"], "model": "echo"}} for i in range(50)],
    )
    c = client(server)
    f = c.files.create(file=open(src, "rb"), purpose="batch")
    assert f.bytes == src.stat().st_size and f.filename == "in.jsonl"
    batch = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "search"},
    )
    assert batch.status in ("validating", "in_progress", "completed")
    done = wait_batch(c, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 50 and done.request_counts.completed == 50
    assert done.metadata["team"] == "search"
    lines = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == [f"q-{i}" for i in range(50)]
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == "echo: question number 3"
    assert batch.id in [b.id for b in c.batches.list(limit=10).data]
    assert f.id in [x.id for x in c.files.list().data]
    assert [m.id for m in c.models.list().data][:2] == ["echo", "echo2"]
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch-nope")
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve("file-nope")
    assert c.files.delete(f.id).deleted


def test_two_models_appear_as_linked_batches(served, tmp_path: Path) -> None:
    root, server = served
    c = client(server)
    f = c.files.create(
        file=open(write_jsonl(tmp_path / "two.jsonl", [chat_line(i) for i in range(5)]), "rb"),
        purpose="batch",
    )
    first = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"models": "echo,echo2"},
    )
    ids = first.metadata["linked_batches"].split(",")
    assert ids[0] == first.id and len(ids) == 2
    outs = []
    for batch_id in ids:
        b = wait_batch(c, batch_id)
        assert b.status == "completed" and b.request_counts.total == 5
        outs.append([json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()])
    assert [x["response"]["body"]["model"] for x in outs[0]] == ["echo"] * 5
    assert [x["response"]["body"]["model"] for x in outs[1]] == ["echo2"] * 5


def test_cancel_and_errors(served, tmp_path: Path) -> None:
    import openai

    root, server = served
    c = client(server)
    lines = [{**x, "body": {**x["body"], "model": "gated"}} for x in gated_job(30000)]  # ends by cancel
    f = c.files.create(file=open(write_jsonl(tmp_path / "long.jsonl", lines), "rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: c.batches.retrieve(b.id).request_counts.completed > 0, what="progress")
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
    done = wait_batch(c, b.id)
    assert done.status == "cancelled" and 0 < done.request_counts.completed < 30000
    with pytest.raises(openai.BadRequestError) as err:
        c.batches.create(input_file_id=f.id, endpoint="/v1/images", completion_window="24h")
    assert "endpoint" in str(err.value)
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {**chat_line(0), "body": {**chat_line(0)["body"], "model": "echo"}},
            {**chat_line(1), "body": {**chat_line(1)["body"], "model": "echo2"}},
        ],
    )
    g = c.files.create(file=open(mixed, "rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_key_size_limit_and_names(root: Path, tmp_path: Path) -> None:
    import urllib.request

    models_yaml(root, settings={"max_upload_bytes": 2000})
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "dropbox_runner",
            "serve",
            "--root",
            str(root),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "needs an API key" in refused.stderr
    server = Server(root, env={"DROPBOX_RUNNER_API_KEY": "sekrit"})
    server.wait_up()
    try:
        import openai

        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").files.list()
        c = client(server, "sekrit")
        with pytest.raises(openai.APIStatusError) as err:
            c.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
        assert err.value.status_code == 413
        f = c.files.create(file=("../../etc/evil.jsonl", json.dumps(chat_line(0)).encode()), purpose="batch")
        assert "/" not in f.filename and not f.filename.startswith(".")
        assert (root / "state/api/files" / f"{f.id}.jsonl").exists()
        assert not (root.parent / "etc").exists()
        req = urllib.request.Request(server.url + "/v1/files")
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req)
        assert http.value.code == 401
    finally:
        server.stop()


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_the_status_page_shows_a_moving_progress_bar(served) -> None:
    from playwright.sync_api import sync_playwright

    root, server = served
    write_jsonl(root / "inbox/gated/page.jsonl", gated_job(40000))  # moves for 25 s, then waits
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            bar = page.locator('tr[data-job="page"] .bar > div')
            bar.wait_for(timeout=30000)
            first = int(bar.get_attribute("data-pct"))
            wait_for(lambda: int(bar.get_attribute("data-pct")) > first, timeout=30, what="the bar to move")
            assert "daemon pid" in page.locator("#daemon").inner_text()
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "status-page.png").stat().st_size > 1000


def launch(p):
    return p.chromium.launch(
        executable_path=shutil.which("chromium"),
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_the_page_charts_throughput_shows_the_queue_and_a_job_with_its_failed_lines(
    root: Path, daemon
) -> None:
    import urllib.request

    from playwright.sync_api import sync_playwright

    models_yaml(root, settings={"history_point_seconds": 1})
    write_jsonl(
        root / "inbox/echo/flawed.jsonl",
        [chat_line(0), "not json", {"custom_id": "u", "url": 5}, chat_line(3)],
    )
    daemon = daemon(root)
    server = Server(root)
    server.wait_up()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        wait_for(lambda: (root / "outbox/flawed/echo.errors.jsonl").exists(), what="the flawed job")
        write_jsonl(root / "inbox/gated/running.jsonl", gated_job(60000))  # runs until the test ends
        (root / "inbox/echo2/behind.manifest.json").write_text('{"priority": -1}')
        write_jsonl(root / "inbox/echo2/behind.jsonl", [chat_line(i) for i in range(3)])
        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(server.url + "/")
                page.locator('tr[data-queue-job="behind"]').wait_for(timeout=30000)
                chart = page.locator("#chart")
                wait_for(lambda: int(chart.get_attribute("data-points")) >= 3, timeout=30, what="points")
                first = int(chart.get_attribute("data-points"))
                assert page.locator("#chart polyline.series").count() >= 1
                wait_for(
                    lambda: int(chart.get_attribute("data-points")) > first,
                    timeout=30,
                    what="the chart grows",
                )
                assert page.locator("#chart rect.load").count() >= 1, "the loads are marked"
                ticks = [
                    float(v)
                    for v in page.eval_on_selector_all("#chart text.tick", "e => e.map(t => t.dataset.value)")
                ]
                step = ticks[1] - ticks[0]
                mantissa = step / 10 ** __import__("math").floor(__import__("math").log10(step))
                assert ticks[0] == 0 and round(mantissa, 6) in (1, 2, 5), ticks  # 0, 1k, 2k: round ticks
                assert all(abs(t - i * step) < 1e-6 * step for i, t in enumerate(ticks)), ticks
                wait_for(
                    lambda: page.locator("#chart polyline.task").count() >= 1,
                    timeout=30,
                    what="a line for the running task",
                )
                queue = page.locator("#queue tr").all_inner_texts()
                assert any("behind" in row for row in queue)
                page.screenshot(path=str(ARTIFACTS / "status-page-overview.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                page.screenshot(path=str(ARTIFACTS / "status-page-phone.png"), full_page=True)
                page.set_viewport_size({"width": 1280, "height": 900})

                page.locator('tr[data-job="flawed"]').first.click()
                page.locator("#job-view .failed-line").first.wait_for(timeout=10000)
                text = page.locator("#job-errors").inner_text()
                assert "line 2" in text and "not valid JSON" in text and "url" in text
                links = page.locator("#job-files a.download")
                names = links.all_inner_texts()
                assert {"batch.json", "echo.jsonl", "echo.errors.jsonl"} <= set(names)
                for i in range(links.count()):
                    href = links.nth(i).get_attribute("href")
                    body = urllib.request.urlopen(server.url + href, timeout=10).read()
                    assert body == (root / href.lstrip("/")).read_bytes()
                page.screenshot(path=str(ARTIFACTS / "status-page-job.png"), full_page=True)

                page.goto(server.url + "/#job/behind")
                page.locator("#cancel").wait_for(timeout=10000)
                wait_for(lambda: page.locator("#cancel").is_enabled(), timeout=10, what="cancel enabled")
                page.locator("#cancel").click()
                wait_for(
                    lambda: (batch_of(root, "behind") or {}).get("status") == "cancelled",
                    timeout=30,
                    what="cancelled",
                )
            finally:
                browser.close()
    finally:
        server.stop()
        daemon.kill(signal.SIGTERM)


def batch_of(root: Path, name: str) -> dict | None:
    try:
        return json.loads((root / "outbox" / name / "batch.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_with_a_key_every_route_but_healthz_needs_it(root: Path) -> None:
    import http.cookiejar
    import urllib.request

    server = Server(root, env={"DROPBOX_RUNNER_API_KEY": "sekrit"})
    server.wait_up()

    def status_of(path: str, headers: dict | None = None, opener=None, method: str = "GET", data=None) -> int:
        req = urllib.request.Request(server.url + path, headers=headers or {}, method=method, data=data)
        try:
            return (opener or urllib.request.build_opener()).open(req, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        routes = [
            "/",
            "/api/status",
            "/outbox/x/echo.jsonl",
            "/v1/models",
            "/v1/files",
            "/v1/batches",
            "/metrics",
        ]
        for path in routes:
            assert status_of(path) == 401, path
            assert status_of(path, {"Authorization": "Bearer wrong"}) == 401, path
        bearer = {"Authorization": "Bearer sekrit"}
        for path in ["/", "/api/status", "/v1/models", "/v1/files", "/v1/batches"]:
            assert status_of(path, bearer) == 200, path
        assert status_of("/outbox/x/echo.jsonl", bearer) == 404
        assert status_of("/healthz") == 200
        # A browser opens /?key=... once; the page's own requests then carry the cookie.
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        assert status_of("/?key=sekrit", opener=browser) == 200
        assert status_of("/api/status", opener=browser) == 200
        # hostile create calls are answered with 4xx, never a 500
        for body in (b"[1]", b"not json", b'{"input_file_id": [1]}', b'{"input_file_id": {"a": 1}}'):
            code = status_of(
                "/v1/batches", {**bearer, "Content-Type": "application/json"}, method="POST", data=body
            )
            assert 400 <= code < 500, body
    finally:
        server.stop()

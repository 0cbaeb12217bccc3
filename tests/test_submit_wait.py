"""`submit --wait`: it follows the batch.json carrying its own submit_id, and its exit code says how
the job ended (0 every model completed, 1 failed/expired/cancelled, 2 usage error or timeout)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from dropbox_runner.cli import main
from dropbox_runner.intake.submit import Followed, follow
from dropbox_runner.layout import Layout

from helpers import batch_json, chat_line, run_once, wait_for, write_jsonl


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def daemon(root: Path, daemon):
    d = daemon(root)
    yield d
    d.kill(signal.SIGTERM)


def test_wait_follows_its_own_drop_past_a_name_an_earlier_job_holds(
    root: Path, tmp_path: Path, daemon
) -> None:
    earlier = write_jsonl(root / "inbox/echo/mine.jsonl", [chat_line(0)])
    wait_for(lambda: (batch_json(root, "mine") or {}).get("status") == "completed", what="the earlier job")
    assert not earlier.exists()
    src = write_jsonl(tmp_path / "mine.jsonl", [chat_line(0), chat_line(1), chat_line(1), chat_line(2)])
    result = invoke(
        "submit", str(src), "--model", "echo", "--wait", "--timeout", "120", "--metadata", "team=x"
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == "outbox/mine.2/", lines
    assert "mine echo: completed, 3 of 4 lines succeeded, 1 failed (outbox/mine.2/echo.errors.jsonl)" in lines
    mine = batch_json(root, "mine.2")
    assert mine["metadata"]["team"] == "x" and mine["metadata"]["submit_id"].startswith("sub_")
    assert batch_json(root, "mine")["metadata"] == {}, "the earlier job is not the one followed"


def test_wait_exits_1_when_the_job_fails(root: Path, tmp_path: Path, daemon) -> None:
    src = write_jsonl(tmp_path / "junk.jsonl", ["not json", "{}"])
    result = invoke("submit", str(src), "--models", "echo,echo2", "--wait", "--timeout", "120")
    assert result.exit_code == 1, result.output
    assert "junk: the file has no valid request line" in result.output
    assert result.output.strip().splitlines()[-1] == "outbox/junk/"


def test_wait_exits_1_when_the_job_expires(root: Path, tmp_path: Path, daemon) -> None:
    # paced runs 16 lines per 10 ms at most: 5000 lines take at least 3 s, longer than the window
    src = write_jsonl(tmp_path / "late.jsonl", [chat_line(i) for i in range(5000)])
    result = invoke("submit", str(src), "--model", "paced", "--completion-window", "1s", "--wait")
    assert result.exit_code == 1, result.output
    assert batch_json(root, "late")["status"] == "expired"
    assert result.output.strip().splitlines()[-1] == "outbox/late/"


def test_wait_exits_1_when_the_job_is_cancelled(root: Path, tmp_path: Path, daemon) -> None:
    src = write_jsonl(tmp_path / "big.jsonl", [chat_line(i) for i in range(20000)])
    outcome = {}
    waiter = threading.Thread(
        target=lambda: outcome.update(r=invoke("submit", str(src), "--model", "paced", "--wait")), daemon=True
    )
    waiter.start()
    wait_for(lambda: (batch_json(root, "big") or {}).get("status") == "in_progress", what="the job running")
    assert invoke("cancel", "big").exit_code == 0
    waiter.join(timeout=120)
    assert not waiter.is_alive()
    assert outcome["r"].exit_code == 1, outcome["r"].output
    assert "big paced: cancelled" in outcome["r"].output


def test_wait_exits_2_when_the_timeout_runs_out(root: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", [chat_line(0)])
    result = invoke("submit", str(src), "--model", "echo", "--wait", "--timeout", "0.3")  # no daemon runs
    assert result.exit_code == 2, result.output
    assert "timed out after 0.3s" in result.output
    assert result.output.strip().splitlines()[-1] == "t: not taken yet"
    run_once(root)  # the drop was left in the inbox whole, and runs later
    assert batch_json(root, "t")["status"] == "completed"


@pytest.mark.parametrize(
    "args, said",
    [
        (["--timeout", "5"], "--timeout goes with --wait"),
        (["--metadata", "novalue"], "'novalue' is not key=value"),
        ([f"--metadata=k{i}=v" for i in range(17)], '"k16" is pair 17'),
        (["--metadata", "k" * 65 + "=v"], "longer than 64 characters"),
        (["--metadata", "k=" + "v" * 513], "metadata.k: the value is longer than 512"),
        (["--completion-window", "soon"], "'soon' is not a duration"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--priority", "100001"], "--priority"),  # a manifest would refuse it, and --wait never end
    ],
)
def test_usage_errors_exit_2_and_drop_nothing(root: Path, tmp_path: Path, args: list[str], said: str) -> None:
    src = write_jsonl(tmp_path / "u.jsonl", [chat_line(0)])
    result = invoke("submit", str(src), "--model", "echo", *args)
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert not list((root / "inbox/echo").iterdir())


def test_submit_writes_window_max_tokens_and_metadata_into_the_manifest(root: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "m.jsonl", [chat_line(0)])
    result = invoke(
        "submit",
        str(src),
        "--model",
        "echo",
        "--completion-window",
        "2h",
        "--max-tokens",
        "7",
        "--metadata",
        "a=b=c",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "inbox/echo/m.manifest.json").read_text())
    assert manifest["completion_window"] == "2h" and manifest["defaults"] == {"max_tokens": 7}
    assert manifest["metadata"]["a"] == "b=c"
    run_once(root)
    batch = batch_json(root, "m")
    assert batch["completion_window"] == "2h" and batch["expires_at"] is not None
    assert batch["metadata"]["a"] == "b=c"


def test_on_a_terminal_the_progress_lines_are_redrawn_in_place(root: Path) -> None:
    layout = Layout(root)
    doc = {
        "status": "in_progress",
        "metadata": {"submit_id": "sub_1"},
        "models": {
            "echo": {"status": "completed", "request_counts": {"total": 4, "completed": 4, "failed": 0}},
            "echo2": {"status": "in_progress", "request_counts": {"total": 4, "completed": 1, "failed": 1}},
        },
    }
    (root / "outbox/r").mkdir()
    (root / "outbox/r/batch.json").write_text(json.dumps(doc))
    shown: list[str] = []

    def echo(text: str) -> None:  # the job ends after the first drawing
        shown.append(text)
        doc["status"] = doc["models"]["echo2"]["status"] = "completed"
        doc["models"]["echo2"]["request_counts"]["completed"] = 3
        (root / "outbox/r/batch.json").write_text(json.dumps(doc))

    assert follow(layout, [Followed("r", "sub_1")], 60, echo, tty=True)
    assert shown == [
        "\x1b[2Kr echo: completed 4/4 done, 0 failed, 0 tok/s\n\x1b[2Kr echo2: in_progress 2/4 done, 1 failed, 0 tok/s",
        "\x1b[F\x1b[F\x1b[2Kr echo: completed 4/4 done, 0 failed, 0 tok/s\n"
        "\x1b[2Kr echo2: completed 4/4 done, 1 failed, 0 tok/s",
    ]

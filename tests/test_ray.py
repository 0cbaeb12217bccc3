"""Copies of a model on Ray (`executor: ray`): a two-node cluster on 127.0.0.1, shared by the tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address stays 127.0.0.1
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from helpers import (  # noqa: E402
    answers,
    batch_json,
    chat_line,
    completed,
    expected,
    finished,
    gated_job,
    models_yaml,
    open_gate,
    ray_models,
    read_jsonl,
    run_once,
    served_together,
    snapshot,
    wait_for,
    write_jsonl,
)


@pytest.fixture(scope="module")
def cluster():
    c = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"node_a": 1}},
    )
    node_b = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node_b": 1})
    c.wait_for_nodes()
    yield c, node_b
    c.shutdown()


def test_three_ray_copies_on_two_nodes_give_the_same_file_as_one_local_copy(cluster, root: Path) -> None:
    c, _ = cluster
    ray_models(root, c.address)
    lines = [chat_line(i) for i in range(3000)] + [chat_line(7)]
    write_jsonl(root / "inbox/rr/r.jsonl", lines)
    write_jsonl(root / "inbox/slow/l.jsonl", lines)
    proc = run_once(root, timeout=240, subprocess=True)  # Ray stays out of the test process
    assert "loading 3 copies of rr (ray)" in proc.stderr
    assert answers(root / "outbox/r/rr.jsonl") == answers(root / "outbox/l/slow.jsonl")
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes()) if ray.is_initialized() else True


def test_a_copy_killed_and_a_node_removed_mid_job_lose_nothing(cluster, root: Path, daemon) -> None:
    c, node_b = cluster
    ray_models(root, c.address)
    write_jsonl(root / "inbox/rr/big.jsonl", [chat_line(i) for i in range(40000)])
    d = daemon(root)
    try:
        copies = wait_for(
            lambda: (
                len([x for x in snapshot(root).get("copies") or [] if x["loaded"]]) == 3
                and snapshot(root)["copies"]
            ),
            timeout=120,
        )

        def done() -> int:
            return completed(root, "big", "rr")

        wait_for(lambda: done() > 2000, timeout=60)
        os.kill(copies[0]["pid"], signal.SIGKILL)  # a copy's Ray worker process, killed
        wait_for(lambda: done() > 8000, timeout=60)
        c.remove_node(node_b)  # and a whole node
        wait_for(lambda: finished(root, "big"), timeout=240, what="the job after the faults")
    finally:
        d.kill(signal.SIGTERM)
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node_b": 1})
    out = read_jsonl(root / "outbox/big/rr.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(40000)]
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert "lost its Ray actor" in (root / "state/daemon.log").read_text()


def ray_processes(mark: str = "") -> set[int]:
    """Ray's processes on the machine; with `mark`, only those started under that TEST_MARK (other
    sessions start Ray of their own meanwhile)."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes() + b"\0" if mark else b""
        except OSError:
            continue
        if b"raylet" in cmd or b"gcs_server" in cmd or b"ray::" in cmd or b"default_worker" in cmd:
            if f"TEST_MARK={mark}\0".encode() in env or not mark:
                found.add(int(pid))
    return found


def test_kill_9_of_the_daemon_ends_its_private_ray_and_the_restart_resumes(root: Path, daemon) -> None:
    ray_models(root, "local")
    write_jsonl(root / "inbox/rr/k.jsonl", [chat_line(i) for i in range(30000)])
    mark = f"kill9-{os.getpid()}-{root.parent.name}"
    d = daemon(root, env={"TEST_MARK": mark})
    wait_for(lambda: len([x for x in snapshot(root).get("copies") or [] if x["loaded"]]) == 3, timeout=120)
    ours = ray_processes(mark)
    assert ours, "the daemon started its own Ray"
    d.kill(signal.SIGKILL)
    try:
        wait_for(
            lambda: not (ray_processes(mark) & ours), timeout=60, what="the daemon's Ray processes to end"
        )
    except AssertionError:
        left = [Path(f"/proc/{x}/cmdline").read_bytes()[:200] for x in ray_processes(mark) & ours]
        raise AssertionError(f"left behind: {left}") from None
    run_once(root, timeout=240, subprocess=True)  # Ray stays out of the test process
    assert [x["custom_id"] for x in read_jsonl(root / "outbox/k/rr.jsonl")] == [
        f"q-{i}" for i in range(30000)
    ]


def test_an_unreachable_ray_address_fails_that_models_tasks_and_the_others_run(root: Path) -> None:
    ray_models(root, "127.0.0.1:1")
    write_jsonl(root / "inbox/rr/u.jsonl", [chat_line(0)])
    write_jsonl(root / "inbox/echo/fine.jsonl", [chat_line(0)])
    run_once(root, timeout=240, subprocess=True)  # Ray stays out of the test process
    assert batch_json(root, "fine")["status"] == "completed"
    batch = batch_json(root, "u")
    assert batch["status"] == "failed" and "ray_address" in batch["models"]["rr"]["error"]


def test_an_empty_poll_is_no_sign_of_life_so_a_hung_copy_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 item 6: a hung actor still answers polls, with nothing; the stall check must see it."""
    from types import SimpleNamespace

    from dropbox_runner.slot.copies import ray as raycopies

    copy = object.__new__(raycopies.RayCopy)
    copy.name, copy.loaded, copy._dead, copy._poll = "rr", True, None, "ref"
    copy.last_event_at = __import__("time").monotonic() - 1000  # its last event, long ago
    monkeypatch.setattr(raycopies.ray, "wait", lambda refs, timeout: (refs, []))
    monkeypatch.setattr(raycopies.ray, "get", lambda ref: [])  # the actor's outbox is empty
    assert copy.events(0) == []
    settings = SimpleNamespace(load_timeout_seconds=1800, stall_timeout_seconds=300)
    assert copy.silent_for() > 300
    assert "hung" in copy.trouble(settings, busy=True)


def test_two_tasks_share_the_ray_copies_with_one_load_per_copy(cluster, root: Path, daemon) -> None:
    """Issue 22 item 4: Ray copies belong to the slot; a second task joins them without a reload."""
    c, _ = cluster
    ray_models(root, c.address)
    gate = f"gate_on: GATE, gate_file: {root / 'gate.open'}"
    entry = f"{{engine: echo, replicas: 2, executor: ray, engine_args: {{delay_ms: 5, max_in_flight: 8, {gate}}}}}"
    models_yaml(root, models={"rg": entry})
    (root / "inbox/rg").mkdir()
    write_jsonl(root / "inbox/rg/a.jsonl", gated_job(300))
    write_jsonl(root / "inbox/rg/b.jsonl", gated_job(200))
    d = daemon(root)
    try:
        ids = wait_for(
            lambda: all(batch_json(root, n) for n in "ab") and [batch_json(root, n)["id"] for n in "ab"],
            timeout=120,
        )
        wait_for(lambda: served_together(root, ids), timeout=120, what="both tasks on the Ray copies")
        loaded = lambda: [c for c in snapshot(root).get("copies") or [] if c.get("loaded")]  # noqa: E731
        wait_for(
            lambda: len(loaded()) == 2, timeout=120, what="both copies loaded (one may serve both tasks)"
        )
        open_gate(root)
        wait_for(lambda: finished(root, "a") and finished(root, "b"), timeout=120, what="both jobs")
    finally:
        d.kill(signal.SIGTERM)
    log = (root / "state/daemon.log").read_text()
    assert log.count("loaded copy") == 2 and log.count("loading 2 copies of rg (ray)") == 1
    for name, n in (("a", 300), ("b", 200)):
        got = [(a[0], a[1]) for a in answers(root / f"outbox/{name}/rg.jsonl")]
        assert got == expected(n)

"""The private Ray head's files (`ray_address: local`): under the root where Ray's socket paths fit,
else in a short folder of the root's own (docs/replicas.md)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address stays 127.0.0.1
pytest.importorskip("ray")


from dropbox_runner.slot.copies import ray as raycopies  # noqa: E402

from helpers import chat_line, finished, ray_models, read_jsonl, wait_for, write_jsonl  # noqa: E402


@pytest.fixture
def short_root(root: Path):
    """The test's root moved to a path short enough for Ray's sockets under state/ray."""
    short = Path(tempfile.mkdtemp(prefix="r", dir="/tmp")) / "root"
    shutil.copytree(root, short, symlinks=True)
    yield short
    shutil.rmtree(short.parent, ignore_errors=True)


def private(folder: Path) -> bool:
    st = folder.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def test_rays_folder_is_the_roots_when_its_sockets_fit_else_a_short_private_one(
    short_root: Path, tmp_path: Path
) -> None:
    state = short_root / "state"
    assert raycopies.ray_folder(state) == state / "ray" and private(state / "ray")
    long = tmp_path / ("x" * 60) / "state"
    folder = raycopies.ray_folder(long)
    try:
        assert len(os.fsencode(folder)) + raycopies.SOCKET_TAIL <= raycopies.SOCKET_PATH_MAX
        assert private(folder) and raycopies.ray_folder(long) == folder, "one folder per root"
        (folder / "session_old").mkdir()
        (folder / "session_old/plasma_store").write_text("x")
        assert list(raycopies.ray_folder(long).iterdir()) == [], "an earlier daemon's files are removed"
        folder.chmod(0o777)  # someone else's, or open to them: not used
        other = raycopies.ray_folder(long)
        assert other != folder and private(other)
        shutil.rmtree(other)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_private_heads_sessions_and_shard_files_live_under_the_root(short_root: Path, daemon) -> None:
    ray_models(short_root, "local")
    write_jsonl(short_root / "inbox/rr/s.jsonl", [chat_line(i) for i in range(20000)])
    shards = short_root / "state/ray/shards"
    d = daemon(short_root)
    try:
        wait_for(lambda: shards.is_dir() and any(shards.iterdir()), timeout=180, what="a shard file")
        assert list(shards.parent.glob("t/session_*/sockets")), "Ray's sessions are under the root"
        assert private(shards.parent), "Ray's own folder (open to all) is inside one of ours"
        wait_for(lambda: finished(short_root, "s") or not d.alive(), timeout=240, what="the job")
    finally:
        d.kill(signal.SIGTERM)
    assert [x["custom_id"] for x in read_jsonl(short_root / "outbox/s/rr.jsonl")] == [
        f"q-{i}" for i in range(20000)
    ]
    assert not shards.exists() or list(shards.iterdir()) == [], "every shard file was removed"

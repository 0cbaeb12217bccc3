"""Inbox names: every name the filesystem allows (up to 255 bytes, any bytes but `/`) is taken,
ignored or rejected with a reason, and none stops the daemon, at start or later (section 14)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropbox_runner.config import load_registry
from dropbox_runner.daemon.loop import Daemon as Core
from dropbox_runner.intake.names import MAX_STEM_BYTES, NAME_MAX, outbox_stem
from dropbox_runner.intake.scanner import is_ignored_name
from dropbox_runner.intake.watcher import Watcher
from dropbox_runner.layout import Layout

from helpers import ECHO_YAML, batch_json, chat_line, models_yaml, read_jsonl, run_once, write_jsonl

LONG = "n" * (NAME_MAX - len(".jsonl"))  # a 255-byte drop name: no room for `.manifest.json`


def drop_bytes(root: Path, folder: str, name: bytes, lines: list) -> Path:
    path = Path(os.fsdecode(os.fsencode(root / "inbox" / folder) + b"/" + name))
    return write_jsonl(path, lines)


def outbox_names(root: Path) -> set[bytes]:
    return {os.fsencode(p.name) for p in (root / "outbox").iterdir()}


def test_a_255_byte_name_in_a_model_folder_runs_and_gets_a_short_readable_folder(root: Path) -> None:
    write_jsonl(root / f"inbox/echo/{LONG}.jsonl", [chat_line(i) for i in range(3)])
    write_jsonl(root / "inbox/echo/plain.jsonl", [chat_line(0)])
    run_once(root, timeout=60)  # before: ENAMETOOLONG from find_manifest at every start
    folder = outbox_stem(LONG)
    assert folder.startswith("n" * 100) and len(folder.encode()) < MAX_STEM_BYTES
    assert batch_json(root, folder)["status"] == "completed"
    assert batch_json(root, folder)["input_file"] == f"{LONG}.jsonl", "batch.json names the drop"
    assert len(read_jsonl(root / "outbox" / folder / "echo.jsonl")) == 3
    assert batch_json(root, "plain")["status"] == "completed"
    write_jsonl(root / f"inbox/echo/{LONG}.jsonl", [chat_line(7)])  # the same name again: `.2`
    run_once(root, timeout=60)
    assert batch_json(root, f"{folder}.2")["status"] == "completed"
    assert not list((root / "inbox/echo").iterdir())


def test_a_255_byte_name_at_the_top_is_rejected_with_a_reason_that_fits(root: Path) -> None:
    drop = write_jsonl(root / f"inbox/{LONG}.jsonl", [chat_line(0)])
    os.utime(drop, (0, 0))  # dropped long ago: past manifest_grace_seconds
    proc = run_once(root, timeout=60)
    batch = batch_json(root, outbox_stem(LONG))
    assert batch["status"] == "failed", proc.stderr[-2000:]
    assert "this name leaves no room for one" in batch["errors"]["data"][0]["message"]
    assert not (root / f"inbox/{LONG}.jsonl").exists(), "rejected: taken into state/, not left"


def test_names_that_are_not_utf8_run_or_are_rejected_and_publish_utf8_folders(root: Path) -> None:
    drop_bytes(root, "echo", b"caf\xe9 \xff.jsonl", [chat_line(0), chat_line(1)])
    os.mkdir(os.fsencode(root / "inbox") + b"/mod\xe8le")
    drop_bytes(root, "", b"mod\xe8le/x.jsonl", [chat_line(0)])
    proc = run_once(root, timeout=60)
    names = {n.decode("utf-8") for n in outbox_names(root)}  # every folder name is UTF-8
    [ran] = [n for n in names if n.startswith("caf_ _-")]
    batch = batch_json(root, ran)
    assert batch["status"] == "completed" and batch["input_file"] == "caf\ufffd \ufffd.jsonl"
    assert len(read_jsonl(root / "outbox" / ran / "echo.jsonl")) == 2
    [refused] = names - {ran}
    reason = batch_json(root, refused)["errors"]["data"][0]["message"]
    assert "inbox/mod\ufffdle/ is not a model of models.yaml" in reason
    assert not list(Path(root / "inbox/echo").iterdir())
    assert "Logging error" not in proc.stderr, "every name is logged in a form the log can hold"


def test_submit_of_a_255_byte_name_picks_a_name_that_fits_and_runs(root: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dropbox_runner.cli import main

    src = write_jsonl(tmp_path / f"{LONG}.jsonl", [chat_line(0)])
    for args in (["--model", "echo"], ["--models", "echo,echo2"]):  # the second writes a manifest
        result = CliRunner().invoke(main, ["submit", str(src), *args, "--root", str(root)])
        assert result.exit_code == 0, result.output  # before: ENAMETOOLONG on the manifest's name
    run_once(root, timeout=60)
    folders = sorted(p.name for p in (root / "outbox").iterdir())
    assert len(folders) == 2 and all(len(f.encode()) <= MAX_STEM_BYTES for f in folders)
    assert all(batch_json(root, f)["status"] == "completed" for f in folders)


def test_outbox_names_are_utf8_short_and_keep_short_utf8_stems() -> None:
    @given(st.binary(min_size=1, max_size=NAME_MAX - len(".jsonl")))
    @settings(max_examples=300)
    def check(stem_bytes: bytes) -> None:
        stem = os.fsdecode(stem_bytes.replace(b"/", b"_").replace(b"\0", b"_"))
        folder = outbox_stem(stem)
        data = folder.encode("utf-8")  # raises if it is not UTF-8
        assert len(data) <= MAX_STEM_BYTES and b"/" not in data and b"\0" not in data
        try:
            short_utf8 = len(stem.encode("utf-8")) <= MAX_STEM_BYTES
        except UnicodeEncodeError:
            short_utf8 = False
        assert (folder == stem) == short_utf8

    check()


# -- the property: any name, in the inbox or a model folder, at start or later ---------------------
NAMES = st.one_of(
    st.binary(min_size=1, max_size=NAME_MAX - len(".jsonl")).map(lambda b: b + b".jsonl"),
    st.binary(min_size=1, max_size=NAME_MAX),
    st.integers(NAME_MAX - 20, NAME_MAX - len(".jsonl")).map(lambda n: b"\xc3\xa9" * (n // 2) + b".jsonl"),
).map(lambda b: b.replace(b"/", b"\xff").replace(b"\0", b"\xfe")[:NAME_MAX])


def intake_once(root: Path, at_start: bool) -> None:
    """The daemon's own intake (recovery at start, then a scan) in-process, with no settle time."""
    registry = load_registry(root)
    registry.settings.settle_seconds = registry.settings.manifest_grace_seconds = 0
    core = Core(Layout(root), registry)
    core.layout.make(list(registry.models))
    if at_start:
        core._recover()
    core.watcher = Watcher(core.layout.inbox, True, 1.0)
    for _ in range(2):  # the first scan sees the candidate, the second takes it
        core.watcher.changed.set()
        core._intake()


@given(name=NAMES, in_model_folder=st.booleans(), at_start=st.booleans())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_name_is_taken_ignored_or_rejected_and_never_stops_intake(
    name: bytes, in_model_folder: bool, at_start: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models_yaml(root, text=ECHO_YAML)
        folder = "echo" if in_model_folder else ""
        (root / "inbox/echo").mkdir(parents=True)
        path = drop_bytes(root, folder, name, [chat_line(0)])
        intake_once(root, at_start)
        left = os.path.lexists(path)
        ignored = is_ignored_name(path.name) or not path.name.endswith(".jsonl") or path.name == ".jsonl"
        assert left == ignored, f"{name!r}: taken {not left}, ignored by name {ignored}"
        for out in (root / "outbox").iterdir():
            data = os.fsencode(out.name)
            assert data.decode("utf-8") and len(data) <= MAX_STEM_BYTES
            batch = json.loads((out / "batch.json").read_text(encoding="utf-8"))
            assert batch["status"] in ("queued", "failed"), batch
        assert len(list((root / "outbox").iterdir())) == (0 if ignored else 1)
        assert not list((root / "state/claims").iterdir()), "no claim left half done"

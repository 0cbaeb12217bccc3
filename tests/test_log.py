"""The result log: group commit behind a marker, and recovery from torn, lost or extra bytes."""

from __future__ import annotations

import json
from pathlib import Path

from dropbox_runner.results.log import ResultLog, committed_records, marker_path, read_marker


def fill(path: Path, indices: range, total: int = 100, commit_every: int = 10) -> None:
    log = ResultLog(path, total)
    log.recover()
    for i in indices:
        log.append(i, i % 7 != 0, 3, 5, json.dumps({"i": i}).encode())
        if (i + 1) % commit_every == 0:
            log.commit()
    log.commit()
    log.close()


def reopen(path: Path, total: int = 100) -> tuple[ResultLog, list[str]]:
    log = ResultLog(path, total)
    rec = log.recover()
    return log, rec.notes


def test_commit_moves_the_marker_with_counts(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    fill(p, range(30))
    m = read_marker(p)
    assert (m.count, m.bytes, m.prompt_tokens, m.completion_tokens) == (30, p.stat().st_size, 90, 150)
    assert m.failed == len([i for i in range(30) if i % 7 == 0])
    assert [r.index for r in committed_records(p)] == list(range(30))


def test_torn_last_record_is_cut_and_said(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    fill(p, range(20))
    with open(p, "ab") as f:
        f.write(b'20 o 3 5 deadbeef {"i": 2')  # a write cut by a crash, past the marker
    log, notes = reopen(p)
    assert sum(log.done) == 20 and "uncommitted" in notes[0]
    assert p.stat().st_size == read_marker(p).bytes


def test_corrupt_record_inside_the_marker_is_cut(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    fill(p, range(20))
    data = bytearray(p.read_bytes())
    pos = data.index(b'{"i": 15}')
    data[pos + 6] = ord("9")  # flip a byte: the checksum no longer matches
    p.write_bytes(bytes(data))
    log, notes = reopen(p)
    assert sum(log.done) == 15
    assert any("corrupt" in n for n in notes)
    assert read_marker(p).count == 15


def test_marker_ahead_of_the_log_keeps_the_valid_records(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    fill(p, range(20))
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 5)  # the last records never reached the disk
    log, notes = reopen(p)
    assert sum(log.done) == 19
    assert any("marker says" in n for n in notes)
    assert read_marker(p).bytes == p.stat().st_size


def test_marker_behind_the_log_drops_what_it_does_not_cover(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    fill(p, range(10))
    old_marker = marker_path(p).read_bytes()
    fill(p, range(10, 20))
    marker_path(p).write_bytes(old_marker)  # power cut before the second marker was durable
    log, notes = reopen(p)
    assert [i for i in range(100) if log.done[i]] == list(range(10))
    assert "uncommitted" in notes[0]


def test_one_writer_at_a_time_and_the_kernel_drops_a_dead_writers_lock(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pytest

    p = tmp_path / "m.log"
    first = ResultLog(p, 10)
    with pytest.raises(BlockingIOError):
        ResultLog(p, 10, blocking_lock=False)
    first.close()
    second = ResultLog(p, 10, blocking_lock=False)
    second.close()
    # A writer killed with SIGKILL leaves no lock behind.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from dropbox_runner.results.log import ResultLog; import time; "
            f"ResultLog(__import__('pathlib').Path({str(p)!r}), 10); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(BlockingIOError):
            ResultLog(p, 10, blocking_lock=False)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    ResultLog(p, 10, blocking_lock=False).close()


def test_records_of_the_first_round_without_a_cached_count_still_read() -> None:
    import zlib

    from dropbox_runner.results.log import decode_record, encode_record

    payload = b'{"custom_id": "a b"}'
    old = b"12 o 3 4 %08x %s\n" % (zlib.crc32(payload), payload)
    rec = decode_record(old, 0)
    assert rec is not None and (rec.index, rec.ok, rec.prompt_tokens, rec.completion_tokens) == (
        12,
        True,
        3,
        4,
    )
    assert rec.cached_tokens == 0 and rec.payload == payload
    new = decode_record(encode_record(123456, False, 5, 6, payload, 2), 0)
    assert (new.index, new.ok, new.prompt_tokens, new.completion_tokens, new.cached_tokens) == (
        123456,
        False,
        5,
        6,
        2,
    )
    assert decode_record(old.replace(b" 3 ", b" 9 ", 1)[:-1] + b"x\n", 0) is None

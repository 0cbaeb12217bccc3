"""Durable file primitives: the one staged writer, and opening files that must be regular files.

Every file the runner writes goes through `staged`: a hidden name opened with O_EXCL|O_NOFOLLOW
(a planted symlink cannot redirect it), fsync, rename, fsync the folder, clean up on failure.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from hashlib import blake2b
from pathlib import Path
from typing import IO, Any

import orjson


class NotRegularFile(OSError):
    """A path that had to be a regular file is a symlink, FIFO, device or folder."""


class _Discarded(Exception):
    pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A test hook, off by default: with $DROPBOX_RUNNER_TEST_ENOSPC set to a path, every staged write
# fails with ENOSPC while that file exists (the nemesis's full disk where no tmpfs can be mounted).
TEST_ENOSPC_ENV = "DROPBOX_RUNNER_TEST_ENOSPC"


def _injected_disk_full() -> None:
    flag = os.environ.get(TEST_ENOSPC_ENV)
    if flag and os.path.exists(flag):
        raise OSError(errno.ENOSPC, "No space left on device (injected by $" + TEST_ENOSPC_ENV + ")")


def _open_new(folder: Path, name: str) -> tuple[Path, int]:
    """A fresh hidden staging file in `folder`; never follows or reuses an existing entry."""
    _injected_disk_full()
    name = os.fsdecode(os.fsencode(name)[:200])  # a long target name still leaves room for the rest
    while True:
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            continue


@contextmanager
def staged(path: Path, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write `path` through a staging file: readers see the old file or the whole new one, never a mix.

    Setting `discard = True` on the yielded file drops it: `path` is left as it was.
    """
    tmp, fd = _open_new(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.discard = False
            yield f
            if f.discard:
                raise _Discarded
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except _Discarded:
        tmp.unlink(missing_ok=True)
        return
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    with staged(path, durable=durable) as f:
        f.write(data)


def write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    write_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n", durable=durable)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def read_json_or_none(path: Path) -> Any | None:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, orjson.JSONDecodeError):
        return None


def open_regular(path: Path) -> IO[bytes]:
    """Open for reading only if `path` is a regular file itself: no symlink followed, no FIFO waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise NotRegularFile(f"{path.name} is not a regular file (a symlink)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path.name} is not a regular file (symlink, FIFO, device or folder)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, cap: int) -> bytes:
    """The bytes of a regular file of at most `cap` bytes; raises NotRegularFile or ValueError."""
    with open_regular(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{path.name} is larger than {cap} bytes")
    return data


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a regular file `src` to `dst` through the staged writer."""
    with open_regular(src) as fin, staged(dst) as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)


def move_into(src: Path, dst: Path, *, after_copy: Any = None) -> None:
    """Move a file to `dst`: an atomic rename, or copy + fsync + verify + unlink across filesystems.

    `after_copy` runs between a verified copy and the removal of `src` (a crash point for tests).
    """
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_atomic(src, dst)
        if not files_equal(src, dst):
            dst.unlink()
            raise OSError(f"copy of {src} to {dst} did not verify") from exc
        if after_copy is not None:
            after_copy()
        src.unlink()
        fsync_dir(src.parent)
    fsync_dir(dst.parent)


def files_equal(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def folder_digest(folder: Path) -> str:
    """A digest of every file under the folder: names and bytes (missing folder: a digest of nothing)."""
    h = blake2b(digest_size=12)
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    except (OSError, ValueError):  # missing, unreadable, a NUL byte in the name
        files = []
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    return h.hexdigest()

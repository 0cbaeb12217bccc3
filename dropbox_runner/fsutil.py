"""Durable file primitives: stage under a hidden name, fsync, rename, fsync the folder.

Every file the runner publishes or journals goes through `write_atomic`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never a mix."""
    tmp = _staging_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    write_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n", durable=durable)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def read_json_or_none(path: Path) -> Any | None:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` under a staging name, fsync, rename, fsync the folder."""
    tmp = _staging_name(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def move_into(src: Path, dst: Path) -> None:
    """Move a file to `dst`: an atomic rename, or copy + fsync + verify + unlink across filesystems."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: src and dst on different filesystems
            raise
        copy_atomic(src, dst)
        if not files_equal(src, dst):
            dst.unlink()
            raise OSError(f"copy of {src} to {dst} did not verify") from exc
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

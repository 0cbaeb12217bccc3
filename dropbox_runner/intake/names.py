"""Inbox names as the filesystem gives them (up to 255 bytes, any bytes but `/`) and the forms the
runner shows and publishes: always valid UTF-8, and short enough for every name derived from them.

Python hands undecodable bytes over as lone surrogates (`surrogateescape`): such a string opens the
file, but cannot go into JSON or a UTF-8 log. `shown` is the form for those; `raw` keeps the bytes.
"""

from __future__ import annotations

import os
from hashlib import blake2b
from pathlib import Path

NAME_MAX = 255  # bytes in one name, on every filesystem Linux mounts read-write
# The longest name the runner derives from a drop's stem beside it: `<stem>.manifest.json`.
LONGEST_SIDECAR = len(".manifest.json")
MAX_STEM_BYTES = NAME_MAX - LONGEST_SIDECAR
SHORT_STEM_BYTES = 120  # the readable part of a shortened outbox name
HASH_HEX = 8


def raw(name: str | Path) -> bytes:
    return os.fsencode(name)


def is_utf8(name: str | Path) -> bool:
    try:
        raw(name).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def shown(name: str | Path) -> str:
    """A name or path as text for logs, reasons and JSON: undecodable bytes become U+FFFD."""
    return raw(name).decode("utf-8", "replace")


def fits(name: str) -> bool:
    return len(raw(name)) <= NAME_MAX


def beside(path: Path, suffix: str) -> Path | None:
    """`<path><suffix>` in the same folder, or None when that name would pass NAME_MAX (so no such
    file can exist, and asking the filesystem would raise ENAMETOOLONG)."""
    name = path.name + suffix
    return path.with_name(name) if fits(name) else None


def outbox_stem(stem: str, budget: int = MAX_STEM_BYTES) -> str:
    """The outbox folder name for a drop's stem: the stem itself when it is UTF-8 and leaves room for
    every name derived from it; else a shortened, readable form plus a short hash of the bytes."""
    data = raw(stem)
    if is_utf8(stem) and len(data) <= budget:
        return stem
    readable = data.decode("utf-8", "replace").replace("\ufffd", "_")
    cut = readable.encode("utf-8")[:SHORT_STEM_BYTES].decode("utf-8", "ignore")  # whole characters
    return f"{cut}-{blake2b(data, digest_size=HASH_HEX // 2).hexdigest()}"


def to_record(path: Path | None) -> str | None:
    """A path for a JSON record, exactly (hex of its bytes), so a non-UTF-8 name survives a restart."""
    return raw(path).hex() if path is not None else None


def from_record(hex_bytes: str | None, fallback: str | None) -> Path | None:
    if isinstance(hex_bytes, str):
        return Path(os.fsdecode(bytes.fromhex(hex_bytes)))
    return Path(fallback) if isinstance(fallback, str) else None

"""Which inbox files are complete drops: ignored names, regular files only, the settle rule.

A candidate is ready once its size and mtime (and its manifest's) have not changed for
`settle_seconds`, and, with `require_ready_marker`, once `<name>.jsonl.ready` exists.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dropbox_runner.config import Settings
from dropbox_runner.errors import is_environmental
from dropbox_runner.intake.names import beside, shown

log = logging.getLogger("dropbox_runner.intake")

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", "~")
MANIFEST_SUFFIXES = (".manifest.json", ".manifest.yaml", ".manifest.yml")


def is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


@dataclass(frozen=True)
class Drop:
    path: Path
    model_folder: str | None  # inbox/<model>/ drops; None for root-level drops
    manifest: Path | None
    reject: str | None = None  # set when the drop is to be taken only to be rejected

    @property
    def name(self) -> str:
        return self.path.name[: -len(".jsonl")]


@dataclass
class _Watch:
    signature: tuple
    stable_since: float


def find_manifest(folder: Path, stem: str) -> Path | None:
    for suffix in MANIFEST_SUFFIXES:
        p = beside(folder / stem, suffix)  # None: a name too long to exist
        if p is not None and _regular(p) is not None:
            return p
    return None


def _regular(path: Path) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


class Scanner:
    def __init__(
        self,
        inbox: Path,
        settings: Settings,
        known_models: list[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self.settings = settings
        self.known_models = known_models
        self.clock = clock
        self._watch: dict[Path, _Watch] = {}
        self._told: set[Path] = set()
        self.pending = 0  # candidates not yet settled: `run --once` waits for them
        self.waiting = 0  # root-level files waiting for their manifest's grace to end
        self.settles_at: float | None = None  # when the first pending candidate settles (clock's time)

    def _tell_once(self, path: Path, why: str) -> None:
        if path not in self._told:
            self._told.add(path)
            log.info("ignored %s: %s", shown(path), why)

    def candidates(self) -> list[tuple[Path, str | None]]:
        found: list[tuple[Path, str | None]] = []
        try:
            entries = list(os.scandir(self.inbox))
        except OSError as exc:
            if is_environmental(exc):
                raise
            self._tell_once(self.inbox, f"the inbox cannot be listed: {exc.strerror or exc}")
            return found
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                try:
                    subs = list(os.scandir(entry.path))
                except OSError:
                    continue
                for sub in subs:
                    self._consider(Path(sub.path), entry.name, sub, found)
            else:
                self._consider(Path(entry.path), None, entry, found)
        return found

    def _consider(self, path: Path, folder: str | None, entry: os.DirEntry, found: list) -> None:
        name = entry.name
        if is_ignored_name(name) or name.endswith(MANIFEST_SUFFIXES) or name.endswith(".jsonl.ready"):
            return
        if not name.endswith(".jsonl"):
            if entry.is_dir(follow_symlinks=False):
                self._tell_once(path, "a folder inside a model folder")
            else:
                self._tell_once(path, "only *.jsonl files are drops")
            return
        if not entry.is_file(follow_symlinks=False):
            self._tell_once(path, "not a regular file (symlink, FIFO, device or folder)")
            return
        if name == ".jsonl":
            return
        found.append((path, folder))

    def scan(self) -> list[Drop]:
        """The drops that are complete now; others are remembered until they settle.

        A boundary: a candidate that raises is told once in the log and left alone; no name stops it.
        """
        now = self.clock()
        ready: list[Drop] = []
        alive: set[Path] = set()
        self.pending = self.waiting = 0
        self.settles_at = None
        for path, folder in self.candidates():
            try:
                self._scan_one(path, folder, now, ready, alive)
            except Exception as exc:
                if is_environmental(exc):
                    raise
                alive.add(path)
                self._tell_once(path, f"it cannot be examined ({type(exc).__name__}: {exc})")
        for gone in set(self._watch) - alive:
            del self._watch[gone]
        return ready

    def _scan_one(self, path: Path, folder: str | None, now: float, ready: list, alive: set) -> None:
        st = _regular(path)
        if st is None:
            return
        alive.add(path)
        manifest = find_manifest(path.parent, path.name[: -len(".jsonl")])
        mst = _regular(manifest) if manifest else None
        sig = (st.st_size, st.st_mtime_ns, st.st_ino, mst and (mst.st_size, mst.st_mtime_ns))
        w = self._watch.get(path)
        if w is None:
            w = self._watch[path] = _Watch(sig, now)
        elif w.signature != sig:
            w.signature, w.stable_since = sig, now
        if now - w.stable_since < self.settings.settle_seconds:
            self.pending += 1
            due = w.stable_since + self.settings.settle_seconds
            self.settles_at = due if self.settles_at is None else min(self.settles_at, due)
            return
        marker = beside(path, ".ready")
        if self.settings.require_ready_marker and marker is not None and not marker.exists():
            return
        # The grace counts from the file's last change, so a restart does not start it over.
        drop = self._decide(path, folder, manifest, time.time() - st.st_mtime)
        if drop is not None and self.settings.require_ready_marker and marker is None:
            # Settled, but no marker can ever sit beside it: rejected, so the user learns why.
            reason = f"{shown(path.name)} is too long for its .ready marker (a name holds 255 bytes)"
            drop = Drop(path, folder, manifest, drop.reject or reason)
        if drop is not None:
            ready.append(drop)
        else:
            self.waiting += 1

    def _decide(self, path: Path, folder: str | None, manifest: Path | None, age: float) -> Drop | None:
        if folder is not None and folder not in self.known_models:
            known = ", ".join(self.known_models) or "none"
            return Drop(
                path,
                folder,
                manifest,
                f"inbox/{shown(folder)}/ is not a model of models.yaml (known models: {known})",
            )
        if folder is None and manifest is None:
            if age < self.settings.manifest_grace_seconds:
                return None
            name = shown(path.name)
            fix = (
                f"add {name[:-6]}.manifest.json with " + '{"models": ["<model>", ...]}'
                if beside(path.with_name(path.name[:-6]), ".manifest.json")
                else "rename it shorter and add a manifest (this name leaves no room for one)"
            )
            return Drop(
                path,
                None,
                None,
                f"{name} was dropped at the top of the inbox without a manifest; put it in "
                f"inbox/<model>/ or {fix}",
            )
        return Drop(path, folder, manifest)

    def forget(self, path: Path) -> None:
        self._watch.pop(path, None)

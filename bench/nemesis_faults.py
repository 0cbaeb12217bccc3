"""The nemesis's faults: one method per kind, each returning whether it was thrown; `Nemesis`
(bench/nemesis.py) picks them by weight and holds the state they read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from nemesis_kit import HOSTILE_KINDS, DiskFull, hostile_drop, marked_processes

FAULTS = {  # kind -> weight
    "daemon_kill9": 3,
    "daemon_restart": 1,
    "model_kill9": 3,
    "copy_kill9": 2,
    "disk_full": 1,
    "hostile_drop": 2,
    "hostile_name": 1,
    "webhook_flap": 2,
    "fat_ids": 1,
}
# Faults (or flap modes) whose fixes are pending on other branches: left out unless --all.
PENDING: dict[str, str] = {}  # fault kinds held back while their fix is pending: none now
DISK_FULL_GAP = 8.0  # seconds of space between two full disks when long ones are skipped
OPEN_JOBS = 4  # jobs kept in flight, so the load does not depend on the machine's speed
TMPFS_SIZE = 1 << 30  # at first; grown while the run's results fill it (a full disk is a fault)
OUTLIVE_SECONDS = 10.0  # a model process notices its daemon died "within a few seconds"


class Faults:
    def throw(self) -> None:
        kinds = [k for k in FAULTS if k not in self.skipped]
        kind = self.rng.choices(kinds, [FAULTS[k] for k in kinds])[0]
        try:
            if getattr(self, kind)():
                self.faults[kind] += 1
        except DiskFull:  # the root had no space for the nemesis's own write: that fault is not thrown
            self.disk_skips[kind] += 1

    def daemon_kill9(self) -> bool:
        if self.daemon.poll() is not None:
            return False
        self.stop_daemon(signal.SIGKILL)
        time.sleep(self.rng.uniform(0, 2))
        self.start_daemon()
        return True

    def daemon_restart(self) -> bool:
        if self.daemon.poll() is not None:
            return False
        self.stop_daemon(signal.SIGTERM)
        self.start_daemon()
        return True

    def running(self) -> tuple[dict, list[tuple]]:
        """The snapshot and the (job id, model) of every task the model process holds (they share)."""
        snap = self.verifier.snapshot()
        return snap, [(r.get("job_id"), r.get("model")) for r in snap.get("running") or []]

    def model_kill9(self) -> bool:
        snap, tasks = self.running()
        pid = snap.get("model_pid")
        if not pid or not tasks or snap.get("copies") or not snap.get("loaded_model"):
            return False
        # Two kills over the same lines would make the daemon hunt a culprit among innocent lines,
        # and six fail the task: kill a task's process at most twice, and only past the last kill,
        # for every task the process holds.
        for task in tasks:
            kills, mark = self.model_kills.get(task, [0, -1])
            if kills >= 2 or self.verifier.committed(task) <= mark:
                return False
        for task in tasks:
            self.model_kills[task] = [
                self.model_kills.get(task, [0, -1])[0] + 1,
                self.verifier.fed(task) + 20,
            ]
        return self.kill_pid(pid)

    def copy_kill9(self) -> bool:
        snap, tasks = self.running()
        task = tasks[0] if tasks else None  # copies run one task at a time
        copies = [c for c in snap.get("copies") or [] if c.get("loaded") and c.get("shard")]
        if not copies or task is None or self.copy_kills[task] >= 1:
            return False
        self.copy_kills[task] += 1
        return self.kill_pid(self.rng.choice(copies)["pid"])

    def kill_pid(self, pid: int, marker: str | None = None) -> bool:
        """SIGKILL `pid` if it is still one of the current daemon's (a pid read from an old snapshot
        may since belong to any process on the machine)."""
        if pid not in marked_processes(marker or self.marker(self.incarnation), [pid]):
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def disk_full(self) -> bool:
        long = "disk_full_long" not in self.skipped
        if not long and time.monotonic() - self.disk_freed_at < DISK_FULL_GAP:
            return False
        hold = self.rng.uniform(1, 12) if long else self.rng.uniform(1, 3)
        try:
            return self.fill_disk(hold)
        finally:
            self.disk_freed_at = time.monotonic()

    def fill_disk(self, hold: float) -> bool:
        if self.enospc_flag:
            self.enospc_flag.touch()
            self.hold(hold)
            self.enospc_flag.unlink()
            return True
        for _ in range(5):
            st = os.statvfs(self.root)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            if self.remount(used + 64 * 1024):
                break
        else:
            return False
        self.hold(hold)
        if not self.remount(self.tmpfs_size):
            raise RuntimeError("could not give the tmpfs its space back")
        return True

    def grow_tmpfs(self) -> None:
        """Double the tmpfs once it is three quarters used: only the disk_full fault fills it."""
        st = os.statvfs(self.root)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        self.root_peak = max(self.root_peak, used)
        if used > self.tmpfs_size * 3 // 4 and self.remount(self.tmpfs_size * 2):
            self.tmpfs_size *= 2

    def remount(self, size: int) -> bool:
        cmd = ["mount", "-o", f"remount,size={size}", str(self.root)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sample_memory()
            time.sleep(0.2)

    def hostile_drop(self) -> bool:
        kind = self.rng.choice(HOSTILE_KINDS)
        tag = f"h{sum(self.faults[k] for k in ('hostile_drop',)):04d}"
        name = hostile_drop(self.root / "inbox", self.outside, kind, tag)
        if name is None:
            self.symlinks.append(self.root / "inbox/e2" / f"{tag}-{kind}.jsonl")
        else:
            self.rejects.append(name)
        return True

    def hostile_name(self) -> bool:
        self.new_job(hostile=True)
        return True

    def fat_ids(self) -> bool:
        if self.faults["fat_ids"] >= 2:  # each takes about 150 MB of the tmpfs
            return False
        self.new_job(fat=True)
        return True

    def webhook_flap(self) -> bool:
        modes = ["ok", "error", "down"] + ([] if "webhook_garbage" in self.skipped else ["garbage"])
        self.receiver.set_mode(self.rng.choice(modes))
        return True

"""The nemesis: a bounded, seeded run that throws random faults at a running daemon with mixed jobs,
then checks that every job is final, nothing is lost or duplicated and every outbox equals an
undisturbed run. `make nemesis` (SEED=, MINUTES=); docs/nemesis.md says what it throws.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nemesis_check import Verifier  # noqa: E402
from nemesis_faults import FAULTS, OPEN_JOBS, OUTLIVE_SECONDS, PENDING, TMPFS_SIZE, Faults  # noqa: E402
from nemesis_kit import (  # noqa: E402
    MARKER,
    MODELS,
    Api,
    DiskFull,
    Job,
    Poller,
    daemon_cmd,
    describe,
    drop_file,
    fat_lines,
    hostile_name,
    make_lines,
    marked_processes,
    models_yaml,
    peak_rss_mb,
    start_process,
)
from nemesis_receiver import Receiver, free_port  # noqa: E402


class Nemesis(Faults):
    def __init__(
        self, seed: int, seconds: float, work: Path, include_pending: bool, say=print, tmpfs: bool = True
    ) -> None:
        # Two streams, so the jobs and the faults tried are the same for a seed whatever the timing
        # (whether a kill finds its target still depends on it).
        self.rng, self.job_rng = random.Random(seed), random.Random(seed + 1)
        self.seed, self.seconds, self.work, self.say = seed, seconds, work, say
        self.skipped = {} if include_pending else dict(PENDING)
        self.root, self.outside = work / "root", work / "outside"
        self.faults: collections.Counter = collections.Counter()
        self.disk_skips: collections.Counter = collections.Counter()  # not thrown: no space for it
        self.failures: list[str] = []
        self.jobs: list[Job] = []
        self.rejects: list[str] = []  # outbox names that must end `failed`
        self.symlinks: list[Path] = []
        self.kills: list[tuple[str, float]] = []  # (daemon incarnation, when) to check for stragglers
        self.copy_kills: collections.Counter = collections.Counter()  # per running task
        self.model_kills: dict[tuple, list] = {}  # task -> [kills, committed at the last kill]
        self.incarnation = 0
        self.run_id = uuid.uuid4().hex[:12]  # in every marker: runs side by side never touch each other
        self.daemon: subprocess.Popen | None = None
        self.peak_mb = 0.0
        self.enospc_flag: Path | None = None
        self.unexpected_exits = 0
        self.tmpfs = False
        self.tmpfs_size, self.root_peak = TMPFS_SIZE, 0
        self.disk_freed_at = 0.0
        self.want_tmpfs = tmpfs

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.root.mkdir(parents=True)
        self.outside.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.root)]
        proc = subprocess.run(mount if self.want_tmpfs else ["false"], capture_output=True)
        self.tmpfs = proc.returncode == 0
        if not self.tmpfs:
            self.enospc_flag = self.work / "enospc"
            why = proc.stderr.decode().strip() or "--no-tmpfs"
            self.say(f"no tmpfs ({why}): disk full is injected at the staged writer")
        self.receiver = Receiver()
        (self.root / "models.yaml").write_text(models_yaml(self.receiver.url))
        for d in ["outbox", "state", *(f"inbox/{m}" for m in MODELS)]:
            (self.root / d).mkdir(parents=True)
        self.port = free_port()
        self.start_serve()
        self.api = Api(self.port)
        deadline = time.monotonic() + 60
        while self.api.call("GET", "/healthz")[0] != 200:
            if time.monotonic() > deadline or self.serve.poll() is not None:
                raise RuntimeError(f"`serve` did not answer: {(self.work / 'serve.log').read_text()[-500:]}")
            time.sleep(0.2)
        self.poller = Poller(self.api)
        self.start_daemon()

    def start_daemon(self) -> None:
        self.incarnation += 1
        env = {MARKER: self.marker(self.incarnation)}
        if self.enospc_flag:
            env["DROPBOX_RUNNER_TEST_ENOSPC"] = str(self.enospc_flag)
        self.daemon = start_process(daemon_cmd(self.root, "run"), self.work / "daemon.out", env)

    def sample_memory(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.peak_mb = max(self.peak_mb, peak_rss_mb(self.daemon.pid) or 0.0)

    def stop_daemon(self, sig: int) -> None:
        self.sample_memory()
        self.daemon.send_signal(sig)
        self.daemon.wait(timeout=120)
        self.kills.append((self.marker(self.incarnation), time.monotonic()))

    # -- jobs ----------------------------------------------------------------------------------------
    def new_job(self, hostile: bool = False, fat: bool = False) -> None:
        tag = f"j{len(self.jobs):04d}"
        kind = (
            self.job_rng.choice(["folder", "folder", "manifest", "api"]) if not (hostile or fat) else "folder"
        )
        if kind == "folder":
            models = [self.job_rng.choice(list(MODELS))]
        elif kind == "manifest":
            models = self.job_rng.sample(list(MODELS), self.job_rng.randint(1, 3))
        else:
            models = self.job_rng.sample(["e1", "e2", "rep"], self.job_rng.randint(1, 2))
        lines = make_lines(self.job_rng, tag, self.job_rng.randint(50, 1500), chat_only=kind == "api")
        if fat:
            models, lines = ["rep"], fat_lines(tag)
        name = hostile_name(self.job_rng, tag) if hostile else f"{tag}.jsonl".encode()
        job = Job(tag, kind, models, lines, name)
        if kind == "api":
            refused = self.api.submit(job)
            if refused and self.root_full():
                raise DiskFull(refused)
            if refused:
                self.failures.append(f"the API refused {tag}: {refused}")
                return
        else:
            drop_file(self.root / "inbox", job)
        self.jobs.append(job)

    def root_full(self) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize < 1 << 20

    def open_jobs(self) -> int:
        return sum(1 for j in self.jobs if not self.verifier.is_final(j))

    # -- the run -------------------------------------------------------------------------------------
    def marker(self, what: int | str) -> str:
        return f"{self.run_id}-{what}"

    def start_serve(self) -> None:
        cmd = daemon_cmd(self.root, "serve", "--port", str(self.port))
        self.serve = start_process(cmd, self.work / "serve.log", {MARKER: self.marker("serve")})

    def watch(self) -> None:
        """Stragglers of a dead daemon, a daemon or server that stopped by itself, memory."""
        now = time.monotonic()
        if self.serve.poll() is not None:  # the nemesis never stops it
            self.failures.append(f"`serve` exited by itself ({self.serve.returncode}); restarted")
            self.start_serve()
        for incarnation, when in list(self.kills):
            left = marked_processes(incarnation)
            if not left:
                self.kills.remove((incarnation, when))
            elif now - when > OUTLIVE_SECONDS:
                self.failures.append(
                    f"processes {describe(left)} outlived daemon {incarnation} by {now - when:.0f}s"
                )
                for pid in left:
                    self.kill_pid(pid, incarnation)
                self.kills.remove((incarnation, when))
        if self.daemon.poll() is not None:
            self.unexpected_exits += 1
            tail = self.verifier.log_tail()
            self.failures.append(f"the daemon exited by itself ({self.daemon.returncode}): {tail}")
            self.kills.append((self.marker(self.incarnation), now))
            if self.unexpected_exits >= 3:
                raise RuntimeError("the daemon stopped by itself three times; giving up")
            self.start_daemon()
        self.sample_memory()
        if self.tmpfs:
            self.grow_tmpfs()

    def run(self) -> bool:
        self.verifier = Verifier(self)
        try:
            self.setup()
            deadline = time.monotonic() + self.seconds
            next_fault = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    while self.open_jobs() < OPEN_JOBS:
                        self.new_job()
                except DiskFull:  # no space for the job: tried again on the next turn
                    self.disk_skips["job"] += 1
                if time.monotonic() >= next_fault:
                    self.throw()
                    next_fault = time.monotonic() + self.rng.uniform(0.5, 4)
                self.watch()
                time.sleep(0.2)
            self.receiver.set_mode("ok")
            self.verifier.drain()
            self.stop_daemon(signal.SIGTERM)
            self.verifier.no_stragglers()
            self.verifier.verify()
        except RuntimeError as exc:
            self.failures.append(str(exc))
        except Exception:  # the nemesis's own fault: still report what it saw
            self.failures.append("the nemesis itself failed: " + traceback.format_exc())
        finally:
            self.cleanup()
        self.report()
        return not self.failures

    def cleanup(self) -> None:
        if getattr(self, "poller", None):
            self.poller.stop()
            self.failures.extend(f"the API answered {bad}" for bad in self.poller.bad[:5])
        for proc in (self.daemon, getattr(self, "serve", None)):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for marker in (self.marker(self.incarnation), self.marker("serve")):
            for pid in marked_processes(marker):
                self.kill_pid(pid, marker)

    def report(self) -> None:
        v = self.verifier
        self.say(
            f"nemesis seed {self.seed}, {self.seconds / 60:.1f} minutes, root on {'tmpfs' if self.tmpfs else 'disk'}"
        )
        for kind, why in self.skipped.items():
            self.say(f"  skipped {kind}: fix pending, {why}")
        self.say("  faults: " + ", ".join(f"{k} {self.faults[k]}" for k in FAULTS if k not in self.skipped))
        self.say(
            f"  jobs {len(self.jobs)} ({len(v.api_jobs())} through the API), lines {v.total_lines()}, "
            f"hostile drops {len(self.rejects) + len(self.symlinks)}, daemon starts {self.incarnation}"
        )
        if self.disk_skips:
            self.say(
                "  not thrown, no space for the nemesis's own write: "
                + ", ".join(f"{k} {n}" for k, n in sorted(self.disk_skips.items()))
            )
        if self.tmpfs:
            self.say(f"  root peak usage {self.root_peak / 2**20:.0f} MB (tmpfs {self.tmpfs_size >> 20} MB)")
        calls = self.poller.calls if getattr(self, "poller", None) else 0
        self.say(
            f"  webhooks: {v.webhook_summary}; API reads {calls}; daemon peak memory {self.peak_mb:.0f} MB"
        )
        for failure in self.failures:
            self.say(f"  FAILURE: {failure}")
        self.say(f"  verdict: {'PASS' if not self.failures else f'FAIL ({len(self.failures)} failures)'}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--all", action="store_true", help="also throw the faults whose fixes are pending")
    parser.add_argument("--no-tmpfs", action="store_true", help="inject ENOSPC instead of a tmpfs")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    work = Path(tempfile.mkdtemp(prefix=f"nemesis-{seed}-"))
    print(f"nemesis seed {seed}: work folder {work}", flush=True)
    try:
        say = lambda s: print(s, flush=True)  # noqa: E731
        ok = Nemesis(seed, args.minutes * 60, work, args.all, say, tmpfs=not args.no_tmpfs).run()
    finally:
        if args.keep:
            shutil.copytree(work / "root", work / "root-copy", symlinks=True)
        unmount(work / "root")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

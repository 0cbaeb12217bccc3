"""The daemon: one per root. Its loop takes drops, carries out control requests, and drives the
model slot (`execution`); every job it touches is inside a boundary that fails that job alone.

It only supervises: models run in a child process and it stays alive when that process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from dropbox_runner.config import Registry
from dropbox_runner.daemon import systemd
from dropbox_runner.daemon.sharing import Sharing
from dropbox_runner.daemon.snapshot import Snapshots
from dropbox_runner.errors import RunnerError, is_environmental
from dropbox_runner.fsutil import read_json_or_none, write_json
from dropbox_runner.intake.claim import Claimer
from dropbox_runner.intake.scanner import Scanner
from dropbox_runner.intake.watcher import FAST_SCAN_SECONDS, Watcher, scan_due, should_poll
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.jobs.retention import retention_due
from dropbox_runner.layout import Layout, acquire_root
from dropbox_runner.queue import scheduler
from dropbox_runner.queue.journal import Journal
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results import webhooks
from dropbox_runner.slot.execution import Execution
from dropbox_runner.slot.loadable import model_problems
from dropbox_runner.status.history import History

log = logging.getLogger("dropbox_runner.daemon")

IO_RETRY_SECONDS = 5.0
PRUNE_SECONDS = 60.0


class Daemon:
    def __init__(self, layout: Layout, registry: Registry, *, once: bool = False) -> None:
        self.layout, self.registry, self.settings, self.once = layout, registry, registry.settings, once
        self.journal = Journal(layout)
        self.jobs = Jobs(self.journal, self.settings.webhooks)
        self.claimer = Claimer(self.jobs, registry)
        self.scanner = Scanner(layout.inbox, self.settings, list(registry.models))
        self.history = History(layout, every=self.settings.history_point_seconds)
        self.sender = webhooks.Sender(layout, self.settings.webhooks, self.settings.webhook_retry_hours)
        self.execution = Execution(self.jobs, registry, self.history)
        self.watcher: Watcher | None = None
        self.stopping = False
        self.signals = 0
        self.last_scan = float("-inf")
        self.last_expiry_check = self.last_prune = float("-inf")  # monotonic: a wall-clock jump moves neither
        self.paused_until = 0.0
        self.model_problems: dict[str, str] = {}
        self.notifier = systemd.Notifier()
        self.snapshots = Snapshots(layout, self.notifier)
        self.sharing = Sharing(self.journal, registry)

    # -- start and stop -----------------------------------------------------------------------------
    def run(self) -> int:
        lock = acquire_root(self.layout)
        try:
            self._install_signals()
            self._check_models()
            if not self._until_space(self._start):  # stopped while the disk was full
                return 0
            self.notifier.ready(f"watching {self.layout.inbox} ({self.watcher.mode})")
            self._loop()
            return 0
        finally:
            self._shutdown()
            lock.release()

    def _start(self) -> None:
        """Everything before the loop; each step may be repeated (after a full disk at start)."""
        self.layout.make(list(self.registry.models))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
        write_json(self.layout.daemon_info, info)
        self._recover()
        if self.watcher is None:
            poll = should_poll(self.settings.poll, self.layout.inbox)
            self.watcher = Watcher(self.layout.inbox, poll, self.settings.poll_interval)
            self.watcher.start()
            self.sender.start()

    def _until_space(self, step: Callable[[], None]) -> bool:
        """Run `step`; on a full disk (any failure of the machine) log it once, wait out the loop's
        pause, and try again until it passes (True) or the daemon is told to stop (False)."""
        waited = False
        while not self.stopping:
            try:
                step()
            except OSError as exc:
                if not is_environmental(exc):
                    raise
                if not waited:
                    self._pause(f"{exc.strerror or exc} ({exc.filename or 'state'}), at start")
                waited, self.paused_until = True, time.monotonic() + IO_RETRY_SECONDS
                while not self.stopping and time.monotonic() < self.paused_until:
                    self.notifier.alive()
                    time.sleep(0.2)
                continue
            if waited:
                log.info("the disk has space again: starting")
            self.paused_until = 0.0
            return True
        return False

    def _install_signals(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.signals += 1
            if self.signals > 1:
                log.warning("second %s: stopping now; the logs are consistent", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: finishing the commit in progress, then stopping", signal.Signals(signum).name)
            self.stopping = True
            self.notifier.stopping()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _check_models(self) -> None:
        """Say which models cannot run here, and why (the packaged ones are built when first loaded)."""
        self.model_problems.update(model_problems(self.layout.root, self.registry))

    def _recover(self) -> None:
        """Finish interrupted claims; put tasks whose owner died back in line; republish."""
        self.claimer.finish_pending()
        self.jobs.recover()
        self.execution.recover_hunts()

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self._unless_full(self.execution.stop, fallback=self.execution.abort_after_disk_error)
        if "dropbox_runner.slot.copies.ray" in sys.modules:  # imported only if a model used Ray
            sys.modules["dropbox_runner.slot.copies.ray"].stop()
        self._unless_full(self.history.tick, True)
        if self.watcher:
            self.watcher.stop()
        self.sender.stop()
        self._unless_full(self._snapshot, True, True)  # forced, stopped
        log.info("stopped")

    @staticmethod
    def _unless_full(step: Callable[..., object], *args: object, fallback: Callable | None = None) -> None:
        """A step of the stop that a full disk must not keep from the next ones (nothing is lost:
        the next start recovers from the logs, as after a crash)."""
        try:
            step(*args)
        except OSError as exc:
            if not is_environmental(exc):
                raise
            log.error("stopping on a full disk: %s", exc)
            if fallback is not None:
                fallback()

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            self.notifier.alive()
            try:
                if not self._step():
                    return
            except OSError as exc:
                if not is_environmental(exc):
                    raise
                self._pause(f"{exc.strerror or exc} ({exc.filename or 'state'})")
                self.execution.abort_after_disk_error()

    def _pause(self, why: str) -> None:
        log.error("paused for %.0fs: %s", IO_RETRY_SECONDS, why)
        self.paused_until = time.monotonic() + IO_RETRY_SECONDS

    def _step(self) -> bool:
        """One turn of the loop; False once `--once` has nothing left to do."""
        if self.paused_until:
            if time.monotonic() < self.paused_until:
                time.sleep(0.2)
                return True
            self.paused_until = 0.0
            self._recover()
        self._intake()
        self._controls()
        self._expire()
        self._prune()
        execution = self.execution
        if not execution.busy and not self._start_next():
            if self.once and self._idle():
                log.info("--once: inbox and queue are empty; exiting")
                return False
            busy = self.scanner.pending or self.scanner.waiting
            self.watcher.changed.wait(self._until_settled(FAST_SCAN_SECONDS if busy else 1.0))
        elif execution.busy:
            self._share()
            if execution.task is not None:  # an error in one task's event fails that task's job
                wait = self._until_settled(0.2)
                self._guarded(lambda: execution.event_job or execution.task.job_id, execution.pump, wait)
            else:  # preempting: the last tasks have left, the process ends
                execution.pump(0.2)
        if execution.pause_reason:
            self._pause(execution.pause_reason)
            execution.pause_reason = None
        self.history.tick()
        self._snapshot()
        return True

    def _guarded(self, job_id: str | Callable[[], str], operation, *args) -> None:
        """The job boundary: an unexpected error fails this job alone and the loop goes on (`job_id`
        may be a function, asked once the error is known: whose work it was)."""
        try:
            operation(*args)
        except Exception as exc:
            if is_environmental(exc):
                raise
            job_id = job_id() if callable(job_id) else job_id
            log.exception("unexpected error in job %s", job_id)
            self.execution.drop(job_id)
            self.jobs.failed_internal(job_id, f"{type(exc).__name__}: {exc}")

    def _idle(self) -> bool:
        return (
            not self.execution.busy
            and self.scanner.pending == 0
            and not self.journal.queued()
            and not any(self.layout.control.iterdir())
            and not any(self.layout.claims.iterdir())
        )

    def _until_settled(self, wait: float) -> float:
        """`wait`, or less: until the first candidate settles, so that it is claimed right then."""
        if self.scanner.settles_at is None:
            return wait
        return min(wait, max(0.0, self.scanner.settles_at - time.monotonic()))

    def _intake(self) -> None:
        now = time.monotonic()
        busy = bool(self.scanner.pending or self.scanner.waiting)
        settled = self.scanner.settles_at is not None and now >= self.scanner.settles_at
        if not scan_due(
            self.watcher.changed.is_set(), busy, now - self.last_scan, self.settings.rescan_seconds, settled
        ):
            return
        self.watcher.changed.clear()
        self.watcher.check()
        self.last_scan = now
        for drop in self.scanner.scan():
            try:
                if not self.claimer.ignored(drop.path):
                    self.claimer.claim(drop)
            except Exception as exc:
                if is_environmental(exc):
                    raise
                log.exception("taking %s failed", drop.path)
            self.scanner.forget(drop.path)
        if any(self.layout.claims.iterdir()):  # a claim that failed once is tried again
            self.claimer.finish_pending()

    def _controls(self) -> None:
        """Carry out each request, then remove it (Maildir's order: a crash repeats it, never loses it)."""
        for path in sorted(self.layout.control.glob("*.json")):
            self._control(read_json_or_none(path))
            path.unlink(missing_ok=True)

    def _control(self, req: object) -> None:
        if not isinstance(req, dict) or not isinstance(req.get("job_id"), str):
            return
        try:
            spec = self.journal.spec(req["job_id"])
        except (RunnerError, FileNotFoundError, ValueError) as exc:
            log.error("%s of %s failed: %s", req.get("op"), req.get("job_id"), exc)
            return
        if req.get("op") == "cancel":
            self._guarded(spec.id, self.execution.cancel, spec)
        elif req.get("op") == "retry":
            self._guarded(spec.id, self._retry, spec)

    def _retry(self, spec) -> None:
        models = self.jobs.retried(spec)
        log.info("retry %s: %s", spec.id, ", ".join(models) or "nothing failed")

    def _expire(self) -> None:
        """End jobs whose completion window ran out (checked about once a second)."""
        if time.monotonic() - self.last_expiry_check < 1.0:
            return
        self.last_expiry_check = time.monotonic()
        for spec in self.jobs.due_to_expire(time.time()):  # expires_at is Unix seconds, as written
            self._guarded(spec.id, self.execution.cancel, spec, Status.EXPIRED)

    def _prune(self) -> None:
        """keep_finished_days or a job's output_expires_after: older finished jobs leave the outbox."""
        if time.monotonic() - self.last_prune < PRUNE_SECONDS or not retention_due(
            self.layout, self.settings.keep_finished_days
        ):
            return
        self.last_prune = time.monotonic()
        self.jobs.pruned(self.settings.keep_finished_days, time.time())  # finished_at is Unix seconds

    def _start_next(self) -> bool:
        choice, self.execution.next_choice = self.execution.next_choice, None  # a preemptor goes first
        choice = choice or scheduler.pick(
            self.journal.queued(),
            self.execution.loaded_model,
            self.settings.max_swap_delay_seconds,
            base_of=self.registry.base_of,
        )
        if choice is None:
            return False
        if self.journal.dequeue_if_stale(choice.key, choice.job_id, choice.model):
            return True
        self._guarded(choice.job_id, self.execution.start, choice)
        return True

    def _share(self) -> None:
        """While a model process runs: admit, take a slot back, or preempt (CONTRACT section 12)."""
        self.sharing.turn(self.execution, self.model_problems, self._guarded)

    def _snapshot(self, force: bool = False, stopped: bool = False) -> None:
        proc = self.execution.proc
        if not self.snapshots.due((proc.pid, proc.loaded) if proc is not None else None, force):
            return
        live = {
            "stopped_at": time.time() if stopped else None,
            "watch_mode": self.watcher.mode if self.watcher else None,
            "model_problems": self.model_problems,
            **self.execution.describe(),
        }
        self.snapshots.write(live)

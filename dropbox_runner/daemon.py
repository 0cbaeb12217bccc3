"""The daemon: one per root; takes drops, runs the queue one model at a time, publishes results.

It only supervises: models run in a child process (`supervisor.ModelProcess`) and it stays alive
when that process dies, recording why and resuming from the last commit.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from dropbox_runner import control, scheduler
from dropbox_runner.config import EngineKind, Registry, resolve_model_path
from dropbox_runner.errors import LockHeld, RunnerError
from dropbox_runner.fsutil import read_json, read_json_or_none, write_json
from dropbox_runner.intake.claim import Claimer
from dropbox_runner.intake.scanner import Scanner
from dropbox_runner.intake.watcher import Watcher, should_poll
from dropbox_runner.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.layout import Layout
from dropbox_runner.lifecycle import Status
from dropbox_runner.memory import fit_problem, is_memory_failure
from dropbox_runner.results.log import first_missing, read_fed_mark, read_marker
from dropbox_runner.results.publish import write_batch_json
from dropbox_runner.supervisor import ModelProcess, group_rss_bytes

log = logging.getLogger("dropbox_runner.daemon")

MAX_CRASHES_WITHOUT_PROGRESS = 5
IO_RETRY_SECONDS = 5.0
PROGRESS_LOG_SECONDS = 10.0
BATCH_JSON_SECONDS = 2.0


def setup_logging(layout: Layout, level: int = logging.INFO) -> None:
    root = logging.getLogger("dropbox_runner")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    filelog = logging.handlers.RotatingFileHandler(layout.log, maxBytes=10 << 20, backupCount=3)
    filelog.setFormatter(fmt)
    root.addHandler(stream)
    root.addHandler(filelog)


def acquire_root(layout: Layout) -> FileLock:
    """The kernel-released lock of the root; raises LockHeld naming the daemon that holds it."""
    layout.state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(layout.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        info = read_json_or_none(layout.daemon_info) or {}
        raise LockHeld(
            f"another daemon (pid {info.get('pid', '?')} on {info.get('host', '?')}) is running on "
            f"{layout.root}; stop it first."
        ) from None
    return lock


class Daemon:
    def __init__(self, layout: Layout, registry: Registry, *, once: bool = False) -> None:
        self.layout = layout
        self.registry = registry
        self.settings = registry.settings
        self.once = once
        self.journal = Journal(layout)
        self.claimer = Claimer(self.journal, registry)
        self.scanner = Scanner(layout.inbox, self.settings, list(registry.models))
        self.watcher: Watcher | None = None
        self.proc: ModelProcess | None = None
        self.current: TaskRecord | None = None
        self.current_spec: JobSpec | None = None
        self.sent = False
        self.last_running: int | None = None
        self.stopping = False
        self.signals = 0
        self.last_scan = 0.0
        self.last_snapshot = 0.0
        self.last_batch_json = 0.0
        self.last_progress_log = 0.0
        self.recomputed_note: str | None = None
        self.swaps: list[dict] = []
        self.memory_retry: dict[str, float] = {}
        self.io_error: str | None = None
        self.paused_until = 0.0
        self.recover_after_pause = False

    # -- start and stop -----------------------------------------------------------------------------
    def run(self) -> int:
        lock = acquire_root(self.layout)
        try:
            self.layout.make(list(self.registry.models))
            write_json(
                self.layout.daemon_info,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": time.time(),
                },
            )
            self._install_signals()
            self._prepare_models()
            self.sweep()
            poll = should_poll(self.settings.poll, self.layout.inbox)
            self.watcher = Watcher(self.layout.inbox, poll, self.settings.poll_interval)
            self.watcher.start()
            self._loop()
            return 0
        finally:
            self._shutdown()
            lock.release()

    def _install_signals(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.signals += 1
            if self.signals > 1:
                log.warning("second %s: stopping now; the logs are consistent", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: finishing the commit in progress, then stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _prepare_models(self) -> None:
        """Build the embedded tiny models on first use (in a child process: it imports torch)."""
        from dropbox_runner.config import is_embedded_path

        missing = [
            name
            for name, m in self.registry.models.items()
            if m.path
            and is_embedded_path(self.layout.root, m.path)
            and not (self.layout.root / m.path / "config.json").exists()
        ]
        if missing:
            import subprocess
            import sys

            names = [Path(self.registry.models[n].path).name for n in missing]
            log.info("building the embedded models %s (first use)", ", ".join(names))
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dropbox_runner.engine.tinymodels",
                    str(self.layout.root / "models"),
                    *names,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def _shutdown(self) -> None:
        if self.current is not None and self.proc is not None and self.proc.alive() and self.sent:
            self.proc.send({"op": "stop"})
            deadline = time.monotonic() + self.settings.stop_timeout_seconds
            while self.current is not None and time.monotonic() < deadline and self.proc.alive():
                self._pump(0.2)
        if self.current is not None:
            self._requeue_current("the daemon stopped")
        if self.proc is not None:
            self.proc.end(self.settings.stop_timeout_seconds)
            self.proc = None
        if self.watcher:
            self.watcher.stop()
        self._snapshot(force=True, stopped=True)
        log.info("stopped")

    # -- recovery at start --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Finish interrupted claims; put tasks whose owner died back in line; republish."""
        self.claimer.finish_pending()
        queued_keys = {k for k, _, _ in self.journal.queued()}
        for job_id in list(self.journal.iter_job_ids(archived=False)):
            spec = self.journal.spec(job_id)
            tasks = self.journal.tasks(spec)
            for task in tasks:
                if task.status == Status.IN_PROGRESS:
                    log.info("%s/%s was running when the last daemon ended; back in line", job_id, task.model)
                    task.move(Status.QUEUED)
                    self.journal.save_task(task)
                if task.status == Status.QUEUED and task.queue_key not in queued_keys:
                    self.journal.enqueue(task)
                if task.status == Status.FINALIZING:
                    log.info("republishing %s/%s (publishing was interrupted)", job_id, task.model)
                    control.finalize_task(self.journal, spec, task, task.outcome or Status.COMPLETED)
                elif task.status.final:
                    self.journal.dequeue(task)
            tasks = (
                self.journal.tasks(spec) if self.journal.job_dir(job_id).parent == self.layout.jobs else []
            )
            if tasks and all(t.status.final for t in tasks):
                control.finish_job(self.journal, spec, tasks)
            elif tasks:
                write_batch_json(self.journal, spec, tasks)
        for key, job_id, model in self.journal.queued():
            if not (self.layout.jobs / job_id / f"{model}.task.json").exists():
                (self.layout.queue / key).unlink(missing_ok=True)

    # -- the loop -----------------------------------------------------------------------------------
    def _pause(self, why: str) -> None:
        log.error("paused for %.0fs: %s", IO_RETRY_SECONDS, why)
        self.paused_until = time.monotonic() + IO_RETRY_SECONDS

    def _loop(self) -> None:
        while not self.stopping:
            try:
                if not self._step():
                    return
            except OSError as exc:  # a full or failing disk: stop, keep what is committed, try again later
                self._pause(f"{exc.strerror or exc} ({exc.filename or 'state'})")
                if self.proc is not None:
                    self.proc.end(self.settings.stop_timeout_seconds)
                    self.proc = None
                self.current = self.current_spec = None
                self.recover_after_pause = True

    def _step(self) -> bool:
        """One turn of the loop; False once `--once` has nothing left to do."""
        if self.paused_until:
            if time.monotonic() < self.paused_until:
                time.sleep(0.2)
                return True
            self.paused_until = 0.0
            if self.recover_after_pause:
                self.recover_after_pause = False
                self.sweep()
        self._intake()
        self._controls()
        if self.current is None and not self._start_next():
            if self.once and self._idle():
                log.info("--once: inbox and queue are empty; exiting")
                return False
            self.watcher.changed.wait(0.25 if self.scanner.pending else 1.0)
        else:
            self._pump(0.2)
        self._snapshot()
        return True

    def _idle(self) -> bool:
        return (
            self.current is None
            and self.scanner.pending == 0
            and not self.journal.queued()
            and not any(self.layout.control.iterdir())
            and not any(self.layout.claims.iterdir())
        )

    def _intake(self) -> None:
        now = time.monotonic()
        due = now - self.last_scan >= self.settings.rescan_seconds
        if not (self.watcher.changed.is_set() or self.scanner.pending or due or now - self.last_scan > 0.25):
            return
        self.watcher.changed.clear()
        self.watcher.check()
        self.last_scan = now
        for drop in self.scanner.scan():
            try:
                self.claimer.claim(drop)
            except OSError as exc:
                log.error("could not take %s: %s", drop.path, exc)
            self.scanner.forget(drop.path)

    def _controls(self) -> None:
        for path in sorted(self.layout.control.glob("*.json")):
            req = read_json_or_none(path)
            path.unlink(missing_ok=True)
            if not req:
                continue
            try:
                self._control(req["op"], self.journal.spec(req["job_id"]))
            except (RunnerError, FileNotFoundError) as exc:
                log.error("%s of %s failed: %s", req.get("op"), req.get("job_id"), exc)

    def _control(self, op: str, spec: JobSpec) -> None:
        if op == "cancel":
            running = self.current if self.current and self.current.job_id == spec.id else None
            models = control.cancel_queued(self.journal, spec, running)
            log.info("cancel %s: %s", spec.id, ", ".join(models) or "no queued task")
            if running is not None and self.proc is not None and self.sent:
                self.proc.send({"op": "cancel"})
            elif running is not None:
                self._finish_current(Status.CANCELLED)
        elif op == "retry":
            models = control.retry(self.journal, spec)
            log.info("retry %s: %s", spec.id, ", ".join(models) or "nothing failed")

    # -- running tasks ------------------------------------------------------------------------------
    def _start_next(self) -> bool:
        loaded = self.proc.name if self.proc is not None and self.proc.alive() else None
        choice = scheduler.pick(self.journal.queued(), loaded, self.settings.max_swap_delay_seconds)
        if choice is None:
            return False
        try:
            spec = self.journal.spec(choice.job_id)
            task = self.journal.task(choice.job_id, choice.model)
        except FileNotFoundError:
            (self.layout.queue / choice.key).unlink(missing_ok=True)
            return True
        if task.status.final:
            self.journal.dequeue(task)
            return True
        self.current, self.current_spec, self.sent, self.last_running = task, spec, False, None
        task.move(Status.IN_PROGRESS)
        task.in_progress_at = task.in_progress_at or time.time()
        self.journal.save_task(task)
        write_batch_json(self.journal, spec)
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        if marker is not None and marker.count >= spec.total:
            log.info("%s/%s: every line already has a result; publishing", spec.id, task.model)
            self._finish_current(Status.COMPLETED)
            return True
        log.info("next: %s (%s) on %s: %s", spec.name, spec.id, task.model, choice.reason)
        if self.proc is not None and (self.proc.name != task.model or not self.proc.alive()):
            self._end_model(f"{task.model} is needed next")
        if self.proc is None:
            self._load(task.model)
        elif self.proc.loaded:
            self._send_run()
        return True

    def _load(self, model: str) -> None:
        config = self.registry.models[model]
        if config.engine == EngineKind.VLLM:
            folder = resolve_model_path(self.layout.root, config)
            problem = fit_problem(model, Path(folder), config.engine_args) if folder else None
            if problem:
                self._fail_model(model, problem)
                return
            if model in self.memory_retry:
                config = config.model_copy(deep=True)
                config.engine_args["gpu_memory_utilization"] = self.memory_retry[model]
        log.info("loading %s", model)
        self.proc = ModelProcess(self.layout, model, config)
        self._snapshot(force=True)

    def _end_model(self, why: str) -> None:
        proc, self.proc = self.proc, None
        seconds = proc.end(self.settings.stop_timeout_seconds)
        log.info("swap: ended %s (pid %d) in %.2fs because %s", proc.name, proc.pid, seconds, why)
        self.swaps.append({"model": proc.name, "unload_seconds": round(seconds, 3), "at": time.time()})

    def _send_run(self) -> None:
        task, spec = self.current, self.current_spec
        if task.load_seconds is None:
            task.load_seconds = self.proc.load_seconds
            self.journal.save_task(task)
        model = self.registry.models[task.model]
        self.proc.send(
            {
                "op": "run",
                "task": {
                    "job_id": spec.id,
                    "model": task.model,
                    "input": str(self.journal.input_path(spec.id)),
                    "log": str(self.journal.log_path(spec.id, task.model)),
                    "total": spec.total,
                    "defaults": [spec.defaults, model.defaults],
                    "commit_interval_ms": self.settings.commit_interval_ms,
                    "poison": task.poison,
                    "isolate_until": task.isolate_until,
                },
            }
        )
        self.sent = True

    def _pump(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        for ev in proc.events(timeout):
            self._event(ev)
            if self.proc is not proc:
                return
        if not proc.alive() and self.proc is proc:
            for ev in proc.drain():
                self._event(ev)
                if self.proc is not proc:
                    return
            self._model_died()

    def _event(self, ev: dict) -> None:
        kind = ev["ev"]
        if kind == "loaded":
            self.proc.loaded, self.proc.load_seconds, self.proc.capacity = (
                True,
                ev["load_seconds"],
                ev["capacity"],
            )
            log.info("loaded %s in %.1fs (window %d)", self.proc.name, ev["load_seconds"], ev["capacity"])
            self._snapshot(force=True)
            if self.current is not None and not self.stopping:
                self._send_run()
        elif kind == "load_failed":
            self._load_failed(ev["reason"])
        elif kind == "resumed":
            for note in ev["notes"]:
                log.warning("recovery of %s/%s: %s", self.current.job_id, self.current.model, note)
            if ev["kept"]:
                log.info(
                    "resuming %s/%s after %d committed results",
                    self.current.job_id,
                    self.current.model,
                    ev["kept"],
                )
        elif kind == "io_error":
            self.io_error = ev["message"]
        elif kind == "running":
            self.last_running = ev["index"]
        elif kind == "progress":
            self._progress(ev)
        elif kind == "task_done":
            outcome = {"completed": Status.COMPLETED, "cancelled": Status.CANCELLED}.get(ev["outcome"])
            if outcome is None:
                self._requeue_current("the daemon is stopping")
            else:
                self._finish_current(outcome)

    def _progress(self, ev: dict) -> None:
        now = time.monotonic()
        task, spec = self.current, self.current_spec
        if task is None:
            return
        if now - self.last_batch_json >= BATCH_JSON_SECONDS:
            self.last_batch_json = now
            write_batch_json(self.journal, spec)
        if now - self.last_progress_log >= PROGRESS_LOG_SECONDS:
            self.last_progress_log = now
            elapsed = (ev["updated_at"] or 0) - (ev["started_at"] or 0)
            tps = ev["completion_tokens"] / elapsed if elapsed > 0 else 0.0
            log.info(
                "progress %s/%s: %d/%d done, %d failed, %.0f tok/s",
                spec.name,
                task.model,
                ev["count"],
                spec.total,
                ev["failed"],
                tps,
            )

    def _finish_current(self, outcome: Status, error: str | None = None) -> None:
        task, spec = self.current, self.current_spec
        self.current = self.current_spec = None
        task.isolate_until = -1
        control.finalize_task(self.journal, spec, task, outcome, error)

    def _requeue_current(self, why: str) -> None:
        task = self.current
        self.current = self.current_spec = None
        task.move(Status.QUEUED)
        self.journal.save_task(task)
        log.info("%s/%s back in line: %s", task.job_id, task.model, why)

    def _load_failed(self, reason: str) -> None:
        model = self.proc.name
        log.error("%s could not load: %s", model, reason)
        self.proc.end(self.settings.stop_timeout_seconds)
        self.proc = None
        config = self.registry.models[model]
        if is_memory_failure(reason) and model not in self.memory_retry and config.engine == EngineKind.VLLM:
            util = float(config.engine_args.get("gpu_memory_utilization", 0.9)) * 0.7
            self.memory_retry[model] = round(util, 3)
            log.warning("retrying %s once with gpu_memory_utilization %.3f", model, util)
            self._load(model)
            return
        self._fail_model(model, f"the model {model} could not load: {reason}")

    def _fail_model(self, model: str, message: str) -> None:
        """Fail the running task and every queued task of a model that cannot run; the queue moves on."""
        log.error("failing the tasks of %s: %s", model, message)
        if self.current is not None:
            self._finish_current(Status.FAILED, message)
        for _, job_id, m in self.journal.queued():
            if m == model:
                spec = self.journal.spec(job_id)
                control.finalize_task(
                    self.journal, spec, self.journal.task(job_id, m), Status.FAILED, message
                )

    def _model_died(self) -> None:
        proc, self.proc = self.proc, None
        why = proc.exit_description()
        proc.end(1.0)
        if self.current is None:
            log.warning("the model process of %s %s while idle", proc.name, why)
            return
        task = self.current
        if self.io_error:
            message, self.io_error = self.io_error, None
            self._pause(f"{message}; nothing committed is lost")
            self._requeue_current("it resumes once the disk accepts writes again")
            return
        if not proc.loaded:
            self._load_failed(f"the model process {why} while loading")
            return
        task.crashes += 1
        log.error(
            "the model process of %s %s during %s (crash %d)", proc.name, why, task.job_id, task.crashes
        )
        self._find_culprit(task)
        if task.crashes > MAX_CRASHES_WITHOUT_PROGRESS + len(task.poison):
            self._finish_current(Status.FAILED, f"the model process crashed {task.crashes} times ({why})")
            return
        self.journal.save_task(task)
        self._requeue_current("restarting the model process and resuming from the last commit")

    def _find_culprit(self, task: TaskRecord) -> None:
        """Narrow a crash down to one request without slowing down ordinary restarts.

        A first crash restarts at full speed: most crashes (a kill, a passing OOM) are not the
        request's fault. If the next crash comes before every line fed at the first one has a result,
        those lines run one at a time; a crash while one runs alone fails that line by itself.
        """
        log_path = self.journal.log_path(task.job_id, task.model)
        if self.last_running is not None and self.last_running <= task.isolate_until:
            task.poison.append(self.last_running)
            log.error(
                "line %d of %s crashed the model process again, alone; it fails with engine_crash",
                self.last_running,
                task.job_id,
            )
            return
        fed = read_fed_mark(log_path)
        if 0 <= first_missing(log_path) <= task.suspect_until:
            task.isolate_until = task.suspect_until
            log.warning(
                "lines up to %d were in flight at two crashes; running them one at a time", task.isolate_until
            )
        task.suspect_until = max(task.suspect_until, fed)

    # -- status snapshot ----------------------------------------------------------------------------
    def _snapshot(self, force: bool = False, stopped: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_snapshot < 1.0:
            return
        self.last_snapshot = now
        info = read_json(self.layout.daemon_info) if self.layout.daemon_info.exists() else {}
        write_json(
            self.layout.snapshot,
            {
                **info,
                "updated_at": time.time(),
                "stopped_at": time.time() if stopped else None,
                "watch_mode": self.watcher.mode if self.watcher else None,
                "loaded_model": self.proc.name if self.proc and self.proc.loaded else None,
                "loading_model": self.proc.name if self.proc and not self.proc.loaded else None,
                "model_pid": self.proc.pid if self.proc else None,
                "load_seconds": self.proc.load_seconds if self.proc else None,
                "model_rss_mb": round(group_rss_bytes(self.proc.pid) / 2**20, 1) if self.proc else None,
                "running": {"job_id": self.current.job_id, "model": self.current.model}
                if self.current
                else None,
                "queue_length": len(os.listdir(self.layout.queue)),
                "swaps": self.swaps[-20:],
            },
            durable=False,
        )

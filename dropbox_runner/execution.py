"""The model slot: at most one model process, the task it runs, and what its events mean.

Starts and swaps model processes, hands them tasks, turns their events into job operations, and
applies the crash policy when one dies or hangs. The daemon's loop drives it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from dropbox_runner import adapters, crashes
from dropbox_runner import protocol as p
from dropbox_runner.config import EngineKind, ModelConfig, Registry, model_problem, resolve_model_path
from dropbox_runner.history import History
from dropbox_runner.jobs import Jobs
from dropbox_runner.journal import JobSpec, TaskRecord
from dropbox_runner.lifecycle import Status
from dropbox_runner.memory import fit_problem, is_memory_failure
from dropbox_runner.results.log import first_missing, read_fed_mark, read_marker
from dropbox_runner.scheduler import Choice
from dropbox_runner.shards import ShardedRun
from dropbox_runner.supervisor import ModelProcess, group_rss_bytes

log = logging.getLogger("dropbox_runner.daemon")

PROGRESS_LOG_SECONDS = 10.0
BATCH_JSON_SECONDS = 2.0
LOAD_ATTEMPTS = 3  # a model process killed while loading is started again, this many times in all


class Execution:
    def __init__(self, jobs: Jobs, registry: Registry, history: History) -> None:
        self.jobs, self.journal, self.layout, self.history = jobs, jobs.journal, jobs.layout, history
        self.registry, self.settings = registry, registry.settings
        self.proc: ModelProcess | None = None
        self.answers_for: set[str] = set()  # the running process's model and the adapters it was started with
        self.task: TaskRecord | None = None
        self.spec: JobSpec | None = None
        self.sent = False  # the task was handed to the model process
        self.sharded: ShardedRun | None = None  # the running task's copies, when it has several
        self.cancel_outcome = Status.CANCELLED  # or EXPIRED, when its completion window ran out
        self.memory_retry: dict[str, float] = {}
        self.load_deaths: dict[str, int] = {}  # model processes killed while loading, per model
        self.swaps: deque[dict[str, Any]] = deque(maxlen=20)
        self.pause_reason: str | None = None  # set when the disk failed: the daemon pauses
        self._io_error: str | None = None
        self._last_batch_json = self._last_progress_log = 0.0
        self._counted = (0, 0)  # requests and completion tokens of the running task already in history

    @property
    def loaded_model(self) -> str | None:
        return self.proc.name if self.proc is not None and self.proc.alive() else None

    # -- starting a task ---------------------------------------------------------------------------
    def start(self, choice: Choice) -> None:
        spec = self.journal.spec(choice.job_id)
        task = self.journal.task(choice.job_id, choice.model)
        if task.status.final:
            self.journal.dequeue(task)
            return
        if spec.expires_at is not None and time.time() >= spec.expires_at:
            self.jobs.cancelled(spec, None, Status.EXPIRED)  # a queued job that expired never loads
            return
        self.task, self.spec, self.sent, self.cancel_outcome = task, spec, False, Status.CANCELLED
        self.jobs.started(spec, task)
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        self._counted = (marker.count, marker.completion_tokens) if marker else (0, 0)
        if marker is not None and marker.count >= spec.total:
            log.info("%s/%s: every line already has a result; publishing", spec.id, task.model)
            self.finish(Status.COMPLETED)
            return
        log.info("next: %s (%s) on %s: %s", spec.name, spec.id, task.model, choice.reason)
        serving = self.registry.base_of(task.model)  # an adapter runs in its base's process
        if serving != task.model:
            problem = adapters.adapter_problem(self.layout.root, self.registry, task.model)
            if problem:
                self._fail_model(task.model, f"the adapter {task.model} cannot run here: {problem}")
                return
        config = self.registry.models[serving]
        if config.replicas > 1 or config.executor == "ray":
            self._start_copies(config)
            return
        if self.proc is not None and (
            self.proc.name != serving or not self.proc.alive() or task.model not in self.answers_for
        ):  # an adapter made after its base started needs the base started again
            self.end_model(f"{task.model} is needed next")
        if self.proc is None:
            self._load(serving)
        if self.proc is not None and self.task is not None:
            self._send_run()  # while it loads, too: the model process prepares the lines meanwhile

    def _load(self, model: str) -> None:
        config = adapters.serving_config(self.layout.root, self.registry, model)
        problem = model_problem(self.layout.root, model, config)
        if config.engine == EngineKind.VLLM and problem is None:
            folder = resolve_model_path(self.layout.root, config)
            problem = fit_problem(model, Path(folder), config.engine_args) if folder else None
        if problem:
            self._fail_model(model, f"the model {model} cannot run here: {problem}")
            return
        if model in self.memory_retry:
            config = config.model_copy(deep=True)
            config.engine_args["gpu_memory_utilization"] = self.memory_retry[model]
        log.info("loading %s", model)
        self.proc = ModelProcess(self.layout, model, config)
        self.answers_for = {model, *config.lora_adapters}

    def end_model(self, why: str) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        started = time.time()
        seconds = proc.end(self.settings.stop_timeout_seconds)
        log.info("swap: ended %s (pid %d) in %.2fs because %s", proc.name, proc.pid, seconds, why)
        self.swaps.append({"model": proc.name, "unload_seconds": round(seconds, 3), "at": time.time()})
        self.history.swapped(proc.name, started, seconds)

    def _start_copies(self, config: ModelConfig) -> None:
        """Several copies of the model on this task: the daemon leases them shards (see shards.py)."""
        model = self.task.model
        self.end_model(f"{model} runs on {config.replicas} copies next")
        problem = model_problem(self.layout.root, model, config)
        if problem:
            self._fail_model(model, f"the model {model} cannot run here: {problem}")
            return
        log.info("loading %d copies of %s (%s)", config.replicas, model, config.executor)
        order = self._order()
        try:
            self.sharded = ShardedRun(
                self.layout, self.journal, self.settings, self.history, self.spec, self.task, config, order
            )
        except ConnectionError as exc:  # Ray cannot be reached
            where = self.settings.ray_address
            self._fail_model(model, f"settings.ray_address: cannot reach Ray at {where!r} ({exc})"[:400])
            return
        self.sent = True

    def _end_copies(self) -> None:
        sharded, self.sharded = self.sharded, None
        if sharded is not None:
            sharded.close()

    def _send_run(self) -> None:
        self.sent = self.proc.send(p.Run(self._order()))

    def _order(self) -> p.TaskOrder:
        task, spec = self.task, self.spec
        model = adapters.effective_config(self.registry, task.model)
        timeout = model.request_timeout_seconds or self.settings.request_timeout_seconds
        return p.TaskOrder(
            job_id=spec.id,
            model=task.model,
            input=str(self.journal.input_path(spec.id)),
            log=str(self.journal.log_path(spec.id, task.model)),
            total=spec.total,
            defaults=[spec.defaults, model.defaults],
            commit_interval_ms=self.settings.commit_interval_ms,
            request_timeout_seconds=timeout,
            poison=task.poison,
            isolate_until=task.isolate_until,
        )

    # -- events ------------------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        if self.sharded is not None:
            self._pump_copies(timeout)
            return
        proc = self.proc
        if proc is None:
            return
        for ev in proc.events(timeout):
            self._event(ev)
            if self.proc is not proc:
                return
        if not proc.alive():
            for ev in proc.drain():
                self._event(ev)
                if self.proc is not proc:
                    return
            self._died(proc, proc.exit_description())
        elif not proc.loaded and proc.silent_for() > self.settings.load_timeout_seconds:
            log.error("%s did not load within load_timeout_seconds; ending it", proc.name)
            proc.end(1.0)
            self._died(proc, f"did not load in {self.settings.load_timeout_seconds:g}s")
        elif (
            self.sent
            and self.task is not None
            and proc.loaded
            and proc.silent_for() > self.settings.stall_timeout_seconds
        ):
            log.error(
                "no result from %s for %.0fs with requests in flight; ending it", proc.name, proc.silent_for()
            )
            proc.end(1.0)
            self._died(proc, f"hung (no result for {self.settings.stall_timeout_seconds:g}s)")

    def _pump_copies(self, timeout: float) -> None:
        sharded = self.sharded
        done = sharded.pump(timeout)
        if done or sharded.failed:
            self._end_copies()
            if done:
                self.finish(Status.COMPLETED)
            else:
                self.finish(Status.FAILED, sharded.failed)
        elif time.monotonic() - self._last_batch_json >= BATCH_JSON_SECONDS:
            self._last_batch_json = time.monotonic()
            self.jobs.progressed(self.spec, self.task)

    def _event(self, ev: p.Message) -> None:
        task = self.task
        if isinstance(ev, p.Loaded):
            log.info("loaded %s in %.1fs (window %d)", self.proc.name, ev.load_seconds, ev.capacity)
            self.history.loaded(self.proc.name, time.time() - ev.load_seconds, ev.load_seconds)
            if task is not None and task.load_seconds is None:
                task.load_seconds = ev.load_seconds
                self.journal.save_task(task)
        elif isinstance(ev, p.LoadFailed):
            proc, self.proc = self.proc, None
            proc.end(self.settings.stop_timeout_seconds)
            self._load_failed(proc.name, ev.reason)
        elif task is None:
            return
        elif isinstance(ev, p.Resumed):
            for note in ev.notes:
                log.warning("recovery of %s/%s: %s", task.job_id, task.model, note)
            if ev.kept:
                log.info("resuming %s/%s after %d committed results", task.job_id, task.model, ev.kept)
        elif isinstance(ev, p.IoError):
            self._io_error = ev.message
        elif isinstance(ev, p.Progress):
            self._progress(ev)
        elif isinstance(ev, p.TaskDone):
            outcome = {"completed": Status.COMPLETED, "cancelled": self.cancel_outcome}.get(ev.outcome)
            if ev.outcome == "failed":  # the engine refused the task's adapter: its tasks fail alone
                self._fail_model(task.model, f"the adapter {task.model} cannot run here: {ev.error}")
            elif outcome is None:
                self.requeue("the daemon is stopping")
            else:
                self.finish(outcome)

    def _progress(self, ev: p.Progress) -> None:
        requests, tokens = self._counted
        self.history.done(self.task.model, max(0, ev.count - requests), max(0, ev.completion_tokens - tokens))
        self._counted = (ev.count, ev.completion_tokens)
        now = time.monotonic()
        if now - self._last_batch_json >= BATCH_JSON_SECONDS:
            self._last_batch_json = now
            self.jobs.progressed(self.spec, self.task)
        if now - self._last_progress_log >= PROGRESS_LOG_SECONDS:
            self._last_progress_log = now
            elapsed = (ev.updated_at or 0) - (ev.started_at or 0)
            tps = ev.completion_tokens / elapsed if elapsed > 0 else 0.0
            log.info(
                "progress %s/%s: %d/%d done, %d failed, %.0f tok/s",
                self.spec.name,
                self.task.model,
                ev.count,
                self.spec.total,
                ev.failed,
                tps,
            )

    # -- ending a task -----------------------------------------------------------------------------
    def finish(self, outcome: Status, error: str | None = None) -> None:
        task, spec = self.task, self.spec
        self.task = self.spec = None
        self.jobs.finalized(spec, task, outcome, error)

    def requeue(self, why: str) -> None:
        task, spec = self.task, self.spec
        self.task = self.spec = None
        self.jobs.requeued(spec, task, why)

    def drop(self, job_id: str) -> None:
        """Forget the running task of a job that failed at its boundary, ending its model process."""
        if self.task is not None and self.task.job_id == job_id:
            self.task = self.spec = None
            self._end_copies()
            if self.proc is not None:
                self.end_model(f"job {job_id} failed")

    def cancel(self, spec: JobSpec, outcome: Status = Status.CANCELLED) -> None:
        """Cancel a job (or expire it): queued tasks end now, the running one at its next step."""
        running = self.task if self.task is not None and self.task.job_id == spec.id else None
        if running is not None and self.cancel_outcome == Status.EXPIRED:
            return  # already expiring
        models = self.jobs.cancelled(spec, running, outcome)
        verb = "cancel" if outcome == Status.CANCELLED else "expire"
        log.info("%s %s: %s", verb, spec.id, ", ".join(models) or "no queued task")
        if running is not None and self.sharded is not None:
            self._end_copies()  # what the copies sent is committed
            self.finish(outcome)
        elif running is not None and self.proc is not None and self.sent:
            self.cancel_outcome = outcome
            self.proc.send(p.Cancel())
        elif running is not None:
            self.finish(outcome)

    def stop(self) -> None:
        """Warm stop: the running task commits and goes back in line; the model process ends."""
        self._end_copies()
        if self.task is not None and self.proc is not None and self.proc.alive() and self.sent:
            self.proc.send(p.Stop())
            deadline = time.monotonic() + self.settings.stop_timeout_seconds
            while self.task is not None and time.monotonic() < deadline and self.proc and self.proc.alive():
                self.pump(0.2)
        if self.task is not None:
            self.requeue("the daemon stopped")
        if self.proc is not None:
            self.proc.end(self.settings.stop_timeout_seconds)
            self.proc = None

    def abort_after_disk_error(self) -> None:
        try:
            self._end_copies()
        except OSError:
            pass  # the disk failed: what the copies sent since the last commit runs again
        if self.proc is not None:
            self.proc.end(self.settings.stop_timeout_seconds)
            self.proc = None
        self.task = self.spec = None

    # -- failures ----------------------------------------------------------------------------------
    def _load_failed(self, model: str, reason: str) -> None:
        log.error("%s could not load: %s", model, reason)
        config = self.registry.models[model]
        if config.engine == EngineKind.VLLM and is_memory_failure(reason):
            util = crashes.memory_retry_utilization(config.engine_args, model in self.memory_retry)
            if util is not None:
                self.memory_retry[model] = util
                log.warning("retrying %s once with gpu_memory_utilization %.3f", model, util)
                self._load(model)
                return
        self._fail_model(model, f"the model {model} could not load: {reason}")

    def _fail_model(self, model: str, message: str) -> None:
        """Fail the running task and every queued task of a model that cannot run; the queue moves on."""
        log.error("failing the tasks of %s: %s", model, message)
        served = {model, *self.registry.adapters_of(model)}  # a base that cannot run fails its adapters
        if self.task is not None and self.task.model in served:
            self.finish(Status.FAILED, message)
        for _, job_id, m in self.journal.queued():
            if m in served:
                spec = self.journal.spec(job_id)
                self.jobs.finalized(spec, self.journal.task(job_id, m), Status.FAILED, message)

    def _died(self, proc: ModelProcess, why: str) -> None:
        self.proc = None
        proc.end(1.0)
        task = self.task
        if task is None:
            log.warning("the model process of %s %s while idle", proc.name, why)
            return
        if self._io_error:
            self.pause_reason, self._io_error = f"{self._io_error}; nothing committed is lost", None
            self.requeue("it resumes once the disk accepts writes again")
            return
        if not proc.loaded:
            deaths = self.load_deaths[proc.name] = self.load_deaths.get(proc.name, 0) + 1
            if deaths < LOAD_ATTEMPTS:
                self.requeue(f"the model process {why} while loading; loading it again")
            else:
                self._load_failed(proc.name, f"the model process {why} while loading, {deaths} times")
            return
        self.load_deaths.pop(proc.name, None)
        log_path = self.journal.log_path(task.job_id, task.model)
        alone = proc.alone if self.sent else None
        verdict = crashes.after_crash(task, alone, first_missing(log_path), read_fed_mark(log_path), why)
        log.error(
            "the model process of %s %s during %s (crash %d): %s",
            proc.name,
            why,
            task.job_id,
            task.crashes,
            verdict.note,
        )
        if verdict.give_up:
            self.finish(Status.FAILED, verdict.note)
        else:
            self.journal.save_task(task)
            self.requeue("restarting the model process and resuming from the last commit")

    # -- for the status snapshot -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "loaded_model": proc.name if proc and proc.loaded else None,
            "loading_model": proc.name if proc and not proc.loaded else None,
            "model_pid": proc.pid if proc else None,
            "load_seconds": proc.load_seconds if proc else None,
            "model_rss_mb": round(group_rss_bytes(proc.pid) / 2**20, 1) if proc else None,
            "running": {"job_id": self.task.job_id, "model": self.task.model} if self.task else None,
            **(self.sharded.describe() if self.sharded is not None else {}),
            "swaps": list(self.swaps),
        }

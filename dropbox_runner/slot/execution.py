"""The model slot: at most one model process, the tasks it runs together, and what its events mean.

Starts and swaps model processes, hands them tasks (several at once: section 12), takes a task's
slot back for a higher priority or another group, preempts for another model, turns events into
job operations, and applies the crash policy when the process dies or hangs. The daemon drives it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.config import EngineKind, ModelConfig, Registry, resolve_model_path
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.queue.journal import JobSpec
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.queue.scheduler import Choice
from dropbox_runner.results.log import read_marker
from dropbox_runner.slot import adapters
from dropbox_runner.slot.copies.shards import ShardedRun
from dropbox_runner.slot.failures import SlotFailures
from dropbox_runner.slot.loadable import adapter_problem, model_problem
from dropbox_runner.slot.memory import fit_problem
from dropbox_runner.slot.supervisor import ModelProcess, group_rss_bytes
from dropbox_runner.slot.task import SlotTask, group_of
from dropbox_runner.status.history import History

log = logging.getLogger("dropbox_runner.daemon")


class Execution(SlotFailures):
    def __init__(self, jobs: Jobs, registry: Registry, history: History) -> None:
        self.jobs, self.journal, self.layout, self.history = jobs, jobs.journal, jobs.layout, history
        self.registry, self.settings = registry, registry.settings
        self.proc: ModelProcess | None = None
        self.running: dict[str, SlotTask] = {}  # by task id: the tasks the model process holds
        self.answers_for: set[str] = set()  # the running process's model and the adapters it was started with
        self.sharded: ShardedRun | None = None  # the running task's copies, when it has several
        self.memory_retry: dict[str, float] = {}
        self.load_deaths: dict[str, int] = {}  # model processes killed while loading, per model
        self.swaps: deque[dict[str, Any]] = deque(maxlen=20)
        self.pause_reason: str | None = None  # set when the disk failed: the daemon pauses
        self.preempting: str | None = None  # why the process is stopping for another model
        self.next_choice: Choice | None = None  # the task that preempted: it starts next
        self.event_job: str | None = None  # whose event pump handles now: an error there is that job's
        self.back_since: dict[str, float] = {}  # queue key -> when it gave up its slot
        self.solo: set[str] = set()  # tasks suspected by a crash while sharing: they run alone
        self.shared_crash: dict[str, int] = {}  # tasks in flight at the last crash while sharing
        self._io_error: str | None = None

    @property
    def loaded_model(self) -> str | None:
        return self.proc.name if self.proc is not None and self.proc.alive() else None

    @property
    def task(self):
        """The first running task's record, or None (one task at a time: the running task)."""
        return next(iter(self.running.values())).task if self.running else None

    @property
    def busy(self) -> bool:
        return bool(self.running) or self.preempting is not None

    def running_keys(self) -> set[str]:
        return {t.task.queue_key for t in self.running.values()}

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
        run = SlotTask(task, spec, group_of(self.journal, spec, self.settings.fair_share_key))
        task.group = run.group
        self.running[run.key] = run
        self.jobs.started(spec, task)
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        run.counted = (marker.count, marker.completion_tokens) if marker else (0, 0)
        if marker is not None and marker.count >= spec.total:
            log.info("%s/%s: every line already has a result; publishing", spec.id, task.model)
            self.finish(run, Status.COMPLETED)
            return
        shared = f", sharing with {len(self.running) - 1} other tasks" if len(self.running) > 1 else ""
        log.info("next: %s (%s) on %s: %s%s", spec.name, spec.id, task.model, choice.reason, shared)
        serving = self.registry.base_of(task.model)  # an adapter runs in its base's process
        if serving != task.model:
            problem = adapter_problem(self.layout.root, self.registry, task.model)
            if problem:
                self._fail_model(task.model, f"the adapter {task.model} cannot run here: {problem}")
                return
        config = self.registry.models[serving]
        if config.replicas > 1 or config.executor == "ray":
            self._start_copies(run, config)
            return
        if self.proc is not None and (
            self.proc.name != serving or not self.proc.alive() or task.model not in self.answers_for
        ):  # an adapter made after its base started needs the base started again
            self.end_model(f"{task.model} is needed next")
        if self.proc is None:
            self._load(serving)
        if self.proc is not None and run.key in self.running and not run.sent:
            run.sent = self.proc.send(p.Run(self._order(run)))  # while it loads too: lines get prepared

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
        for run in self.running.values():  # tasks of a process that was reloaded (memory retry)
            if self.registry.base_of(run.task.model) == model and not run.sent:
                run.sent = self.proc.send(p.Run(self._order(run)))

    def end_model(self, why: str) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        started = time.time()
        seconds = proc.end(self.settings.stop_timeout_seconds)
        log.info("swap: ended %s (pid %d) in %.2fs because %s", proc.name, proc.pid, seconds, why)
        self.swaps.append({"model": proc.name, "unload_seconds": round(seconds, 3), "at": time.time()})
        self.history.swapped(proc.name, started, seconds)

    def _start_copies(self, run: SlotTask, config: ModelConfig) -> None:
        """Several copies of the model on this task: the daemon leases them shards (see shards.py)."""
        model = run.task.model
        self.end_model(f"{model} runs on {config.replicas} copies next")
        problem = model_problem(self.layout.root, model, config)
        if problem:
            self._fail_model(model, f"the model {model} cannot run here: {problem}")
            return
        log.info("loading %d copies of %s (%s)", config.replicas, model, config.executor)
        try:
            self.sharded = ShardedRun(
                self.layout,
                self.journal,
                self.settings,
                self.history,
                run.spec,
                run.task,
                config,
                self._order(run),
            )
        except ConnectionError as exc:  # Ray cannot be reached
            where = self.settings.ray_address
            self._fail_model(model, f"settings.ray_address: cannot reach Ray at {where!r} ({exc})"[:400])
            return
        run.sent = True

    def _end_copies(self) -> None:
        sharded, self.sharded = self.sharded, None
        if sharded is not None:
            sharded.close()

    def _order(self, run: SlotTask) -> p.TaskOrder:
        task, spec = run.task, run.spec
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
            task_id=run.key,
            priority=spec.priority,
            group=run.group,
        )

    # -- giving slots back -------------------------------------------------------------------------
    def evict(self, key: str, why: str) -> None:
        """The task commits and goes back to the queue in its place; the others go on."""
        run = self.running.get(key)
        if run is None or run.leaving or self.proc is None:
            return
        log.info("slot: %s/%s gives up its slot: %s", run.task.job_id, run.task.model, why)
        run.leaving = why
        self.proc.send(p.Stop(run.key))

    def preempt(self, why: str, preemptor: Choice) -> None:
        """Stop feeding; the requests in flight finish (stop_timeout_seconds at most); every task goes
        back to the queue, the model process ends, and `preemptor` starts next."""
        if self.preempting is not None or self.proc is None:
            return
        held = ", ".join(sorted(self.running))
        log.info("preempt: %s/%s preempts %s: %s", preemptor.job_id, preemptor.model, held, why)
        self.preempting, self.next_choice = why, preemptor
        for run in self.running.values():
            run.leaving = run.leaving or why
        if not self.running:
            self.end_model(why)
            self.preempting = None
            return
        self.proc.send(p.Stop(grace_seconds=self.settings.stop_timeout_seconds))

    # -- events ------------------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        if self.sharded is not None:
            self._pump_copies(timeout)
            return
        proc = self.proc
        self.event_job = None
        if proc is None:
            return
        for ev in proc.events(timeout):
            self._event(ev)
            if self.proc is not proc:
                return
        busy = any(r.sent for r in self.running.values())
        why = proc.trouble(self.settings, busy=busy)
        if why is not None:
            for ev in proc.drain() if not proc.alive() else ():
                self._event(ev)
                if self.proc is not proc:
                    return
            if self.preempting is not None and not self.running:
                self._preempted()
                return
            self._died(proc, why)

    def _pump_copies(self, timeout: float) -> None:
        sharded, run = self.sharded, next(iter(self.running.values()))
        done = sharded.pump(timeout)
        if done or sharded.failed:
            self._end_copies()
            if done:
                self.finish(run, Status.COMPLETED)
            else:
                self.finish(run, Status.FAILED, sharded.failed)
        elif run.due_batch_json():
            self.jobs.progressed(run.spec, run.task)

    def _event(self, ev: p.Message) -> None:
        if isinstance(ev, p.Loaded):
            log.info("loaded %s in %.1fs (window %d)", self.proc.name, ev.load_seconds, ev.capacity)
            self.history.loaded(self.proc.name, time.time() - ev.load_seconds, ev.load_seconds)
            for run in self.running.values():
                if run.task.load_seconds is None:
                    run.task.load_seconds = ev.load_seconds
                    self.journal.save_task(run.task)
            return
        if isinstance(ev, p.LoadFailed):
            proc, self.proc = self.proc, None
            proc.end(self.settings.stop_timeout_seconds)
            self._load_failed(proc.name, ev.reason)
            return
        run = self.running.get(getattr(ev, "task_id", ""))
        self.event_job = run.task.job_id if run is not None else None
        if run is None:
            return
        if isinstance(ev, p.Resumed):
            for note in ev.notes:
                log.warning("recovery of %s: %s", run.key, note)
            if ev.kept:
                log.info("resuming %s after %d committed results", run.key, ev.kept)
        elif isinstance(ev, p.IoError):
            self._io_error = ev.message
        elif isinstance(ev, p.Progress):
            self._progress(run, ev)
        elif isinstance(ev, p.TaskDone):
            if ev.outcome == "failed":  # the engine refused the task's adapter: its tasks fail alone
                self._fail_model(run.task.model, f"the adapter {run.task.model} cannot run here: {ev.error}")
            else:
                self._task_done(run, ev.outcome)

    def _task_done(self, run: SlotTask, outcome: str) -> None:
        final = {"completed": Status.COMPLETED, "cancelled": run.cancel_outcome}.get(outcome)
        if run.cancelling and final is None:  # it gave up its slot just before the cancel arrived
            final = run.cancel_outcome
        if final is not None:
            self.finish(run, final)
        elif run.leaving:
            run.task.preemptions += 1
            self.back_since[run.task.queue_key] = time.time()
            self.requeue(run, run.leaving)
        else:
            self.requeue(run, "the daemon is stopping")
        if self.preempting is not None and not self.running:
            self._preempted()

    def _preempted(self) -> None:
        why, self.preempting = self.preempting, None
        self.end_model(why)

    def _progress(self, run: SlotTask, ev: p.Progress) -> None:
        requests, tokens = run.counted
        self.history.done(run.task.model, max(0, ev.count - requests), max(0, ev.completion_tokens - tokens))
        run.progressed(ev)
        self.history.task_progress(run.key, run.group, ev.count, ev.completion_tokens)
        if run.due_batch_json():
            self.jobs.progressed(run.spec, run.task)
        if run.due_progress_log():
            log.info(
                "progress %s/%s: %d/%d done, %d failed, %.0f tok/s over the last minute (group %s)",
                run.spec.name,
                run.task.model,
                ev.count,
                run.spec.total,
                ev.failed,
                run.recent_rate()[1],
                run.group,
            )

    # -- ending a task -----------------------------------------------------------------------------
    def finish(self, run: SlotTask, outcome: Status, error: str | None = None) -> None:
        self.running.pop(run.key, None)
        self.history.task_ended(run.key)
        self.solo.discard(run.key)
        self.back_since.pop(run.task.queue_key, None)
        self.jobs.finalized(run.spec, run.task, outcome, error)

    def requeue(self, run: SlotTask, why: str) -> None:
        self.running.pop(run.key, None)
        self.history.task_ended(run.key)
        self.jobs.requeued(run.spec, run.task, why)

    def drop(self, job_id: str) -> None:
        """Forget the running tasks of a job that failed at its boundary, ending its model process."""
        runs = [r for r in self.running.values() if r.task.job_id == job_id]
        for run in runs:
            self.running.pop(run.key, None)
        if runs:
            self._end_copies()
            self.end_model(f"job {job_id} failed")
            for run in list(self.running.values()):
                self.requeue(run, f"its model process ended because job {job_id} failed")

    def cancel(self, spec: JobSpec, outcome: Status = Status.CANCELLED) -> None:
        """Cancel a job (or expire it): queued tasks end now, the running ones at their next step."""
        # a job's base and adapter tasks may run at once (sections 12 and 13): each of them ends
        runs = [r for r in self.running.values() if r.task.job_id == spec.id]
        runs = [r for r in runs if r.cancel_outcome != Status.EXPIRED]  # not those already expiring
        if not runs and any(r.task.job_id == spec.id for r in self.running.values()):
            return
        models = self.jobs.cancelled(spec, [r.task for r in runs], outcome)
        verb = "cancel" if outcome == Status.CANCELLED else "expire"
        log.info("%s %s: %s", verb, spec.id, ", ".join(models) or "no queued task")
        if runs and self.sharded is not None:
            self._end_copies()  # what the copies sent is committed
        for run in runs:
            if self.sharded is None and self.proc is not None and run.sent:
                run.cancel_outcome, run.cancelling = outcome, True
                self.proc.send(p.Cancel(run.key))
            else:
                self.finish(run, outcome)

    def stop(self) -> None:
        """Warm stop: the running tasks commit and go back in line; the model process ends."""
        self._end_copies()
        if self.running and self.proc is not None and self.proc.alive():
            self.proc.send(p.Stop())
            deadline = time.monotonic() + self.settings.stop_timeout_seconds
            while self.running and time.monotonic() < deadline and self.proc and self.proc.alive():
                self.pump(0.2)
        for run in list(self.running.values()):
            self.requeue(run, "the daemon stopped")
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
        self.running.clear()
        self.preempting = None

    # -- for the status snapshot -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "loaded_model": proc.name if proc and proc.loaded else None,
            "loading_model": proc.name if proc and not proc.loaded else None,
            "model_pid": proc.pid if proc else None,
            "load_seconds": proc.load_seconds if proc else None,
            "engine_preemptions": proc.engine_preemptions if proc else None,  # vLLM's own (KV cache full)
            "model_rss_mb": round(group_rss_bytes(proc.pid) / 2**20, 1) if proc else None,
            "running": [r.describe(self.running.values()) for r in self.running.values()],
            "preempting": self.preempting,
            **(self.sharded.describe() if self.sharded is not None else {}),
            "swaps": list(self.swaps),
        }

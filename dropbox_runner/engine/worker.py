"""The model process: loads one model, then runs the tasks the daemon sends, writing their result logs.

It talks to the daemon by JSON lines (commands on stdin, events on a pipe) and dies, with its whole
process group and without writing another byte, as soon as stdin closes (the daemon is gone).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from dropbox_runner.engine.base import Engine, Finished, RequestRejected
from dropbox_runner.requests import IdSet, LineError, Request, iter_raw_lines, parse_line
from dropbox_runner.results.log import ResultLog
from dropbox_runner.results.records import error_line, failure_line, request_ids, success_line

log = logging.getLogger("dropbox_runner.worker")


POISON_MESSAGE = (
    "this request crashed the model process, alone, after crashing it in a batch; it was not run again"
)


class Channel:
    """Events to the daemon, one JSON object per line on an inherited pipe."""

    def __init__(self, fd: int) -> None:
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def send(self, event: str, **data: Any) -> None:
        with self._lock:
            self._f.write(orjson.dumps({"ev": event, **data}) + b"\n")


class Lifeline:
    """Reads commands from stdin; EOF means the daemon died, so the whole process group goes at once."""

    def __init__(self) -> None:
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.active_log: ResultLog | None = None
        threading.Thread(target=self._read, name="lifeline", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin.buffer:
            if line.strip():
                self.commands.put(orjson.loads(line))
        self.die()

    def die(self) -> None:
        if self.active_log is not None:
            self.active_log.freeze()  # waits for a commit in progress, then forbids any other
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def poll(self) -> dict[str, Any] | None:
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            return None


def make_engine(spec: dict[str, Any]) -> Engine:
    if spec["engine"] == "echo":
        from dropbox_runner.engine.echo import EchoEngine

        return EchoEngine(spec["model"], spec["engine_args"])
    from dropbox_runner.engine.vllm_engine import VllmEngine

    return VllmEngine(spec["model"], spec["path"], spec["task"], spec["engine_args"])


def load_failure_reason(exc: BaseException) -> str:
    """vLLM's reason in one sentence: the deepest message that says something."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        nxt = seen.__cause__ or seen.__context__
        if not str(nxt).strip():
            break
        seen = nxt
    text = " ".join(str(exc).split()) or type(exc).__name__
    deeper = " ".join(str(seen).split())
    if seen is not exc and deeper and deeper not in text:
        text = f"{text} ({deeper})"
    return text[:600]


class TaskRun:
    """One task: resume its log, feed the engine within its window, commit in the background."""

    def __init__(self, engine: Engine, task: dict[str, Any], channel: Channel, lifeline: Lifeline) -> None:
        self.engine, self.task, self.channel, self.lifeline = engine, task, channel, lifeline
        self.job_id: str = task["job_id"]
        self.model: str = task["model"]
        self.defaults = tuple(task.get("defaults") or ())
        self.isolate_until = int(task.get("isolate_until", -1))
        self.log = ResultLog(Path(task["log"]), int(task["total"]))
        self.interval = task["commit_interval_ms"] / 1000
        self.outcome = "completed"
        self._stop = threading.Event()

    def run(self) -> str:
        recovery = self.log.recover()
        self.lifeline.active_log = self.log
        self.channel.send(
            "resumed", kept=recovery.kept, dropped_bytes=recovery.dropped_bytes, notes=recovery.notes
        )
        committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        committer.start()
        try:
            self._feed()
        finally:
            self._stop.set()
            committer.join()
            try:
                self.log.commit()
            except OSError as exc:
                self.channel.send("io_error", message=f"cannot write {self.log.path}: {exc.strerror or exc}")
                self.lifeline.die()
            self.lifeline.active_log = None
            self.log.close()
        self.channel.send("progress", **self.log.marker.model_dump())
        return self.outcome

    def _commit_loop(self) -> None:
        deadline = time.monotonic() + self.interval
        # The next commit is due one interval after the start of the last, not after its end.
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            deadline = time.monotonic() + self.interval
            try:
                committed = self.log.commit()
            except OSError as exc:  # disk full, I/O error: what is committed stays; stop here
                self.channel.send("io_error", message=f"cannot write {self.log.path}: {exc.strerror or exc}")
                self.lifeline.die()
            if committed:
                self.channel.send("progress", **self.log.marker.model_dump())

    def _feed(self) -> None:
        engine, done = self.engine, self.log.done
        seen = IdSet()
        poison = set(self.task.get("poison") or ())
        window = 1 if self.isolate_until >= 0 else engine.capacity
        self.log.mark_started()
        with open(self.task["input"], "rb") as f:
            for raw in iter_raw_lines(f):
                parsed = parse_line(raw, seen, self.defaults)
                if done[raw.index]:
                    continue
                if isinstance(parsed, LineError):
                    self._record_line_error(parsed)
                    continue
                if raw.index in poison:
                    self._record_failure(raw.index, parsed.custom_id, "engine_crash", POISON_MESSAGE)
                    continue
                while engine.in_flight >= window:
                    self._collect()
                    if self._interrupted():
                        return
                if raw.index <= self.isolate_until:
                    self.channel.send("running", index=raw.index)
                elif window == 1:
                    window = engine.capacity
                self.log.fed(raw.index)
                self._submit(parsed)
                if self._interrupted():
                    return
        while engine.in_flight:
            self._collect()
            if self._interrupted():
                return

    def _submit(self, req: Request) -> None:
        try:
            self.engine.submit(req)
        except RequestRejected as exc:
            self._record(
                Finished(
                    req.index,
                    req.custom_id,
                    400,
                    error={"message": str(exc), "param": exc.param, "code": "invalid_request"},
                )
            )

    def _collect(self) -> None:
        for finished in self.engine.step():
            self._record(finished)

    def _interrupted(self) -> bool:
        cmd = self.lifeline.poll()
        if cmd is None:
            return False
        op = cmd.get("op")
        if op in ("cancel", "stop"):
            self.engine.abort_all()
            self.outcome = "cancelled" if op == "cancel" else "interrupted"
            if op == "stop":
                self.lifeline.commands.put(cmd)  # the main loop exits after this task
            return True
        return False

    def _record(self, fin: Finished) -> None:
        ids = request_ids(self.job_id, self.model, fin.index)
        if fin.status_code == 200:
            payload = success_line(fin.custom_id, fin.body, ids)
            self.log.append(fin.index, True, fin.prompt_tokens, fin.completion_tokens, payload)
        else:
            err = fin.error or {}
            payload = error_line(
                fin.custom_id,
                fin.status_code,
                err.get("message", "request failed"),
                ids,
                param=err.get("param"),
                code=err.get("code"),
            )
            self.log.append(fin.index, False, 0, 0, payload)

    def _record_line_error(self, e: LineError) -> None:
        ids = request_ids(self.job_id, self.model, e.index)
        payload = error_line(e.custom_id, 400, f"line {e.line}: {e.message}", ids, param=e.param, code=e.code)
        self.log.append(e.index, False, 0, 0, payload)

    def _record_failure(self, index: int, custom_id: str, code: str, message: str) -> None:
        payload = failure_line(custom_id, code, message, request_ids(self.job_id, self.model, index))
        self.log.append(index, False, 0, 0, payload)


def main() -> int:
    # The committer thread must get the GIL on time from a busy feeding loop (default: 5 ms slices).
    sys.setswitchinterval(0.0005)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
    )
    spec = orjson.loads(sys.stdin.buffer.readline())
    channel = Channel(int(spec["event_fd"]))
    lifeline = Lifeline()
    started = time.time()
    try:
        engine = make_engine(spec)
    except Exception as exc:  # any load failure is reported, then the process ends
        log.exception("model %s failed to load", spec["model"])
        channel.send("load_failed", reason=load_failure_reason(exc))
        return 3
    channel.send(
        "loaded", load_seconds=round(time.time() - started, 3), capacity=engine.capacity, pid=os.getpid()
    )
    while True:
        cmd = lifeline.commands.get()
        if cmd["op"] == "stop":
            channel.send("stopped")
            return 0
        if cmd["op"] == "run":
            task = cmd["task"]
            outcome = TaskRun(engine, task, channel, lifeline).run()
            channel.send("task_done", job_id=task["job_id"], model=task["model"], outcome=outcome)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # vLLM leaves non-daemon threads; the daemon waits for this exit to free memory

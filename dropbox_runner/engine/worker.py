"""The model process: loads one model, then runs the tasks the daemon sends, writing their result logs.

It talks to the daemon by JSON lines (commands on stdin, events on a pipe) and dies, with its whole
process group and without writing another byte, as soon as stdin closes (the daemon is gone).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import sys
import threading
import time
from pathlib import Path

from dropbox_runner import protocol as p
from dropbox_runner.engine.base import Engine, Finished, RequestRejected
from dropbox_runner.engine.feedahead import FeedAhead, grouped
from dropbox_runner.engine.shardsink import ShardSink
from dropbox_runner.lines import IdSet, LineError, Request, iter_raw_lines, parse_line
from dropbox_runner.results.log import ResultLog
from dropbox_runner.results.records import error_line, failure_line, request_ids, success_line

log = logging.getLogger("dropbox_runner.worker")


POISON_MESSAGE = (
    "this request crashed the model process, alone, after crashing it in a batch; it was not run again"
)


class Channel:
    """Events to the daemon on an inherited pipe. A commit never waits on the daemon: progress
    events are dropped while the pipe is full (the next one carries the newer marker)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._lock = threading.Lock()

    def send(self, event: p.Message) -> None:
        data = memoryview(event.encode())
        with self._lock:
            while data:
                try:
                    data = data[os.write(self._fd, data) :]
                except BlockingIOError:
                    select.select([], [self._fd], [], 1.0)

    def offer(self, event: p.Message) -> None:
        """Send if the pipe has room now (a small event is written whole or not at all)."""
        with self._lock:
            try:
                os.write(self._fd, event.encode())
            except BlockingIOError:
                pass


class Lifeline:
    """Reads commands from stdin; EOF means the daemon died, so the whole process group goes at once.

    A task's order may arrive while the engine still loads: its feed-ahead starts as soon as the
    tokenizer is there (loaded by the main thread first: transformers' lazy imports are not safe
    from two threads at once).
    """

    def __init__(self, spec: p.Start) -> None:
        self.spec = spec
        self.commands: queue.Queue[p.Message] = queue.Queue()
        self.active_log: ResultLog | None = None
        self.ahead: FeedAhead | None = None
        self._tokenizer = None
        self._waiting: p.TaskOrder | None = None  # an order that came before the tokenizer
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="lifeline", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin.buffer:
            if line.strip():
                cmd = p.decode(line, p.COMMANDS)
                if isinstance(cmd, p.Run) and self.spec.engine == "vllm":
                    self._prepare(cmd.task)
                self.commands.put(cmd)
        self.die()

    def _prepare(self, order: p.TaskOrder) -> None:
        with self._lock:
            if self.ahead is not None:
                return
            if self._tokenizer is None:
                self._waiting = self._waiting or order
            else:
                self.ahead = FeedAhead(self._tokenizer, order)

    def tokenizer_ready(self, tokenizer) -> None:
        with self._lock:
            self._tokenizer = tokenizer
            order, self._waiting = self._waiting, None
        if order is not None:
            self._prepare(order)

    def feed_ahead_for(self, order: p.TaskOrder) -> FeedAhead | None:
        """The feed-ahead prepared for this order (a vLLM model's), or None; each serves one task."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and not ahead.matches(order):
            ahead.stop()
            return None
        return ahead

    def die(self) -> None:
        if self.active_log is not None:
            self.active_log.freeze()  # waits for a commit in progress, then forbids any other
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def poll(self) -> p.Message | None:
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            return None


def prepare_tokenizer(spec: p.Start, lifeline: Lifeline) -> None:
    """Load the model's tokenizer here, before the engine, and hand it to the feed-ahead."""
    from dropbox_runner.engine.vllm_engine import load_tokenizer

    build_if_missing(spec)
    try:
        tokenizer = load_tokenizer(spec.path, spec.engine_args)
        if getattr(tokenizer, "chat_template", None):  # warm the template machinery up, here
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            )
    except Exception:  # no feed-ahead: the feeding loop tokenizes by itself (vLLM says why if it cannot)
        log.exception("the tokenizer of %s did not load ahead of the engine", spec.model)
        return
    lifeline.tokenizer_ready(tokenizer)


def build_if_missing(spec: p.Start) -> None:
    if spec.build and not (Path(spec.path) / "config.json").exists():
        from dropbox_runner.engine import tinymodels

        log.info("building %s into %s (first use)", spec.build, spec.path)
        tinymodels.main([str(Path(spec.path).parent), spec.build])


def make_engine(spec: p.Start) -> Engine:
    if spec.engine == "echo":
        from dropbox_runner.engine.echo import EchoEngine

        return EchoEngine(spec.model, spec.engine_args, spec.adapters)
    from dropbox_runner.engine.vllm_engine import VllmEngine

    build_if_missing(spec)
    return VllmEngine(spec.model, spec.path, spec.task, spec.engine_args, spec.adapters)


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


ENGINE_ERROR = "the engine raised an error on this request: {}"


class TaskRun:
    """One task: resume its log, feed the engine within its window, commit in the background."""

    def __init__(
        self,
        engine: Engine,
        task: p.TaskOrder,
        channel: Channel,
        lifeline: Lifeline,
        ahead: FeedAhead | None,
        group: bool = True,
    ) -> None:
        self.engine, self.task, self.channel, self.lifeline, self.ahead = (
            engine,
            task,
            channel,
            lifeline,
            ahead,
        )
        self.defaults = tuple(task.defaults)
        self.group = group and ahead is not None  # grouping by prefix needs the token ids ahead
        if task.shard is None:
            self.log: ResultLog | ShardSink = ResultLog(Path(task.log), task.total)
        else:  # a copy running a shard for the daemon: results go back up the pipe
            self.log = ShardSink(task.total, task.shard[0], task.shard[1], channel.send)
        self.interval = task.commit_interval_ms / 1000
        self.timeout = task.request_timeout_seconds
        self.started: dict[int, tuple[float, str]] = {}  # in flight, oldest first: start time, custom_id
        self.outcome = "completed"
        self._stop = threading.Event()

    def run(self) -> str:
        recovery = self.log.recover()
        self.lifeline.active_log = self.log
        self.channel.send(p.Resumed(kept=recovery.kept, notes=recovery.notes))
        committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        committer.start()
        try:
            self._feed()
        finally:
            self._stop.set()
            committer.join()
            self._commit()
            self.lifeline.active_log = None
            self.log.close()
        if self.task.shard is None:
            self.channel.send(self._progress())
        return self.outcome

    def _progress(self) -> p.Progress:
        m = self.log.marker
        return p.Progress(m.count, m.failed, m.completion_tokens, m.started_at, m.updated_at)

    def _commit(self) -> bool:
        try:
            return self.log.commit()
        except OSError as exc:  # disk full, I/O error: what is committed stays; stop here
            self.channel.send(p.IoError(f"cannot write {self.log.path}: {exc.strerror or exc}"))
            self.lifeline.die()
            return False

    def _commit_loop(self) -> None:
        deadline = time.monotonic() + self.interval
        # The next commit is due one interval after the start of the last, not after its end.
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            deadline = time.monotonic() + self.interval
            if self._commit() and self.task.shard is None:
                self.channel.offer(self._progress())

    def _feed(self) -> None:
        task = self.task
        alone = task.isolate_until >= 0  # lines up to isolate_until run one at a time
        # With token ids from the feed-ahead, a window's worth of lines is read ahead and fed grouped
        # by prompt prefix, so vLLM's prefix cache serves the lines that share one.
        lookahead = self.engine.capacity if self.group else 1
        batch: list[tuple[Request, list[list[int]] | None]] = []
        self.log.mark_started()
        for req in self._requests():
            if alone and req.index > task.isolate_until:
                if not self._drain():  # the last line run alone ends before others start
                    return
                alone = False
                self.channel.send(p.Running(None))
            if alone:
                if not self._feed_one(req, None, window=1, announce=True):
                    return
                continue
            batch.append((req, self.ahead.take(req.index) if self.ahead is not None else None))
            if len(batch) >= lookahead:
                if not self._feed_batch(batch):
                    return
                batch = []
        if self._feed_batch(batch):
            self._drain()

    def _requests(self):
        """The task's lines still to run, in input order; bad lines and known poison fail on the way."""
        done, seen, poison, task = self.log.done, IdSet(), set(self.task.poison), self.task
        with open(task.input, "rb") as f:
            lines = iter_raw_lines(f)
            if task.shard is not None:  # a copy's shard: read from the checkpoint before it to its end
                offset, line, index = task.shard_at
                f.seek(offset)
                lines = iter_raw_lines(f, offset, index, line - 1)
            for raw in lines:
                if task.shard is not None and (raw.index >= task.shard[1] or done[raw.index]):
                    if raw.index >= task.shard[1]:
                        return
                    continue  # not this copy's line (repeated ids are the daemon's to fail)
                parsed = parse_line(raw, seen, self.defaults)
                if done[raw.index]:
                    continue
                if isinstance(parsed, LineError):
                    self._record_line_error(parsed)
                elif raw.index in poison:
                    self._record_failure(raw.index, parsed.custom_id, "engine_crash", POISON_MESSAGE)
                else:
                    yield parsed

    def _feed_batch(self, batch: list[tuple[Request, list[list[int]] | None]]) -> bool:
        ordered = grouped(batch) if len(batch) > 1 else batch
        return all(self._feed_one(req, ids, window=self.engine.capacity) for req, ids in ordered)

    def _feed_one(
        self, req: Request, ids: list[list[int]] | None, window: int, announce: bool = False
    ) -> bool:
        """Wait for room in the window, then submit; False if the task was interrupted."""
        while self.engine.in_flight >= window:
            self._collect()
            if self._interrupted():
                return False
        if announce:
            self.channel.send(p.Running(req.index))
        self.log.fed(req.index)
        self._submit(req, ids)
        return not self._interrupted()

    def _drain(self) -> bool:
        """Collect until nothing is in flight; False if interrupted."""
        while self.engine.in_flight:
            self._collect()
            if self._interrupted():
                return False
        return True

    def _submit(self, req: Request, ids: list[list[int]] | None = None) -> None:
        try:
            self.engine.submit(req, ids, model=self.task.model)  # the task's model: the base or an adapter
        except RequestRejected as exc:
            error = {"message": str(exc), "param": exc.param, "code": "invalid_request"}
            self._record(Finished(req.index, req.custom_id, 400, error=error))
            return
        except Exception as exc:  # the engine's own fault for this request: it fails alone
            log.exception("request %s raised in the engine", req.custom_id)
            message = ENGINE_ERROR.format(f"{type(exc).__name__}: {exc}"[:300])
            error = {"message": message, "param": None, "code": "engine_error", "type": "server_error"}
            self._record(Finished(req.index, req.custom_id, 500, error=error))
            return
        if self.timeout is not None:  # only timed requests need their start time
            self.started[req.index] = (time.monotonic(), req.custom_id)

    def _collect(self) -> None:
        for finished in self.engine.step():
            self._record(finished)
        if self.timeout is not None:
            self._expire(time.monotonic() - self.timeout)

    def _expire(self, cutoff: float) -> None:
        """Fail alone every request handed to the engine before `cutoff` (oldest first)."""
        while self.started:
            index, (t0, custom_id) = next(iter(self.started.items()))
            if t0 > cutoff:
                return
            self.engine.abort(index)
            message = f"the request ran longer than request_timeout_seconds ({self.timeout:g} s)"
            self._record_failure(index, custom_id, "request_timeout", message)

    def _interrupted(self) -> bool:
        cmd = self.lifeline.poll()
        if cmd is None:
            return False
        if isinstance(cmd, p.Cancel | p.Stop):
            self.engine.abort_all()
            self.started.clear()
            self.outcome = "cancelled" if isinstance(cmd, p.Cancel) else "interrupted"
            if isinstance(cmd, p.Stop):
                self.lifeline.commands.put(cmd)  # the main loop exits after this task
            return True
        return False

    def _ids(self, index: int) -> tuple[str, str]:
        self.started.pop(index, None)
        return request_ids(self.task.job_id, self.task.model, index)

    def _record(self, fin: Finished) -> None:
        if self.log.done[fin.index]:  # already failed by its timeout
            return
        ids = self._ids(fin.index)
        if fin.status_code == 200:
            payload = success_line(fin.custom_id, fin.body, ids)
            self.log.append(
                fin.index, True, fin.prompt_tokens, fin.completion_tokens, payload, fin.cached_tokens
            )
        else:
            err = fin.error or {}
            payload = error_line(
                fin.custom_id,
                fin.status_code,
                err.get("message", "request failed"),
                ids,
                type=err.get("type", "invalid_request_error"),
                param=err.get("param"),
                code=err.get("code"),
            )
            self.log.append(fin.index, False, 0, 0, payload)

    def _record_line_error(self, e: LineError) -> None:
        ids = self._ids(e.index)
        payload = error_line(e.custom_id, 400, f"line {e.line}: {e.message}", ids, param=e.param, code=e.code)
        self.log.append(e.index, False, 0, 0, payload)

    def _record_failure(self, index: int, custom_id: str, code: str, message: str) -> None:
        payload = failure_line(custom_id, code, message, self._ids(index))
        self.log.append(index, False, 0, 0, payload)


def serve(channel: Channel, lifeline: Lifeline, spec: p.Start) -> int:
    started = time.time()
    try:
        if spec.engine == "vllm":
            prepare_tokenizer(spec, lifeline)
        engine = make_engine(spec)
    except Exception as exc:  # any load failure is reported, then the process ends
        log.exception("model %s failed to load", spec.model)
        channel.send(p.LoadFailed(load_failure_reason(exc)))
        return 3
    channel.send(p.Loaded(load_seconds=round(time.time() - started, 3), capacity=engine.capacity))
    while True:
        cmd = lifeline.commands.get()
        if isinstance(cmd, p.Stop):
            return 0
        if isinstance(cmd, p.Run):
            ahead = lifeline.feed_ahead_for(cmd.task)
            refused = engine.refuses(cmd.task.model)  # an adapter the engine cannot serve fails its task
            if refused is not None:
                if ahead is not None:
                    ahead.stop()
                channel.send(p.TaskDone("failed", refused[:600]))
                continue
            group = spec.feed_order == "prefix"
            outcome = TaskRun(engine, cmd.task, channel, lifeline, ahead, group).run()
            if ahead is not None:
                log.info("feed-ahead prepared %d lines of %s", ahead.prepared, cmd.task.job_id)
                ahead.stop()
            channel.send(p.TaskDone(outcome))


def main() -> int:
    # The committer thread must get the GIL on time from a busy feeding loop (default: 5 ms slices).
    sys.setswitchinterval(0.0005)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
    )
    spec = p.decode(sys.stdin.buffer.readline(), p.COMMANDS)
    assert isinstance(spec, p.Start)
    channel = Channel(spec.event_fd)
    lifeline = Lifeline(spec)
    try:
        return serve(channel, lifeline, spec)
    except Exception:  # a fault no request owns: end here; the daemon resumes and hunts the culprit
        log.exception("the model process failed")
        return 4


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        code = 5
    sys.stdout.flush()
    os._exit(code)  # vLLM leaves non-daemon threads; the daemon waits for this exit to free memory

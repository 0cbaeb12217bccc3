"""The model process: loads one model, then runs the tasks the daemon sends, together, writing
their result logs (the feeding loop is `feeding.Worker`).

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
from dropbox_runner.engine.base import Engine
from dropbox_runner.engine.feedahead import FeedAhead
from dropbox_runner.engine.feeding import Worker

log = logging.getLogger("dropbox_runner.worker")


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
    """Reads commands from stdin; EOF means the daemon died, so the whole process group goes at once,
    after every task's log is frozen.

    An order may arrive while the engine still loads: the feed-ahead prepares its lines as soon as
    the tokenizer is there (loaded by the main thread first: transformers' lazy imports are not safe
    from two threads at once).
    """

    def __init__(self, spec: p.Start) -> None:
        self.spec = spec
        self.commands: queue.Queue[p.Message] = queue.Queue()
        self.logs: set = set()  # the result logs of the tasks running; frozen before the process dies
        self.ahead: FeedAhead | None = None
        self._waiting: list[p.TaskOrder] = []  # orders that came before the tokenizer
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
            if self.ahead is None:
                self._waiting.append(order)
                return
        self.ahead.add(order)

    def tokenizer_ready(self, tokenizer) -> None:
        with self._lock:
            self.ahead = FeedAhead(tokenizer)
            waiting, self._waiting = self._waiting, []
        for order in waiting:
            self.ahead.add(order)

    def die(self) -> None:
        for result_log in list(self.logs):
            result_log.freeze()  # waits for a commit in progress, then forbids any other
        os.killpg(os.getpgid(0), signal.SIGKILL)


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

        return EchoEngine(spec.model, spec.engine_args, spec.task, spec.adapters)
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
    Worker(engine, channel, lifeline, lifeline.ahead, spec.feed_order == "prefix").serve()
    return 0


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

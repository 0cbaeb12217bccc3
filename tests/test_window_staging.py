"""A task whose last lines wait in the window for room (the engine full of another task's lines) is
not finished: it ends only once they ran. It used to end at once, published `completed` without
them, and the model process then died feeding them to the closed log (found by issue 22's race
with eight tasks on tiny-llama: "completed, 448 of 500 done")."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dropbox_runner import protocol as p
from dropbox_runner.engine.echo import EchoEngine
from dropbox_runner.engine.feeding import Worker
from dropbox_runner.results.log import read_fed_mark, read_marker

from helpers import Commands, Events, task_order, wait_for


def test_a_task_with_lines_waiting_for_room_in_the_window_is_not_finished(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    engine = EchoEngine("m", {"max_in_flight": 2, "gate_on": "GATE", "gate_file": str(gate)})
    events, lifeline = Events(), Commands()
    worker = Worker(engine, events, lifeline, None)
    worker.group = True  # windows composed across tasks, as on vLLM (echo has no feed-ahead)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            worker.serve()
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    b = task_order(tmp_path, "b", ["GATE one", "GATE two", "three"])
    a = task_order(tmp_path, "a", ["only line"])
    lifeline.commands.put(p.Run(b))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    wait_for(
        lambda: read_fed_mark(Path(b.log)) >= 1, what="b's two gated lines in the engine (its window full)"
    )
    lifeline.commands.put(p.Run(a))  # a's line is staged with b's third, and waits for room
    wait_for(
        lambda: any(isinstance(e, p.Resumed) and e.task_id == "a/m" for e in events.seen), what="a to start"
    )
    time.sleep(0.3)  # turns of the loop with a's line staged behind the full window
    assert not any(isinstance(e, p.TaskDone) and e.task_id == "a/m" for e in events.seen), (
        "a ended while its line still waited in the window"
    )
    gate.write_text("")
    wait_for(
        lambda: sum(isinstance(e, p.TaskDone) for e in events.seen) == 2 or errors, what="both tasks to end"
    )
    lifeline.commands.put(p.Stop())
    thread.join(30)
    assert not errors, errors
    assert [e.outcome for e in events.seen if isinstance(e, p.TaskDone)] == ["completed", "completed"]
    assert read_marker(Path(a.log)).count == 1 and read_marker(Path(b.log)).count == 3

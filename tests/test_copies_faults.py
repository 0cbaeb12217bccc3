"""A copy's death, told once and exactly: what a dead copy had answered is never run again, even out
of order and through a hunt's halving; one death counts once per task; a stop for a task the copies
do not hold stops nothing. (Found by review of the merge of copies and halving.)"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from dropbox_runner import protocol as p
from dropbox_runner.engine.shardsink import ShardSink
from dropbox_runner.slot.copies.pool import Copies
from dropbox_runner.slot.copies.shards import Shard, ShardedTask


def sharded(done_lines: set[int], total: int = 100) -> ShardedTask:
    """A task's side of the copies with a log in which `done_lines` have a result."""
    task = object.__new__(ShardedTask)
    done = bytearray(total)
    for i in done_lines:
        done[i] = 1
    task.log, task.queue = SimpleNamespace(done=done), deque()
    task.deaths, task.narrowings, task.poison, task.leaving = 0, 0, [], None
    task.order, task.key = SimpleNamespace(model="m", job_id="j", input="/dev/null"), "j/m"
    task.answered = len(done_lines)
    return task


def leased_again(task: ShardedTask) -> set[int]:
    """Every line a copy would run for the shards queued now (what its sink leaves not done)."""
    runs = set()
    for shard in task.queue:
        sink = ShardSink(len(task.log.done), shard.start, shard.end, send=None, done=task._done_in(shard))
        runs |= {i for i in range(shard.start, shard.end) if not sink.done[i]}
    return runs


def test_a_halved_shard_never_runs_a_line_the_dead_copy_answered_out_of_order() -> None:
    task = sharded({1, 6})  # the copy answered lines 1 and 6 of 0-9, out of order, then died twice
    task.give_back(Shard(0, 10, crashes=1))
    assert [(s.start, s.end) for s in task.queue] == [(0, 5), (5, 8), (8, 9), (9, 10)]
    assert leased_again(task) == {0, 2, 3, 4, 5, 7, 8, 9}
    assert all(s.crashes == 1 for s in task.queue) and task.narrowings == 1


def test_a_shard_given_back_after_one_death_skips_what_was_answered() -> None:
    task = sharded({3, 4, 8})
    task.give_back(Shard(2, 10))
    assert leased_again(task) == {2, 5, 6, 7, 9}


def test_one_missing_line_that_killed_two_copies_is_the_poison() -> None:
    task = sharded({0})  # Shard(0, 2) with line 0 answered: line 1 alone is the suspect
    poisoned = []
    task._poison = poisoned.append
    task.give_back(Shard(0, 2, crashes=1))
    assert poisoned == [1] and not task.queue


def test_one_copy_death_counts_once_for_a_task_however_many_shards_it_held() -> None:
    task = sharded(set())
    task.copy_died([Shard(0, 10), Shard(10, 20)])
    assert task.deaths == 1
    assert sorted((s.start, s.end) for s in task.queue) == [(0, 10), (10, 20)]


def test_a_stop_for_a_task_the_copies_do_not_hold_stops_nothing() -> None:
    copies = object.__new__(Copies)
    sent = []
    copies.tasks, copies.stopping = {"j/held": SimpleNamespace(leaving=None)}, False
    copies.copies = [SimpleNamespace(proc=SimpleNamespace(send=sent.append))]
    copies.send(p.Stop("j/gone"))
    assert copies.stopping is False and copies.tasks["j/held"].leaving is None and sent == []
    copies.send(p.Stop())  # a stop of the whole model still stops every task and copy
    assert copies.stopping is True and copies.tasks["j/held"].leaving == "interrupted" and len(sent) == 1

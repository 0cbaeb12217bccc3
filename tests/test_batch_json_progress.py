"""batch.json shows a running job's progress at most every 2 s, and the last of a burst too: it
showed the first commit's count for as long as the job then committed nothing (a request that
hangs, here a gated line), once a task's first result was committed at once (found by
test_copies_shared's preemption test: "8 of 600" while 599 were committed)."""

from __future__ import annotations

from pathlib import Path

from helpers import completed, finished, gated_job, open_gate, wait_for, write_jsonl


def test_batch_json_catches_up_with_the_last_progress_of_a_burst(root: Path, daemon) -> None:
    write_jsonl(root / "inbox/gated/held.jsonl", gated_job(40))  # 39 lines, then one held by the gate
    daemon(root)
    wait_for(lambda: completed(root, "held", "gated") == 39, timeout=60, what="batch.json to show 39 done")
    open_gate(root)
    wait_for(lambda: finished(root, "held"), timeout=60, what="the job to end")
    assert completed(root, "held", "gated") == 40

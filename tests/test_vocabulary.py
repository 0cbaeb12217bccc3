"""The file vocabulary in one place (issue 21 item 3): queue keys formatted and parsed by QueueKey
alone, and the names of the root's files spelled by Layout alone."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dropbox_runner
from dropbox_runner.config import MODEL_NAME_RE
from dropbox_runner.intake.manifest import PRIORITY_LIMIT
from dropbox_runner.jobs import operations
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.layout import Layout
from dropbox_runner.queue import catalog, scheduler
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord, new_job_id, queue_key
from dropbox_runner.queue.keys import MAX_RANK, BadQueueKey, QueueKey
from dropbox_runner.queue.lifecycle import BadTransition, Status

# Any model name models.yaml accepts, and any job id new_job_id makes (and others without - or /).
models = st.from_regex(MODEL_NAME_RE, fullmatch=True)
job_ids = st.one_of(
    st.from_regex(r"batch_[0-9a-f]{1,40}", fullmatch=True),
    st.text(st.characters(blacklist_characters="-/", blacklist_categories=("Cs",)), min_size=1),
)
priorities = st.integers(-(10**9), 10**9)
created = st.integers(0, 10**20 - 1)


@given(priorities, created, job_ids, models)
def test_a_key_round_trips(priority: int, created_ns: int, job_id: str, model: str) -> None:
    key = QueueKey.of(priority, created_ns, job_id, model)
    text = str(key)
    assert QueueKey.parse(text) == key
    assert str(QueueKey.parse(text)) == text
    assert text == queue_key(priority, created_ns, job_id, model)  # the journal writes this form
    assert scheduler.rank(text) == key.rank and scheduler.queued_at(text) == created_ns / 1e9
    assert 0 <= key.rank <= MAX_RANK


limits = st.integers(-PRIORITY_LIMIT, PRIORITY_LIMIT)


@given(limits, limits, st.integers(0, 10**20 - 2), models)
def test_lexical_order_is_queue_order(p1: int, p2: int, created_ns: int, model: str) -> None:
    """A higher priority sorts first; at equal priority, the earlier arrival."""
    job = new_job_id()
    a, b = str(QueueKey.of(p1, created_ns, job, model)), str(QueueKey.of(p2, created_ns + 1, job, model))
    assert (a < b) == (p1 >= p2)


@given(st.text())
def test_any_name_parses_exactly_or_is_refused(text: str) -> None:
    """A stray file in state/queue/ is no key: parse refuses it; a name it accepts formats back."""
    try:
        key = QueueKey.parse(text)
    except BadQueueKey:
        return
    assert str(key) == text


@pytest.mark.parametrize(
    "name",
    [
        "",
        "notes.txt",
        "0500000-00000000000000000001-batch_a",  # no model
        "500000-00000000000000000001-batch_a-echo",  # rank of 6 digits
        "0500000-1-batch_a-echo",
        "٠٥٠٠٠٠٠-00000000000000000001-batch_a-echo",  # digits, but not ASCII ones
        "9999999-00000000000000000001-batch_a-echo",  # rank past 2 * PRIORITY_SPAN
        "0500000-00000000000000000001--echo",  # empty job id
        "0500000-00000000000000000001-batch_a-",  # empty model
        "0500000-00000000000000000001-batch_a-a/b",
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(BadQueueKey):
        QueueKey.parse(name)


@pytest.mark.parametrize(
    "job_id, model", [("batch-1", "echo"), ("a/b", "echo"), ("", "echo"), ("batch_1", "")]
)
def test_a_key_that_would_not_parse_is_not_made(job_id: str, model: str) -> None:
    with pytest.raises(BadQueueKey):
        QueueKey.of(0, 1, job_id, model)


def test_a_model_with_dashes_keeps_them() -> None:
    key = QueueKey.parse(str(QueueKey.of(3, 12, "batch_ab", "tiny-llama-2.q4")))
    assert (key.job_id, key.model, key.rank) == ("batch_ab", "tiny-llama-2.q4", 500_000 - 3)


def _journal(tmp_path: Path) -> Journal:
    layout = Layout(tmp_path)
    layout.make(["echo"])
    return Journal(layout)


def _spec(name: str) -> JobSpec:
    return JobSpec(
        id=new_job_id(),
        name=name,
        outbox=name,
        source=f"{name}.jsonl",
        models=["echo"],
        created_at=time.time(),
    )


def test_a_stray_file_in_the_queue_is_not_an_entry(tmp_path: Path) -> None:
    """Before QueueKey, a JSON file of another name was an entry, and the scheduler failed on its name."""
    journal = _journal(tmp_path)
    layout, spec = journal.layout, _spec("a")
    (task,) = journal.create(spec)
    (layout.queue / "notes").write_text('{"job_id": "x", "model": "echo"}')
    assert journal.queued() == [(task.queue_key, spec.id, "echo")]


def _package_sources() -> list[tuple[Path, str]]:
    package = Path(dropbox_runner.__file__).parent
    return [
        (p, p.read_text(encoding="utf-8")) for p in sorted(package.rglob("*.py")) if p.name != "layout.py"
    ]


def test_only_queue_keys_parse_queue_keys() -> None:
    """Nobody splits a key by hand: no `key.split("-"` anywhere but in QueueKey."""
    by_hand = re.compile(r"""key\w*(\[\d\])?\.(r?split|partition)\(["']-""")
    found = [f"{p.name}: {m.group(0)}" for p, text in _package_sources() for m in by_hand.finditer(text)]
    assert found == []


def test_dequeues_go_through_the_journal(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    layout, specs = journal.layout, [_spec("a"), _spec("b")]
    (a,), (b,) = (journal.create(s) for s in specs)
    assert not journal.dequeue_if_stale(a.queue_key, a.job_id, a.model)  # its record is there: kept
    journal.forget(a.job_id)
    assert journal.dequeue_if_stale(a.queue_key, a.job_id, a.model)
    assert [k for k, _, _ in journal.queued()] == [b.queue_key]
    journal.dequeue_job(b.job_id)
    assert journal.queued() == [] and not any(layout.queue.iterdir())


def test_no_module_but_the_journal_removes_a_queue_entry() -> None:
    removes = [
        f"{p.name}: {line.strip()}"
        for p, text in _package_sources()
        if p.name != "journal.py"
        for line in text.splitlines()
        if "queue" in line and ("unlink(" in line or "os.remove(" in line)
    ]
    assert removes == []


def test_an_illegal_transition_is_refused() -> None:
    task = TaskRecord(job_id="batch_1", model="echo", queue_key=str(QueueKey.of(0, 1, "batch_1", "echo")))
    with pytest.raises(BadTransition):
        task.status = Status.COMPLETED  # queued -> completed skips finalizing: even a plain assignment
    with pytest.raises(BadTransition):
        task.move(Status.FAILED)
    assert task.status == Status.QUEUED
    task.move(Status.IN_PROGRESS)
    task.status = Status.FINALIZING  # a legal one, assigned
    task.move(Status.FAILED)
    assert task.status == Status.FAILED
    assert TaskRecord.model_validate(task.model_dump(mode="json")).status == Status.FAILED  # read back as is


@pytest.mark.parametrize("running", [False, True])
def test_a_task_whose_publishing_fails_ends_failed_through_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: bool
) -> None:
    """The job boundary's last resort (publishing itself fails) used to set `task.status` directly."""
    journal = _journal(tmp_path)
    layout, spec = journal.layout, _spec("p")
    (task,) = journal.create(spec)
    jobs = Jobs(journal, hooks=[])
    if running:
        jobs.started(spec, task)

    def cannot_publish(*_: object) -> None:
        raise OSError("the outbox is gone")

    monkeypatch.setattr(operations, "publish_task", cannot_publish)
    jobs.failed_internal(spec.id, "boom")
    ended = journal.task(spec.id, "echo")
    assert (ended.status, ended.error, ended.error_code) == (Status.FAILED, "boom", "internal_error")
    assert catalog.quarantined(layout) == [] and journal.queued() == []
    assert layout.archived_job(spec.id).task("echo").exists()  # the job ended and moved to the archive


# The names of the root's files, as a module would spell them to build a path of its own.
FILE_NAMES = re.compile(
    r"""\.task\.json"""
    r"""|["'](spec\.json|input\.jsonl|retry\.json|reason\.txt|batch\.json|history\.json|compare\.jsonl)["']"""
    r"""|\.(marker|fed|log|errors\.jsonl)["']"""
    r"""|/\s*["'](state|inbox|outbox|jobs|archive|queue|claims|control|dedupe|quarantine|webhooks|api|models)["']"""
)


def test_no_module_but_layout_spells_the_roots_file_names() -> None:
    """`{model}.task.json` and its kin are built in layout.py alone (they were in five modules)."""
    found = [f"{p.name}: {m.group(0)}" for p, text in _package_sources() for m in FILE_NAMES.finditer(text)]
    assert found == []


def test_the_layout_spells_what_the_files_were_named() -> None:
    """The names on disk stay as they were: a root written before this change reads the same."""
    layout = Layout(Path("/r"))
    job = layout.job("batch_1")
    assert job.path == Path("/r/state/archive/batch_1")  # neither active nor archived: the archive
    assert [job.spec.name, job.input.name, job.retry.name, job.reason.name] == [
        "spec.json",
        "input.jsonl",
        "retry.json",
        "reason.txt",
    ]
    assert [job.task("m-1").name, job.log("m-1").name, job.marker("m-1").name] == [
        "m-1.task.json",
        "m-1.log",
        "m-1.marker",
    ]
    out = layout.outbox_folder("a.2")
    assert [out.batch, out.output("m"), out.errors("m"), out.compare] == [
        Path("/r/outbox/a.2") / n for n in ("batch.json", "m.jsonl", "m.errors.jsonl", "compare.jsonl")
    ]
    assert layout.queue_entry("k") == Path("/r/state/queue/k")
    assert layout.claim("batch_1") == Path("/r/state/claims/batch_1.json")
    assert layout.control_request("cancel", "batch_1") == Path("/r/state/control/cancel-batch_1.json")
    assert layout.dedupe_entry("d") == Path("/r/state/dedupe/d.json")
    assert layout.webhook_event("evt_1") == Path("/r/state/webhooks/evt_1.json")
    assert layout.api_upload("file-1") == Path("/r/state/api/files/file-1.jsonl")
    assert layout.api_batch("batch_a") == Path("/r/state/api/batches/batch_a.json")
    assert layout.history == Path("/r/state/history.json")
    assert layout.output_expiry_flag == Path("/r/state/output-expiry-used")

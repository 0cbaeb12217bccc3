"""The root folder, where everything lives under it, and the lock that makes one daemon per root
(taken by `acquire_root`, probed by `daemon_running`).

Every other module asks `Layout` for paths; nothing builds paths from a drop's name itself. The
files of one job's folder are a `JobFolder`'s, those of one outbox folder an `OutboxFolder`'s.
Names a user writes into the inbox (drops, manifests, `.ready`) are read by `intake.scanner`.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from filelock import FileLock, Timeout

from dropbox_runner.errors import LockHeld

ROOT_ENV = "DROPBOX_RUNNER_ROOT"


def resolve_root(root: str | Path | None) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV) or os.getcwd()
    return Path(root).expanduser().absolute()


@dataclass(frozen=True)
class JobFolder:
    """The files of one job: `state/jobs/<id>/`, `state/archive/<id>/` or `state/quarantine/<id>/`."""

    path: Path

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def input(self) -> Path:
        return self.path / "input.jsonl"

    @property
    def retry(self) -> Path:
        """The intent of a retry, so one interrupted is finished at the next start."""
        return self.path / "retry.json"

    @property
    def reason(self) -> Path:
        """Why a quarantined job was set aside."""
        return self.path / "reason.txt"

    def manifest(self, suffix: str) -> Path:
        """The drop's manifest as taken (`manifest.json`, `manifest.yaml`, ...)."""
        return self.path / f"manifest{suffix}"

    def taken_manifest(self) -> Path | None:
        return next(self.path.glob("manifest.*"), None)

    def task(self, model: str) -> Path:
        return self.path / f"{model}.task.json"

    def log(self, model: str) -> Path:
        return self.path / f"{model}.log"

    def marker(self, model: str) -> Path:
        return marker_of(self.log(model))


def marker_of(log: Path) -> Path:
    """A result log's commit marker (count, tokens, times), beside it."""
    return log.with_suffix(".marker")


def fed_mark_of(log: Path) -> Path:
    """The highest line index a model process handed its engine, beside the result log."""
    return log.with_suffix(".fed")


def drop_file(folder: Path, stem: str) -> Path:
    """A drop as `submit` writes it into an inbox folder (the scanner reads what users write)."""
    return folder / f"{stem}.jsonl"


def drop_manifest(folder: Path, stem: str) -> Path:
    return folder / f"{stem}.manifest.json"


@dataclass(frozen=True)
class OutboxFolder:
    """What the runner publishes for one job: `outbox/<name>/`."""

    path: Path

    @property
    def batch(self) -> Path:
        return self.path / "batch.json"

    @property
    def compare(self) -> Path:
        return self.path / "compare.jsonl"

    def output(self, model: str) -> Path:
        return self.path / self.output_name(model)

    def errors(self, model: str) -> Path:
        return self.path / self.errors_name(model)

    @staticmethod
    def output_name(model: str) -> str:
        """Every line's result, in input order (the name batch.json and status show)."""
        return f"{model}.jsonl"

    @staticmethod
    def errors_name(model: str) -> str:
        """The failed lines alone, present only when some line failed."""
        return f"{model}.errors.jsonl"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def models_yaml(self) -> Path:
        return self.root / "models.yaml"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def jobs(self) -> Path:
        """Jobs not yet finished, one folder each: spec, input, result logs, task records."""
        return self.state / "jobs"

    @property
    def archive(self) -> Path:
        """Finished jobs, moved here whole so the active listing stays short."""
        return self.state / "archive"

    @property
    def queue(self) -> Path:
        """One entry per (job, model) task; lexical order of names is queue order."""
        return self.state / "queue"

    @property
    def claims(self) -> Path:
        """Intent records of drops being taken, so a crash mid-claim is finished at restart."""
        return self.state / "claims"

    @property
    def control(self) -> Path:
        """Requests from the CLI to the daemon (cancel, retry)."""
        return self.state / "control"

    @property
    def dedupe(self) -> Path:
        """Completed jobs by the digest of everything that decides their results."""
        return self.state / "dedupe"

    @property
    def quarantine(self) -> Path:
        """Drops whose taking failed twice, each with a reason.txt; never replayed."""
        return self.state / "quarantine"

    @property
    def webhooks(self) -> Path:
        """Webhook events journaled and not yet delivered to every URL, one file each."""
        return self.state / "webhooks"

    @property
    def api_files(self) -> Path:
        return self.state / "api" / "files"

    @property
    def api_batches(self) -> Path:
        return self.state / "api" / "batches"

    def api_upload(self, file_id: str) -> Path:
        """An uploaded file's lines; `api_upload_meta` is its OpenAI file object."""
        return self.api_files / f"{file_id}.jsonl"

    def api_upload_meta(self, file_id: str) -> Path:
        return self.api_files / f"{file_id}.json"

    def api_batch(self, batch_id: str) -> Path:
        """An API batch's record (its job, model and the final batch.json once retention ran)."""
        return self.api_batches / f"{batch_id}.json"

    @property
    def embedded_models(self) -> Path:
        """Where the models this package builds on first use live (models/tiny-llama, ...)."""
        return self.root / "models"

    @property
    def history(self) -> Path:
        return self.state / "history.json"

    @property
    def output_expiry_flag(self) -> Path:
        """Present once a job asked for output_expires_after: retention then looks at every start."""
        return self.state / "output-expiry-used"

    @property
    def lock(self) -> Path:
        return self.state / "daemon.lock"

    @property
    def daemon_info(self) -> Path:
        return self.state / "daemon.json"

    @property
    def snapshot(self) -> Path:
        return self.state / "status.json"

    @property
    def log(self) -> Path:
        return self.state / "daemon.log"

    @property
    def engine_log(self) -> Path:
        return self.state / "engine.log"

    def make(self, model_names: list[str] = ()) -> None:
        for d in (
            self.inbox,
            self.outbox,
            self.jobs,
            self.archive,
            self.queue,
            self.claims,
            self.control,
            self.dedupe,
            self.quarantine,
        ):
            d.mkdir(parents=True, exist_ok=True)
        for name in model_names:
            self.model_inbox(name).mkdir(exist_ok=True)

    def model_inbox(self, model: str) -> Path:
        return self.inbox / model

    def outbox_folder(self, name: str) -> OutboxFolder:
        return OutboxFolder(self.outbox / name)

    def queue_entry(self, key: str) -> Path:
        return self.queue / key

    def claim(self, job_id: str) -> Path:
        return self.claims / f"{job_id}.json"

    def control_request(self, op: str, job_id: str) -> Path:
        return self.control / f"{op}-{job_id}.json"

    def dedupe_entry(self, digest: str) -> Path:
        return self.dedupe / f"{digest}.json"

    def webhook_event(self, event_id: str) -> Path:
        return self.webhooks / f"{event_id}.json"

    def job(self, job_id: str) -> JobFolder:
        """A job's folder, active or archived (see `job_dir`)."""
        return JobFolder(self.job_dir(job_id))

    def active_job(self, job_id: str) -> JobFolder:
        return JobFolder(self.jobs / job_id)

    def archived_job(self, job_id: str) -> JobFolder:
        return JobFolder(self.archive / job_id)

    def quarantined_job(self, job_id: str) -> JobFolder:
        return JobFolder(self.quarantine / job_id)

    def job_dir(self, job_id: str) -> Path:
        active = self.jobs / job_id
        try:
            return active if active.exists() else self.archive / job_id
        except OSError:  # a name the filesystem cannot hold (ENAMETOOLONG) is no job of either folder
            return self.archive / job_id


LOCK_ATTEMPTS = 5  # `daemon_running` probes the lock for an instant: a starting daemon tries a few times


def acquire_root(layout: Layout) -> FileLock:
    """The kernel-released lock of the root; raises LockHeld naming the daemon that holds it."""
    layout.state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(layout.lock), timeout=0)
    for attempt in range(LOCK_ATTEMPTS):
        try:
            lock.acquire()
            return lock
        except Timeout:
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(0.1)
    try:
        info = orjson.loads(layout.daemon_info.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        info = {}
    raise LockHeld(
        f"another daemon (pid {info.get('pid', '?')} on {info.get('host', '?')}) is running on "
        f"{layout.root}; stop it first."
    )


def daemon_running(layout: Layout) -> bool:
    """Whether a daemon holds the root's lock (the one `acquire_root` takes). A shared lock is asked
    for: it works on a read-only descriptor everywhere (NFS emulates flock with fcntl locks, and
    refuses an exclusive one on a read-only descriptor with EBADF), and it fails while the daemon
    holds its exclusive lock."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)

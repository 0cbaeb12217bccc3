"""The root folder and where everything lives under it (CONTRACT.md section 1).

Every other module asks `Layout` for paths; nothing builds paths from a drop's name itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "DROPBOX_RUNNER_ROOT"


def resolve_root(root: str | Path | None) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV) or os.getcwd()
    return Path(root).expanduser().absolute()


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
        return self.state / "dedupe"

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
        ):
            d.mkdir(parents=True, exist_ok=True)
        for name in model_names:
            (self.inbox / name).mkdir(exist_ok=True)

    def find_job(self, ref: str) -> str | None:
        """The id of a job given its id, its outbox folder name or its drop name (the newest of that name)."""
        import orjson

        if ref.startswith("batch_") and ((self.jobs / ref).exists() or (self.archive / ref).exists()):
            return ref
        best: tuple[int, float, str] | None = None
        for folder in (self.jobs, self.archive):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for job_id in names:
                try:
                    spec = orjson.loads((folder / job_id / "spec.json").read_bytes())
                except (FileNotFoundError, NotADirectoryError, orjson.JSONDecodeError):
                    continue
                if ref in (spec["outbox"], spec["name"]):
                    rank = (1 if spec["outbox"] == ref else 0, spec["created_at"], job_id)
                    best = max(best, rank) if best else rank
        return best[2] if best else None

    def job_dir(self, job_id: str) -> Path:
        active = self.jobs / job_id
        return active if active.exists() else self.archive / job_id

"""The nemesis's judge: which jobs are final, where each was published, and the verdict at the end
(nothing lost or duplicated, every outbox equal to an undisturbed run, events kept, no straggler).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from nemesis_kit import MARKER, daemon_cmd, describe, marked_processes, models_yaml

from dropbox_runner.results.log import read_fed_mark

FINAL = ("completed", "failed", "cancelled", "expired")
TAG = re.compile(r"^(j\d{4})-")
PEAK_MB_LIMIT = 150
DRAIN_SECONDS = 600
STUCK_SECONDS = 120  # the drain gives up when no job became final for this long
WEBHOOK_WAIT_SECONDS = 60


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def normalized(path: Path) -> list[dict]:
    """Output lines without the parts that differ between runs (ids and times)."""
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    for x in lines:
        x.pop("id", None)
        if x.get("response"):
            x["response"].pop("request_id", None)
            body = x["response"].get("body") or {}
            body.pop("id", None)
            body.pop("created", None)
    return lines


class Verifier:
    def __init__(self, nemesis: Any) -> None:
        self.n = nemesis
        self.root: Path = nemesis.root
        self.folders: dict[str, list[str]] = collections.defaultdict(list)  # tag -> final outbox folders
        self.seen: set[str] = set()
        self.unknown: list[str] = []
        self.scanned_at = 0.0
        self.webhook_summary = "not checked"

    # -- during the run --------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return read_json(self.root / "state/status.json") or {}

    def committed(self, task: tuple) -> int:
        marker = read_json(self.root / "state/jobs" / task[0] / f"{task[1]}.marker") or {}
        return marker.get("count", 0)

    def fed(self, task: tuple) -> int:
        return read_fed_mark(self.root / "state/jobs" / task[0] / f"{task[1]}.log")

    def log_tail(self) -> str:
        try:
            lines = (self.n.work / "daemon.out").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return " | ".join(lines[-2:])[-600:]

    def scan(self) -> None:
        if time.monotonic() - self.scanned_at < 0.5:
            return
        self.scanned_at = time.monotonic()
        rejects = set(self.n.rejects)
        for entry in os.scandir(self.root / "outbox"):
            if entry.name in self.seen or entry.name.startswith("."):
                continue
            batch = read_json(Path(entry.path) / "batch.json")
            if not batch or batch.get("status") not in FINAL:
                continue
            self.seen.add(entry.name)
            tag = self.tag_of(Path(entry.path)) or self.tag_of_name(batch.get("input_file") or "")
            if tag:
                self.folders[tag].append(entry.name)
            elif entry.name not in rejects:
                self.unknown.append(entry.name)

    @staticmethod
    def tag_of(folder: Path) -> str | None:
        for out in folder.glob("*.jsonl"):
            with open(out, "rb") as f:
                for line in f:
                    m = TAG.match(json.loads(line).get("custom_id") or "")
                    if m:
                        return m.group(1)
        return None

    @staticmethod
    def tag_of_name(name: str) -> str | None:
        """A job that published no output file (it failed) is still known by its drop's name."""
        m = TAG.match(name)
        return m.group(1) if m else None

    def is_final(self, job: Any) -> bool:
        self.scan()
        return job.tag in self.folders

    def rejects_final(self) -> bool:
        return all(self.batch(name).get("status") in FINAL for name in self.n.rejects)

    def batch(self, name: str) -> dict:
        return read_json(self.root / "outbox" / name / "batch.json") or {}

    def drain(self) -> None:
        """Let the daemon finish every job, undisturbed, bounded; then give the webhooks a minute."""
        deadline = time.monotonic() + DRAIN_SECONDS
        finals, moved = -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - moved < STUCK_SECONDS:
            done = sum(self.is_final(j) for j in self.n.jobs)
            if done == len(self.n.jobs) and self.rejects_final():
                break
            if done != finals:
                finals, moved = done, time.monotonic()
            self.n.watch()
            time.sleep(0.5)
        deadline = time.monotonic() + WEBHOOK_WAIT_SECONDS
        while time.monotonic() < deadline and self.undelivered():
            self.n.watch()
            time.sleep(0.5)

    def no_stragglers(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [p for i in range(1, self.n.incarnation + 1) for p in marked_processes(self.n.marker(i))]
            if not left:
                return
            time.sleep(0.2)
        self.n.failures.append(f"processes {describe(left)} outlived the final daemon (stopped with SIGTERM)")

    # -- the verdict ---------------------------------------------------------------------------------
    def api_jobs(self) -> list:
        return [j for j in self.n.jobs if j.kind == "api"]

    def total_lines(self) -> int:
        return sum(len(j.lines) * len(j.models) for j in self.n.jobs)

    def final_folders(self) -> list[str]:
        return [f for j in self.n.jobs for f in self.folders.get(j.tag, [])] + list(self.n.rejects)

    def undelivered(self) -> list[str]:
        delivered = {e["data"]["id"] for e in self.n.receiver.events.values()}
        return [f for f in self.final_folders() if self.batch(f).get("id") not in delivered]

    def verify(self) -> None:
        fail = self.n.failures.append
        self.scan()
        self.scanned_at = 0
        for job in self.n.jobs:
            where = self.folders.get(job.tag, [])
            if not where:
                fail(
                    f"lost: {job.tag} ({job.kind}, {','.join(job.models)}, name {job.name!r}) never finished"
                )
            elif len(where) == 1 and self.batch(where[0]).get("status") != "completed":
                errors = (self.batch(where[0]).get("errors") or {}).get("data") or [{}]
                fail(f"{job.tag} ended {self.batch(where[0]).get('status')}: {errors[0].get('message')}")
            elif len(where) > 1:
                fail(f"duplicated: {job.tag} was published in {where}")
        for name in self.n.rejects:
            if self.batch(name).get("status") != "failed":
                fail(f"hostile drop {name} was not rejected: {self.batch(name).get('status')}")
        for name in self.unknown:
            fail(f"an outbox folder no job owns: {name!r}")
        for link in self.n.symlinks:
            if not link.is_symlink() or (self.root / "outbox" / link.stem).exists():
                fail(f"the symlink {link.name} was taken (it must be ignored)")
        left = [p for p in (self.root / "inbox").rglob("*") if p.is_file() and not p.is_symlink()]
        if left:
            fail(f"drops left in the inbox: {[p.name[:60] for p in left[:5]]}")
        quarantined = (
            list((self.root / "state/quarantine").glob("*"))
            if (self.root / "state/quarantine").exists()
            else []
        )
        if quarantined:
            fail(f"quarantined drops: {[q.name for q in quarantined]}")
        self.compare_with_reference()
        self.check_api()
        self.check_webhooks()
        if self.n.peak_mb >= PEAK_MB_LIMIT:
            fail(f"the daemon's peak memory was {self.n.peak_mb:.0f} MB (limit {PEAK_MB_LIMIT})")

    def compare_with_reference(self) -> None:
        ref = self.n.work / "ref"
        (ref / "outbox").mkdir(parents=True)
        (ref / "state").mkdir()
        (ref / "models.yaml").write_text(models_yaml(None, reference=True))
        jobs = [j for j in self.n.jobs if len(self.folders.get(j.tag, [])) == 1]
        for job in jobs:
            for model in job.models:
                path = ref / "inbox" / model / f"{job.tag}-{model}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(job.data())
        env = {**os.environ, MARKER: self.n.marker("reference")}
        proc = subprocess.run(
            daemon_cmd(ref, "run", "--once"), capture_output=True, text=True, timeout=1800, env=env
        )
        if proc.returncode != 0:
            self.n.failures.append(f"the reference run failed: {proc.stderr[-500:]}")
            return
        for job in jobs:
            got = self.root / "outbox" / self.folders[job.tag][0]
            for model in job.models:
                want = ref / "outbox" / f"{job.tag}-{model}" / f"{model}.jsonl"
                if not (got / f"{model}.jsonl").exists():
                    self.n.failures.append(f"{job.tag}: no {model}.jsonl in {got.name}")
                elif normalized(got / f"{model}.jsonl") != normalized(want):
                    self.n.failures.append(f"{job.tag}: {got.name}/{model}.jsonl differs from the reference")
                counts = self.batch(got.name).get("models", {}).get(model, {}).get("request_counts")
                ref_counts = read_json(want.parent / "batch.json")["models"][model]["request_counts"]
                if counts != ref_counts:
                    self.n.failures.append(f"{job.tag}/{model}: counts {counts}, reference {ref_counts}")

    def check_api(self) -> None:
        for job in self.api_jobs():
            for batch_id, model in zip(job.batch_ids, job.models, strict=False):
                status, body = self.n.api.call("GET", f"/v1/batches/{batch_id}")
                b = json.loads(body) if status == 200 else {}
                if b.get("status") != "completed" or not b.get("output_file_id"):
                    self.n.failures.append(f"API {batch_id} ({job.tag}): {status} {b.get('status')}")
                    continue
                status, content = self.n.api.call("GET", f"/v1/files/{b['output_file_id']}/content")
                folder = self.folders.get(job.tag, ["?"])[0]
                if (
                    status != 200
                    or content != (self.root / "outbox" / folder / f"{model}.jsonl").read_bytes()
                ):
                    self.n.failures.append(f"API output of {batch_id} ({job.tag}) differs from the outbox")

    def check_webhooks(self) -> None:
        journaled = set()
        for path in (self.root / "state/webhooks").glob("evt_*.json"):
            event = (read_json(path) or {}).get("event") or {}
            journaled.add((event.get("data") or {}).get("id"))
        missing = self.undelivered()
        lost = [f for f in missing if self.batch(f).get("id") not in journaled]
        for name in lost:
            self.n.failures.append(f"webhook event lost: {name} ({self.batch(name).get('status')})")
        r = self.n.receiver
        self.webhook_summary = (
            f"{len(self.final_folders()) - len(missing)} of {len(self.final_folders())} events delivered, "
            f"{len(missing) - len(lost)} still journaled, {len(lost)} lost, {r.bad_signatures} bad signatures"
        )
        if r.bad_signatures:
            self.n.failures.append(f"{r.bad_signatures} webhook posts with a bad signature")

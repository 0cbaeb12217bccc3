"""`GET /metrics`: the root's state in the Prometheus text format, read from the same files as
`status --json` (so the counts agree with it) plus the daemon's history of model loads.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from dropbox_runner.layout import Layout
from dropbox_runner.status import view as status
from dropbox_runner.status.history import read_history

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RootCollector:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def collect(self) -> Any:
        doc = status.collect(self.layout, show_all=True, with_history=False)
        history = read_history(self.layout)

        jobs = GaugeMetricFamily("dropbox_runner_jobs", "Jobs by status.", labels=["status"])
        for state, n in sorted(Counter(j["status"] for j in doc["jobs"]).items()):
            jobs.add_metric([state], n)
        yield jobs

        yield GaugeMetricFamily(
            "dropbox_runner_queue_tasks", "Tasks in the queue.", value=doc["queue_length"]
        )
        yield GaugeMetricFamily(
            "dropbox_runner_daemon_up", "1 if a daemon holds the root.", value=int(doc["daemon"]["running"])
        )

        requests = CounterMetricFamily(
            "dropbox_runner_requests", "Requests answered, by model and outcome.", labels=["model", "outcome"]
        )
        tokens = CounterMetricFamily(
            "dropbox_runner_tokens", "Tokens, by model and kind.", labels=["model", "kind"]
        )
        sums: dict[str, Counter] = {}
        for job in doc["jobs"]:
            for m in job["models"]:
                c = sums.setdefault(m["model"], Counter())
                c["succeeded"] += m["succeeded"]
                c["failed"] += m["failed"]
                c["prompt"] += m["usage"]["prompt_tokens"]
                c["completion"] += m["usage"]["completion_tokens"]
        for model, c in sorted(sums.items()):
            for outcome in ("succeeded", "failed"):
                requests.add_metric([model, outcome], c[outcome])
            for kind in ("prompt", "completion"):
                tokens.add_metric([model, kind], c[kind])
        yield requests
        yield tokens
        yield from _by_group(doc)

        loads = CounterMetricFamily("dropbox_runner_model_loads", "Model loads, by model.", labels=["model"])
        seconds = SummaryMetricFamily(
            "dropbox_runner_model_load_seconds", "Time to load a model, by model.", labels=["model"]
        )
        for model, t in sorted((history.get("totals") or {}).items()):
            loads.add_metric([model], t.get("loads", 0))
            seconds.add_metric([model], count_value=t.get("loads", 0), sum_value=t.get("load_seconds", 0.0))
        yield loads
        yield seconds


MAX_GROUPS = 50  # the groups with the most completion tokens are named; the rest are `other`


def _by_group(doc: dict[str, Any]) -> Any:
    """Requests, tokens and preemptions by model and fair-share group (CONTRACT section 12)."""
    sums: dict[tuple[str, str], Counter] = {}
    for job in doc["jobs"]:
        for m in job["models"]:
            c = sums.setdefault((m["model"], m.get("group") or "none"), Counter())
            c["succeeded"] += m["succeeded"]
            c["failed"] += m["failed"]
            c["prompt"] += m["usage"]["prompt_tokens"]
            c["completion"] += m["usage"]["completion_tokens"]
            c["preemptions"] += m.get("preemptions", 0)
    per_group = Counter()
    for (_, group), c in sums.items():
        per_group[group] += c["completion"]
    named = {g for g, _ in per_group.most_common(MAX_GROUPS)}
    folded: dict[tuple[str, str], Counter] = {}
    for (model, group), c in sums.items():
        folded.setdefault((model, group if group in named else "other"), Counter()).update(c)
    requests = CounterMetricFamily(
        "dropbox_runner_group_requests",
        "Requests answered, by model, group and outcome.",
        labels=["model", "group", "outcome"],
    )
    tokens = CounterMetricFamily(
        "dropbox_runner_group_tokens", "Tokens, by model, group and kind.", labels=["model", "group", "kind"]
    )
    preemptions = CounterMetricFamily(
        "dropbox_runner_preemptions",
        "Times tasks gave up their slot, by model and group.",
        labels=["model", "group"],
    )
    for (model, group), c in sorted(folded.items()):
        for outcome in ("succeeded", "failed"):
            requests.add_metric([model, group, outcome], c[outcome])
        for kind in ("prompt", "completion"):
            tokens.add_metric([model, group, kind], c[kind])
        preemptions.add_metric([model, group], c["preemptions"])
    yield requests
    yield tokens
    yield preemptions


def render(layout: Layout) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RootCollector(layout))
    return generate_latest(registry)

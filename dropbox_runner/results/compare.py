"""compare.jsonl: for a job of several models, each model's answer to each input line, side by side.

Reads the published per-model files in step, so memory stays at one line per model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import orjson

from dropbox_runner.fsutil import staged
from dropbox_runner.queue.journal import JobSpec, Journal


def answer_of(line: dict[str, Any]) -> dict[str, Any]:
    """The readable part of one output line: the text (or embedding norms, scores, ranking), or the error."""
    response = line.get("response")
    if response is None:
        return {"error": (line.get("error") or {}).get("message")}
    body = response.get("body") or {}
    if response.get("status_code") != 200:
        return {"error": (body.get("error") or {}).get("message")}
    if "results" in body:  # rerank: the documents, best first
        return {"ranking": [r.get("index") for r in body["results"]]}
    data = body.get("data") or []
    if data and "score" in data[0]:
        scores = [d.get("score") for d in data]
        return {"score": scores[0] if len(scores) == 1 else scores}
    if body.get("object") == "list":
        norms = [round(math.sqrt(sum(x * x for x in d["embedding"])), 6) for d in body.get("data", [])]
        return {"embedding_norm": norms[0] if len(norms) == 1 else norms}
    choices = body.get("choices") or []
    texts = [(c.get("message") or {}).get("content") if "message" in c else c.get("text") for c in choices]
    return {"text": texts[0] if len(texts) == 1 else texts}


def publish_compare(journal: Journal, spec: JobSpec) -> None:
    out_dir = journal.layout.outbox_folder(spec.outbox)
    paths = {m: out_dir.output(m) for m in spec.models}
    if not all(p.exists() for p in paths.values()):
        return
    with ExitStack() as stack, staged(out_dir.compare) as out:
        files = {m: stack.enter_context(open(p, "rb")) for m, p in paths.items()}
        for rows in zip(*files.values(), strict=False):
            parsed = [orjson.loads(r) for r in rows]
            out.write(
                orjson.dumps(
                    {
                        "custom_id": next((p.get("custom_id") for p in parsed if p.get("custom_id")), None),
                        "answers": {m: answer_of(p) for m, p in zip(files, parsed, strict=True)},
                    }
                )
                + b"\n"
            )

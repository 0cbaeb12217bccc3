"""The interface every engine offers the model process: submit requests, step, collect finished ones.

An engine never blocks on a full window: the worker keeps at most `capacity` requests in flight.
A request is named by its task's tag and its line index, so the lines of several tasks never collide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from dropbox_runner.lines.parse import Request
from dropbox_runner.lines.responses import response_body
from dropbox_runner.lines.scoring import SCORING_KINDS, score_pair


@dataclass(slots=True)
class Finished:
    index: int
    custom_id: str
    status_code: int  # 200, or 4xx/5xx with `error`
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"message", "param", "type", "code"}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    tag: str = ""  # the task the request belongs to (several tasks share one engine)


class RequestRejected(Exception):
    """The request cannot run on this model: a 400 naming the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


Ids = list[list[int]] | None  # a request's prompts as token ids, when the feed-ahead made them


class Engine(Protocol):
    model_name: str
    capacity: int
    preemptions: int | None  # requests the engine preempted (its KV cache full); None: not known

    def submit(
        self, req: Request, prompts: Ids = None, *, tag: str = "", priority: int = 0, model: str | None = None
    ) -> None:
        """`tag`: the task's, unique in the process; `model`: the engine's own model (None) or one of
        the LoRA adapters it was started with."""

    def refuses(self, model: str) -> str | None:
        """Why this engine cannot answer for `model` (an adapter it cannot load), or None."""

    def step(self) -> list[Finished]: ...

    @property
    def in_flight(self) -> int: ...

    def abort(self, index: int, tag: str = "") -> None: ...

    def abort_all(self) -> None: ...


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def generation_body(
    kind: str, rid: str, model: str, choices: list[dict[str, Any]], pt: int, ct: int, cached: int = 0
) -> dict[str, Any]:
    """The body answering a chat, completion or responses request (choices: index, text,
    finish_reason, logprobs); a responses request has one choice."""
    if kind == "response":
        c = choices[0]
        return response_body(rid, model, c["text"], c["finish_reason"], pt, ct, cached)
    chat = kind == "chat"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c["index"],
                **({"message": {"role": "assistant", "content": c["text"]}} if chat else {"text": c["text"]}),
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ],
        "usage": usage(pt, ct, cached),
    }


def embedding_body(model: str, vectors: list[list[float]], pt: int) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": pt, "total_tokens": pt},
    }


def score_inputs(req: Request) -> tuple[list[str], list[str]]:
    """The texts of a score or rerank line: queries (one, or one per document) and documents."""
    first, second = score_pair(req.kind, req.body)
    a, b = req.body[first], req.body[second]
    return ([a] if isinstance(a, str) else a), ([b] if isinstance(b, str) else b)


def score_pairs(queries: list[str], documents: list[str]) -> list[tuple[int, int]]:
    """(query, document) indices of each score, in the order of the answer: 1:1, 1:N or N:N."""
    return [(0 if len(queries) == 1 else i, i) for i in range(len(documents))]


def check_task(req: Request, task: str, model: str) -> None:
    """Score and rerank lines need an embedding model or a cross-encoder; a cross-encoder takes only those."""
    scoring = req.kind in SCORING_KINDS
    if scoring and task not in ("embed", "score"):
        raise RequestRejected(
            f"{req.kind} lines need a model whose task is embed or score; {model}'s task is {task}", "url"
        )
    if task == "score" and not scoring:
        raise RequestRejected(
            f"{model} is a cross-encoder (task score): it takes score and rerank lines", "url"
        )


def scoring_body(
    req: Request, rid: str, model: str, documents: list[str], scores: list[float], pt: int
) -> dict[str, Any]:
    """The body answering a score line (scores in pair order) or a rerank line (best first, cut at
    `top_n`): the fields vLLM's scoring server answers with, nulls included."""
    if req.kind == "score":
        return {
            "id": f"score-{rid}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {
                "prompt_tokens": pt,
                "total_tokens": pt,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }
    results = [
        {"index": i, "document": {"text": documents[i], "multi_modal": None}, "relevance_score": s}
        for i, s in enumerate(scores)
    ]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)  # stable: ties keep input order
    top_n = req.body.get("top_n") or 0
    return {
        "id": f"score-{rid}",  # vLLM's scoring server names both kinds so
        "model": model,
        "usage": {"prompt_tokens": pt, "total_tokens": pt},
        "results": results[: top_n or None],
    }


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    return body.get("max_completion_tokens") or body.get("max_tokens")

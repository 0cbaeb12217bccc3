"""The interface every engine offers the model process: submit requests, step, collect finished ones.

An engine never blocks on a full window: the worker keeps at most `capacity` requests in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from dropbox_runner.lines import Request
from dropbox_runner.openai_responses import response_body


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


class RequestRejected(Exception):
    """The request cannot run on this model: a 400 naming the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Engine(Protocol):
    model_name: str
    capacity: int

    def submit(self, req: Request, prompts: list[list[int]] | None = None, model: str | None = None) -> None:
        """`model`: the engine's own model (None) or one of the LoRA adapters it was started with."""

    def refuses(self, model: str) -> str | None:
        """Why this engine cannot answer for `model` (an adapter it cannot load), or None."""

    def step(self) -> list[Finished]: ...

    @property
    def in_flight(self) -> int: ...

    def abort(self, index: int) -> None: ...

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


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    return body.get("max_completion_tokens") or body.get("max_tokens")

"""`/v1/responses` lines: check a Responses body, run it as the chat request it amounts to, and
answer with a Response object (`openai.types.responses.Response`).

`input` is a string or a list of message items; `instructions` becomes a system message first.
"""

from __future__ import annotations

import time
from typing import Any

from dropbox_runner.lines.fields import check_number, quote

# What a Responses body may hold here: honoured, or informational.
HONOURED = frozenset({"input", "instructions", "max_output_tokens", "temperature", "top_p", "text"})
INFORMATIONAL = frozenset(
    {
        "model",
        "metadata",
        "user",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "safety_identifier",
        "stream",
    }
)
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
PART_TYPES = {"input_text", "output_text", "text"}


def to_chat(body: dict[str, Any]) -> tuple[str, str] | dict[str, Any]:
    """The chat body a Responses body amounts to, or (param, message) of its first problem."""
    for key, value in body.items():
        if key == "tools" and value in ([], None):  # no tools is what runs here anyway
            continue
        if key not in HONOURED | INFORMATIONAL:
            name = key[:200]
            return name, f"`{name}` is not supported for responses requests in a batch here"
    if body.get("stream"):
        return "stream", "`stream` cannot be used in a batch"
    messages = _messages(body.get("input"))
    if isinstance(messages, tuple):
        return messages
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            return "instructions", "`instructions` must be a string"
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"messages": messages}
    for key, target, lo, hi, integer in (
        ("max_output_tokens", "max_tokens", 1, 2**63 - 1, True),
        ("temperature", "temperature", 0, 2, False),
        ("top_p", "top_p", 0, 1, False),
    ):
        value = body.get(key)
        if value is not None:
            problem = check_number(key, value, lo, hi, integer)
            if problem:
                return key, problem
            chat[target] = value
    text = body.get("text")
    if text is not None:
        rf = _response_format(text)
        if isinstance(rf, tuple):
            return rf
        if rf is not None:
            chat["response_format"] = rf
    return chat


def _messages(value: Any) -> tuple[str, str] | list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return "input", "`input` must be a string or a non-empty list of message items"
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            return (
                f"input[{i}]",
                "each input item must be a message ({role, content}); other items are not supported",
            )
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            return f"input[{i}].role", f"`role` must be one of {', '.join(ROLES)}, got {quote(role)}"
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str)
            for p in content
        ):
            text = "".join(p["text"] for p in content)
        else:
            return f"input[{i}].content", "`content` must be a string or a list of text parts (input_text)"
        messages.append({"role": ROLES[role], "content": text})
    return messages


def _response_format(text: Any) -> tuple[str, str] | dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        return "text", "`text` must be an object with a `format`"
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {
            "type": "json_schema",
            "json_schema": {"name": str(fmt.get("name", "output")), "schema": fmt["schema"]},
        }
    return (
        "text.format",
        "`text.format` must be {type: text}, {type: json_object} or {type: json_schema, schema: {...}}",
    )


def response_body(rid: str, model: str, text: str, finish_reason: str, pt: int, ct: int, cached: int) -> dict:
    """A Response object for one generated message."""
    now = int(time.time())
    incomplete = finish_reason == "length"
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": now,
        "completed_at": now,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": [
            {
                "id": f"msg_{rid}",
                "type": "message",
                "role": "assistant",
                "status": "incomplete" if incomplete else "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": pt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": ct,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": pt + ct,
        },
    }

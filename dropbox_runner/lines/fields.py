"""What each endpoint's body may hold: the fields honoured, passed through or informational, and a
total check of each value (any JSON value gives None or a message naming the field).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

MAX_N = 128

# Fields that change generation and that we map to the engine.
HONOURED = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
        "top_logprobs",
        "response_format",
    }
)
# vLLM's own sampling extras, passed through as its OpenAI server takes them.
VLLM_EXTRAS = frozenset(
    {
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "stop_token_ids",
        "bad_words",
        "allowed_token_ids",
        "logit_bias",
        "truncate_prompt_tokens",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
    }
)
# Fields that do not change generation.
INFORMATIONAL = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "service_tier",
        "stream_options",
        "encoding_format",
        "parallel_tool_calls",
        "request_id",
        "priority",
    }
)
PAYLOAD = {"chat": "messages", "completion": "prompt", "embedding": "input"}
SAMPLING_FOR = {"chat", "completion", "response"}


QUOTE_CHARS = 200  # a message never quotes more of a user's value than this


def quote(value: Any) -> str:
    """A user's value for a message: JSON, cut to QUOTE_CHARS characters."""
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_number(key: str, v: Any, lo: float | None, hi: float | None, integer: bool) -> str | None:
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or (integer and not isinstance(v, int))
        or (isinstance(v, float) and not math.isfinite(v))
    ):
        return f"`{key}` must be {'an integer' if integer else 'a number'}, got {quote(v)}"
    if lo is not None and v < lo:
        return f"`{key}` must be at least {lo}, got {v}"
    if hi is not None and v > hi:
        return f"`{key}` must be at most {hi}, got {v}"
    return None


INT64 = 2**63 - 1
NUMBER_RULES: dict[str, tuple[float | None, float | None, bool]] = {
    "max_tokens": (1, INT64, True),
    "max_completion_tokens": (1, INT64, True),
    "temperature": (0, 2, False),
    "top_p": (0, 1, False),
    "top_k": (-1, INT64, True),
    "min_p": (0, 1, False),
    "n": (1, MAX_N, True),
    "seed": (-INT64, INT64, True),
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    "repetition_penalty": (0, 100, False),
    "top_logprobs": (0, 20, True),
    "min_tokens": (0, INT64, True),
    "truncate_prompt_tokens": (-1, INT64, True),
}
BOOL_FIELDS = frozenset(
    {
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "stream",
    }
)


def _check_string_list(key: str, v: Any, *, allow_str: bool) -> str | None:
    if allow_str and isinstance(v, str):
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        return f"`{key}` must be {'a string or ' if allow_str else ''}a list of strings"
    return None


def _check_token_ids(key: str, v: Any) -> str | None:
    if not isinstance(v, list) or not all(_is_int(t) and 0 <= t <= INT64 for t in v):
        return f"`{key}` must be a list of token ids (integers)"
    return None


def _check_logit_bias(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "`logit_bias` must be an object of token id to bias"
    for k, bias in v.items():
        if not k.isdigit() or len(k) > 18:
            return f"`logit_bias` keys must be token ids, got {quote(k)}"
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            return f"`logit_bias` values must be numbers from -100 to 100, got {quote(bias)}"
    return None


def _check_response_format(v: Any) -> str | None:
    rtype = v.get("type") if isinstance(v, dict) else None
    if rtype not in ("text", "json_object", "json_schema"):
        return "`response_format.type` must be text, json_object or json_schema"
    if rtype == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            return "`response_format.json_schema.schema` must be an object"
    return None


def _check_field(kind: str, key: str, v: Any) -> str | None:
    """The problem of one generation field's value, or None; total over any JSON value."""
    if v is None:
        return None
    rule = NUMBER_RULES.get(key)
    if rule is not None:
        return check_number(key, v, *rule)
    if key in BOOL_FIELDS:
        return None if isinstance(v, bool) else f"`{key}` must be true or false, got {quote(v)}"
    if key == "stop":
        return _check_string_list(key, v, allow_str=True)
    if key == "bad_words":
        return _check_string_list(key, v, allow_str=False)
    if key in ("stop_token_ids", "allowed_token_ids"):
        return _check_token_ids(key, v)
    if key == "logit_bias":
        return _check_logit_bias(v)
    if key == "chat_template_kwargs":
        return None if isinstance(v, dict) else "`chat_template_kwargs` must be an object"
    if key == "response_format":
        return _check_response_format(v)
    if key == "logprobs":
        if kind == "chat":
            return None if isinstance(v, bool) else f"`logprobs` must be true or false, got {quote(v)}"
        return check_number(key, v, 0, 20, True) if not isinstance(v, bool) else None
    return None


def _check_messages(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, list) or not value:
        return "messages", "`messages` must be a non-empty list"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}]", "each message must be an object with a `role` string"
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"messages[{i}].content", "`content` must be a string or a list of parts"
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                return (
                    f"messages[{i}].content[{j}]",
                    'each content part must be {"type": "text", "text": "..."}; other parts are not supported',
                )
    return None


def _check_strings(name: str, value: Any) -> tuple[str, str] | None:
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(p, str) for p in value)
    ):
        return None
    return name, f"`{name}` must be a string or a non-empty list of strings"


ALLOWED = {
    kind: INFORMATIONAL | {payload} | (HONOURED | VLLM_EXTRAS if kind in SAMPLING_FOR else frozenset())
    for kind, payload in PAYLOAD.items()
}


def check_body(kind: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first problem of a body, or None; total over any JSON value."""
    payload = PAYLOAD[kind]
    if payload not in body:
        return payload, f"body has no `{payload}`"
    problem = _check_messages(body[payload]) if kind == "chat" else _check_strings(payload, body[payload])
    if problem:
        return problem
    if kind == "embedding" and body.get("dimensions") is not None:
        return "dimensions", "`dimensions` is not supported: the model's full embedding is returned"
    if body.get("stream"):
        return "stream", "`stream` cannot be used in a batch"
    allowed = ALLOWED[kind]
    for key, value in body.items():
        if key not in allowed:
            name = key[:QUOTE_CHARS]
            return name, f"`{name}` is not supported for {kind} requests and would change the result"
        message = _check_field(kind, key, value)
        if message:
            return key, message
    return None


def check_defaults(defaults: Any) -> str | None:
    """The problem of a `defaults` mapping (manifest or models.yaml), or None."""
    if not isinstance(defaults, dict):
        return "`defaults` must be an object"
    for key, value in defaults.items():
        if key not in HONOURED | VLLM_EXTRAS:
            return f"`{key[:QUOTE_CHARS]}` is not a generation field that defaults can set"
        message = _check_field("chat", key, value)
        if message:
            return message
    return None

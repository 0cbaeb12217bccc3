"""What a score or rerank line's body may hold, as vLLM's ScoreRequest and RerankRequest take it:
a total check of any JSON value (None, or the field and a message), and where its inputs are.
"""

from __future__ import annotations

from typing import Any

from dropbox_runner.lines.fields import INFORMATIONAL, INT64, QUOTE_CHARS, check_number, quote

SCORING_KINDS = frozenset({"score", "rerank"})
# The pairs of inputs a score body may name, as vLLM's ScoreRequest takes them; a rerank body's.
SCORE_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))
RERANK_PAIR = ("query", "documents")
# vLLM's scoring field honoured: a cross-encoder's activation (cosine does not depend on it)
SCORING_FIELDS = frozenset({"use_activation"})


def score_pair(kind: str, body: dict[str, Any]) -> tuple[str, str]:
    """The two fields that hold the inputs of a checked score or rerank body."""
    if kind == "rerank":
        return RERANK_PAIR
    return next(pair for pair in SCORE_PAIRS if pair[0] in body and pair[1] in body)


def _check_pair(kind: str, body: dict[str, Any]) -> tuple[str, str] | None:
    if kind == "rerank":
        missing = next((k for k in RERANK_PAIR if k not in body), None)
        return None if missing is None else (missing, f"body has no `{missing}`")
    whole = [pair for pair in SCORE_PAIRS if pair[0] in body and pair[1] in body]
    if not whole:
        half = next((pair for pair in SCORE_PAIRS if pair[0] in body or pair[1] in body), SCORE_PAIRS[0])
        missing = half[0] if half[0] not in body else half[1]
        return missing, (
            f"body has no `{missing}` (a score body takes `text_1` and `text_2`, or `queries` and `documents`)"
        )
    extra = sorted({k for pair in SCORE_PAIRS for k in pair if k in body} - set(whole[0]))
    if extra:
        first, second = whole[0]
        return extra[0], f"`{extra[0]}` cannot be used with `{first}` and `{second}`: name one pair"
    return None


def _check_inputs(kind: str, pair: tuple[str, str], body: dict[str, Any]) -> tuple[str, str] | None:
    first, second = pair
    a, b = body[first], body[second]
    if kind == "rerank" and not isinstance(a, str):
        return first, "`query` must be a string (text only)"
    for name, value in ((first, a), (second, b)):
        if not isinstance(value, str) and not (
            isinstance(value, list) and value and all(isinstance(t, str) for t in value)
        ):
            return name, f"`{name}` must be a string or a non-empty list of strings (text only)"
    n1, n2 = (1 if isinstance(v, str) else len(v) for v in (a, b))
    if n1 > 1 and n1 != n2:
        return second, (
            f"`{first}` has {n1} texts and `{second}` {n2}: pairs are one to one, one to many, "
            "or many to as many"
        )
    return None


def check_scoring(kind: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """The first problem of a score or rerank body, or None; total over any JSON value."""
    problem = _check_pair(kind, body)
    if problem:
        return problem
    pair = score_pair(kind, body)
    problem = _check_inputs(kind, pair, body)
    if problem:
        return problem
    if body.get("stream"):
        return "stream", "`stream` cannot be used in a batch"
    allowed = INFORMATIONAL | SCORING_FIELDS | set(pair) | ({"top_n"} if kind == "rerank" else set())
    for key, value in body.items():
        if key not in allowed:
            name = key[:QUOTE_CHARS]
            return name, f"`{name}` is not supported for {kind} requests and would change the result"
        if value is None:
            continue
        message = None
        if key == "top_n":
            message = check_number(key, value, 0, INT64, True)
        elif key == "use_activation" and not isinstance(value, bool):
            message = f"`use_activation` must be true or false, got {quote(value)}"
        if message:
            return key, message
    return None

"""Input lines: the OpenAI Batch format, checked line by line while streaming."""

from __future__ import annotations

import io
import json

import pytest

from dropbox_runner.lines.parse import IdSet, LineError, RawLine, Request, iter_raw_lines, parse_line


def parse(obj: object, defaults: tuple = ()) -> Request | LineError:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(RawLine(0, 1, data), IdSet(), defaults)


def chat(**body: object) -> dict:
    return {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}], **body},
    }


def test_bom_crlf_and_blank_lines() -> None:
    data = (
        b"\xef\xbb\xbf"
        + json.dumps(chat()).encode()
        + b"\r\n\r\n   \n"
        + json.dumps(chat()).encode()
        + b"\r\n"
    )
    raws = list(iter_raw_lines(io.BytesIO(data)))
    assert [(r.index, r.line) for r in raws] == [(0, 1), (1, 4)]
    assert isinstance(parse(raws[0].data), Request)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 10_000}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"stream": True}, "stream"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"stop": 5}, "stop"),
    ],
)
def test_fields_that_cannot_be_honoured_fail_naming_the_field(body: dict, param: str) -> None:
    result = parse(chat(**body))
    assert isinstance(result, LineError)
    assert result.param == param


def test_informational_and_vllm_extra_fields_are_accepted() -> None:
    result = parse(
        chat(user="u1", metadata={"k": "v"}, store=False, ignore_eos=True, min_tokens=2, model="x")
    )
    assert isinstance(result, Request)


def test_defaults_fill_missing_fields_only() -> None:
    result = parse(
        chat(max_tokens=5), ({"max_tokens": 9, "temperature": 0.5}, {"temperature": 0, "top_k": 3})
    )
    assert isinstance(result, Request)
    assert result.body["max_tokens"] == 5
    assert result.body["temperature"] == 0.5
    assert result.body["top_k"] == 3


def test_embedding_lines_ignore_generation_defaults() -> None:
    line = {"custom_id": "e", "url": "/v1/embeddings", "body": {"input": "hi"}}
    assert isinstance(parse(line, ({"max_tokens": 3},)), Request)


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "JSON object"),
        ({"url": "/v1/completions", "body": {"prompt": "x"}}, "custom_id"),
        ({"custom_id": "a", "url": "/v1/images", "body": {}}, "unknown url"),
        ({"custom_id": "a", "url": "/v1/completions"}, "no `body`"),
        ({"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": []}}, "non-empty"),
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}, "POST"),
        (b'{"custom_id": "a", "body": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "not valid JSON"),
    ],
)
def test_bad_lines_get_a_clear_message(obj: object, needle: str) -> None:
    result = parse(obj)
    assert isinstance(result, LineError)
    assert needle in result.message


def test_duplicate_custom_id_fails_the_later_line() -> None:
    seen = IdSet()
    first = parse_line(RawLine(0, 1, json.dumps(chat()).encode()), seen)
    second = parse_line(RawLine(1, 2, json.dumps(chat()).encode()), seen)
    assert isinstance(first, Request)
    assert isinstance(second, LineError) and "duplicate" in second.message


def test_overlong_line_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import dropbox_runner.lines.parse as rq

    monkeypatch.setattr(rq, "MAX_LINE_BYTES", 1000)
    data = b"x" * 5000 + b"\n" + json.dumps(chat()).encode() + b"\n"
    raws = list(rq.iter_raw_lines(io.BytesIO(data)))
    assert raws[0].data is None and raws[1].line == 2
    assert isinstance(rq.parse_line(raws[1], IdSet()), Request)


# Hostile values that once raised instead of failing their line (issue 11), kept as plain tests.
@pytest.mark.parametrize(
    ("line", "param"),
    [
        ({"custom_id": "a", "url": ["/v1/chat/completions"], "body": {}}, "url"),
        ({"custom_id": "a", "url": {"x": 1}, "body": {}}, "url"),
        ({"custom_id": "a", "method": ["POST"], "url": "/v1/completions", "body": {"prompt": "x"}}, "method"),
        (chat(response_format={"type": "json_schema", "json_schema": "a string"}), "response_format"),
        (chat(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "response_format"),
        (chat(response_format={"type": ["json_object"]}), "response_format"),
        (chat(chat_template_kwargs=[1, 2]), "chat_template_kwargs"),
        (chat(logit_bias=[1, 2]), "logit_bias"),
        (chat(logit_bias={"abc": 1}), "logit_bias"),
        (chat(logit_bias={"5": "high"}), "logit_bias"),
        (chat(logprobs="yes"), "logprobs"),
        (chat(stop_token_ids=["a"]), "stop_token_ids"),
        (chat(ignore_eos="true"), "ignore_eos"),
        (chat(seed=2**63), "seed"),
        (
            {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": "many"}},
            "logprobs",
        ),
        (
            {
                "custom_id": "a",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            },
            "messages[0].content[0]",
        ),
        (
            {
                "custom_id": "a",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_hostile_values_fail_their_line_naming_the_field(line: dict, param: str) -> None:
    result = parse(line)
    assert isinstance(result, LineError), result
    assert result.param == param


def test_messages_quote_at_most_about_200_characters_of_a_value() -> None:
    huge = "x" * 1_000_000
    for obj in (
        {"custom_id": "a", "url": huge, "body": {}},
        chat(temperature=huge),
        chat(**{huge: 1}),
    ):
        result = parse(obj)
        assert isinstance(result, LineError)
        assert len(result.message) < 400 and (result.param is None or len(result.param) <= 200)
    seen = IdSet()
    first = parse_line(RawLine(0, 1, json.dumps({**chat(), "custom_id": huge}).encode()), seen)
    again = parse_line(RawLine(1, 2, json.dumps({**chat(), "custom_id": huge}).encode()), seen)
    assert isinstance(first, Request) and isinstance(again, LineError) and len(again.message) < 400

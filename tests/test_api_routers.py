"""The API as routers over one root: every error it returns is OpenAI's one envelope (the routes',
the edge's and those FastAPI or Starlette make themselves), and nothing below the api package
imports it. In-process (Starlette's TestClient): no server, no daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from dropbox_runner.api.server import create_app
from dropbox_runner.config import load_registry
from dropbox_runner.layout import Layout

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def app_client(root: Path, key: str | None = None, **kwargs) -> TestClient:
    return TestClient(
        create_app(Layout(root), load_registry(root), api_key=key), base_url="http://127.0.0.1", **kwargs
    )


def error_of(response) -> dict:
    """The envelope's inside, after checking it is exactly OpenAI's shape."""
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_no_such_route_is_a_404_in_the_envelope(root: Path) -> None:
    with app_client(root) as http:
        error = error_of(r := http.get("/v1/nothing-here"))
    assert r.status_code == 404 and error["code"] == "not_found" and "/v1/nothing-here" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_method_a_route_does_not_take_is_a_405_in_the_envelope_with_allow(root: Path) -> None:
    with app_client(root) as http:
        r = http.put("/v1/files")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    assert "PUT" in error_of(r)["message"] and "POST" in r.headers["allow"]


@pytest.mark.parametrize(
    ("path", "param"), [("/v1/batches?limit=abc", "limit"), ("/api/status?page=x", "page")]
)
def test_a_query_parameter_of_the_wrong_type_is_a_422_naming_it(root: Path, path: str, param: str) -> None:
    with app_client(root) as http:
        r = http.get(path)
    error = error_of(r)
    assert r.status_code == 422 and error["param"] == param and error["code"] == "invalid_value"
    assert f"query parameter {param!r}" in error["message"] and "integer" in error["message"]


def test_a_bug_is_a_500_in_the_envelope_and_still_reaches_the_log(root: Path) -> None:
    app = create_app(Layout(root), load_registry(root))

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as http:
        r = http.get("/v1/broken")
    error = error_of(r)
    assert r.status_code == 500 and error["type"] == "server_error" and error["code"] == "internal_error"
    assert "a bug" not in error["message"], "no internals in the answer"
    with TestClient(app, base_url="http://127.0.0.1") as http, pytest.raises(RuntimeError, match="a bug"):
        http.get("/v1/broken")  # re-raised after the answer: the server logs its traceback


def test_the_edge_and_the_routes_refuse_in_the_same_envelope(root: Path) -> None:
    with app_client(root, key="sekrit") as http:
        assert error_of(r := http.get("/v1/files"))["code"] == "invalid_api_key" and r.status_code == 401
        assert error_of(http.get("/v1/files", headers={"host": "evil.example"}))["code"] == "host_not_allowed"
        auth = {"authorization": "Bearer sekrit"}
        assert error_of(http.get("/v1/batches/batch_nope", headers=auth))["code"] == "batch_not_found"
        assert error_of(http.get("/api/jobs/nope", headers=auth))["code"] == "job_not_found"
        assert error_of(http.get("/nope", headers=auth))["code"] == "not_found"


ROUTES = [
    "/",
    "/healthz",
    "/metrics",
    "/api/status",
    "/api/jobs/{x}",
    "/api/jobs/{x}/{x}",
    "/outbox/{x}/{x}",
    "/v1/models",
    "/v1/files",
    "/v1/files/{x}",
    "/v1/files/{x}/content",
    "/v1/batches",
    "/v1/batches/{x}",
    "/v1/batches/{x}/cancel",
    "/v1/{x}",
    "/{x}",
]
segments = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).map(lambda s: quote(s, safe=""))
queries = st.dictionaries(
    st.sampled_from(["limit", "after", "page", "since", "key"]), st.text(max_size=8), max_size=3
)


@pytest.fixture
def http(root: Path) -> Iterator[TestClient]:
    with app_client(root, raise_server_exceptions=False) as client:
        yield client


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    st.sampled_from(ROUTES),
    st.lists(segments, min_size=2, max_size=2),
    queries,
    st.binary(max_size=40),
)
def test_every_error_the_api_returns_is_the_envelope(
    http: TestClient, method: str, route: str, parts: list[str], query: dict, body: bytes
) -> None:
    path = route.replace("{x}", parts[0], 1).replace("{x}", parts[1], 1)
    r = http.request(method, path, params=query, content=body)
    assert r.status_code < 500, (method, path, r.text)
    if r.status_code >= 400:
        error_of(r)

"""Score and rerank lines on the echo engine: vLLM's bodies, order, errors, usage, counts.

The echo engine scores with the cosine of its echo embeddings, so the shapes and the order of the
answers can be checked here without a model; tests/test_vllm.py compares MiniLM with vLLM's runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dropbox_runner.lines.parse import IdSet, LineError, RawLine, Request, parse_line

from helpers import batch_json, chat_line, models_yaml, read_jsonl, run_once, write_jsonl

SCORING_MODELS = """
  echo-embed: {engine: echo, task: embed}
  echo-ce: {engine: echo, task: score}
"""
DOCS = ["A man plays the guitar.", "The stock market fell.", "A man is playing a guitar.", "Cats sleep."]
QUERY = "A man is playing a guitar."


def score_line(cid: str, url: str = "/v1/score", **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


@pytest.fixture
def sroot(root: Path) -> Path:
    models_yaml(root, models=SCORING_MODELS)
    for m in ("echo-embed", "echo-ce"):
        (root / "inbox" / m).mkdir()
    return root


def run(root: Path, model: str, name: str, lines: list) -> list[dict]:
    write_jsonl(root / f"inbox/{model}/{name}.jsonl", lines)
    run_once(root)
    return read_jsonl(root / f"outbox/{name}/{model}.jsonl")


def test_score_and_rerank_lines_answer_with_vllms_bodies_best_first(sroot: Path) -> None:
    vllm_protocol = pytest.importorskip("vllm.entrypoints.pooling.scoring.protocol")
    lines = [
        score_line("one-to-many", text_1=QUERY, text_2=DOCS),
        score_line("pairs", queries=[QUERY, "Cats sleep."], documents=[DOCS[0], "Cats sleep."]),
        score_line("single", url="/score", text_1=QUERY, text_2=DOCS[0]),
        score_line("rerank", url="/v1/rerank", query=QUERY, documents=DOCS),
        score_line("top2", url="/v2/rerank", query=QUERY, documents=DOCS, top_n=2, model="anything"),
        score_line("top9", url="/rerank", query=QUERY, documents=DOCS[:2], top_n=9),
    ]
    out = run(sroot, "echo-embed", "sc", lines)
    assert [x["custom_id"] for x in out] == [x["custom_id"] for x in lines]
    bodies = {x["custom_id"]: x["response"]["body"] for x in out}
    assert all(x["response"]["status_code"] == 200 for x in out), out
    for cid in ("one-to-many", "pairs", "single"):
        vllm_protocol.ScoreResponse.model_validate(bodies[cid])
        assert bodies[cid]["object"] == "list" and bodies[cid]["model"] == "echo-embed"
    for cid in ("rerank", "top2", "top9"):
        vllm_protocol.RerankResponse.model_validate(bodies[cid])
    scores = [d["score"] for d in bodies["one-to-many"]["data"]]
    assert [d["index"] for d in bodies["one-to-many"]["data"]] == [0, 1, 2, 3]
    assert scores[2] == pytest.approx(1.0) and max(scores) == scores[2], "a text is nearest itself"
    assert all(-1 <= s <= 1 for s in scores)
    assert bodies["single"]["data"][0]["score"] == scores[0], "a pair scores the same alone"
    pairs = [d["score"] for d in bodies["pairs"]["data"]]
    assert pairs[0] == scores[0] and pairs[1] == pytest.approx(1.0), "N:N scores pair i with pair i"
    results = bodies["rerank"]["results"]
    assert [r["relevance_score"] for r in results] == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)
    assert all(scores[r["index"]] == r["relevance_score"] for r in results)
    assert bodies["top2"]["results"] == results[:2]
    assert len(bodies["top9"]["results"]) == 2
    # usage: an embedding model reads each text once, words count as tokens on the echo engine
    words = len(QUERY.split()) + sum(len(d.split()) for d in DOCS)
    usage = bodies["one-to-many"]["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"], usage["completion_tokens"]) == (words, words, 0)
    assert bodies["rerank"]["usage"] == {"prompt_tokens": words, "total_tokens": words}
    batch = batch_json(sroot, "sc")
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    total = sum(b["usage"]["prompt_tokens"] for b in bodies.values())
    assert batch["models"]["echo-embed"]["usage"]["prompt_tokens"] == total


def test_a_cross_encoder_reads_each_pair_and_takes_only_scoring_lines(sroot: Path) -> None:
    lines = [
        score_line("s", text_1=QUERY, text_2=DOCS),
        score_line("r", url="/v1/rerank", query=QUERY, documents=DOCS, top_n=1),
        chat_line(0),
    ]
    out = run(sroot, "echo-ce", "ce", lines)
    s, r, chat = (x["response"] for x in out)
    assert s["status_code"] == 200 and r["status_code"] == 200
    pairs = len(DOCS) * len(QUERY.split()) + sum(len(d.split()) for d in DOCS)
    assert s["body"]["usage"]["prompt_tokens"] == pairs, "a cross-encoder counts the query once per pair"
    assert r["body"]["results"][0]["index"] == 2
    assert chat["status_code"] == 400 and chat["body"]["error"]["param"] == "url"
    assert "cross-encoder" in chat["body"]["error"]["message"]


def test_score_lines_on_a_generate_model_fail_naming_the_url(root: Path) -> None:
    lines = [
        score_line("s", text_1="a", text_2="b"),
        score_line("r", url="/v1/rerank", query="a", documents=["b"]),
        chat_line(0),
    ]
    out = run(root, "echo", "gen", lines)
    codes = [x["response"]["status_code"] for x in out]
    assert codes == [400, 400, 200]
    error = out[0]["response"]["body"]["error"]
    assert error["param"] == "url" and "task is generate" in error["message"]
    errors = read_jsonl(root / "outbox/gen/echo.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["s", "r"]
    assert batch_json(root, "gen")["request_counts"] == {"total": 3, "completed": 1, "failed": 2}


def parse(url: str, body: object) -> Request | LineError:
    data = json.dumps({"custom_id": "x", "url": url, "body": body}).encode()
    return parse_line(RawLine(0, 1, data), IdSet())


@pytest.mark.parametrize(
    ("url", "body", "param"),
    [
        ("/v1/score", {"text_1": "a"}, "text_2"),
        ("/v1/score", {"documents": ["a"]}, "queries"),
        ("/v1/score", {}, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "queries": "c"}, "queries"),
        ("/v1/score", {"text_1": ["a", "b", "c"], "text_2": ["a", "b"]}, "text_2"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": "b"}, "text_2"),
        ("/v1/score", {"text_1": [], "text_2": "b"}, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": [{"content": []}]}, "text_2"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "top_n": 1}, "top_n"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "max_tokens_per_doc": 3}, "max_tokens_per_doc"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "use_activation": "yes"}, "use_activation"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "stream": True}, "stream"),
        ("/v1/rerank", {"query": "a"}, "documents"),
        ("/v1/rerank", {"documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": ["a"], "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "a", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": 1.5}, "top_n"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "text_1": "c"}, "text_1"),
    ],
)
def test_bad_scoring_bodies_fail_naming_the_field(url: str, body: dict, param: str) -> None:
    result = parse(url, body)
    assert isinstance(result, LineError), result
    assert result.param == param, result.message


def test_each_pair_of_inputs_vllm_takes_is_accepted() -> None:
    for first, second in (
        ("text_1", "text_2"),
        ("queries", "documents"),
        ("queries", "items"),
        ("data_1", "data_2"),
    ):
        result = parse("/v1/score", {first: "a", second: ["b", "c"], "user": "u", "use_activation": False})
        assert isinstance(result, Request) and result.kind == "score", result
    result = parse("/v1/rerank", {"query": "a", "documents": "b", "top_n": 0, "priority": 0})
    assert isinstance(result, Request) and result.kind == "rerank", result


def test_models_yaml_takes_task_score_and_names_a_wrong_task(tmp_path: Path) -> None:
    from dropbox_runner.config import parse_registry
    from dropbox_runner.errors import ConfigError

    registry = parse_registry("models:\n  ce: {path: x, task: score}\n", tmp_path)
    assert registry.models["ce"].task == "score"
    with pytest.raises(ConfigError, match="task"):
        parse_registry("models:\n  ce: {path: x, task: rerank}\n", tmp_path)


def test_two_scoring_models_side_by_side_in_compare_jsonl(sroot: Path) -> None:
    (sroot / "inbox/both.manifest.json").write_text(json.dumps({"models": ["echo-embed", "echo-ce"]}))
    lines = [
        score_line("s", text_1=QUERY, text_2=DOCS[:2]),
        score_line("r", url="/v1/rerank", query=QUERY, documents=DOCS),
    ]
    write_jsonl(sroot / "inbox/both.jsonl", lines)
    run_once(sroot)
    rows = read_jsonl(sroot / "outbox/both/compare.jsonl")
    embed, ce = (read_jsonl(sroot / f"outbox/both/{m}.jsonl") for m in ("echo-embed", "echo-ce"))
    scores = [d["score"] for d in embed[0]["response"]["body"]["data"]]
    assert rows[0]["answers"]["echo-embed"] == {"score": scores}
    assert rows[1]["answers"]["echo-ce"] == {
        "ranking": [r["index"] for r in ce[1]["response"]["body"]["results"]]
    }
    assert rows[1]["answers"]["echo-ce"]["ranking"][0] == 2

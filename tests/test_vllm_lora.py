"""LoRA adapters on the real vLLM: each adapter's greedy text, line by line, equals vLLM's own
`LLM.chat(..., lora_request=...)` on that adapter, and differs from the base's (CONTRACT section 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dropbox_runner.engine import tinymodels

from helpers import batch_json, chat_line, models_yaml, read_jsonl, run_once, write_jsonl

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
ARGS = {"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.15, "enforce_eager": True}
QUESTIONS = [f"What does line {i} of the adapter test ask about {i * 7}?" for i in range(32)]

# vLLM's own answers for each adapter, one LLM with the same arguments the runner sets for two adapters.
REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
base, adapters, questions, args = json.loads(sys.argv[1])
llm = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=8, **args)
params = SamplingParams(temperature=0, max_tokens=16)
chats = [[{"role": "user", "content": q}] for q in questions]
out = {"base": [o.outputs[0].text for o in llm.chat(chats, params, use_tqdm=False)]}
for i, (name, folder) in enumerate(sorted(adapters.items()), 1):
    got = llm.chat(chats, params, lora_request=LoRARequest(name, i, folder), use_tqdm=False)
    out[name] = [o.outputs[0].text for o in got]
print("REFERENCE" + json.dumps(out))
"""


def test_each_adapters_greedy_text_equals_vllms_own_lora_chat_and_a_refused_one_fails_alone(
    tmp_path: Path,
) -> None:
    base = tinymodels.build(REPO / "models", "tiny-llama")
    root = tmp_path / "root"
    folders = {
        name: str(tinymodels.random_lora(base, root / "adapters" / name, seed))
        for name, seed in (("a1", 1), ("a2", 2))
    }
    # Rank 16 over the base's max_lora_rank of 8: vLLM itself refuses it when the model process loads it.
    tinymodels.random_lora(base, root / "adapters/wide", 3, rank=16)
    models = {
        "tiny-llama": {
            "path": str(base),
            "engine_args": {**ARGS, "max_lora_rank": 8, "max_loras": 2},
            "defaults": {"temperature": 0, "max_tokens": 16},
        },
        **{name: {"base": "tiny-llama", "adapter": f"adapters/{name}"} for name in [*folders, "wide"]},
    }
    models_yaml(root, text=json.dumps({"settings": {"settle_seconds": 0.2}, "models": models}))
    write_jsonl(root / "inbox/cmp.jsonl", [chat_line(i, q) for i, q in enumerate(QUESTIONS)])
    manifest = {"models": ["tiny-llama", "a1", "wide", "a2"]}
    (root / "inbox/cmp.manifest.json").write_text(json.dumps(manifest))
    proc = run_once(root, timeout=900, env={"HF_HUB_OFFLINE": "1"})
    assert proc.stderr.count("loading tiny-llama") == 1, "one load for the base and its adapters"
    batch = batch_json(root, "cmp")
    assert [batch["models"][m]["status"] for m in ("tiny-llama", "a1", "a2")] == ["completed"] * 3, batch
    assert batch["models"]["wide"]["status"] == "failed"
    assert "vLLM cannot serve this adapter" in batch["models"]["wide"]["error"], batch["models"]["wide"]
    text = {
        m: [
            x["response"]["body"]["choices"][0]["message"]["content"]
            for x in read_jsonl(root / f"outbox/cmp/{m}.jsonl")
        ]
        for m in ("tiny-llama", "a1", "a2")
    }
    ref = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps([str(base), folders, QUESTIONS, ARGS])],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    found = next(line for line in ref.stdout.splitlines() if line.startswith("REFERENCE"))
    expected = json.loads(found[len("REFERENCE") :])
    # The base's own lines are the base's, not an adapter's (they never share an engine step with
    # the adapters': vLLM's CPU build gave them an adapter's weights when they did; docs/lora.md).
    assert text["tiny-llama"] == expected["base"]
    for name in folders:
        assert text[name] == expected[name], name
        differ = sum(a != b for a, b in zip(text[name], text["tiny-llama"], strict=True))
        assert differ > len(QUESTIONS) / 2, f"{name} differs from the base on {differ} lines only"
    assert text["a1"] != text["a2"]

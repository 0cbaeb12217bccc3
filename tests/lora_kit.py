"""Adapters for the LoRA tests: folders of the PEFT form for the echo engine, real ones made with peft."""

from __future__ import annotations

import json
from pathlib import Path


def fake_adapter(folder: Path, rank: int = 8, weights: bytes = b"weights") -> Path:
    """A folder of the PEFT form (adapter_config.json and weights): enough for the echo engine."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def random_adapter(base: Path, folder: Path, seed: int, rank: int = 8, targets=("q_proj", "v_proj")) -> Path:
    """A real LoRA adapter of the model in `base`, random enough to change greedy answers (ENVIRONMENT.md's
    recipe: peft's init_lora_weights=False, then lora_B drawn from N(0, 0.5))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(folder)
    return folder

"""Adapters for the LoRA tests: folders of the PEFT form for the echo engine (real ones: tinymodels)."""

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

"""LoRA adapters (CONTRACT section 13): checking an adapter entry against its base and its folder,
and what the base's process is started with so that it answers for its adapters.

An adapter is never a model of its own for scheduling: `Registry.base_of` names the process that
serves it. Nothing here imports vLLM or peft; the folder is read as files.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from dropbox_runner.config import EngineKind, ModelConfig, Registry, Task

# vLLM's accepted max_lora_rank values (MaxLoRARanks in vllm/config/lora.py, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_rank(folder: Path) -> int | str:
    """The largest LoRA rank the folder's adapter_config.json declares, or why it cannot be read."""
    path = folder / "adapter_config.json"
    try:
        config = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return f"{folder} has no adapter_config.json (not a PEFT adapter folder)"
    except (OSError, orjson.JSONDecodeError) as exc:
        return f"{path} cannot be read as JSON ({exc})"
    if not isinstance(config, dict):
        return f"{path} is not a JSON object"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are served"
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [None])]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        return f"{path}: the rank `r` (and every rank_pattern value) must be a whole number >= 1"
    return max(ranks)


def own_problem(root: Path, registry: Registry, name: str) -> str | None:
    """What is wrong with the adapter itself, its base's entry aside from whether that loads here."""
    model = registry.models[name]
    base = registry.models.get(model.base or "")
    if base is None:
        return f"its base {model.base!r} is not a model of models.yaml"
    if base.base is not None:
        return f"its base {model.base!r} is itself an adapter; name the model it adapts"
    if base.task != Task.GENERATE:
        return f"its base {model.base!r} is not a generation model (task: {base.task.value})"
    if base.replicas > 1 or base.executor != "local":
        return (
            f"its base {model.base!r} runs as several copies or on Ray; adapters are served by one local copy"
        )
    folder = model.adapter_folder(root)
    try:
        if not folder.is_dir():
            return f"the adapter folder {folder} does not exist"
        if not any((folder / w).is_file() for w in WEIGHT_FILES):
            return f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)})"
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        return f"the adapter folder {str(folder)[:200]!r} cannot be read ({exc})"
    rank = adapter_rank(folder)
    if isinstance(rank, str):
        return rank
    if rank > VLLM_LORA_RANKS[-1]:
        return f"its rank {rank} is more than vLLM can serve (max_lora_rank at most {VLLM_LORA_RANKS[-1]})"
    return None


def lora_rank_for(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def serving_config(root: Path, registry: Registry, base: str) -> ModelConfig:
    """The base's entry as its process loads it: with the adapters it answers for and, on vLLM,
    enable_lora, max_loras and max_lora_rank for them (what the base's engine_args say wins)."""
    config = registry.models[base].model_copy(deep=True)
    served = {
        name: str(registry.models[name].adapter_folder(root).resolve())
        for name in registry.adapters_of(base)
        if own_problem(root, registry, name) is None  # the base's own problems stop its load anyway
    }
    config._adapters = served
    if served and config.engine == EngineKind.VLLM:
        rank = max(adapter_rank(Path(folder)) for folder in served.values())
        cap = getattr(registry.settings, "max_shared_tasks", None)  # section 12's setting, once it exists
        config.engine_args.setdefault("enable_lora", True)
        config.engine_args.setdefault("max_loras", min(len(served), cap) if cap else len(served))
        config.engine_args.setdefault("max_lora_rank", lora_rank_for(rank))
    return config


def effective_config(registry: Registry, name: str) -> ModelConfig:
    """What decides an adapter's requests: its base's entry with the adapter's defaults applied over
    the base's, and the request_timeout_seconds the registry gives it (its own, else the base's, else
    settings')."""
    model = registry.models[name]
    if model.base is None or model.base not in registry.models:
        return model
    base = registry.models[model.base]
    return base.model_copy(
        update={
            "defaults": {**base.defaults, **model.defaults},
            "request_timeout_seconds": registry.request_timeout_seconds(name),
            "base": model.base,
            "adapter": model.adapter,
        },
        deep=True,
    )

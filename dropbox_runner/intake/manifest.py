"""Sidecar manifests (`<name>.manifest.json` / `.yaml`): models, priority, defaults, metadata.

Parsing never raises: a bad manifest becomes a rejection reason for its drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)
    priority: int = 0
    defaults: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


def read_manifest(path: Path) -> Manifest | str:
    """The manifest, or a sentence saying what is wrong with it."""
    try:
        text = path.read_bytes()
        if path.name.endswith(".json"):
            raw = orjson.loads(text)
        else:
            raw = yaml.safe_load(text.decode("utf-8"))
    except (orjson.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.name.endswith(".json") else "YAML"
        return f"manifest {path.name} is not valid {kind} ({str(exc).splitlines()[0][:120]})"
    if not isinstance(raw, dict):
        return f'manifest {path.name} must be an object like {{"models": ["tiny-llama"]}}'
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        return f"manifest {path.name}: {key}: {what}"

"""models.yaml: the model registry and the daemon's settings, loaded into pydantic models.

A wrong file raises ConfigError naming the file, the key and what is wrong.
"""

from __future__ import annotations

import importlib.util
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dropbox_runner.errors import ConfigError

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
PACKAGE_PREFIX = "package:"
EMBEDDED_MODELS = ("tiny-llama", "tiny-qwen")


class EngineKind(StrEnum):
    VLLM = "vllm"
    ECHO = "echo"


class Task(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settle_seconds: float = Field(2.0, ge=0)
    rescan_seconds: float = Field(30.0, gt=0)
    poll: Literal["auto", True, False] = "auto"
    poll_interval: float = Field(1.0, gt=0)
    commit_interval_ms: int = Field(200, ge=1)
    dedupe: bool = True
    manifest_grace_seconds: float = Field(60.0, ge=0)
    require_ready_marker: bool = False
    max_file_bytes: int = Field(10 * 1024**3, gt=0)
    max_swap_delay_seconds: float = Field(600.0, ge=0)
    stop_timeout_seconds: float = Field(10.0, gt=0)
    api_key: str | None = None  # required by `serve` on a non-loopback address (or $DROPBOX_RUNNER_API_KEY)
    max_upload_bytes: int = Field(1024**3, gt=0)

    @field_validator("poll", mode="before")
    @classmethod
    def _poll_words(cls, v: Any) -> Any:
        words = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
        return words.get(v.lower(), v) if isinstance(v, str) else v


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    engine: EngineKind = EngineKind.VLLM
    task: Task = Task.GENERATE
    engine_args: dict[str, Any] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: Settings = Field(default_factory=Settings)
    models: dict[str, ModelConfig] = Field(default_factory=dict)


def resolve_model_path(root: Path, model: ModelConfig) -> str | None:
    """The folder (or hub id) the engine loads: package: paths, root-relative folders, hub ids."""
    if model.path is None:
        return None
    if model.path.startswith(PACKAGE_PREFIX):
        package, _, sub = model.path[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    local = (root / model.path).expanduser()
    if local.exists() or is_embedded_path(root, model.path) or not HUB_ID_RE.match(model.path):
        return str(local.resolve())
    return model.path


def is_embedded_path(root: Path, path: str) -> bool:
    """Paths of the tiny models this package builds on first use (models/tiny-llama, models/tiny-qwen)."""
    p = (root / path).resolve()
    return p.parent == (root / "models").resolve() and p.name in EMBEDDED_MODELS


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return key, "unknown key"
    return key, err["msg"]


def load_registry(root: Path) -> Registry:
    path = root / "models.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: not found; run `dropbox-runner init` to create a starter file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with `settings` and `models`.")
    if isinstance(raw.get("models"), dict):
        for name, entry in raw["models"].items():
            if not MODEL_NAME_RE.match(str(name)):
                raise ConfigError(f"{path}: models.{name}: bad model name; use 1 to 64 of A-Z a-z 0-9 . _ -.")
            if entry is None:
                raise ConfigError(f"{path}: models.{name}: empty entry; give at least `path` or `engine`.")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        key, what = _describe(exc.errors()[0])
        raise ConfigError(f"{path}: {key}: {what}.") from exc
    for name, model in registry.models.items():
        check_model_entry(root, name, model, path)
    return registry


def check_model_entry(root: Path, name: str, model: ModelConfig, yaml_path: Path) -> None:
    if model.engine == EngineKind.ECHO:
        unknown = set(model.engine_args) - {"delay_ms", "max_in_flight", "crash_on"}
        if unknown:
            raise ConfigError(
                f"{yaml_path}: models.{name}.engine_args.{sorted(unknown)[0]}: unknown key for the echo engine."
            )
        return
    if not model.path:
        raise ConfigError(f"{yaml_path}: models.{name}.path: missing; a vllm model needs a folder or hub id.")
    resolved = resolve_model_path(root, model)
    if resolved is None:
        raise ConfigError(f"{yaml_path}: models.{name}.path: package in {model.path!r} is not installed.")
    if resolved.startswith("/") and not Path(resolved).exists() and not is_embedded_path(root, model.path):
        raise ConfigError(f"{yaml_path}: models.{name}.path: {model.path!r} does not exist.")

"""models.yaml: the model registry and the daemon's settings, loaded into pydantic models.

A wrong file raises ConfigError naming the file, the key and what is wrong. A model that is well
written but cannot load here (package or folder missing, vLLM absent) is not an error of the file:
`slot.loadable.model_problem` says why, and only that model's work waits or fails.
"""

from __future__ import annotations

import importlib.util
import re
from enum import StrEnum
from hashlib import blake2b
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from dropbox_runner import plainyaml
from dropbox_runner.errors import ConfigError
from dropbox_runner.layout import Layout
from dropbox_runner.lines.fields import check_defaults

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
PACKAGE_PREFIX = "package:"
EMBEDDED_MODELS = ("tiny-llama", "tiny-qwen", "smollm2")  # built into <root>/models/ on first load
# Names an outbox folder already uses for other files: compare.jsonl, <model>.errors.jsonl.
RESERVED_NAMES = ("compare",)
RESERVED_SUFFIXES = (".errors",)
ECHO_ARGS = frozenset(
    {
        "delay_ms",
        "max_in_flight",
        "load_delay_ms",
        "crash_on",
        "crash_in_step",
        "raise_on",
        "hang_on",
        "slow_on",
        "gate_on",
        "gate_file",
    }
)


class EngineKind(StrEnum):
    VLLM = "vllm"
    ECHO = "echo"


class Task(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"
    SCORE = "score"  # a cross-encoder: score and rerank lines only


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    secret: str  # Standard Webhooks: "whsec_" and base64
    events: list[str] = Field(
        default_factory=lambda: ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
    )

    @field_validator("secret")
    @classmethod
    def _base64(cls, v: str) -> str:
        import base64
        import binascii

        try:
            base64.b64decode(v.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError('must be "whsec_" followed by base64') from None
        return v

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
        unknown = [e for e in v if e not in known]
        if unknown:
            raise ValueError(f"unknown event {unknown[0][:40]!r}; known: {', '.join(known)}")
        return v


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
    max_shared_tasks: int = Field(8, ge=1, le=256)  # tasks of the loaded model run in its process at once
    fair_share_key: str = "team"  # the job metadata key whose value names a job's group
    preempt_after_seconds: float | None = Field(300.0, ge=0)  # null: never preempt for another model
    stop_timeout_seconds: float = Field(10.0, gt=0)
    stall_timeout_seconds: float = Field(300.0, gt=0)  # no commit while requests are in flight
    load_timeout_seconds: float = Field(1800.0, gt=0)
    request_timeout_seconds: float | None = Field(None, gt=0)
    keep_finished_days: float | None = Field(None, gt=0)
    history_point_seconds: float = Field(10.0, gt=0)  # one point of throughput history this often
    ray_address: str = "local"  # local: a private Ray instance of the daemon; auto or host:port: a cluster
    webhooks: list[Webhook] = Field(default_factory=list)
    webhook_retry_hours: float = Field(24.0, gt=0)
    api_key: str | None = None  # required by `serve` on a non-loopback address (or $DROPBOX_RUNNER_API_KEY)
    max_upload_bytes: int = Field(1024**3, gt=0)
    allowed_hosts: list[str] = Field(default_factory=list)  # Host names the API answers beyond loopback

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
    request_timeout_seconds: float | None = Field(None, gt=0)
    replicas: int = Field(1, ge=1, le=64)  # copies of the model that work on one task at once
    executor: Literal["local", "ray"] = "local"
    devices: list[str] | None = None  # CUDA_VISIBLE_DEVICES of each local copy (default: by count)
    # prefix: each window of lines is fed grouped by prompt prefix (the prefix cache serves them);
    # input: fed in input order. Results and their order are the same either way.
    feed_order: Literal["prefix", "input"] = "prefix"
    # An adapter entry (section 13): the model of this file whose process serves it, and its PEFT folder.
    base: str | None = None
    adapter: str | None = None
    _adapters: dict[str, str] = PrivateAttr(default_factory=dict)  # set on a base's serving config

    def adapter_folder(self, root: Path) -> Path:
        """An adapter entry's folder: a path relative to the root, or absolute (`~` expanded)."""
        path = Path(self.adapter or "")
        try:
            path = path.expanduser()
        except RuntimeError:  # an unknown ~user: the folder check then says it does not exist
            pass
        return root / path

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The adapters this (serving) config's process answers for: name -> folder (adapters.py)."""
        return self._adapters

    def fingerprint(self) -> str:
        """A digest of everything in this entry that changes results (for dedupe)."""
        data = self.model_dump(
            mode="json", exclude={"request_timeout_seconds", "replicas", "executor", "devices", "feed_order"}
        )
        return blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: Settings = Field(default_factory=Settings)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    def base_of(self, name: str) -> str:
        """The model whose process serves `name`: an adapter's base, else the model itself."""
        model = self.models.get(name)
        return model.base if model is not None and model.base is not None else name

    def adapters_of(self, base: str) -> list[str]:
        return [name for name, m in self.models.items() if m.base == base]

    def request_timeout_seconds(self, name: str) -> float | None:
        """A model's request_timeout_seconds, else its base's (for an adapter), else `settings:`'s."""
        for entry in (self.models.get(name), self.models.get(self.base_of(name))):
            if entry is not None and entry.request_timeout_seconds is not None:
                return entry.request_timeout_seconds
        return self.settings.request_timeout_seconds


def resolve_model_path(root: Path, model: ModelConfig) -> str | None:
    """The folder (or hub id) the engine loads: package: paths, root-relative folders, hub ids."""
    if model.path is None:
        return None
    try:
        if model.path.startswith(PACKAGE_PREFIX):
            package, _, sub = model.path[len(PACKAGE_PREFIX) :].partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                return None
            return str(Path(next(iter(spec.submodule_search_locations))) / sub)
        local = (root / model.path).expanduser()
        if local.exists() or is_embedded_path(root, model.path) or not HUB_ID_RE.match(model.path):
            return str(local.resolve())
    except (ImportError, ValueError, RuntimeError, OSError):  # no package, a NUL byte, an unknown ~user
        return None
    return model.path


def is_embedded_path(root: Path, path: str) -> bool:
    """Paths of the models this package builds on first use (models/tiny-llama, models/smollm2, ...)."""
    p = (root / path).resolve()
    return p.parent == Layout(root).embedded_models.resolve() and p.name in EMBEDDED_MODELS


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return key, "unknown key"
    return key, err["msg"]


def load_registry(root: Path) -> Registry:
    path = Layout(root).models_yaml
    if not path.exists():
        raise ConfigError(f"{path}: not found; run `dropbox-runner init` to create a starter file.")
    try:
        return parse_registry(path.read_text(encoding="utf-8"), root)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text.") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_registry(text: str, root: Path) -> Registry:
    """models.yaml's text as a Registry; raises ConfigError naming the key (total over any text)."""
    try:
        raw = plainyaml.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0][:200]}).") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping with `settings` and `models`.")
    if isinstance(raw.get("models"), dict):
        for name, entry in raw["models"].items():
            if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
                raise ConfigError(
                    f"models.{str(name)[:80]}: bad model name; use 1 to 64 of A-Z a-z 0-9 . _ -."
                )
            if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
                raise ConfigError(
                    f"models.{name}: the name is reserved (outbox/<name>/compare.jsonl and "
                    "<model>.errors.jsonl use it); choose another."
                )
            if entry is None:
                raise ConfigError(f"models.{name}: empty entry; give at least `path` or `engine`.")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        key, what = _describe(exc.errors()[0])
        raise ConfigError(f"{key[:200]}: {what[:200]}.") from None
    for name, model in registry.models.items():
        check_model_entry(name, model)
        check_copies(name, model)
    return registry


def check_model_entry(name: str, model: ModelConfig) -> None:
    """What a models.yaml entry must say, whatever this machine has installed."""
    problem = check_defaults(model.defaults)
    if problem:
        raise ConfigError(f"models.{name}.defaults: {problem}.")
    if model.base is not None or model.adapter is not None:
        check_adapter_entry(name, model)
        return
    if model.engine == EngineKind.ECHO:
        unknown = set(model.engine_args) - ECHO_ARGS
        if unknown:
            raise ConfigError(
                f"models.{name}.engine_args.{sorted(unknown)[0][:80]}: unknown key for the echo engine."
            )
        return
    if not model.path:
        raise ConfigError(f"models.{name}.path: missing; a vllm model needs a folder or hub id.")


ADAPTER_KEYS = frozenset({"base", "adapter", "defaults", "request_timeout_seconds"})


def check_adapter_entry(name: str, model: ModelConfig) -> None:
    """The form of an adapter entry. What depends on the base or the folder is adapters.adapter_problem's:
    such an adapter fails its own tasks, and the daemon runs the rest."""
    if not model.base:
        raise ConfigError(f"models.{name}.base: missing; an adapter entry names the model it adapts.")
    if not model.adapter:
        raise ConfigError(f"models.{name}.adapter: missing; an adapter entry names its PEFT LoRA folder.")
    extra = sorted(model.model_fields_set - ADAPTER_KEYS)
    if extra:
        raise ConfigError(
            f"models.{name}.{extra[0]}: an adapter entry takes only base, adapter, defaults and "
            "request_timeout_seconds (its base's entry says how the model loads)."
        )


def check_copies(name: str, model: ModelConfig) -> None:
    if model.devices is not None and len(model.devices) != model.replicas:
        raise ConfigError(
            f"models.{name}.devices: {len(model.devices)} devices for {model.replicas} replicas; give one per copy."
        )

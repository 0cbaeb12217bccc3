"""Sidecar manifests (`<name>.manifest.json` / `.yaml`): models, priority, defaults, metadata.

Parsing never raises: a bad manifest becomes a rejection reason for its drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dropbox_runner import plainyaml
from dropbox_runner.fsutil import read_regular
from dropbox_runner.lines.fields import check_defaults, quote

MAX_MANIFEST_BYTES = 1 << 20
PRIORITY_LIMIT = 100_000
# OpenAI's metadata limits; the runner's own keys (written by `submit` and the API) are not counted
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
RUNNER_KEYS = frozenset({"submit_id", "api_batches"})
EXPIRES_AFTER_SECONDS = (3600, 2_592_000)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)
    priority: int = Field(0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)
    defaults: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    completion_window: str | int | float | None = None
    output_expires_after: Any = None  # {"anchor": "created_at", "seconds": N}, checked below


def read_manifest(path: Path) -> Manifest | str:
    """The manifest, or a sentence saying what is wrong with it (never follows a symlink)."""
    kind = "JSON" if path.name.endswith(".json") else "YAML"
    try:
        text = read_regular(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as exc:
        return f"manifest {path.name} cannot be read: {exc}"
    return parse_manifest(text, path.name, kind)


def parse_manifest(text: bytes, name: str, kind: str) -> Manifest | str:
    """Total over any bytes: a Manifest or the reason it is refused."""
    try:
        raw = orjson.loads(text) if kind == "JSON" else plainyaml.load(text.decode("utf-8"))
    except (orjson.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        return f"manifest {name} is not valid {kind} ({str(exc).splitlines()[0][:160] if str(exc) else exc})"
    if not isinstance(raw, dict):
        return f'manifest {name} must be an object like {{"models": ["tiny-llama"]}}'
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])[:100]
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"][:160]
        return f"manifest {name}: {key}: {what}"
    if manifest.completion_window is not None and window_seconds(manifest.completion_window) is None:
        return (
            f"manifest {name}: completion_window: {quote(manifest.completion_window)} is not a duration; "
            'give "24h", "30m", "90s" or a number of seconds'
        )
    problem = check_defaults(manifest.defaults)
    if problem:
        return f"manifest {name}: defaults: {problem}"
    problem = metadata_problem(manifest.metadata)
    if problem:
        return f"manifest {name}: {problem}"
    if manifest.output_expires_after is not None:
        seconds = expires_after_seconds(manifest.output_expires_after)
        if isinstance(seconds, str):
            return f"manifest {name}: {seconds}"
        manifest.output_expires_after = {"anchor": "created_at", "seconds": seconds}
    try:
        size = len(orjson.dumps(manifest.metadata))
    except TypeError:  # an integer past 64 bits
        return f"manifest {name}: metadata holds a number JSON cannot carry"
    if size > 64 * 1024:
        return f"manifest {name}: metadata is larger than 64 KiB"
    long_model = next((m for m in manifest.models if len(m) > 64), None)
    if long_model is not None:
        return f"manifest {name}: models: no model is named {quote(long_model)}"
    return manifest


def metadata_problem(metadata: Any) -> str | None:
    """OpenAI's limits on metadata (16 pairs, keys up to 64 characters, string values up to 512)."""
    if not isinstance(metadata, dict):
        return "metadata must be an object"
    own = [k for k in metadata if k not in RUNNER_KEYS]
    if len(own) > METADATA_PAIRS:
        return (
            f"metadata: {quote(own[METADATA_PAIRS])} is pair {METADATA_PAIRS + 1}; at most {METADATA_PAIRS}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > METADATA_KEY_CHARS:
            return f"metadata: the key {quote(key)} is longer than {METADATA_KEY_CHARS} characters"
        if isinstance(value, str) and len(value) > METADATA_VALUE_CHARS:
            return f"metadata.{key}: the value is longer than {METADATA_VALUE_CHARS} characters"
    return None


def expires_after_seconds(value: Any) -> int | str:
    """The seconds of an `output_expires_after` object, or a sentence saying what is wrong with it."""
    low, high = EXPIRES_AFTER_SECONDS
    shape = f'output_expires_after must be {{"anchor": "created_at", "seconds": {low}..{high}}}'
    if (
        not isinstance(value, dict)
        or value.get("anchor") != "created_at"
        or set(value) - {"anchor", "seconds"}
    ):
        return shape
    seconds = value.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not low <= seconds <= high:
        return f"output_expires_after.seconds: {quote(seconds)} is not a whole number in {low}..{high}"
    return seconds


def window_seconds(window: Any) -> float | None:
    """Seconds of a completion window: "24h", "30m", "90s", "2d" or a positive number; None if neither."""
    if isinstance(window, bool):
        return None
    if isinstance(window, int | float):
        return float(window) if 0 < window < 10**9 else None
    if not isinstance(window, str) or len(window) > 20:
        return None
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(window[-1:])
    number = window[:-1] if unit else window
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        return None
    return value if 0 < value < 10**9 else None

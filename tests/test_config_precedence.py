"""Settings precedence decided in config (issue 21 item 4): a model's value over its base's (an
adapter) over `settings:`, asked of the registry rather than spelled at each call site."""

from __future__ import annotations

from pathlib import Path

from dropbox_runner.config import parse_registry
from dropbox_runner.slot.adapters import effective_config

YAML = """settings:
  request_timeout_seconds: 30
models:
  plain: {engine: echo}
  own: {engine: echo, request_timeout_seconds: 5}
  base: {engine: echo, request_timeout_seconds: 7}
  bare: {engine: echo}
  tuned: {base: base, adapter: adapters/t}
  quick: {base: base, adapter: adapters/q, request_timeout_seconds: 2}
  loose: {base: bare, adapter: adapters/l}
"""


def test_a_model_s_request_timeout_over_its_base_s_over_the_setting(tmp_path: Path) -> None:
    registry = parse_registry(YAML, tmp_path)
    timeouts = {name: registry.request_timeout_seconds(name) for name in registry.models}
    assert timeouts == {"plain": 30, "own": 5, "base": 7, "bare": 30, "tuned": 7, "quick": 2, "loose": 30}


def test_without_the_setting_a_model_without_its_own_has_no_timeout(tmp_path: Path) -> None:
    registry = parse_registry(YAML.replace("settings:\n  request_timeout_seconds: 30\n", ""), tmp_path)
    assert registry.request_timeout_seconds("plain") is None
    assert registry.request_timeout_seconds("loose") is None
    assert registry.request_timeout_seconds("quick") == 2


def test_an_adapter_s_effective_config_carries_the_timeout_the_registry_gives(tmp_path: Path) -> None:
    registry = parse_registry(YAML, tmp_path)
    for name in ("tuned", "quick", "loose"):
        assert effective_config(registry, name).request_timeout_seconds == registry.request_timeout_seconds(
            name
        )

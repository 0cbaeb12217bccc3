"""models.yaml: a wrong file stops with the file, the key and what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dropbox_runner.config import load_registry
from dropbox_runner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("models:\n  a: {engine: echo, colour: red}\n", "models.a.colour: unknown key"),
        ("models:\n  'bad name!': {engine: echo}\n", "models.bad name!: bad model name"),
        ("models:\n  a: {engine: tensorrt}\n", "models.a.engine: Input should be 'vllm' or 'echo'"),
        ("models:\n  compare: {engine: echo}\n", "models.compare: the name is reserved"),
        ("models:\n  a.errors: {engine: echo}\n", "models.a.errors: the name is reserved"),
        ("models:\n  a: {engine: echo, defaults: {temperature: hot}}\n", "models.a.defaults: `temperature`"),
        ("x: &a [1]\ny: *a\n", "aliases"),
        ("models:\n  a: {engine: vllm}\n", "models.a.path: missing"),
        ("settings: {settle_seconds: -1}\nmodels: {}\n", "settings.settle_seconds: Input should be greater"),
        ("settings: {colour: red}\n", "settings.colour: unknown key"),
        ("models: [1, 2\n", "not valid YAML"),
        ("models:\n  a: {engine: echo, engine_args: {temperature: 3}}\n", "models.a.engine_args.temperature"),
    ],
)
def test_bad_models_yaml_names_file_and_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    (tmp_path / "models.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_registry(tmp_path)
    assert str(tmp_path / "models.yaml") in str(err.value)
    assert expected in str(err.value)


def test_daemon_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  a: {engine: echo, colour: red}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "run", "--once", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "models.a.colour: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_models_yaml_is_valid_and_matches_the_starter() -> None:
    registry = load_registry(REPO)
    assert {"tiny-llama", "tiny-qwen", "minilm"} <= set(registry.models)
    assert registry.models["minilm"].task == "embed"
    assert (REPO / "models.yaml").read_text() == (REPO / "dropbox_runner/models.default.yaml").read_text()


def test_poll_accepts_words(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("settings: {poll: 'true'}\nmodels: {e: {engine: echo}}\n")
    assert load_registry(tmp_path).settings.poll is True

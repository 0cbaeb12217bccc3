"""Loading a model into the slot: the checks first (its files, the memory it needs), then its handle:
one local model process (`supervisor.ModelProcess`), or the model's copies (`copies.pool.Copies`,
for `replicas > 1` or `executor: ray`). Both take the same commands and give the same events.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dropbox_runner.config import EngineKind, ModelConfig, Registry, resolve_model_path
from dropbox_runner.layout import Layout
from dropbox_runner.slot import adapters
from dropbox_runner.slot.copies.pool import Copies
from dropbox_runner.slot.handle import ModelHandle
from dropbox_runner.slot.loadable import model_problem
from dropbox_runner.slot.memory import fit_problem
from dropbox_runner.slot.supervisor import ModelProcess

log = logging.getLogger("dropbox_runner.daemon")


class CannotLoad(Exception):
    """The model cannot run here; the message says why, for its tasks' errors."""


def open_model(
    layout: Layout, registry: Registry, model: str, memory_retry: dict[str, float]
) -> tuple[ModelHandle, ModelConfig]:
    """Start loading `model` (with the smaller gpu_memory_utilization of a memory retry, if any)."""
    config = adapters.serving_config(layout.root, registry, model)
    problem = model_problem(layout.root, model, config)
    copies = config.replicas > 1 or config.executor == "ray"
    if config.engine == EngineKind.VLLM and problem is None and not copies:
        folder = resolve_model_path(layout.root, config)
        problem = fit_problem(model, Path(folder), config.engine_args) if folder else None
    if problem:
        raise CannotLoad(f"the model {model} cannot run here: {problem}")
    if model in memory_retry:
        config = config.model_copy(deep=True)
        config.engine_args["gpu_memory_utilization"] = memory_retry[model]
    if not copies:
        log.info("loading %s", model)
        return ModelProcess(layout, model, config), config
    log.info("loading %d copies of %s (%s)", config.replicas, model, config.executor)
    try:
        return Copies(layout, model, config, registry.settings), config
    except ConnectionError as exc:  # Ray cannot be reached
        where = registry.settings.ray_address
        raise CannotLoad(f"settings.ray_address: cannot reach Ray at {where!r} ({exc})"[:400]) from None

"""The FastAPI app over one root: OpenAI's Files and Batch APIs, the runner's own routes and page,
behind the edge (Host, Origin, key), every error in one envelope.

Uploads become drops (written the safe way into the inbox); every answer is read from state/ and
outbox/, so it works whether the daemon runs in this process or another.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from dropbox_runner.api import batches, envelope, files, native
from dropbox_runner.api.context import Context
from dropbox_runner.api.edge import Edge
from dropbox_runner.api.edge import is_loopback as is_loopback  # `serve` asks it of its address
from dropbox_runner.config import Registry
from dropbox_runner.jobs.api_records import ApiRecords
from dropbox_runner.layout import Layout

API_KEY_ENV = "DROPBOX_RUNNER_API_KEY"


def create_app(layout: Layout, registry: Registry, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dropbox_runner", docs_url=None, redoc_url=None)
    app.state.context = Context(layout, registry, ApiRecords(layout))
    for module in (files, batches, native):
        app.include_router(module.router)
    envelope.install(app)
    # Host, Origin and the key are judged before any route (with a key, all but /healthz need it)
    app.add_middleware(Edge, api_key=api_key, allowed_hosts=registry.settings.allowed_hosts)
    return app


def resolve_api_key(registry: Registry) -> str | None:
    return os.environ.get(API_KEY_ENV) or registry.settings.api_key

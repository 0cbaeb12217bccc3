"""What every route of one app works on: the root's layout, models.yaml and the API's records.

Kept on `app.state` by `create_app` and handed to a route by FastAPI (`ctx: Ctx`), so the routers are
plain module-level `APIRouter`s rather than closures inside the app's factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from dropbox_runner.config import Registry
from dropbox_runner.jobs.api_records import ApiRecords
from dropbox_runner.layout import Layout


@dataclass(frozen=True)
class Context:
    layout: Layout
    registry: Registry
    records: ApiRecords


async def context(request: Request) -> Context:  # async: no worker thread for a field read
    return request.app.state.context


Ctx = Annotated[Context, Depends(context)]

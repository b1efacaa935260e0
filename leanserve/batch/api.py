"""The OpenAI Files and Batches API over the batch store and runner (docs/batch.md).

    POST   /v1/files                  multipart: file (JSONL), purpose "batch"
    GET    /v1/files                  the caller's files (?purpose=)
    GET    /v1/files/{id}             one file's object
    GET    /v1/files/{id}/content     its bytes (input, output and error files alike)
    DELETE /v1/files/{id}
    POST   /v1/batches                {"input_file_id", "endpoint", "completion_window", "metadata"}
    GET    /v1/batches                ?after=&limit= (newest first)
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

Files and batches belong to the API key that made them (its id); another key gets 404. Without
API keys, every caller shares them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from leanserve.batch.runner import BatchRunner
from leanserve.batch.store import BatchStore, StoreError
from leanserve.gateway.router import caller_key_id
from leanserve.serve.errors import APIError


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., max_length=200)
    endpoint: str = Field(..., max_length=200, description="/v1/chat/completions or /v1/completions")
    completion_window: str = Field("24h", max_length=20, description="24h (OpenAI's only value) or 1h")
    metadata: dict[str, str] | None = Field(None, description="at most 16 pairs")


def _api_error(e: StoreError) -> APIError:
    return APIError(e.status, e.message, param=e.param, code=e.code)


async def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    """A store call on a worker thread (file writes, JSONL parsing); its user errors as HTTP ones."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except StoreError as e:
        raise _api_error(e) from None


def install_batch_routes(app: FastAPI, store: BatchStore, runner: BatchRunner, secured: list[Any]) -> None:
    @app.post("/v1/files", tags=["batch"], dependencies=secured, summary="upload a batch input file (JSONL)")
    async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
        content = await file.read()
        obj = await _call(store.add_file, content, file.filename or "upload.jsonl", purpose, caller_key_id(request))
        return obj.to_dict()

    @app.get("/v1/files", tags=["batch"], dependencies=secured)
    async def list_files(request: Request, purpose: str | None = Query(None, max_length=40)) -> dict[str, Any]:
        files = await _call(store.list_files, caller_key_id(request), purpose)
        return {"object": "list", "data": [f.to_dict() for f in files], "has_more": False}

    @app.get("/v1/files/{file_id}", tags=["batch"], dependencies=secured)
    async def get_file(file_id: str, request: Request) -> dict[str, Any]:
        return (await _call(store.get_file, file_id, caller_key_id(request))).to_dict()

    @app.get("/v1/files/{file_id}/content", tags=["batch"], dependencies=secured)
    async def file_content(file_id: str, request: Request) -> Response:
        data = await _call(store.file_content, file_id, caller_key_id(request))
        return Response(data, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}", tags=["batch"], dependencies=secured)
    async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        await _call(store.delete_file, file_id, caller_key_id(request))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", tags=["batch"], dependencies=secured,
              summary="run a file of requests on idle capacity (the batch priority class)")
    async def create_batch(body: BatchCreate, request: Request) -> dict[str, Any]:
        batch = await _call(store.create_batch, body.input_file_id, body.endpoint, body.completion_window,
                            body.metadata, caller_key_id(request))
        runner.poke()
        return batch

    @app.get("/v1/batches", tags=["batch"], dependencies=secured)
    async def list_batches(request: Request, after: str | None = Query(None, max_length=200),
                           limit: int = Query(20)) -> dict[str, Any]:
        page, more = await _call(store.list_batches, caller_key_id(request), after, limit)
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": more}

    @app.get("/v1/batches/{batch_id}", tags=["batch"], dependencies=secured)
    async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return await _call(store.batch_dict, batch_id, caller_key_id(request))

    @app.post("/v1/batches/{batch_id}/cancel", tags=["batch"], dependencies=secured)
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        batch = await _call(store.cancel, batch_id, caller_key_id(request))
        runner.poke()
        return batch

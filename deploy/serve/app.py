"""The FastAPI application: OpenAI-compatible routes, /health, /metrics and the chat page.

    GET  /v1/models               the served model (with its sampler defaults and strategies)
    POST /v1/chat/completions     chat answers; `stream: true` as server-sent events
    POST /v1/completions          plain-text continuations
    GET  /health, GET /metrics    liveness and Prometheus metrics (no API key needed)
    GET  /                        the chat page (static/index.html), a client of the API

Every refusal is an OpenAI error object (`protocol.ApiError`): 400 for a bad or over-limit
request, 401 for a missing or wrong API key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from dgpt_core.generation.pipeline import TextDiffusionPipeline

from .batching import BatchDecoder, Canvas, DecodeJob, Delta, Event, Failed, Finished
from .jobs import ModelService
from .metrics import ServerMetrics
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from .settings import ServeSettings

STATIC = Path(__file__).parent / "static"


def create_app(pipe: TextDiffusionPipeline, settings: ServeSettings) -> FastAPI:
    """The server's app on a loaded pipeline; its decode worker runs while the app is up."""
    metrics = ServerMetrics()
    service = ModelService(pipe, settings)
    decoder = BatchDecoder(pipe, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        decoder.start()
        yield
        decoder.stop()

    app = FastAPI(title="diffusionGPT", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics, app.state.service = metrics, service

    @app.exception_handler(ApiError)
    async def refuse(request: Request, err: ApiError) -> JSONResponse:
        metrics.count_request(request.url.path, err.status, err.type)
        return JSONResponse(err.body(), status_code=err.status)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The body, refused once it exceeds max_body_bytes (before reading it all when announced)."""
        limit = settings.max_body_bytes
        too_large = ApiError(400, f"request body over this server's limit of {limit} bytes", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return bytes(body)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        metrics.count_request(request.url.path, 200)
        return {"object": "list", "data": [service.describe()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await answer(request, ChatCompletionRequest, service.chat_job, "chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await answer(request, CompletionRequest, service.completion_job, "text")

    async def answer(request: Request, model: type, make_job: Callable, kind: str) -> Response:
        """Authorize, parse the body as `model`, decode its job; the whole answer or its event stream."""
        authorize(request)
        req = parse_body(model, await read_body(request))
        job = make_job(req, asyncio.get_running_loop())
        streamed, usage_chunk = req.stream, req.stream_options is not None and req.stream_options.include_usage
        decoder.submit(job)
        reply = Reply(service.model_id, kind, job.prompt_tokens)
        if streamed:
            metrics.count_request(request.url.path, 200)
            return StreamingResponse(reply.events(job, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            event = await last_event(job)
        finally:
            job.cancelled = True  # no-op once decoded; drops the job if the client left first
        if isinstance(event, Failed):
            raise ApiError(500, event.message, type="server_error")
        metrics.count_request(request.url.path, 200)
        return JSONResponse(reply.whole(event))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_id}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def last_event(job: DecodeJob) -> Finished | Failed:
    """Wait for the job's Finished (or Failed) event, skipping canvases."""
    while True:
        event = await job.events.get()
        if isinstance(event, Finished | Failed):
            return event


class Reply:
    """The OpenAI response bodies of one request: `chat.completion(.chunk)` or `text_completion`."""

    def __init__(self, model_id: str, kind: str, prompt_tokens: int) -> None:
        self.model_id, self.kind, self.prompt_tokens = model_id, kind, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.perf_counter()

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model_id}

    def _usage(self, done: Finished) -> dict[str, int]:
        completion = sum(a.completion_tokens for a in done.answers)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _extras(self, done: Finished) -> dict[str, Any]:
        """The non-OpenAI fields of a finished answer: forward passes, batch and seconds."""
        return {"nfe": done.nfe, "batch_size": done.batch_sequences,
                "seconds": round(time.perf_counter() - self.start, 4)}

    def whole(self, done: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": a.text}, "logprobs": None,
                        "finish_reason": a.finish_reason} for i, a in enumerate(done.answers)]
        else:
            choices = [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                       for i, a in enumerate(done.answers)]
        return {**self._envelope(False), "choices": choices, "usage": self._usage(done), **self._extras(done)}

    def _chunk(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._envelope(True), "choices": [choice]}

    async def events(self, job: DecodeJob, usage_chunk: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: a role chunk per choice (chat), a chunk
        without choices carrying the canvas after every denoising step (when `denoise` was asked),
        a text chunk per choice and finished block (semi-autoregressive and block-causal decoding),
        then per choice the rest of its text and its finish reason, the extras on the last chunk."""
        try:
            sent = [""] * job.rows
            if self.kind == "chat":
                for i in range(job.rows):
                    yield sse(self._chunk(i, None, None, first=True))
            while True:
                event: Event = await job.events.get()
                if isinstance(event, Canvas):
                    denoise = {"step": event.step, "nfe": event.nfe, "canvas": event.texts,
                               "seconds": round(time.perf_counter() - self.start, 4)}
                    yield sse({**self._envelope(True), "choices": [], "denoise": denoise})
                    continue
                if isinstance(event, Delta):
                    for i, text in enumerate(event.texts):
                        if text:
                            sent[i] += text
                            yield sse(self._chunk(i, text, None))
                    continue
                if isinstance(event, Failed):
                    yield sse(ApiError(500, event.message, type="server_error").body())
                    break
                for i, a in enumerate(event.answers):
                    rest = a.text[len(sent[i]):] if a.text.startswith(sent[i]) else a.text
                    if rest or not sent[i]:
                        yield sse(self._chunk(i, rest, None))
                for i, a in enumerate(event.answers):
                    last = i == len(event.answers) - 1
                    yield sse({**self._chunk(i, None, a.finish_reason), **(self._extras(event) if last else {})})
                if usage_chunk:
                    yield sse({**self._envelope(True), "choices": [], "usage": self._usage(event)})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

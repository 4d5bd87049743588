"""The HTTP API: OpenAI-style chat completions, multipart caption/ask, model list, health and the web page.

Every error leaves as JSON in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with a 4xx for the
client's mistakes and a 5xx for the server's; a failed request never takes the server down.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..config import ServeConfig
from ..data.conversations import parse
from ..data.examples import Dialogue, Prompting
from ..errors import DataError
from .engine import BASE, Adapter, Batcher, Engine, Job, Result, Sampling
from .schemas import (
    AskResponse,
    CaptionResponse,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from .uploads import UploadError, bytes_from_url, decode_image

log = logging.getLogger("vlmtune.serve")
STATIC = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
# The multipart fields /v1/caption and /v1/ask share.
ImageFile = Annotated[UploadFile, File(description="the image file (JPEG, PNG, WebP, GIF, BMP or TIFF)")]
ModelName = Annotated[
    str | None, Form(description="base or adapter name from /v1/models (default: first run)")
]
MaxTokens = Annotated[int | None, Form(ge=1, description="longest reply in tokens")]


class APIError(HTTPException):
    pass


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    batcher = Batcher(engine, cfg.max_batch, cfg.batch_wait_ms / 1000)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    from fastapi_offline import FastAPIOffline  # Swagger UI from the package: /docs works offline

    app = FastAPIOffline(
        title="vlmtune",
        description="Captions and answers from a vision-language model and its LoRA adapters.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=int(cfg.max_upload_mb * 2**20))
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)  # added last, so it runs first

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body')}: {e['msg']}" for e in exc.errors()]
        return error_response(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(UploadError)
    async def _bad_upload(request: Request, exc: UploadError) -> JSONResponse:
        return error_response(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def pick(name: str | None) -> Adapter:
        try:
            return engine.adapter(name)
        except KeyError:
            raise APIError(
                404, f"model {name!r} is not served here; GET /v1/models lists: " + ", ".join(engine.adapters)
            ) from None

    def token_limit(asked: int | None) -> int:
        n = asked or cfg.default_max_tokens
        if n > cfg.max_tokens:
            raise APIError(400, f"max_tokens {n} is over this server's limit of {cfg.max_tokens}")
        return n

    async def image_of(data: bytes, what: str) -> Any:
        return await asyncio.to_thread(decode_image, data, cfg.max_pixels, what)  # off the event loop

    async def generate(jobs: list[Job]) -> list[Result]:
        futures = [batcher.submit(j) for j in jobs]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), cfg.timeout)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()  # a job still queued is dropped, not generated
            raise APIError(
                504, f"the request took over {cfg.timeout:g} s; try again or raise --timeout"
            ) from None
        except Exception as e:  # the model failed on this batch: say so, log it, keep serving
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}") from e

    def prompt_for(adapter: Adapter, question: str | None) -> str:
        return engine.family.format_question(question) if question else adapter.prompt

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness and load; the one route that needs no API key, so it names no model."""
        return {"status": "ok", "waiting": batcher.waiting, **engine.stats}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> ModelList:
        base = next(a for a in engine.adapters.values() if a.peft_name == BASE)
        cards = [
            ModelCard(id=a.name, created=created, root=a.source, parent=None if a is base else base.name)
            for a in engine.adapters.values()
        ]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions", tags=["openai"], responses=ERRORS, response_model=ChatResponse)
    async def chat(req: ChatRequest) -> Any:
        """OpenAI chat completions: images as `image_url` data URIs (several, in any user turns, for families
        that read several); the whole conversation (system and earlier turns included) in the family's
        template, as training renders it; the reply continues it."""
        adapter = pick(req.model)
        if req.n > cfg.max_n:
            raise APIError(400, f"n {req.n} is over this server's limit of {cfg.max_n}")
        limit = token_limit(req.max_completion_tokens or req.max_tokens)
        prompting = Prompting(adapter.prompt, None, engine.family.question_template)
        urls, dialogue = _conversation(req, prompting, engine.family.max_images)
        images = [
            await image_of(
                bytes_from_url(url), "the image_url image" if len(urls) == 1 else f"image_url {k + 1}"
            )
            for k, url in enumerate(urls)
        ]
        sampling = Sampling(req.temperature or 0.0, req.top_p or 1.0)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def job(on_text: Any = None) -> Job:
            return Job(
                images,
                dialogue.prompt,
                adapter,
                limit,
                sampling,
                on_text,
                history=dialogue.history,
                turn_images=dialogue.turn_images,
            )

        if req.stream:
            return StreamingResponse(
                _stream(rid, now, adapter, req.n, job, generate), media_type="text/event-stream"
            )
        jobs = [job() for _ in range(req.n)]
        results = await generate(jobs)
        return ChatResponse(
            id=rid,
            created=now,
            model=adapter.name,
            choices=[
                Choice(index=i, message=ChatMessage(content=r.text), finish_reason=r.finish_reason)
                for i, r in enumerate(results)
            ],
            usage=_usage(results),
        )

    @app.post("/v1/caption", tags=["vlmtune"], responses=ERRORS)
    async def caption(
        image: ImageFile,
        model: ModelName = None,
        max_tokens: MaxTokens = None,
    ) -> CaptionResponse:
        """Caption one uploaded image."""
        start = time.perf_counter()
        adapter, limit = pick(model), token_limit(max_tokens)
        picture = await image_of(await image.read(), f"upload {image.filename!r}")
        [r] = await generate([Job(picture, prompt_for(adapter, None), adapter, limit)])
        return CaptionResponse(
            model=adapter.name, caption=r.text, finish_reason=r.finish_reason, seconds=_since(start)
        )

    @app.post("/v1/ask", tags=["vlmtune"], responses=ERRORS)
    async def ask(
        image: ImageFile,
        question: Annotated[str, Form(min_length=1, description="the question about the image")],
        model: ModelName = None,
        max_tokens: MaxTokens = None,
    ) -> AskResponse:
        """Answer a question about one uploaded image."""
        start = time.perf_counter()
        if not question.strip():
            raise APIError(400, "question is blank")
        adapter, limit = pick(model), token_limit(max_tokens)
        picture = await image_of(await image.read(), f"upload {image.filename!r}")
        [r] = await generate([Job(picture, prompt_for(adapter, question), adapter, limit)])
        return AskResponse(
            model=adapter.name,
            question=question,
            answer=r.text,
            finish_reason=r.finish_reason,
            seconds=_since(start),
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 4)


def _usage(results: list[Result]) -> Usage:
    prompt = results[0].prompt_tokens if results else 0  # the n completions share one prompt
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _conversation(req: ChatRequest, prompting: Prompting, most: int | None) -> tuple[list[str], Dialogue]:
    """The image URLs of the conversation (at most `most`), and what to generate from: every turn, read by
    the same parser as training data, rendered as training renders it."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        conversation = parse(messages, training=False)
    except DataError as e:
        raise APIError(400, f"messages: {e}") from None
    urls = list(conversation.images)
    if not urls:
        raise APIError(
            400, "no image: add a content part {'type': 'image_url', 'image_url': {'url': 'data:...'}}"
        )
    if most is not None and len(urls) > most:
        raise APIError(400, f"{len(urls)} images sent; this model takes at most {most} per conversation")
    if not all(isinstance(url, str) and url for url in urls):
        raise APIError(400, "an image_url part has no url")
    return urls, prompting.reply_to(conversation)


async def _stream(rid, created, adapter, n, job, generate) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: a role chunk, text deltas as they are generated, a chunk
    with each choice's finish_reason, then [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def sender(i: int) -> Any:
        return lambda text: loop.call_soon_threadsafe(pieces.put_nowait, (i, text))

    def chunk(i: int, delta: dict[str, str], finish: str | None = None) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": adapter.name,
            "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return f"data: {json.dumps(body)}\n\n"

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    jobs = [job(sender(i)) for i in range(n)]
    task = asyncio.ensure_future(generate(jobs))
    while not (task.done() and pieces.empty()):
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            i, text = getter.result()
            yield chunk(i, {"content": text})
        else:
            getter.cancel()
    try:
        results = task.result()
    except Exception as e:  # the status line has gone out already: the error travels as an event
        status = e.status_code if isinstance(e, HTTPException) else 500
        detail = e.detail if isinstance(e, HTTPException) else f"{type(e).__name__}: {e}"
        yield f"data: {json.dumps({'error': {'message': detail, 'type': 'server_error', 'code': status}})}\n\n"
    else:
        for i, r in enumerate(results):
            yield chunk(i, {}, r.finish_reason)
    yield "data: [DONE]\n\n"


class _BodyLimit:
    """413 for a request body over `limit` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over the limit of {self.limit / 2**20:g} MiB (--max-upload-mb)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, message)(scope, receive, send)
        seen, over = 0, False

        async def counted() -> dict:
            nonlocal seen, over
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                over = True
                return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return msg

        async def guarded_send(msg: dict) -> None:
            if not over:
                await send(msg)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not over:
                raise
        if over:  # whatever the app made of the cut-off body, the client learns why it was cut off
            await error_response(413, message)(scope, receive, send)


class _RequireKey:
    """Every route but /health needs the key: `Authorization: Bearer KEY` (OpenAI clients), `X-API-Key`, or
    HTTP Basic auth with KEY as the password, which is how a browser opening the page sends it."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or self._allowed(dict(scope["headers"])):
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/v1/")
        challenge = 'Bearer realm="vlmtune"' if api else 'Basic realm="vlmtune"'
        response = error_response(
            401, "missing or wrong API key: send Authorization: Bearer KEY", {"WWW-Authenticate": challenge}
        )
        await response(scope, receive, send)

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"")
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        return hmac.compare_digest(given, self.key)

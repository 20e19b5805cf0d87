"""The OpenAI-compatible HTTP server over a `resa.batching.Batcher` (docs/server.md).

The engine runs on the batcher's thread only; the event loop parses requests, tokenizes prompts
in a worker thread, submits them and relays the tokens the batcher hands back
(`loop.call_soon_threadsafe` into one asyncio queue per request). A client that goes away
(streaming or not) has its request cancelled, which frees its KV blocks at the next iteration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..batching import Batcher, QueueFullError
from ..batching import Request as BatchRequest
from ..blocks import CacheTooLargeError
from ..config import ResaConfig
from ..engine import PromptTooLongError
from ..errors import ResaError, UsageError
from ..sampling import SamplingConfig
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, error_body

__all__ = ["ServerSettings", "create_app", "ApiError"]

access_log = logging.getLogger("resa.server.access")

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class ServerSettings:
    """What `resa serve` configures. Request fields left out take these defaults."""

    model_names: list[str] = field(default_factory=lambda: ["resa"])
    resa: ResaConfig = ResaConfig()
    sampling: SamplingConfig = SamplingConfig()
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_num_seqs: int = 16
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    drain_timeout: float = 30.0
    retry_after_s: int = 1


class ApiError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def _error_type(status: int) -> str:
    return {401: "authentication_error", 503: "service_unavailable"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


# ---- ASGI gate: API key, body limit, access log -------------------------------------------------

class _Gate:
    """Pure ASGI middleware (streams pass through untouched): checks the Bearer key (every path
    but /health), refuses bodies over the limit with 413, and writes one access-log line per
    request (method, path, status, duration, tokens)."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        info: dict[str, Any] = {}
        scope["resa.log"] = info
        status = [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._check_key(scope)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                if error is _DISCONNECTED:
                    return
                await error.response()(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            code = status[0] or 500  # nothing sent: an exception on its way to the error handler
            self.metrics.http.labels(self.metrics.model_name, str(code)).inc()
            line = {"method": scope.get("method"), "path": scope.get("path"), "status": code,
                    "duration_ms": round(1000 * (time.monotonic() - start), 1), **info}
            access_log.info(json.dumps(line))

    def _check_key(self, scope) -> ApiError | None:
        key = self.settings.api_key
        if key is None or scope.get("path") == "/health":
            return None
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        type_="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        """Read the whole body (bounded), then hand it to the app from a buffer."""
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, f"request body over the limit of {limit} bytes (resa serve --max-body-bytes)",
                           code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return receive, too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, _DISCONNECTED
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, too_big
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay, None


_DISCONNECTED = ApiError(499, "client disconnected")


# ---- streaming ------------------------------------------------------------------------------------

async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(Response):
    """Server-sent events from an async iterator of `data:` payloads, while watching for the
    client to leave; `on_close` runs however the stream ends (cancels an unfinished request)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        # Not Response.__init__: it would add "content-length: 0".
        self.status_code, self.background = 200, None
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", **headers}
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(_wait_disconnect(receive))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            self.on_close()
        if tasks[0].done() and not tasks[0].cancelled() and tasks[0].exception() is not None:
            if not isinstance(tasks[0].exception(), OSError):  # a send to a closed connection is a disconnect
                raise tasks[0].exception()


# ---- the app --------------------------------------------------------------------------------------

class _Server:
    """Request handling over one engine and batcher (the routes call into it)."""

    def __init__(self, engine, batcher: Batcher, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine, self.batcher, self.settings, self.metrics = engine, batcher, settings, metrics
        self.draining = False

    # ---- parsing ----

    @staticmethod
    def parse(model, body: bytes):
        if not body.strip():
            raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            first = errors[0]
            if first["type"] == "json_invalid":
                raise ApiError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                               code="invalid_json") from None
            if not first["loc"]:
                raise ApiError(400, "the request body must be a JSON object", code="invalid_json") from None
            param = ".".join(map(str, first["loc"]))
            # A union reports one error per alternative; name the field once.
            fields = sorted({str(e["loc"][0]) for e in errors if e["loc"]})
            detail = first["msg"] if len(fields) == 1 and len(errors) == 1 else \
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:4])
            raise ApiError(400, f"invalid field {param}: {detail}", param=str(first["loc"][0])) from None

    def check_common(self, req) -> str:
        """The model name the response reports; refuses what this server cannot honour."""
        names = self.settings.model_names
        if req.model is not None and req.model not in names:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {', '.join(names)}",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise ApiError(400, f"n = {req.n} is not supported: this server returns exactly one choice (n = 1)",
                           param="n", code="unsupported_value")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of other than 1 is not supported", param="best_of", code="unsupported_value")
        if req.logprobs not in (None, False, 0) or getattr(req, "top_logprobs", None):
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_value")
        if getattr(req, "echo", False):
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_value")
        if getattr(req, "suffix", None):
            raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        if getattr(req, "tools", None):
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported_value")
        return req.model or names[0]

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"prompt is a list of {len(p)} prompts; this server takes one prompt per "
                               "request (send them as separate requests)", param="prompt", code="unsupported_value")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "prompt is empty", param="prompt")
            return self.engine.tokenizer.encode(p)
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        return list(p)

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        tok = self.engine.tokenizer
        if tok.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                       param="messages", code="unsupported_value")
                    parts.append(part["text"])
                content = "".join(parts)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = tok.apply_chat_template(messages)
        except Exception as exc:  # noqa: BLE001 -- a template refusing the conversation (raise_exception)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return tok.encode(text)

    def build(self, req, prompt_ids: list[int], max_tokens: int | None, id_: str) -> BatchRequest:
        s = self.settings
        room = (self.batcher.max_model_len - len(prompt_ids))
        if max_tokens is None:
            max_tokens = min(s.max_tokens, room) if room >= 1 else s.max_tokens
        elif max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        top_k = req.top_k
        if top_k == -1:  # vLLM's spelling of "off"
            top_k = 0
        try:
            sampling = SamplingConfig(
                temperature=s.sampling.temperature if req.temperature is None else req.temperature,
                top_k=s.sampling.top_k if top_k is None else top_k,
                top_p=s.sampling.top_p if req.top_p is None else req.top_p,
                seed=s.sampling.seed if req.seed is None else req.seed)
        except ResaError as exc:
            raise ApiError(400, str(exc), param=str(exc).split(" ")[0]) from None
        try:
            resa = s.resa.with_(**req.resa.changes()) if req.resa is not None else s.resa
        except ResaError as exc:
            raise ApiError(400, f"resa: {exc}", param="resa") from None
        stop = s.stop if req.stop is None else req.stop
        return BatchRequest(prompt_ids, max_tokens=max_tokens, sampling=sampling, resa=resa, stop=stop,
                            eos_token_ids=() if req.ignore_eos else None, id=id_)

    def submit(self, request: BatchRequest) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", type_="service_unavailable",
                           code="shutting_down")
        try:
            self.batcher.submit(request)
        except QueueFullError as exc:
            raise ApiError(503, str(exc), type_="service_unavailable", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except (PromptTooLongError, CacheTooLargeError) as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except UsageError as exc:
            first = str(exc).split(" ", 1)[0]
            param = "prompt" if first.startswith("prompt") else "stop" if first.startswith("stop") else None
            raise ApiError(400, str(exc), param=param) from None

    # ---- one request ----

    async def handle(self, http: Request, chat: bool) -> Response:
        req = self.parse(ChatRequest if chat else CompletionRequest, await http.body())
        model = self.check_common(req)
        try:
            prompt_ids = await run_in_threadpool(self.chat_prompt if chat else self.completion_prompt, req)
        except UsageError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        max_tokens = req.max_tokens
        if chat and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        request = self.build(req, prompt_ids, max_tokens, rid)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_output(r: BatchRequest, ids: list, text: str) -> None:  # the batcher's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (text, r.finished))
            except RuntimeError:  # the event loop is gone (server stopped)
                pass

        request.on_output = on_output
        self.submit(request)
        info = http.scope.get("resa.log", {})
        info.update(id=rid, prompt_tokens=len(request.prompt_ids))
        created = int(time.time())
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            events = self.events(request, queue, chat, model, created, include_usage, info)
            return _EventStream(events, lambda: self.close(request, info), {"X-Request-Id": rid})
        waiter = asyncio.ensure_future(self.until_done(queue))
        gone = asyncio.ensure_future(_wait_disconnect(http.receive))
        try:
            await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
            self.close(request, info)
        if not request.finished:
            return Response(status_code=499)  # nobody reads it
        self.raise_failed(request)
        return JSONResponse(self.body(request, chat, model, created), headers={"X-Request-Id": rid})

    @staticmethod
    async def until_done(queue: asyncio.Queue) -> None:
        while not (await queue.get())[1]:
            pass

    def close(self, request: BatchRequest, info: dict) -> None:
        """However a response ends: cancel the request if it is still running; account it."""
        if not request.finished:
            self.batcher.cancel(request.id)
            info["finish_reason"] = "disconnected"
        elif "finish_reason" not in info:
            info["finish_reason"] = request.finish_reason
            reason = FINISH_REASONS.get(request.finish_reason, request.finish_reason)
            self.metrics.finished.labels(self.metrics.model_name, reason).inc()
            st = request.stats
            if st is not None and st.finished is not None:
                self.metrics.e2e.observe(st.finished - st.arrival)
        info["completion_tokens"] = len(request.output_ids)

    @staticmethod
    def raise_failed(request: BatchRequest) -> None:
        if request.finish_reason == "error":
            raise ApiError(500, f"generation failed: {request.error}", type_="server_error", code="generation_failed")
        if request.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (the server is shutting down)", type_="service_unavailable",
                           code="cancelled")

    @staticmethod
    def usage(request: BatchRequest) -> dict:
        p, c = len(request.prompt_ids), request.stats.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def resa_stats(request: BatchRequest) -> dict:
        st = request.stats
        return {"mode": request.resa.mode, "kv_read_fraction": st.kv_read_fraction,
                "rectifications": st.rectifications, "rectify_widths": st.rectify_widths,
                "cached_tokens": st.cached_tokens,
                "decode_steps": st.decode_steps, "ttft_s": st.ttft,
                **({"verify_windows": st.verify_windows, "drafted": st.drafted, "accepted": st.accepted}
                   if request.resa.mode == "verify" else {})}

    def body(self, request: BatchRequest, chat: bool, model: str, created: int) -> dict:
        reason = FINISH_REASONS.get(request.finish_reason, request.finish_reason)
        text = request.text
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": request.id, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": self.usage(request), "resa": self.resa_stats(request)}

    async def events(self, request: BatchRequest, queue: asyncio.Queue, chat: bool, model: str, created: int,
                     include_usage: bool, info: dict) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, reason: str | None = None, **extra) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                if extra.pop("role", False):
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            return json.dumps({"id": request.id, "object": obj, "created": created, "model": model,
                               "choices": [choice], **extra})

        if chat:
            yield chunk(None, role=True)
        while True:
            # One chunk per generated token; its text may be empty (part of a character, or text
            # that may start a stop string, which the batcher holds back until it knows).
            piece, done = await queue.get()
            if done:
                rest = piece  # the text that came with the finish
                break
            yield chunk(piece)
        if request.finish_reason in ("error", "cancelled"):
            if rest:
                yield chunk(rest)
            try:
                self.raise_failed(request)
            except ApiError as exc:
                yield json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))
        else:
            reason = FINISH_REASONS.get(request.finish_reason, request.finish_reason)
            yield chunk(rest or None, reason, resa=self.resa_stats(request))
            if include_usage:
                yield json.dumps({"id": request.id, "object": obj, "created": created, "model": model,
                                  "choices": [], "usage": self.usage(request), "resa": self.resa_stats(request)})
        yield "[DONE]"


def create_app(engine, settings: ServerSettings | None = None, batcher: Batcher | None = None) -> FastAPI:
    """The server's ASGI app. The batcher (made from the settings unless given) starts with the
    app's lifespan and is drained when it ends; `app.state.server.draining = True` stops
    admission (what SIGTERM does)."""
    settings = settings or ServerSettings()
    if engine.tokenizer is None:
        raise UsageError("the server needs a model with a tokenizer")
    if batcher is None:
        batcher = Batcher(engine, max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
                          max_num_batched_tokens=settings.max_num_batched_tokens, max_waiting=settings.max_waiting,
                          block_size=settings.resa.block_size)
    batcher.check_resa(settings.resa)  # the server's defaults must be settings it can serve
    metrics = ServerMetrics(batcher, settings.model_names[0])
    batcher.observe = metrics.observe
    server = _Server(engine, batcher, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            server.draining = True
            await run_in_threadpool(batcher.shutdown, True, settings.drain_timeout)
            await run_in_threadpool(batcher.shutdown, False, 10.0)

    app = FastAPI(title="resa", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server, app.state.batcher, app.state.metrics = server, batcher, metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse(error_body(message, _error_type(exc.status_code), None, None), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logging.getLogger("resa.server").exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                       "internal_error"), 500)

    @app.get("/health")
    async def health():
        if server.draining or not batcher.alive:
            return JSONResponse({"status": "draining" if server.draining else "stopped"}, 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "resa",
                                            "max_model_len": batcher.max_model_len} for n in settings.model_names]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, chat=True)

    app.add_middleware(_Gate, settings=settings, metrics=metrics)
    return app

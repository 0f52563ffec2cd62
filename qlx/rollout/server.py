"""An OpenAI-compatible HTTP server over a qlx model: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health`` and ``/metrics`` (Prometheus text format).

:class:`OpenAIApp` is a plain ASGI application (no framework) served by uvicorn (:class:`OpenAIServer`), as vLLM and
SGLang are. A request is validated (``qlx.rollout.protocol``, in a worker thread: tokenizing a long prompt must not
stall other streams), its rows are submitted to a generation backend (``qlx.rollout.backend``: the static engine
by default, anything speaking that protocol otherwise), and the backend's chunks are turned into the response as
they arrive: ``stream: true`` sends each chunk's newly final text as a server-sent event. A client that disconnects
(mid-stream or while waiting) gets its request cancelled in the backend. When the backend's queued rows plus the
request's would pass ``ServeLimits.max_queued_rows``, the answer is 429 with ``Retry-After``. A bad request gets a
4xx JSON error in OpenAI's shape (malformed HTTP included: uvicorn's own plain-text 400 is replaced); a failure
inside generation a 500 (an error event when the stream has started); the server keeps serving either way.

For tests and in-process users::

    with serve_in_thread(model, tokenizer, port=0) as base_url:   # e.g. "http://127.0.0.1:53117/v1"
        openai.OpenAI(base_url=base_url, api_key="none").completions.create(model="qlx", prompt="hi")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from uvicorn.protocols.http.h11_impl import H11Protocol

from qlx.rollout.backend import Backend, Chunk, Row, StaticBackend
from qlx.rollout.engine import SamplingSpec
from qlx.rollout.protocol import (
    APIError,
    ChoiceBuilder,
    ParsedRequest,
    ServeLimits,
    models_body,
    parse_request,
    response_body,
    stream_events,
    stream_header,
    usage_event,
)

logger = logging.getLogger(__name__)

_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_GET_PATHS = ("/health", "/metrics")
_OTHER_METHODS = {"PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
_KEEP_ALIVE_S = 30  # idle keep-alive connections close after this (uvicorn's 5 s races clients reusing them)
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)  # long prompts, long outputs
_DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this size so the client sees the 413


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _Disconnected(Exception):
    """The client closed the connection."""


class _RequestStream:
    """One request's :class:`~qlx.rollout.backend.Sink`: backend threads put chunks, the event loop awaits them.

    open_rows: rows whose last chunk has not arrived (0 or ``failed``: the backend is done with the request).
    first_token_at: ``time.monotonic()`` when the first chunk with tokens arrived (None before).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, rows: int):
        self._loop = loop
        self._queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.open_rows = rows
        self.failed = False
        self.first_token_at: float | None = None

    def chunk(self, chunk: Chunk) -> None:
        self._put(chunk)

    def fail(self, error: BaseException) -> None:
        self._put(error)

    def _put(self, item: Chunk | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stopped, nobody waits
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    @property
    def done(self) -> bool:
        return self.failed or self.open_rows == 0

    async def next(self, disconnected: asyncio.Future) -> Chunk:
        """The next chunk; raises _Disconnected once ``disconnected`` is done, APIError 500 if generation failed."""
        get = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({get, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            raise _Disconnected
        item = get.result()
        if isinstance(item, BaseException):
            self.failed = True
            raise APIError(500, f"generation failed: {type(item).__name__}: {item}") from item
        if item.finish_reason is not None:
            self.open_rows -= 1
        if item.tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return item


class _BackendCollector(Collector):
    """The backend's :class:`~qlx.rollout.backend.BackendStats`, read at each scrape."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def collect(self):
        s = self._backend.stats()
        yield GaugeMetricFamily("qlx_queue_depth", "Rows submitted and not yet generating.", value=s.queued_rows)
        yield GaugeMetricFamily("qlx_slots_busy", "Rows generating now.", value=s.busy_slots)
        yield GaugeMetricFamily("qlx_slots_total", "Most rows generating at once.", value=s.total_slots)
        yield GaugeMetricFamily(
            "qlx_tokens_per_second", "Output tokens per second over the backend's latest window.", value=s.tokens_per_s
        )
        yield CounterMetricFamily("qlx_generated_tokens", "Output tokens generated.", value=s.generated_tokens)
        yield CounterMetricFamily("qlx_cancelled_rows", "Rows ended as cancelled.", value=s.cancelled_rows)
        if s.kv_pages_used is not None:
            yield GaugeMetricFamily("qlx_kv_pages_used", "KV cache pages in use.", value=s.kv_pages_used)
        if s.kv_pages_total is not None:
            yield GaugeMetricFamily("qlx_kv_pages_total", "KV cache pages in the pool.", value=s.kv_pages_total)


class _Metrics:
    """The server's Prometheus registry: its own request metrics plus the backend's statistics."""

    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "qlx_requests", "HTTP requests answered, by path and status.", ["path", "status"], registry=self.registry
        )
        self.running = Gauge("qlx_requests_running", "Generation requests in flight.", registry=self.registry)
        self.first_token = Histogram(
            "qlx_time_to_first_token_seconds",
            "From submission to a request's first tokens.",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "qlx_request_seconds",
            "From submission to a generation request's end.",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_BackendCollector(backend))


def _header(scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key == name]


async def _send_json(send, status: int, payload, *, close: bool = False, headers: tuple = ()) -> None:
    data = json.dumps(payload).encode()
    await _send_bytes(send, status, data, b"application/json", close=close, headers=headers)


async def _send_bytes(send, status: int, data: bytes, content_type: bytes, *, close=False, headers=()) -> None:
    """A whole response (uvicorn drops the body of a HEAD answer and keeps its Content-Length)."""
    fields = [(b"Content-Type", content_type), (b"Content-Length", str(len(data)).encode()), *headers]
    if close:
        fields.append((b"Connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": data})


async def _send_error(send, error: APIError, *, close: bool = False, headers: tuple = ()) -> None:
    await _send_json(send, error.status, error.body(), close=close, headers=headers)


async def _read_body(receive, limit: int) -> bytes:
    """The request body, read to its end (what is past ``limit`` bytes is dropped)."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        data = message.get("body", b"")
        if size + len(data) <= limit:
            parts.append(data)
        size += len(data)
        more = message.get("more_body", False)
    return b"".join(parts)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class OpenAIApp:
    """The ASGI application: routes, the 4xx rules, and generation requests against ``backend``.

    stop_token_ids: end every generation (the chat template's end-of-turn tokens), besides a request's own.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer,
        *,
        model_name: str,
        vocab_size: int,
        limits: ServeLimits,
        chat_mode: str = "thinking",
        stop_token_ids: tuple[int, ...] = (),
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.limits = limits
        self.chat_mode = chat_mode
        self.stop_token_ids = stop_token_ids
        self.created = int(time.time())
        self.metrics = _Metrics(backend)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan="off"; nothing else is served
            return
        path = scope["path"].rstrip("/")
        statuses = []

        async def recorded(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        try:
            await self._route(scope, receive, recorded, scope["method"], path)
        except _Disconnected:
            pass
        finally:
            known = path in _ENDPOINTS or path in _GET_PATHS or path.startswith("/v1/models")
            status = str(statuses[0]) if statuses else "none"
            self.metrics.requests.labels(path if known else "other", status).inc()

    async def _route(self, scope, receive, send, method: str, path: str) -> None:
        if method in ("GET", "HEAD"):
            await self._get(send, path)
        elif method == "POST":
            await self._post(scope, receive, send, path)
        elif method in _OTHER_METHODS:
            await self._method_not_allowed(scope, receive, send, method, path)
        else:
            await _send_error(send, APIError(501, f"unsupported method {method!r}"), close=True)

    async def _get(self, send, path: str) -> None:
        if path == "/v1/models":
            await _send_json(send, 200, models_body(self.model_name, self.created))
        elif path == f"/v1/models/{self.model_name}":
            await _send_json(send, 200, models_body(self.model_name, self.created)["data"][0])
        elif path == "/health":
            await _send_json(send, 200, {"status": "ok"})
        elif path == "/metrics":
            data = generate_latest(self.metrics.registry)
            await _send_bytes(send, 200, data, CONTENT_TYPE_LATEST.encode())
        elif path in _ENDPOINTS:
            await _send_error(send, APIError(405, f"{path} takes POST, not GET"))
        else:
            message = f"unknown path {path!r}; this server serves /v1/models, /v1/completions, /v1/chat/completions"
            await _send_error(send, APIError(404, message, code="not_found"))

    async def _method_not_allowed(self, scope, receive, send, method: str, path: str) -> None:
        """405 with ``Allow`` on a known path (404 on others), after reading the body."""
        await _read_body(receive, 0)
        allow = "POST" if path in _ENDPOINTS else "GET" if path.startswith("/v1/models") or path in _GET_PATHS else None
        if allow is None:
            await _send_error(send, APIError(404, f"unknown path {path!r}", code="not_found"), close=True)
            return
        error = APIError(405, f"{path} takes {allow}, not {method}", code="method_not_allowed")
        await _send_error(send, error, close=True, headers=((b"Allow", allow.encode()),))

    async def _post(self, scope, receive, send, path: str) -> None:
        lengths = _header(scope, b"content-length")  # uvicorn's parser (h11) already refused malformed ones
        if b"chunked" in b",".join(_header(scope, b"transfer-encoding")).lower() or not lengths:
            await _send_error(send, APIError(411, "send the request body with a Content-Length header"), close=True)
            return
        length = int(lengths[0])
        if length > self.limits.max_body_bytes:
            if length <= _DRAIN_LIMIT:
                await _read_body(receive, 0)
            message = f"request body of {length} bytes exceeds {self.limits.max_body_bytes} bytes"
            await _send_error(send, APIError(413, message, code="request_too_large"), close=True)
            return
        body = await _read_body(receive, self.limits.max_body_bytes)
        if path not in _ENDPOINTS:
            status = 405 if path.startswith("/v1/models") else 404
            message = f"no POST endpoint at {path!r}; POST to /v1/completions or /v1/chat/completions"
            await _send_error(send, APIError(status, message, code="not_found"))
            return
        try:
            payload = json.loads(body, parse_constant=_refuse_constant)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            await _send_error(send, APIError(400, f"request body is not valid JSON: {error}", code="invalid_json"))
            return
        except RecursionError:
            depth = self.limits.max_json_depth
            await _send_error(
                send, APIError(400, f"request body nests deeper than {depth} levels", code="invalid_json")
            )
            return
        try:
            request = await asyncio.to_thread(self._parse, _ENDPOINTS[path], payload)
            await self._complete(request, receive, send)
        except APIError as error:
            await _send_error(send, error)
        except _Disconnected:
            raise
        except Exception as error:  # noqa: BLE001 - any other failure is a 500, and the server keeps serving
            logger.exception("request to %s failed", path)
            await _send_error(send, APIError(500, f"internal error: {type(error).__name__}: {error}"))

    def _parse(self, endpoint: str, payload) -> ParsedRequest:
        return parse_request(
            endpoint,
            payload,
            tokenizer=self.tokenizer,
            model_name=self.model_name,
            vocab_size=self.vocab_size,
            limits=self.limits,
            chat_mode=self.chat_mode,
        )

    def _rows(self, request: ParsedRequest) -> list[Row]:
        """The request's rows, prompt-major (prompt i, sample j at i * n + j); sample j uses stream i * n + j."""
        seed = secrets.randbits(32) if request.seed is None else request.seed
        stops = tuple(dict.fromkeys(self.stop_token_ids + request.stop_token_ids))
        return [
            Row(
                prompt,
                SamplingSpec(
                    max_new_tokens=request.max_tokens[i],
                    temperature=request.temperature,
                    top_p=request.top_p,
                    top_k=request.top_k,
                    stop_token_ids=stops,
                    seed=seed,
                    stream=i * request.n + j,
                ),
            )
            for i, prompt in enumerate(request.prompts)
            for j in range(request.n)
        ]

    async def _complete(self, request: ParsedRequest, receive, send) -> None:
        """Submit the request, answer from its chunks, and cancel it in the backend unless it ended there."""
        rows = self._rows(request)
        queued = self.backend.stats().queued_rows
        if queued + len(rows) > self.limits.max_queued_rows:
            message = (
                f"the server's queue holds {queued} rows; with this request's {len(rows)} it would pass its budget "
                f"of {self.limits.max_queued_rows}: retry later"
            )
            retry = ((b"Retry-After", str(self.limits.retry_after_s).encode()),)
            await _send_error(send, APIError(429, message, code="rate_limit_exceeded"), headers=retry)
            return
        stream = _RequestStream(asyncio.get_running_loop(), len(rows))
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        self.backend.submit(request_id, rows, stream)
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        self.metrics.running.inc()
        try:
            if request.stream:
                await self._stream(request, len(rows), stream, disconnected, send)
            else:
                builders = await self._collect(request, len(rows), stream, disconnected)
                await _send_json(send, 200, response_body(request, [b.choice() for b in builders]))
        finally:
            self.metrics.running.dec()
            self.metrics.latency.observe(time.monotonic() - started)
            if stream.first_token_at is not None:
                self.metrics.first_token.observe(stream.first_token_at - started)
            disconnected.cancel()
            if not stream.done:
                self.backend.cancel(request_id)

    async def _collect(self, request, rows: int, stream, disconnected) -> list[ChoiceBuilder]:
        builders = [ChoiceBuilder(self.tokenizer, request.stop) for _ in range(rows)]
        while not all(b.finish_reason for b in builders):
            chunk = await stream.next(disconnected)
            builders[chunk.row].feed(chunk.tokens, chunk.logprobs, chunk.finish_reason)
        return builders

    async def _stream(self, request, rows: int, stream, disconnected, send) -> None:
        """Server-sent events as chunks arrive; the response starts with the first chunk (a failure before it is a
        500, as for a non-streamed request)."""
        builders = [ChoiceBuilder(self.tokenizer, request.stop) for _ in range(rows)]
        header = stream_header(request)
        offsets = [0] * rows  # characters of token texts sent per choice (log-probs' text_offset)
        first = [True] * rows
        opened = False
        try:
            while not all(b.finish_reason for b in builders):
                chunk = await stream.next(disconnected)
                delta = builders[chunk.row].feed(chunk.tokens, chunk.logprobs, chunk.finish_reason)
                events = stream_events(
                    request, header, chunk.row, delta, first=first[chunk.row], offset=offsets[chunk.row]
                )
                offsets[chunk.row] += sum(len(t) for t in delta.token_texts)
                first[chunk.row] = first[chunk.row] and not events
                if not opened:
                    opened = True
                    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                await _send_events(send, events)
        except APIError as error:
            if not opened:
                raise
            await _send_events(send, [error.body()], end=True)
            return
        if not opened:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        tail = [usage_event(request, header, [b.choice() for b in builders])] if request.include_usage else []
        await _send_events(send, tail, end=True)


_SSE_HEADERS = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")]


async def _send_events(send, events: list[dict], *, end: bool = False) -> None:
    data = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    if end:
        data += b"data: [DONE]\n\n"
    if data or end:
        await send({"type": "http.response.body", "body": data, "more_body": not end})


class _JSONErrorsH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse (a malformed request line, a bad or
    repeated Content-Length) with OpenAI's JSON error instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        message = "malformed HTTP request: check the request line and the Content-Length header"
        data = json.dumps(APIError(400, message).body()).encode()
        headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(data)).encode())]
        for event in (
            h11.Response(status_code=400, headers=[*headers, (b"Connection", b"close")], reason=b"Bad Request"),
            h11.Data(data=data),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class OpenAIServer:
    """The HTTP server over ``model``: bound at construction (``url`` is known; ``port=0`` picks a free port), the
    backend running; ``serve_forever`` in any thread, ``close`` to stop serving and stop the backend.

    backend: a :class:`~qlx.rollout.backend.Backend` (default: the static engine, :class:`StaticBackend` with
    ``limits.max_rows`` rows, ``batch_wait_s`` and ``prefill_chunk``); ``model`` gives the vocabulary and context
    limits either way.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "qlx",
        limits: ServeLimits | None = None,
        chat_mode: str = "thinking",
        batch_wait_s: float = 0.01,
        prefill_chunk: int = 512,
        backend: Backend | None = None,
    ):
        self.limits = limits or ServeLimits()
        self.model_name = model_name
        vocab_size = model.config.vocab_size
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {vocab_size}; "
                "serve the model with its own tokenizer"
            )
        if self.limits.max_model_len > model.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.limits.max_model_len} exceeds the model's max_position_embeddings "
                f"({model.config.max_position_embeddings})"
            )
        self.backend = backend or StaticBackend(
            model, max_rows=self.limits.max_rows, batch_wait_s=batch_wait_s, prefill_chunk=prefill_chunk
        )
        if self.backend.max_rows < self.limits.max_rows:
            raise ValueError(f"limits.max_rows {self.limits.max_rows} exceeds the backend's {self.backend.max_rows}")
        stops = tuple(
            i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i is not None
        )
        self.app = OpenAIApp(
            self.backend,
            tokenizer,
            model_name=model_name,
            vocab_size=vocab_size,
            limits=self.limits,
            chat_mode=chat_mode,
            stop_token_ids=stops,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        config = uvicorn.Config(
            self.app,
            http=_JSONErrorsH11,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=_KEEP_ALIVE_S,
        )
        self._uvicorn = uvicorn.Server(config)
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self.backend.start()

    @property
    def url(self) -> str:
        """Base URL of the API, ending in ``/v1`` (what ``openai.OpenAI(base_url=...)`` takes)."""
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve until ``close`` (or, in the main thread, Ctrl-C / SIGTERM: uvicorn's graceful shutdown)."""
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def close(self) -> None:
        """Stop serving (waiting for ``serve_forever`` to return), close the socket, stop the backend."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()
        self.socket.close()
        self.backend.close()


@contextlib.contextmanager
def serve_in_thread(model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[str]:
    """Serve ``model`` in a background thread for the duration of the ``with`` block; yields the base URL
    (``http://host:port/v1``). ``port=0`` picks a free port. ``options`` go to :class:`OpenAIServer`."""
    server = OpenAIServer(model, tokenizer, host=host, port=port, **options)
    thread = threading.Thread(target=server.serve_forever, name="qlx-http", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.close()
        thread.join()

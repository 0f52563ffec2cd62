"""An OpenAI-compatible HTTP server over a qlx model: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Standard library only (``http.server.ThreadingHTTPServer``). Each connection gets a handler thread that validates
the request (``qlx.rollout.protocol``) and queues its rows; one :class:`GenerationWorker` thread owns the model and
runs everything queued together as one batched :func:`qlx.rollout.engine.generate_rows` call (it waits
``batch_wait_s`` after the first request for others to join, up to ``limits.max_rows`` rows). A bad request gets a
4xx JSON error in OpenAI's shape; a failure inside generation gets a 500; the server keeps serving either way.

For tests and in-process users::

    with serve_in_thread(model, tokenizer, port=0) as base_url:   # e.g. "http://127.0.0.1:53117/v1"
        openai.OpenAI(base_url=base_url, api_key="none").completions.create(model="qlx", prompt="hi")
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qlx.rollout.engine import SamplingSpec, generate_rows
from qlx.rollout.protocol import (
    APIError,
    ServeLimits,
    finish_choice,
    models_body,
    parse_request,
    response_body,
    stream_events,
)

logger = logging.getLogger(__name__)

_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this size so the client sees the 413
_DIGITS = re.compile(r"[0-9]+")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


@dataclasses.dataclass
class _Job:
    prompts: Sequence[Sequence[int]]
    specs: Sequence[SamplingSpec]
    future: concurrent.futures.Future


class GenerationWorker:
    """The one thread that runs the model. ``submit`` queues rows; queued jobs run together as one batch.

    batches: how many generate calls ran and how many rows each had (for tests and logs).
    """

    def __init__(self, model, *, max_rows: int, batch_wait_s: float = 0.01, prefill_chunk: int = 512):
        self.model = model
        self.max_rows = max_rows
        self.batch_wait_s = batch_wait_s
        self.prefill_chunk = prefill_chunk
        self.batches: list[int] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="qlx-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, prompts: Sequence[Sequence[int]], specs: Sequence[SamplingSpec]) -> concurrent.futures.Future:
        """Queue ``len(prompts)`` rows (at most ``max_rows``); the future resolves to their GenerateResult."""
        if not 0 < len(prompts) <= self.max_rows:
            raise ValueError(f"a job has 1..{self.max_rows} rows, got {len(prompts)}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(prompts, specs, future))
        return future

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """``first`` plus whatever arrives within batch_wait_s and fits; returns (jobs, left-over job, stopping)."""
        jobs, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_rows:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if rows + len(job.prompts) > self.max_rows:
                return jobs, job, False
            jobs.append(job)
            rows += len(job.prompts)
        return jobs, None, False

    def _loop(self) -> None:
        pending, stopping = None, False
        while not stopping or pending is not None:
            first = pending if pending is not None else self._queue.get()
            if first is None:
                return
            jobs, pending, stopping = self._collect(first)
            prompts = [p for job in jobs for p in job.prompts]
            specs = [s for job in jobs for s in job.specs]
            self.batches.append(len(prompts))
            try:
                result = generate_rows(self.model, prompts, specs, prefill_chunk=self.prefill_chunk)
            except Exception as error:  # noqa: BLE001 - reported to every waiting request as a 500
                logger.exception("generation failed for a batch of %d rows", len(prompts))
                for job in jobs:
                    job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                rows = slice(start, start + len(job.prompts))
                job.future.set_result(result.rows(rows))
                start = rows.stop


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; ``serve_forever`` in any thread, ``close`` to stop it and its generation worker."""

    daemon_threads = True

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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self.chat_mode = chat_mode
        self.created = int(time.time())
        self.vocab_size = model.config.vocab_size
        if tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {self.vocab_size}; "
                "serve the model with its own tokenizer"
            )
        if self.limits.max_model_len > model.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.limits.max_model_len} exceeds the model's max_position_embeddings "
                f"({model.config.max_position_embeddings})"
            )
        self.stop_token_ids = tuple(
            i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i is not None
        )
        self.worker = GenerationWorker(
            model, max_rows=self.limits.max_rows, batch_wait_s=batch_wait_s, prefill_chunk=prefill_chunk
        )
        super().__init__((host, port), _Handler)
        self.worker.start()

    @property
    def url(self) -> str:
        """Base URL of the API, ending in ``/v1`` (what ``openai.OpenAI(base_url=...)`` takes)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.worker.stop()

    def complete(self, endpoint: str, body) -> tuple[object, list[dict] | None]:
        """Run one parsed request: (JSON response, or None and the stream's events)."""
        request = parse_request(
            endpoint,
            body,
            tokenizer=self.tokenizer,
            model_name=self.model_name,
            vocab_size=self.vocab_size,
            limits=self.limits,
            chat_mode=self.chat_mode,
        )
        seed = secrets.randbits(32) if request.seed is None else request.seed
        stops = tuple(dict.fromkeys(self.stop_token_ids + request.stop_token_ids))
        prompts, specs = [], []
        for i, prompt in enumerate(request.prompts):
            for j in range(request.n):
                prompts.append(prompt)
                specs.append(
                    SamplingSpec(
                        max_new_tokens=request.max_tokens[i],
                        temperature=request.temperature,
                        top_p=request.top_p,
                        top_k=request.top_k,
                        stop_token_ids=stops,
                        seed=seed,
                        stream=i * request.n + j,
                    )
                )
        try:
            result = self.worker.submit(prompts, specs).result()
        except Exception as error:
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}") from error
        choices = [
            finish_choice(tokens, logprobs, reason, tokenizer=self.tokenizer, stop=request.stop)
            for tokens, logprobs, reason in zip(
                result.sequences(),
                [row[:n] for row, n in zip(result.logprobs, result.lengths, strict=True)],
                result.finish_reasons,
                strict=True,
            )
        ]
        if request.stream:
            return None, stream_events(request, choices)
        return response_body(request, choices), None


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.info("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: object, *, close: bool = False, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the GET answer's status and headers, no body
            self.wfile.write(data)

    def _send_error(self, error: APIError, *, close: bool = False) -> None:
        self._send_json(error.status, error.body(), close=close)

    def _send_stream(self, events: list[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, models_body(self.server.model_name, self.server.created))
        elif path == f"/v1/models/{self.server.model_name}":
            self._send_json(200, models_body(self.server.model_name, self.server.created)["data"][0])
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path in _ENDPOINTS:
            self._send_error(APIError(405, f"{path} takes POST, not GET"))
        else:
            self._send_error(
                APIError(
                    404,
                    f"unknown path {path!r}; this server serves /v1/models, /v1/completions, /v1/chat/completions",
                    code="not_found",
                )
            )

    do_HEAD = do_GET  # noqa: N815

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method: 501) as OpenAI JSON, not HTML."""
        error = APIError(code, message or HTTPStatus(code).phrase)
        if self.command == "HEAD" or code < 200 or code in (204, 304):
            self.send_response(code, message)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        self._send_error(error, close=True)

    def _method_not_allowed(self) -> None:
        """405 with ``Allow`` for the methods this server has no handler for on a known path (404 on others)."""
        length = self.headers.get("Content-Length", "").strip()
        if _DIGITS.fullmatch(length):
            self._drain(int(length))
        path = self.path.split("?")[0].rstrip("/")
        allow = "POST" if path in _ENDPOINTS else "GET" if path.startswith("/v1/models") or path == "/health" else None
        if allow is None:
            self._send_error(APIError(404, f"unknown path {path!r}", code="not_found"), close=True)
            return
        self._send_json(
            405,
            APIError(405, f"{path} takes {allow}, not {self.command}", code="method_not_allowed").body(),
            close=True,
            headers={"Allow": allow},
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed  # noqa: N815

    def _drain(self, length: int) -> None:
        """Read and drop a body of ``length`` bytes (none above _DRAIN_LIMIT), so the client reads the answer."""
        remaining = length if length <= _DRAIN_LIMIT else 0
        while remaining > 0:
            data = self.rfile.read(min(remaining, 1 << 16))
            if not data:
                break
            remaining -= len(data)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering with an error (missing length, oversized, bad encoding)."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or not lengths:
            self._send_error(APIError(411, "send the request body with a Content-Length header"), close=True)
            return None
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            shown = lengths[0] if len(lengths) == 1 else lengths
            self._send_error(APIError(400, f"bad Content-Length {shown!r}: need one non-negative integer"), close=True)
            return None
        length = int(lengths[0])
        if length > self.server.limits.max_body_bytes:
            self._drain(length)
            self._send_error(
                APIError(
                    413,
                    f"request body of {length} bytes exceeds {self.server.limits.max_body_bytes} bytes",
                    code="request_too_large",
                ),
                close=True,
            )
            return None
        return self.rfile.read(length)

    def do_POST(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0].rstrip("/")
        body = self._read_body()
        if body is None:
            return
        if path not in _ENDPOINTS:
            status = 405 if path.startswith("/v1/models") else 404
            self._send_error(
                APIError(
                    status,
                    f"no POST endpoint at {path!r}; POST to /v1/completions or /v1/chat/completions",
                    code="not_found",
                )
            )
            return
        try:
            payload = json.loads(body, parse_constant=_refuse_constant)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            self._send_error(APIError(400, f"request body is not valid JSON: {error}", code="invalid_json"))
            return
        except RecursionError:
            depth = self.server.limits.max_json_depth
            self._send_error(APIError(400, f"request body nests deeper than {depth} levels", code="invalid_json"))
            return
        try:
            response, events = self.server.complete(_ENDPOINTS[path], payload)
        except APIError as error:
            self._send_error(error)
            return
        except Exception as error:  # noqa: BLE001 - any other failure is a 500, and the server keeps serving
            logger.exception("request to %s failed", path)
            self._send_error(APIError(500, f"internal error: {type(error).__name__}: {error}"))
            return
        if events is None:
            self._send_json(200, response)
        else:
            self._send_stream(events)


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

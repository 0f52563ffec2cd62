"""The generation backend protocol the HTTP server (``qlx.rollout.server``) speaks, and the static engine behind it.

A backend owns the model and runs in its own thread(s); the server only submits, cancels and reads statistics::

    backend.submit(request_id, rows, sink)   # rows: Row(prompt, SamplingSpec) of one request, prompt-major
    backend.cancel(request_id)                # the client went away; a no-op for an unknown or finished id
    backend.stats() -> BackendStats           # read by /metrics and the server's queue budget (429)
    backend.max_rows                          # most rows one request may have
    backend.start(); backend.close()          # close finishes (or cancels) what was submitted, then returns

Results flow back through ``sink`` (:class:`Sink`), from any backend thread, without blocking:

- ``sink.chunk(Chunk(row, tokens, logprobs, finish_reason))``: the next tokens of row ``row`` (in order, as the
  backend produces them: one chunk per row for the static engine, one per burst for a continuous one).
  ``finish_reason`` is None until the row's last chunk, which carries "stop" (its last token is a stop token),
  "length" (``max_new_tokens`` reached) or "cancelled" (possibly with no tokens). Every row of a submitted request
  gets exactly one last chunk, cancelled or not, unless ``sink.fail`` is called.
- ``sink.fail(error)``: generation of the request failed; no chunk follows.

Two backends here:

- :class:`StaticBackend`: the static engine (``generate_rows``); requests queued within ``batch_wait_s`` of the first
  one run together as one batch, and each row comes back as one chunk when the batch ends.
- :class:`ContinuousBackend`: any continuous-batching engine with ``submit / step / cancel / stats``
  (``qlx.rollout.continuous.ContinuousEngine``): one thread loops ``step()`` while anything is admitted, submits and
  cancels between steps (a request's rows of one prompt are one group), and sends each row's new tokens after every
  step: requests join the running batch and stream per burst.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from qlx.rollout.engine import SamplingSpec, generate_rows

logger = logging.getLogger(__name__)

FINISH_CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to generate: ``spec.max_new_tokens`` tokens at most after ``prompt``."""

    prompt: tuple[int, ...]
    spec: SamplingSpec


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The next tokens of row ``row`` of a request; ``logprobs[i]`` is the sampling log-prob of ``tokens[i]``
    (``qlx.rollout.sampling``). ``finish_reason``: None, or on the row's last chunk "stop" | "length" | "cancelled".
    """

    row: int
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class BackendStats:
    """What a backend reports (``/metrics``; ``queued_rows`` also drives the server's 429).

    queued_rows: submitted rows not yet generating. busy_slots / total_slots: rows generating now / the most at once.
    generated_tokens: tokens produced since start (a counter). tokens_per_s: output tokens per second over the most
    recent window the backend measures (the static engine: its last batch). cancelled_rows: rows ended "cancelled".
    kv_pages_used / kv_pages_total: the paged KV pool's pages in use / in all (None without a paged cache).
    """

    queued_rows: int
    busy_slots: int
    total_slots: int
    generated_tokens: int
    tokens_per_s: float
    cancelled_rows: int
    kv_pages_used: int | None = None
    kv_pages_total: int | None = None


class Sink(Protocol):
    """Where a backend sends one request's results (any thread; must not block)."""

    def chunk(self, chunk: Chunk) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Backend(Protocol):
    """A generation backend (see the module docstring for the contract)."""

    max_rows: int

    def start(self) -> None: ...

    def submit(self, request_id: str, rows: Sequence[Row], sink: Sink) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class _Job:
    request_id: str
    rows: Sequence[Row]
    sink: Sink


class _EngineThread:
    """What both backends share: ``max_rows`` rows per request, one daemon thread (``_loop``) that owns the engine
    and reads ``_inbox`` until it holds None, and a lock for what the request threads read."""

    def __init__(self, *, max_rows: int, thread_name: str):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (got {max_rows})")
        self.max_rows = max_rows
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._lock = threading.Lock()

    def _loop(self) -> None:
        """The engine thread's body (each backend's own)."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread once it has read the None (each backend finishes or cancels what was submitted)."""
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _check_rows(self, rows: Sequence[Row]) -> None:
        if not 0 < len(rows) <= self.max_rows:
            raise ValueError(f"a request has 1..{self.max_rows} rows, got {len(rows)}")


class StaticBackend(_EngineThread):
    """Today's static engine on the backend protocol: one thread runs everything queued together as one batched
    :func:`qlx.rollout.engine.generate_rows` call (it waits ``batch_wait_s`` after the first request for others to
    join, up to ``max_rows`` rows), then sends each row as one chunk. A request cancelled while queued is dropped
    before its batch runs; one cancelled while its batch runs gets "cancelled" rows when the batch ends.

    batches: how many generate calls ran and how many rows each had (for tests and logs).
    """

    def __init__(self, model, *, max_rows: int, batch_wait_s: float = 0.01, prefill_chunk: int = 512):
        super().__init__(max_rows=max_rows, thread_name="qlx-generation")
        self.model = model
        self.batch_wait_s = batch_wait_s
        self.prefill_chunk = prefill_chunk
        self.batches: list[int] = []
        self._cancelled: set[str] = set()
        self._live: set[str] = set()  # requests submitted and not finished
        self._queued_rows = self._busy_rows = self._generated = self._cancelled_rows = 0
        self._tokens_per_s = 0.0

    def submit(self, request_id: str, rows: Sequence[Row], sink: Sink) -> None:
        self._check_rows(rows)
        with self._lock:
            self._queued_rows += len(rows)
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already submitted")
            self._live.add(request_id)
        self._inbox.put(_Job(request_id, rows, sink))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live:
                self._cancelled.add(request_id)

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                queued_rows=self._queued_rows,
                busy_slots=self._busy_rows,
                total_slots=self.max_rows,
                generated_tokens=self._generated,
                tokens_per_s=self._tokens_per_s,
                cancelled_rows=self._cancelled_rows,
            )

    def _finish(self, job: _Job) -> bool:
        """Forget ``job``; True when it was cancelled (its rows were then sent "cancelled")."""
        with self._lock:
            cancelled = job.request_id in self._cancelled
            self._live.discard(job.request_id)
            self._cancelled.discard(job.request_id)
            if cancelled:
                self._cancelled_rows += len(job.rows)
        if cancelled:
            for row in range(len(job.rows)):
                job.sink.chunk(Chunk(row, (), (), FINISH_CANCELLED))
        return cancelled

    def _take(self, job: _Job) -> bool:
        """Move ``job`` from the queue to the running batch; False (and its rows sent "cancelled") if cancelled."""
        with self._lock:
            self._queued_rows -= len(job.rows)
            cancelled = job.request_id in self._cancelled
        return not (cancelled and self._finish(job))

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """``first`` plus whatever arrives within batch_wait_s and fits; returns (jobs, left-over job, stopping)."""
        jobs = [first] if self._take(first) else []
        rows = sum(len(job.rows) for job in jobs)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_rows:
            try:
                job = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if rows + len(job.rows) > self.max_rows:
                return jobs, job, False
            if self._take(job):
                jobs.append(job)
                rows += len(job.rows)
        return jobs, None, False

    def _loop(self) -> None:
        pending, stopping = None, False
        while not stopping or pending is not None:
            first = pending if pending is not None else self._inbox.get()
            if first is None:
                return
            jobs, pending, stopping = self._collect(first)
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        self.batches.append(len(rows))
        with self._lock:
            self._busy_rows = len(rows)
        started = time.monotonic()
        try:
            result = generate_rows(
                self.model, [r.prompt for r in rows], [r.spec for r in rows], prefill_chunk=self.prefill_chunk
            )
        except Exception as error:  # noqa: BLE001 - reported to every request of the batch (a 500)
            logger.exception("generation failed for a batch of %d rows", len(rows))
            with self._lock:
                self._busy_rows = 0
            for job in jobs:
                self._finish(job)
                job.sink.fail(error)
            return
        with self._lock:
            self._busy_rows = 0
            self._generated += int(result.lengths.sum())
            self._tokens_per_s = float(result.lengths.sum()) / max(time.monotonic() - started, 1e-9)
        start = 0
        for job in jobs:
            part = result.rows(slice(start, start + len(job.rows)))
            start += len(job.rows)
            if self._finish(job):
                continue
            for row, (tokens, n, reason) in enumerate(
                zip(part.sequences(), part.lengths, part.finish_reasons, strict=True)
            ):
                job.sink.chunk(Chunk(row, tuple(tokens), tuple(float(x) for x in part.logprobs[row, :n]), reason))


@dataclasses.dataclass
class _Live:
    """A request on the continuous engine: its groups (first row, engine handle) and tokens sent per row."""

    sink: Sink
    groups: list
    sent: list[int]
    open: set[int]


class ContinuousBackend(_EngineThread):
    """A continuous-batching engine on the backend protocol: ``engine`` has ``submit(prompt, specs) -> handle``,
    ``step()``, ``cancel(handle)`` and ``stats()`` (``qlx.rollout.continuous.ContinuousEngine``: handles with
    ``tokens`` / ``logprobs`` / ``finish_reasons`` per sample, stats with ``queue_depth``, ``slots_busy``,
    ``max_slots``, ``pages_used``, ``pages_total``, ``generated_tokens``, ``tokens_per_second``).

    One thread owns the engine: between steps it submits new requests (each run of a request's rows with the same
    prompt is one group, so a prompt's n samples share its prefill) and cancels, then steps and sends every row's new
    tokens as one chunk, so requests join the running batch and stream per burst. ``max_rows`` (rows per request)
    must not pass the engine's slots. ``stats()`` is the engine's as of the last step (the engine is not
    thread-safe); ``queued_rows`` = unfinished rows not in a slot.
    """

    def __init__(self, engine, *, max_rows: int):
        super().__init__(max_rows=max_rows, thread_name="qlx-continuous")
        self.engine = engine
        self._live: dict[str, _Live] = {}
        self._open_rows = self._cancelled_rows = 0
        self._stats = BackendStats(0, 0, max_rows, 0, 0.0, 0)

    def submit(self, request_id: str, rows: Sequence[Row], sink: Sink) -> None:
        self._check_rows(rows)
        with self._lock:
            self._open_rows += len(rows)
        self._inbox.put(("submit", request_id, rows, sink))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def stats(self) -> BackendStats:
        with self._lock:
            queued = max(0, self._open_rows - self._stats.busy_slots)
            return dataclasses.replace(self._stats, queued_rows=queued, cancelled_rows=self._cancelled_rows)

    def _loop(self) -> None:
        while True:
            items = [] if self._live else [self._inbox.get()]  # idle: wait for work; busy: take what came
            while not self._inbox.empty():
                items.append(self._inbox.get())
            for item in items:
                if item is None:
                    for request_id in list(self._live):
                        self._cancel(request_id)
                    self._emit()
                    return
                if item[0] == "submit":
                    self._submit(*item[1:])
                else:
                    self._cancel(item[1])
            if self._live:
                try:
                    self.engine.step()
                except Exception as error:  # noqa: BLE001 - every live request gets it (a 500); the thread goes on
                    logger.exception("a continuous-engine step failed")
                    for request_id in list(self._live):
                        self._fail(request_id, error)
            self._emit()

    def _submit(self, request_id: str, rows: Sequence[Row], sink: Sink) -> None:
        groups: list[tuple[int, tuple[int, ...], list[SamplingSpec]]] = []
        for i, row in enumerate(rows):
            if groups and groups[-1][1] == row.prompt:
                groups[-1][2].append(row.spec)
            else:
                groups.append((i, row.prompt, [row.spec]))
        live = _Live(sink, [], [0] * len(rows), set(range(len(rows))))
        self._live[request_id] = live
        try:
            for first, prompt, specs in groups:
                live.groups.append((first, self.engine.submit(prompt, specs)))
        except Exception as error:  # noqa: BLE001 - a request the engine refuses is a 500 for it alone
            self._fail(request_id, error)

    def _cancel(self, request_id: str) -> None:
        live = self._live.get(request_id)
        for _, handle in live.groups if live else ():
            self.engine.cancel(handle)

    def _fail(self, request_id: str, error: BaseException) -> None:
        live = self._live.pop(request_id)
        for _, handle in live.groups:
            self.engine.cancel(handle)
        with self._lock:
            self._open_rows -= len(live.open)
        live.sink.fail(error)

    def _emit(self) -> None:
        """Refresh the statistics, send every row's tokens since the last call, forget finished requests."""
        s = self.engine.stats()
        with self._lock:
            self._stats = BackendStats(
                queued_rows=0,
                busy_slots=s.slots_busy,
                total_slots=s.max_slots,
                generated_tokens=s.generated_tokens,
                tokens_per_s=s.tokens_per_second,
                cancelled_rows=0,
                kv_pages_used=s.pages_used,
                kv_pages_total=s.pages_total,
            )
        for request_id, live in list(self._live.items()):
            for first, handle in live.groups:
                tokens, logprobs, reasons = handle.tokens, handle.logprobs, handle.finish_reasons
                for g, reason in enumerate(reasons):
                    row, sent = first + g, live.sent[first + g]
                    if row not in live.open or (len(tokens[g]) == sent and reason is None):
                        continue
                    live.sent[row] = len(tokens[g])
                    if reason is not None:
                        live.open.discard(row)
                        with self._lock:
                            self._open_rows -= 1
                            self._cancelled_rows += reason == FINISH_CANCELLED
                    live.sink.chunk(Chunk(row, tuple(tokens[g][sent:]), tuple(logprobs[g][sent:]), reason))
            if not live.open:
                del self._live[request_id]

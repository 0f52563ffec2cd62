"""The one client for OpenAI-compatible chat endpoints (``qlx serve``, vLLM, SGLang, hosted APIs), on the official
``openai`` package. Synthesis filters (``qlx.data``), the RL judge (``qlx.rl.rewards.judge``) and the evaluator
(``qlx.eval``) all use it; it lives at the top of the package, importing only ``openai`` and the standard library, so
every layer may import it.

    client = OpenAIClient(ClientConfig("http://127.0.0.1:8000/v1", "qwen3", timeout_s=3600, concurrency=16))
    text = client.chat([{"role": "user", "content": "hi"}], temperature=0.7, seed=3)
    done = client.complete(messages, stream=True)        # Completion(text, finish_reason, usage)
    for i, result in client.map(lambda m: client.complete(m), many): ...   # at most `concurrency` in flight

Retries: connection errors, timeouts, HTTP 429 and 5xx, and 200 replies that are not a chat completion (a body that
is not JSON, content that is not a string) are retried ``max_retries`` times with exponential backoff
(``backoff_s · 2^(k-1)``, at most ``max_backoff_s``); any other HTTP status fails at once with the server's message.
The ``openai`` package's own retry loop is off (``max_retries=0``), so this is the only one.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import openai


class LLMError(RuntimeError):
    """The endpoint failed or kept replying with something unusable; ``attempts`` requests were made."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """base_url: the API root holding ``/chat/completions`` (e.g. "http://127.0.0.1:8000/v1"); model: the model id
    the server serves; api_key: sent as a bearer token (None: a placeholder, for local servers); timeout_s: seconds
    per request (long generations: stream, and set an hour); max_retries: extra attempts after the first;
    backoff_s, max_backoff_s: the wait before retry k is min(backoff_s · 2^(k-1), max_backoff_s); concurrency: the
    most requests :meth:`OpenAIClient.map` keeps in flight."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    concurrency: int = 8

    def __post_init__(self):
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0; max_retries, backoff_s and max_backoff_s must be >= 0")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    @classmethod
    def from_env(cls, env=None, **overrides) -> "ClientConfig":
        """``QLX_LLM_URL`` (else ``OPENAI_BASE_URL``), ``QLX_LLM_MODEL``, ``QLX_LLM_API_KEY`` (else
        ``OPENAI_API_KEY``)."""
        env = os.environ if env is None else env
        url = env.get("QLX_LLM_URL") or env.get("OPENAI_BASE_URL")
        if not url:
            raise ValueError(
                "set QLX_LLM_URL (or OPENAI_BASE_URL) to the endpoint's base URL, e.g. http://127.0.0.1:8000/v1"
            )
        model = env.get("QLX_LLM_MODEL")
        if not model:
            raise ValueError("set QLX_LLM_MODEL to the model name the endpoint serves")
        key = env.get("QLX_LLM_API_KEY") or env.get("OPENAI_API_KEY")
        return cls(base_url=url, model=model, api_key=key, **overrides)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One chat reply: its text, the server's finish reason ("stop", "length", ...; None if not sent) and usage
    ({"prompt_tokens", "completion_tokens", "total_tokens"}; None if not sent)."""

    text: str
    finish_reason: str | None
    usage: dict | None


class _Unusable(Exception):
    pass


_RETRIED = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError, _Unusable)


def _usage(usage) -> dict | None:
    if usage is None:
        return None
    return {k: getattr(usage, k, None) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


class OpenAIClient:
    """Chat completions against one endpoint; counts ``requests`` and ``retries`` (thread-safe)."""

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], None] = time.sleep):
        self.config, self.sleep = config, sleep
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()
        self._api = openai.OpenAI(
            base_url=config.base_url, api_key=config.api_key or "none", timeout=config.timeout_s, max_retries=0
        )

    def _count(self, retry: bool) -> None:
        with self._lock:
            self.requests += 1
            self.retries += int(retry)

    def _once(self, body: dict, stream: bool) -> Completion:
        try:
            if not stream:
                reply = self._api.chat.completions.create(**body)
                choice = reply.choices[0]
                text, finish, usage = choice.message.content, choice.finish_reason, _usage(reply.usage)
            else:
                parts, finish, usage = [], None, None
                for chunk in self._api.chat.completions.create(
                    **body, stream=True, stream_options={"include_usage": True}
                ):
                    usage = _usage(chunk.usage) or usage
                    if chunk.choices:
                        delta = chunk.choices[0].delta
                        if delta is not None and delta.content:
                            parts.append(delta.content)
                        finish = chunk.choices[0].finish_reason or finish
                text = "".join(parts)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, openai.APIResponseValidationError) as e:
            raise _Unusable(f"reply is not a chat completion ({type(e).__name__}: {e})") from None
        if not isinstance(text, str):
            raise _Unusable("reply has no string message content")
        return Completion(text, finish, usage)

    def complete(
        self,
        messages: list[dict],
        *,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        top_p: float | None = None,
        seed: int | None = None,
        stream: bool = False,
        extra_body: dict | None = None,
    ) -> Completion:
        """One chat completion (``stream=True``: the reply arrives as server-sent events, so an hour-long generation
        keeps the connection busy); retried as the module docstring says. Raises :class:`LLMError`."""
        body = {"model": self.config.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        if extra_body:
            body["extra_body"] = extra_body
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        attempts = self.config.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                self.sleep(min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s))
            self._count(retry=attempt > 0)
            try:
                return self._once(body, stream)
            except openai.APIStatusError as e:
                detail = e.response.text[:300]
                if not isinstance(e, _RETRIED):
                    raise LLMError(f"{url}: HTTP {e.status_code}: {detail}", attempt + 1) from None
                last = f"HTTP {e.status_code}: {detail}"
            except _RETRIED as e:
                last = f"{type(e).__name__}: {e}"
        raise LLMError(f"{url}: no usable reply after {attempts} attempts; last error: {last}", attempts)

    def chat(self, messages: list[dict], **options) -> str:
        """The reply text of :meth:`complete`."""
        return self.complete(messages, **options).text

    def map(self, fn: Callable, items: Iterable) -> Iterator[tuple[int, object]]:
        """``fn(item)`` for every item on ``concurrency`` threads; yields ``(index, result)`` as each finishes, the
        result being the exception when ``fn`` raised (so one failure loses nothing else). Items are submitted
        lazily: at most ``2 · concurrency`` are queued at a time."""
        limit = 2 * self.config.concurrency
        with concurrent.futures.ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="qlx-llm") as pool:
            pending = {}
            for index, item in enumerate(items):
                pending[pool.submit(fn, item)] = index
                if len(pending) >= limit:
                    yield from self._drain(pending, concurrent.futures.FIRST_COMPLETED)
            yield from self._drain(pending, concurrent.futures.ALL_COMPLETED)

    @staticmethod
    def _drain(pending: dict, when) -> Iterator[tuple[int, object]]:
        done, _ = concurrent.futures.wait(list(pending), return_when=when)
        for future in done:
            index = pending.pop(future)
            error = future.exception()
            yield index, future.result() if error is None else error


_FENCE = "```"


def parse_json_reply(text: str):
    """The JSON object or array in a model reply (text after the last ``</think>``; code fences and surrounding
    prose ignored); ``ValueError`` if none."""
    text = text.rsplit("</think>", 1)[-1].strip()
    start = text.find(_FENCE)
    end = text.find(_FENCE, start + len(_FENCE)) if start >= 0 else -1
    if end >= 0:  # str.find, not a regex: a fence followed by a long blank run must not backtrack quadratically
        text = text[start + len(_FENCE) : end].removeprefix("json")
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError(f"no JSON in reply {text[:120]!r}")
    decoded, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
    return decoded

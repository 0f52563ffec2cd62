"""A small client for OpenAI-compatible chat endpoints (``qlx serve``, vLLM, any hosted API), standard library only.

``LLMConfig.from_env()`` reads ``QLX_LLM_URL`` (the base URL, e.g. ``http://127.0.0.1:8000/v1``), ``QLX_LLM_MODEL`` and
``QLX_LLM_API_KEY`` (falling back to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``). Requests time out; connection errors,
timeouts, HTTP 429/5xx and malformed replies are retried with exponential backoff; other 4xx fail at once with the
server's message. Replies are validated (``choices[0].message.content`` must be a string).
"""

import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request


class LLMError(RuntimeError):
    """The endpoint failed or kept replying with something unusable."""


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5

    def __post_init__(self):
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("timeout_s must be > 0; max_retries and backoff_s must be >= 0")

    @classmethod
    def from_env(cls, env=None, **overrides) -> "LLMConfig":
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


class _Unusable(Exception):
    pass


def _content(payload: bytes) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _Unusable(f"reply is not a chat completion ({type(e).__name__}: {e})") from None
    if not isinstance(content, str):
        raise _Unusable("reply has no string message content")
    return content


_FENCE = "```"


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>`` (the whole text when there is none)."""
    return text.rsplit("</think>", 1)[-1].strip()


def parse_json_reply(text: str):
    """The JSON object or array in a model reply (code fences and surrounding prose ignored); ``ValueError`` if none."""
    text = strip_thinking(text)
    start = text.find(_FENCE)
    end = text.find(_FENCE, start + len(_FENCE)) if start >= 0 else -1
    if end >= 0:  # str.find, not a regex: a fence followed by a long blank run must not backtrack quadratically
        text = text[start + len(_FENCE) : end].removeprefix("json")
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError(f"no JSON in reply {text[:120]!r}")
    decoded, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
    return decoded


class ChatClient:
    """``chat(messages) -> str`` against ``{base_url}/chat/completions``; counts requests and retries."""

    def __init__(self, config: LLMConfig, *, sleep=time.sleep):
        self.config, self.sleep = config, sleep
        self.requests = 0
        self.retries = 0

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024, seed=None) -> str:
        body = {"model": self.config.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        last = "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.retries += 1
                self.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            self.requests += 1
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as reply:
                    return _content(reply.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise LLMError(f"{url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except _Unusable as e:
                last = str(e)
        raise LLMError(f"{url}: no usable reply after {self.config.max_retries + 1} attempts; last error: {last}")

"""The OpenAI wire format: validate a request body into generation rows, and turn generated tokens into a response.

Pure functions of JSON-ready data and a tokenizer (``qlx.data.tokenizer.Tokenizer``); no sockets, no model. Every
rejected request raises :class:`APIError`, which carries the HTTP status and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the offending field.

Supported fields (anything else is rejected with 400, so nothing is silently ignored):

- both endpoints: ``model``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` (vLLM extension; 0 or -1 is off),
  ``n``, ``stop`` (string or up to 4 strings), ``stop_token_ids`` (vLLM extension), ``seed``, ``stream``,
  ``stream_options.include_usage``, ``user`` (metadata), ``presence_penalty`` / ``frequency_penalty`` (0 only).
- ``/v1/completions``: ``prompt`` (string, list of strings, token ids, or list of token-id lists), ``logprobs``
  (0 only: the sampled tokens' log-probs, no alternatives), ``echo`` (false only).
- ``/v1/chat/completions``: ``messages`` (system / developer / user / assistant; string or text-part content),
  ``max_completion_tokens``, ``logprobs`` (bool), ``top_logprobs`` (0 only), ``chat_template_kwargs.enable_thinking``.

Log-probs are those of the distribution each token was drawn from (see ``qlx.rollout.sampling``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """A request the server refuses; ``body()`` is OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how much the server queues.

    max_model_len: prompt tokens + max_tokens of every prompt must fit in this.
    max_rows: prompts × n of one request (also the most rows the static engine runs together).
    max_body_bytes: largest accepted request body.
    max_json_depth: deepest nesting of arrays and objects in a body (a chat request needs 5).
    max_queued_rows: rows waiting in the backend (not yet generating) the server accepts; a request that would
        pass it gets 429 with ``Retry-After``. At least ``max_rows``, so any valid request fits an empty queue.
    retry_after_s: the ``Retry-After`` seconds of that 429.
    """

    max_model_len: int = 4096
    max_rows: int = 16
    max_body_bytes: int = 8 << 20
    max_json_depth: int = 32
    max_queued_rows: int = 256
    retry_after_s: int = 1

    def __post_init__(self):
        for name in ("max_model_len", "max_rows", "max_body_bytes", "max_json_depth", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_queued_rows < self.max_rows:
            raise ValueError(
                f"ServeLimits.max_queued_rows must be >= max_rows ({self.max_rows}), got {self.max_queued_rows}"
            )


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A validated request. ``prompts[i]`` is generated ``n`` times with ``max_tokens[i]`` new tokens at most."""

    endpoint: str  # "completions" | "chat"
    model: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: tuple[int, ...]
    n: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    logprobs: bool
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class Choice:
    """One finished generation, ready to serialise. ``token_ids``/``logprobs`` exclude a final stop token."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    token_texts: tuple[str, ...]
    finish_reason: str
    completion_tokens: int


_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stop_token_ids",
    "seed",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
}
_FIELDS = {
    "completions": _COMMON | {"prompt", "echo"},
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"},
}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _bad(message: str, param: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not (_is_int(value) or isinstance(value, float)) or not low <= value <= high:
        raise _bad(f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise _bad(f"'{key}' must be an integer in [{low}, {high}], got {value!r}", key)
    return value


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _token_ids(value: Any, param: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _bad(f"'{param}' must be a non-empty list of token ids", param)
    for j, token in enumerate(value):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise _bad(f"'{param}[{j}]' must be a token id in [0, {vocab_size}), got {token!r}", f"{param}[{j}]")
    return tuple(value)


def _completion_prompts(body: dict, tokenizer, vocab_size: int) -> list[tuple[int, ...]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [_token_ids(prompt, "prompt", vocab_size)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]", vocab_size) for i, p in enumerate(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    else:
        raise _bad(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt"
        )
    prompts = []
    for i, text in enumerate(texts):
        ids = tuple(tokenizer.encode(text))
        if not ids:
            raise _bad(f"'prompt[{i}]' encodes to zero tokens", f"prompt[{i}]")
        prompts.append(ids)
    return prompts


def _message_text(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(
                    f"'messages[{i}].content[{j}]' must be a text part {{'type': 'text', 'text': ...}}",
                    f"messages[{i}].content[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"'messages[{i}].content' must be a string or a list of text parts", f"messages[{i}].content")


def _chat_prompt(body: dict, tokenizer, chat_mode: str) -> tuple[int, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of messages", "messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"'messages[{i}]' must be an object with 'role' and 'content'", f"messages[{i}]")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise _bad(
                f"'messages[{i}].role' is {role!r}; supported roles: {', '.join(_CHAT_ROLES)}", f"messages[{i}].role"
            )
        rendered.append({"role": _CHAT_ROLES[role], "content": _message_text(message, i)})
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
        raise _bad("'chat_template_kwargs' supports only {'enable_thinking': bool}", "chat_template_kwargs")
    thinking = _boolean(kwargs, "enable_thinking", True)
    mode = chat_mode if thinking else "no_think"
    return tuple(tokenizer.apply_chat_template(rendered, add_generation_prompt=True, mode=mode))


def check_json_values(body: Any, *, max_depth: int) -> None:
    """Raise APIError 400 naming the field when a string of the decoded ``body`` (a key or a value) is not valid
    Unicode (a lone surrogate, which JSON's ``"\\ud800"`` escape can produce), or when arrays and objects nest deeper
    than ``max_depth``. Iterative and linear in the body's size."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= max_depth:
                field = path.split(".")[0].split("[")[0] or None  # the top-level field (the full path is long)
                raise _bad(f"'{field or 'body'}' nests arrays and objects deeper than {max_depth} levels", field)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                child = f"{path}[{key}]" if isinstance(value, list) else f"{path}.{key}" if path else key
                if isinstance(key, str):
                    _check_unicode(key, child)
                stack.append((item, child, depth + 1))
        elif isinstance(value, str):
            _check_unicode(value, path or None)


def _check_unicode(text: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(
            f"'{param or 'body'}' is not valid Unicode: {e.reason} at character {e.start}", param, "invalid_unicode"
        ) from None


def parse_request(
    endpoint: str,
    body: Any,
    *,
    tokenizer,
    model_name: str,
    vocab_size: int,
    limits: ServeLimits,
    chat_mode: str = "thinking",
) -> ParsedRequest:
    """Validate the JSON ``body`` of ``/v1/completions`` (endpoint "completions") or ``/v1/chat/completions``
    ("chat"); token ids must lie in [0, vocab_size) (the model's vocabulary). Raises :class:`APIError` naming the
    field on anything malformed, unsupported or too large."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_json_values(body, max_depth=limits.max_json_depth)
    unknown = sorted(set(body) - _FIELDS[endpoint])
    if unknown:
        raise _bad(f"unsupported parameter '{unknown[0]}'", unknown[0], "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' is required and must be a string", "model")
    if model != model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise _bad(f"'{key}' is not supported (only 0)", key, "unsupported_parameter")
    if endpoint == "completions":
        if _boolean(body, "echo", False):
            raise _bad("'echo' is not supported (only false)", "echo", "unsupported_parameter")
        if _integer(body, "logprobs", None, 0, 20) not in (None, 0):
            raise _bad("'logprobs' supports only 0 (the sampled tokens' log-probs, no alternatives)", "logprobs")
        logprobs = body.get("logprobs") is not None
        prompts = _completion_prompts(body, tokenizer, vocab_size)
        max_tokens_key, default_max = "max_tokens", 16
    else:
        logprobs = _boolean(body, "logprobs", False)
        if _integer(body, "top_logprobs", 0, 0, 20) != 0:
            raise _bad("'top_logprobs' supports only 0 (no alternatives)", "top_logprobs")
        prompts = [_chat_prompt(body, tokenizer, chat_mode)]
        max_tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        default_max = None
    n = _integer(body, "n", 1, 1, limits.max_rows)
    if len(prompts) * n > limits.max_rows:
        raise _bad(f"{len(prompts)} prompts x n={n} exceeds the server's {limits.max_rows} rows per request", "n")
    requested = _integer(body, max_tokens_key, default_max, 1, 2**31 - 1)
    max_tokens = []
    for i, prompt in enumerate(prompts):
        room = limits.max_model_len - len(prompt)
        wanted = room if requested is None else requested
        if wanted < 1 or wanted > room:
            param = max_tokens_key if requested is not None else "messages"
            raise _bad(
                f"this model's maximum context length is {limits.max_model_len} tokens; prompt {i} has "
                f"{len(prompt)} tokens and asks for {max(wanted, 1)} more",
                param,
                "context_length_exceeded",
            )
        max_tokens.append(wanted)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list | tuple)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    stop_token_ids = body.get("stop_token_ids") or []
    stop_token_ids = _token_ids(stop_token_ids, "stop_token_ids", vocab_size) if stop_token_ids else ()
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("'stream_options' supports only {'include_usage': bool}", "stream_options")
    top_k = _integer(body, "top_k", 0, -1, vocab_size)
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        prompts=tuple(prompts),
        max_tokens=tuple(max_tokens),
        n=n,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k, 0),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        stop=tuple(stop),
        stop_token_ids=stop_token_ids,
        logprobs=logprobs,
        stream=_boolean(body, "stream", False),
        include_usage=_boolean(options, "include_usage", False),
    )


class ChoiceBuilder:
    """One generation's text as its tokens arrive (in chunks, or all at once).

    A final stop token is not part of the text, and the text ends before the earliest ``stop`` string
    (finish_reason then becomes "stop"; only tokens that end before the cut are listed). :meth:`feed` returns the
    part that became final: while the row runs, text that could still be the start of a stop string or an
    incomplete UTF-8 character is held back. :meth:`choice` is everything fed so far.

    Work per feed is bounded by the tokens since the last final one (not the whole generation): ``decode(t[:k])``
    is computed as the cached text of a settled prefix ``t[:a]`` plus ``decode(t[a - 2:k])`` minus
    ``decode(t[a - 2:a])`` (two tokens of context keep word-boundary spaces right); a settled prefix ends at a whole
    character, and a window that does not extend its context falls back to the full decode.
    """

    _CONTEXT = 2

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.finish_reason: str | None = None
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self._text = ""  # the final text so far
        self._sent = 0  # tokens already final
        self._anchor, self._settled, self._context = 0, "", ""  # a, decode(t[:a]), decode(t[a - 2:a])

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self._tokens[start:stop], skip_special_tokens=True)

    def _after_settled(self, k: int) -> str:
        """``decode(tokens[:k])`` past the settled prefix, for k >= the anchor."""
        window = self._decode(max(0, self._anchor - self._CONTEXT), k)
        if window.startswith(self._context):
            return window[len(self._context) :]
        return self._decode(0, k)[len(self._settled) :]

    def feed(self, tokens: Sequence[int], logprobs: Sequence[float], finish_reason: str | None = None) -> Choice:
        """Add the next tokens (``finish_reason`` on the last ones: "stop" when the last token is a stop token);
        returns the newly final part (its ``completion_tokens``: tokens fed so far). Nothing is added once
        finished (a stop string may finish the text before the generation ends)."""
        if self.finish_reason is not None:
            return self._delta("", self._sent)
        self._tokens += [int(t) for t in tokens]
        self._logprobs += [float(x) for x in logprobs]
        end = len(self._tokens) - (finish_reason == "stop" and bool(self._tokens))  # without a final stop token
        text = self._settled + self._after_settled(end)
        cuts = [i for i in (text.find(s, len(self._text)) for s in self.stop) if i >= 0]
        if cuts:
            final, self.finish_reason = min(cuts), "stop"
        elif finish_reason is not None:
            final, self.finish_reason = len(text), finish_reason
        else:
            final = self._safe_length(text)
        keep = end
        if len(text) > final:  # the tokens whose text ends within the final text
            keep -= 1
            while keep > self._sent and len(self._settled) + len(self._after_settled(keep)) > final:
                keep -= 1
        keep = max(keep, self._sent)
        delta = text[len(self._text) : final]
        self._text += delta
        sent, self._sent = self._sent, keep
        if keep > self._anchor:
            rest = self._after_settled(keep)
            if not rest.endswith("\ufffd"):  # settle only at a whole character
                self._anchor, self._settled = keep, self._settled + rest
                self._context = self._decode(max(0, keep - self._CONTEXT), keep)
        return self._delta(delta, sent)

    def _safe_length(self, text: str) -> int:
        """Length of ``text`` that no later token can change: without a trailing incomplete character (U+FFFD) and
        without a suffix that begins a stop string."""
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        return end - hold

    def _delta(self, text: str, first: int) -> Choice:
        tokens = self._tokens[first : self._sent]
        return Choice(
            text,
            tuple(tokens),
            tuple(self._logprobs[first : self._sent]),
            tuple(self.tokenizer.decode([t]) for t in tokens),
            self.finish_reason,
            len(self._tokens),
        )

    def choice(self) -> Choice:
        """Everything final so far (the whole generation once finished)."""
        delta = self._delta("", 0)
        return dataclasses.replace(delta, text=self._text)


def finish_choice(
    tokens: Sequence[int],
    logprobs: Sequence[float],
    finish_reason: str,
    *,
    tokenizer,
    stop: Sequence[str] = (),
) -> Choice:
    """A finished generation's :class:`Choice` (see :class:`ChoiceBuilder`)."""
    builder = ChoiceBuilder(tokenizer, stop)
    builder.feed(tokens, logprobs, finish_reason)
    return builder.choice()


def _usage(request: ParsedRequest, choices: Sequence[Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in request.prompts) * request.n
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs_body(request: ParsedRequest, choice: Choice, offset: int = 0) -> dict | None:
    if not request.logprobs:
        return None
    if request.endpoint == "completions":
        offsets = []
        for text in choice.token_texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": list(choice.token_texts),
            "token_logprobs": list(choice.logprobs),
            "top_logprobs": None,
            "text_offset": offsets,
        }
    return {
        "content": [
            {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
            for text, lp in zip(choice.token_texts, choice.logprobs, strict=True)
        ]
    }


def response_body(request: ParsedRequest, choices: Sequence[Choice]) -> dict:
    """The non-streaming JSON response; ``choices`` are ordered prompt-major (prompt i, sample j at i * n + j)."""
    created = int(time.time())
    if request.endpoint == "completions":
        items = [
            {"index": i, "text": c.text, "logprobs": _logprobs_body(request, c), "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": items,
            "usage": _usage(request, choices),
        }
    items = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _logprobs_body(request, c),
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(choices)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": items,
        "usage": _usage(request, choices),
    }


def stream_header(request: ParsedRequest) -> dict:
    """The fields every event of one streamed response shares (``id``, ``object``, ``created``, ``model``)."""
    chat = request.endpoint == "chat"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model,
    }


def stream_events(request: ParsedRequest, header: dict, index: int, delta: Choice, *, first: bool, offset: int = 0):
    """The server-sent events (each sent as ``data: <json>``; the stream ends with ``data: [DONE]``) for the newly
    final part ``delta`` of choice ``index`` (:meth:`ChoiceBuilder.feed`): a content event when it has text or
    tokens (for chat, the choice's ``first`` event carries the role), then a finish event when it finished.
    ``offset``: the summed length of the choice's token texts sent before (the completions log-probs'
    ``text_offset``)."""
    chat = request.endpoint == "chat"
    events = []
    if delta.text or delta.token_ids or (chat and first):
        logprobs = _logprobs_body(request, delta, offset)
        if chat:
            message = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            events.append({**header, "choices": [_chunk(index, delta=message, logprobs=logprobs)]})
        else:
            events.append({**header, "choices": [_chunk(index, text=delta.text, logprobs=logprobs)]})
    if delta.finish_reason is not None:
        end = (
            _chunk(index, delta={}, finish=delta.finish_reason)
            if chat
            else _chunk(index, text="", finish=delta.finish_reason)
        )
        events.append({**header, "choices": [end]})
    return events


def usage_event(request: ParsedRequest, header: dict, choices: Sequence[Choice]) -> dict:
    """The last event of a stream with ``stream_options.include_usage``."""
    return {**header, "choices": [], "usage": _usage(request, choices)}


def _chunk(index: int, *, text: str | None = None, delta: dict | None = None, logprobs=None, finish=None) -> dict:
    chunk: dict = {"index": index, "logprobs": logprobs, "finish_reason": finish}
    if delta is None:
        chunk["text"] = text
    else:
        chunk["delta"] = delta
    return chunk


def models_body(model_name: str, created: int) -> dict:
    """``GET /v1/models``."""
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "qlx"}]}

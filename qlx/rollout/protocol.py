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
    """What one request may ask for.

    max_model_len: prompt tokens + max_tokens of every prompt must fit in this.
    max_rows: prompts × n of one request (also the most rows the batching worker runs together).
    max_body_bytes: largest accepted request body.
    max_json_depth: deepest nesting of arrays and objects in a body (a chat request needs 5).
    """

    max_model_len: int = 4096
    max_rows: int = 16
    max_body_bytes: int = 8 << 20
    max_json_depth: int = 32

    def __post_init__(self):
        for name in ("max_model_len", "max_rows", "max_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1 (got {getattr(self, name)})")


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


def finish_choice(
    tokens: Sequence[int],
    logprobs: Sequence[float],
    finish_reason: str,
    *,
    tokenizer,
    stop: Sequence[str] = (),
) -> Choice:
    """Text of one generation: a final stop token is not part of the text, and the text ends before the earliest
    ``stop`` string (finish_reason then becomes "stop"; only tokens that end before the cut are listed)."""
    tokens, logprobs = list(tokens), list(logprobs)
    completion_tokens = len(tokens)
    if finish_reason == "stop" and tokens:
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cuts:
        cut = min(cuts)
        text, finish_reason = text[:cut], "stop"
        keep = 0
        while keep < len(tokens) and len(tokenizer.decode(tokens[: keep + 1], skip_special_tokens=True)) <= cut:
            keep += 1
        tokens, logprobs = tokens[:keep], logprobs[:keep]
    token_texts = tuple(tokenizer.decode([t]) for t in tokens)
    return Choice(text, tuple(tokens), tuple(float(x) for x in logprobs), token_texts, finish_reason, completion_tokens)


def _usage(request: ParsedRequest, choices: Sequence[Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in request.prompts) * request.n
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs_body(request: ParsedRequest, choice: Choice) -> dict | None:
    if not request.logprobs:
        return None
    if request.endpoint == "completions":
        offsets, offset = [], 0
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


def stream_events(request: ParsedRequest, choices: Sequence[Choice]) -> list[dict]:
    """The server-sent events of a streamed response (each sent as ``data: <json>``, then ``data: [DONE]``).

    Generation runs as one compiled loop, so each choice arrives as one content chunk followed by its finish chunk.
    """
    full = response_body(request, choices)
    base = {"id": full["id"], "created": full["created"], "model": full["model"]}
    events = []
    for i, c in enumerate(choices):
        logprobs = _logprobs_body(request, c)
        if request.endpoint == "completions":
            obj = "text_completion"
            events.append({**base, "object": obj, "choices": [_chunk(i, text=c.text, logprobs=logprobs)]})
            events.append({**base, "object": obj, "choices": [_chunk(i, text="", finish=c.finish_reason)]})
        else:
            obj = "chat.completion.chunk"
            delta = {"role": "assistant", "content": c.text}
            events.append({**base, "object": obj, "choices": [_chunk(i, delta=delta, logprobs=logprobs)]})
            events.append({**base, "object": obj, "choices": [_chunk(i, delta={}, finish=c.finish_reason)]})
    if request.include_usage:
        obj = "text_completion" if request.endpoint == "completions" else "chat.completion.chunk"
        events.append({**base, "object": obj, "choices": [], "usage": full["usage"]})
    return events


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

"""The one OpenAI client (qlx.openai_client) against a local stub: which errors are retried, streaming, seeds,
bounded concurrency."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qlx.openai_client import ClientConfig, LLMError, OpenAIClient


class _Stub:
    """Replies from ``script`` (status, body) in order, then 200 "ok"; streams when asked; tracks concurrency."""

    def __init__(self, script=(), delay=0.0):
        self.script, self.delay, self.bodies = list(script), delay, []
        self.active = self.peak = 0
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.bodies.append(body)
                    stub.active += 1
                    stub.peak = max(stub.peak, stub.active)
                    status, payload = stub.script.pop(0) if stub.script else (200, None)
                time.sleep(stub.delay)
                with lock:
                    stub.active -= 1
                if body.get("stream") and status == 200:
                    return self._stream(body)
                text = payload if isinstance(payload, bytes) else json.dumps(_reply(payload or "ok")).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def _stream(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunks = [{"delta": {"content": "hel"}}, {"delta": {"content": "lo"}, "finish_reason": "length"}]
                for c in chunks:
                    event = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
                    self.wfile.write(f"data: {json.dumps({**event, 'choices': [{'index': 0, **c}]})}\n\n".encode())
                usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
                self.wfile.write(
                    f"data: {json.dumps({**event, 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
                )

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def client(self, **kw):
        config = ClientConfig(f"http://127.0.0.1:{self.server.server_port}/v1", "m", **{"backoff_s": 0.0, **kw})
        return OpenAIClient(config)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _reply(content):
    message = {"role": "assistant", "content": content}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip


MSG = [{"role": "user", "content": "hi"}]


def test_429_and_5xx_are_retried_other_4xx_are_not():
    stub = _Stub([(429, b"slow down"), (503, b"busy"), (200, None)])
    client = stub.client(max_retries=2)
    done = client.complete(MSG, seed=7, top_p=0.9)
    assert (done.text, done.finish_reason, done.usage["total_tokens"]) == ("ok", "stop", 2)
    assert client.requests == 3 and client.retries == 2 and stub.bodies[-1]["seed"] == 7
    stub.script = [(404, b'{"error": "no such model"}')]
    with pytest.raises(LLMError, match="HTTP 404.*no such model") as info:
        client.chat(MSG)
    assert info.value.attempts == 1 and client.requests == 4
    stub.script = [(500, b"x")] * 3
    with pytest.raises(LLMError, match="after 3 attempts.*HTTP 500") as info:
        client.chat(MSG)
    assert info.value.attempts == 3
    stub.close()


def test_backoff_is_exponential_and_capped():
    stub = _Stub([(502, b"")] * 4)
    waits = []
    config = ClientConfig(
        f"http://127.0.0.1:{stub.server.server_port}/v1", "m", max_retries=4, backoff_s=1.0, max_backoff_s=3.0
    )
    assert OpenAIClient(config, sleep=waits.append).chat(MSG) == "ok"
    assert waits == [1.0, 2.0, 3.0, 3.0]
    stub.close()


def test_streaming_collects_text_finish_reason_and_usage():
    stub = _Stub()
    done = stub.client().complete(MSG, stream=True, max_tokens=2)
    assert (done.text, done.finish_reason, done.usage) == (
        "hello", "length", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    )  # fmt: skip
    assert stub.bodies[0]["stream"] is True and stub.bodies[0]["stream_options"] == {"include_usage": True}
    stub.close()


def test_map_bounds_concurrency_and_keeps_failures():
    stub = _Stub(delay=0.15)
    client = stub.client(concurrency=3)

    def ask(i):
        if i == 4:
            raise ValueError("bad item")
        return client.chat([{"role": "user", "content": str(i)}])

    results = dict(client.map(ask, range(9)))
    assert sorted(results) == list(range(9)) and isinstance(results[4], ValueError)
    assert all(results[i] == "ok" for i in results if i != 4)
    assert stub.peak == 3
    stub.close()

"""The OpenAI-compatible server (ASGI on uvicorn) over a real localhost socket: the official openai client, raw
HTTP, concurrent batching, error responses, streaming per backend chunk, cancellation on disconnect, the queue
budget's 429, /metrics, and `qlx serve`'s loading of Hugging Face and qlx checkpoints."""

import http.client
import io
import json
import queue
import random
import socket
import threading
import time
from urllib.parse import urlparse

import jax
import numpy as np
import openai
import pytest
import torch
import yaml
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families
from transformers import Qwen3Config, Qwen3ForCausalLM

import qlx
from qlx.cli import main as qlx_main
from qlx.data.llm import ChatClient, LLMConfig
from qlx.data.tokenizer import load_tokenizer, render_chat, train_bpe_tokenizer
from qlx.rl.rewards.judge import Judge, JudgeConfig
from qlx.rollout import OpenAIServer, generate, serve_in_thread
from qlx.rollout.backend import BackendStats, Chunk, ContinuousBackend, Row, StaticBackend
from qlx.rollout.engine import SamplingSpec
from qlx.rollout.protocol import ChoiceBuilder, ServeLimits, finish_choice
from qlx.rollout.serve_cli import build_server, load_model

NAME = "tiny"
LIMITS = ServeLimits(max_model_len=512, max_rows=8, max_body_bytes=4096)


def _texts(n=200):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghiklmnoprstu") for _ in range(rng.randint(2, 7))) for _ in range(200)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(_texts(), vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    """A tiny random Qwen3 with the tokenizer's vocabulary (made by transformers, loaded with qlx.load_hf)."""
    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("served")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return qlx.load_hf(path)


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with serve_in_thread(model, tokenizer, model_name=NAME, limits=LIMITS) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def _stops(tokenizer):
    return [tokenizer.im_end_id, tokenizer.pad_id]


def _expected(model, tokenizer, prompt_ids, max_tokens):
    """Greedy continuation through generate(): (tokens without a final stop token, log-probs, finish reason)."""
    result = generate(model, [prompt_ids], max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=_stops(tokenizer))
    tokens, logprobs = result.sequences()[0], result.logprobs[0, : result.lengths[0]]
    if result.finish_reasons[0] == "stop":
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    return tokens, logprobs, result.finish_reasons[0]


def _post(url, path, body: bytes, headers=None):
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_models_and_completions_through_the_openai_client(client, model, tokenizer):
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "the quick brown fox"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
    tokens, logprobs, finish = _expected(model, tokenizer, tokenizer.encode(prompt), 10)
    choice = out.choices[0]
    assert choice.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.finish_reason == finish
    np.testing.assert_allclose(choice.logprobs.token_logprobs, logprobs, atol=1e-5)
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    # Token-id prompts, several prompts and n > 1 in one request: choices are prompt-major.
    ids = [tokenizer.encode("abc de"), tokenizer.encode("fox")]
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, n=2)
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, prompt_ids in enumerate(ids):
        text = tokenizer.decode(_expected(model, tokenizer, prompt_ids, 6)[0], skip_special_tokens=True)
        assert out.choices[2 * i].text == out.choices[2 * i + 1].text == text


def test_chat_completions_streamed_and_not(client, model, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc de fox"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True)
    prompt_ids = tokenizer.encode(render_chat(messages, add_generation_prompt=True, mode="thinking"))
    tokens, logprobs, finish = _expected(model, tokenizer, prompt_ids, 8)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert out.choices[0].finish_reason == finish
    np.testing.assert_allclose([t.logprob for t in out.choices[0].logprobs.content], logprobs, atol=1e-5)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sampling_with_a_seed_is_reproducible_and_stop_strings_cut(client):
    kwargs = dict(model=NAME, prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, n=2, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # the n samples use different streams
    text = first.choices[0].text
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    out = client.completions.create(**{**kwargs, "n": 1, "stop": [cut]})
    assert out.choices[0].text == text[: text.index(cut)] and out.choices[0].finish_reason == "stop"


def test_the_projects_own_clients_talk_to_it(url, client):
    """The synthesis engines' ChatClient and the reward judge speak to this server unchanged."""
    messages = [{"role": "user", "content": "abc de fox"}]
    expected = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    reply = ChatClient(LLMConfig(base_url=url, model=NAME, max_retries=0)).chat(messages, max_tokens=8)
    assert reply == expected.choices[0].message.content
    judge = Judge(JudgeConfig(base_url=url, model=NAME, max_tokens=8, retries=0))
    assert judge.equivalent("What is 2 + 2?", "4", "four") in (True, False)  # None would mean the request failed


def test_concurrent_requests_are_batched_together(model, tokenizer):
    server = OpenAIServer(model, tokenizer, model_name=NAME, limits=LIMITS, batch_wait_s=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    prompts = ["abc", "fox de", "the quick brown", "de"]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=5, temperature=0).choices[0]

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.close()
        thread.join()
    assert len(server.backend.batches) < len(prompts) and sum(server.backend.batches) == len(prompts)
    for prompt, choice in zip(prompts, results, strict=True):
        tokens = _expected(model, tokenizer, tokenizer.encode(prompt), 5)[0]
        assert choice.text == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": "a", "best_of": 2}).encode(), 400, "best_of"),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": "a", "max_tokens": 600}).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": [1, -3]}).encode(), 400, "prompt[1]"),
        (
            "/v1/completions",
            json.dumps({"model": NAME, "prompt": "a", "temperature": "hot"}).encode(),
            400,
            "temperature",
        ),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": "a", "n": 9}).encode(), 400, "n"),
        ("/v1/completions", json.dumps({"model": "gpt-4", "prompt": "a"}).encode(), 404, "model"),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": "x" * 5000}).encode(), 413, None),
        (
            "/v1/chat/completions",
            json.dumps({"model": NAME, "messages": [{"role": "robot", "content": "a"}]}).encode(),
            400,
            "messages[0].role",
        ),
        ("/v1/chat/completions", json.dumps({"model": NAME, "messages": []}).encode(), 400, "messages"),
        ("/v1/embeddings", json.dumps({"model": NAME, "input": "a"}).encode(), 404, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, client, path, body, status, param):
    got, payload = _post(url, path, body)
    assert got == status, payload
    error = payload["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert client.completions.create(model=NAME, prompt="abc", max_tokens=2, temperature=0).choices[0].text is not None


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=600)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="a")


def test_qlx_serve_loads_hf_and_qlx_checkpoints(tmp_path, model, tokenizer, capsys):
    qlx.save_hf(model, tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    texts = {}
    for engine in ("static", "continuous"):
        server = build_server(build_args(tmp_path / "hf", "--engine", engine, "--max-batch", "4", "--burst", "2"))
        assert type(server.backend).__name__ == {"static": "StaticBackend", "continuous": "ContinuousBackend"}[engine]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
            assert [m.id for m in client.models.list().data] == ["hf"]
            out = client.completions.create(model="hf", prompt="abc", max_tokens=4, temperature=0)
            texts[engine] = out.choices[0].text
        finally:
            server.close()
            thread.join()
    tokens = _expected(model, tokenizer, tokenizer.encode("abc"), 4)[0]
    assert texts["static"] == texts["continuous"] == tokenizer.decode(tokens, skip_special_tokens=True)
    with pytest.raises(ValueError, match="--max-batch must be a power of two"):
        build_server(build_args(tmp_path / "hf", "--engine", "continuous", "--max-batch", "6"))

    from qlx.config import to_dict
    from qlx.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.config)}))
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(5, {"params": nnx.split(model, nnx.Param, ...)[1]}, {})
    ckpt.close()
    restored = load_model(run)
    for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        load_model(tmp_path)
    assert qlx_main(["serve", "--ckpt", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "neither a Hugging Face directory" in capsys.readouterr().err


def build_args(ckpt, *extra):
    import argparse

    from qlx.rollout import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(["--ckpt", str(ckpt), "--port", "0", "--max-model-len", "64", *extra])


def _raw(url, request: bytes):
    """Send raw request bytes on a fresh connection; (status, headers, JSON payload or None)."""
    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


def _post_bytes(path, body: bytes, headers=b""):
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers + (
        b"Content-Length: %d\r\n\r\n" % len(body) if b"Content-Length" not in headers else b"\r\n") + body  # fmt: skip


_COMPLETION = '{"model": "tiny", "prompt": %s}'
_CHAT = '{"model": "tiny", "messages": [{"role": "user", "content": %s}]}'


@pytest.mark.parametrize(
    ("request_bytes", "status", "param"),
    [
        (_post_bytes("/v1/completions", (_COMPLETION % '"ab\\ud800"').encode()), 400, "prompt"),
        (_post_bytes("/v1/completions", (_COMPLETION % '["ok", "\\udfff"]').encode()), 400, "prompt[1]"),
        (_post_bytes("/v1/chat/completions", (_CHAT % '"\\ud800"').encode()), 400, "messages[0].content"),
        (_post_bytes("/v1/chat/completions", (_CHAT % '[{"type": "text", "text": "\\ud83d"}]').encode()), 400,
         "messages[0].content[0].text"),
        (_post_bytes("/v1/completions", b'{"model": "tiny", "prompt": "a", "\\ud800": 1}'), 400, "\ud800"),
        (_post_bytes("/v1/completions", (_COMPLETION % ("[" * 40 + "1" + "]" * 40)).encode()), 400, "prompt"),
        (_post_bytes("/v1/completions", (_COMPLETION % ("[" * 1900 + "]" * 1900)).encode()), 400, None),
        (_post_bytes("/v1/completions", b'{"model": "tiny", "prompt": "a", "temperature": NaN}'), 400, None),
        (_post_bytes("/v1/completions", b"", b"Content-Length: -5\r\n"), 400, None),
        (_post_bytes("/v1/completions", b"{}", b"Content-Length: 2x\r\n"), 400, None),
        (_post_bytes("/v1/completions", b"{}", b"Content-Length: 2\r\nContent-Length: 3\r\n"), 400, None),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411, None),
        (b"FOO /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 501, None),
        (b"GET /v1/models extra-word HTTP/1.1\r\nHost: x\r\n\r\n", 400, None),
    ],
    ids=["surrogate", "surrogate_list", "chat_surrogate", "chat_part_surrogate", "surrogate_key", "nested_40",
         "nested_1900", "nan", "negative_length", "bad_length", "two_lengths", "no_length", "unknown_method",
         "bad_request_line"],
)  # fmt: skip
def test_hostile_requests_get_json_4xx_and_the_server_keeps_serving(url, client, request_bytes, status, param):
    got, headers, payload = _raw(url, request_bytes)
    assert got == status and headers["Content-Type"] == "application/json", (got, payload)
    assert payload["error"]["param"] == param and payload["error"]["message"]
    assert client.completions.create(model=NAME, prompt="abc", max_tokens=2, temperature=0).choices[0].text is not None


@pytest.mark.parametrize(("path", "status"), [("/health", 200), ("/v1/models", 200), ("/v1/completions", 405)])
def test_head_answers_like_get_without_a_body(url, path, status):
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", path)
    get = connection.getresponse()
    body = get.read()
    connection.request("HEAD", path)  # same connection: a HEAD answer without a body keeps it usable
    head = connection.getresponse()
    assert (head.status, get.status) == (status, status) and head.read() == b""
    assert head.getheader("Content-Length") == str(len(body)) and head.getheader("Content-Type") == "application/json"
    connection.close()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET"), ("PATCH", "/v1/chat/completions", "POST"),
     ("OPTIONS", "/health", "GET")],
)  # fmt: skip
def test_unsupported_methods_get_json_405_with_allow(url, client, method, path, allow):
    body = b'{"model": "tiny"}'
    got, headers, payload = _raw(url, b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        method.encode(), path.encode(), len(body), body))  # fmt: skip
    assert (got, headers["Allow"], headers["Content-Type"]) == (405, allow, "application/json")
    assert payload["error"]["code"] == "method_not_allowed" and method in payload["error"]["message"]
    assert client.completions.create(model=NAME, prompt="abc", max_tokens=2, temperature=0).choices[0].text is not None


class ScriptedBackend:
    """A backend the test drives (the protocol of ``qlx.rollout.backend``): it records what the server submits
    and cancels, holds every submitted row as queued until ``finish``, and the test sends the chunks itself."""

    max_rows = 8

    def __init__(self):
        self.submitted: queue.Queue = queue.Queue()  # (request_id, rows, sink)
        self.cancelled: queue.Queue = queue.Queue()
        self.open: dict[str, int] = {}

    def start(self):
        pass

    def close(self):
        pass

    def submit(self, request_id, rows, sink):
        self.open[request_id] = len(rows)
        self.submitted.put((request_id, rows, sink))

    def cancel(self, request_id):
        self.cancelled.put(request_id)

    def finish(self, request_id):
        del self.open[request_id]

    def stats(self):
        return BackendStats(
            queued_rows=sum(self.open.values()),
            busy_slots=1,
            total_slots=self.max_rows,
            generated_tokens=42,
            tokens_per_s=12.5,
            cancelled_rows=self.cancelled.qsize(),
            kv_pages_used=3,
            kv_pages_total=10,
        )


@pytest.fixture
def scripted(model, tokenizer):
    backend = ScriptedBackend()
    limits = ServeLimits(max_model_len=512, max_rows=4, max_queued_rows=6, retry_after_s=3)
    with serve_in_thread(model, tokenizer, model_name=NAME, limits=limits, backend=backend) as base_url:
        yield backend, base_url


def _open_stream(url, body: dict):
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def _next_event(response):
    """The next server-sent event's JSON (or "[DONE]")."""
    while True:
        line = response.readline()
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :].strip()
            return data.decode() if data == b"[DONE]" else json.loads(data)


def test_streamed_chunks_arrive_before_the_request_ends(scripted, tokenizer):
    backend, url = scripted
    conn = _open_stream(url, {"model": NAME, "prompt": "abc", "max_tokens": 20, "stream": True, "logprobs": 0})
    request_id, rows, sink = backend.submitted.get(timeout=60)
    assert [r.prompt for r in rows] == [tuple(tokenizer.encode("abc"))] and rows[0].spec.max_new_tokens == 20
    first, second = tokenizer.encode("fox de"), tokenizer.encode(" the quick")
    sink.chunk(Chunk(0, tuple(first), (-0.5,) * len(first)))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    event = _next_event(response)  # arrives while the backend has not finished the row
    assert event["choices"][0]["text"] == tokenizer.decode(first) and event["choices"][0]["finish_reason"] is None
    assert event["choices"][0]["logprobs"]["token_logprobs"] == [-0.5] * len(first)
    assert backend.cancelled.empty()
    backend.finish(request_id)
    sink.chunk(Chunk(0, (*second, tokenizer.im_end_id), (-1.0,) * (len(second) + 1), "stop"))
    event = _next_event(response)
    assert tokenizer.decode(first) + event["choices"][0]["text"] == tokenizer.decode(first + second)
    assert event["choices"][0]["logprobs"]["text_offset"][0] == len(tokenizer.decode(first))
    assert _next_event(response)["choices"][0]["finish_reason"] == "stop"
    assert _next_event(response) == "[DONE]"
    conn.close()
    assert backend.cancelled.empty()  # the backend ended the request itself: nothing to cancel


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_gets_its_request_cancelled(scripted, tokenizer, stream):
    backend, url = scripted
    conn = _open_stream(url, {"model": NAME, "prompt": "abc", "max_tokens": 20, "stream": stream, "n": 2})
    request_id, rows, sink = backend.submitted.get(timeout=60)
    assert len(rows) == 2
    if stream:  # mid-stream: after the first chunk was delivered
        sink.chunk(Chunk(1, tuple(tokenizer.encode("fox")), (0.0,)))
        assert _next_event(conn.getresponse())["choices"][0]["index"] == 1
    conn.close()
    assert backend.cancelled.get(timeout=30) == request_id
    backend.finish(request_id)


def test_requests_over_the_queue_budget_get_429_with_retry_after(scripted, tokenizer):
    backend, url = scripted
    waiting = _open_stream(url, {"model": NAME, "prompt": "abc", "max_tokens": 4, "n": 4})  # 4 of the 6 queued rows
    request_id, rows, sink = backend.submitted.get(timeout=60)
    body = json.dumps({"model": NAME, "prompt": ["a", "b", "c"], "max_tokens": 4}).encode()
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    assert (response.status, response.getheader("Retry-After")) == (429, "3")
    assert payload["error"]["code"] == "rate_limit_exceeded" and "4 rows" in payload["error"]["message"]
    assert backend.submitted.empty()  # the refused request never reached the backend
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=NAME, prompt=["a", "b", "c"], max_tokens=4)
    backend.finish(request_id)  # the queue drains: the same request is accepted now
    for row in range(4):
        sink.chunk(Chunk(row, tuple(tokenizer.encode("de")), (0.0,), "length"))
    assert waiting.getresponse().status == 200
    waiting.close()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    other_id, rows, sink = backend.submitted.get(timeout=60)
    assert len(rows) == 3
    backend.finish(other_id)
    for row in range(3):
        sink.chunk(Chunk(row, (), (), "length"))
    assert conn.getresponse().status == 200
    conn.close()


def _metrics(url):
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.read().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    conn.close()
    return samples


def test_metrics_report_the_backend_and_the_requests(scripted):
    backend, url = scripted
    samples = _metrics(url)
    for name, value in [("qlx_queue_depth", 0), ("qlx_slots_busy", 1), ("qlx_slots_total", 8),
                        ("qlx_tokens_per_second", 12.5), ("qlx_generated_tokens_total", 42),
                        ("qlx_kv_pages_used", 3), ("qlx_kv_pages_total", 10), ("qlx_requests_running", 0)]:  # fmt: skip
        assert samples[(name, ())] == value, name
    backend.open["someone"] = 5
    assert _metrics(url)[("qlx_queue_depth", ())] == 5
    assert _metrics(url)[("qlx_requests_total", (("path", "/metrics"), ("status", "200")))] >= 2


def test_metrics_count_the_static_engines_tokens(url, client):
    before = _metrics(url)[("qlx_generated_tokens_total", ())]
    out = client.completions.create(model=NAME, prompt="abc de", max_tokens=7, temperature=0, n=2)
    after = _metrics(url)
    assert after[("qlx_generated_tokens_total", ())] - before == out.usage.completion_tokens
    assert after[("qlx_time_to_first_token_seconds_count", ())] >= 1 and after[("qlx_queue_depth", ())] == 0


class _Recorder:
    def __init__(self):
        self.chunks, self.errors, self.done = [], [], threading.Event()

    def chunk(self, chunk):
        self.chunks.append(chunk)
        if chunk.finish_reason is not None:
            self.done.set()

    def fail(self, error):
        self.errors.append(error)
        self.done.set()


def test_static_backend_drops_a_request_cancelled_in_the_queue(model, tokenizer):
    backend = StaticBackend(model, max_rows=4, batch_wait_s=0.5)
    backend.start()
    kept, dropped = _Recorder(), _Recorder()
    spec = SamplingSpec(max_new_tokens=5, temperature=0.0, stop_token_ids=tuple(_stops(tokenizer)))
    prompt = tuple(tokenizer.encode("fox de"))
    try:
        backend.submit("kept", [Row(prompt, spec)], kept)
        backend.submit("dropped", [Row(prompt, spec), Row(prompt, spec)], dropped)
        backend.cancel("dropped")  # within the batch window: before the batch runs
        assert kept.done.wait(120) and dropped.done.wait(120)
    finally:
        backend.close()
    assert backend.batches == [1]
    assert [(c.row, c.tokens, c.finish_reason) for c in dropped.chunks] == [(0, (), "cancelled"), (1, (), "cancelled")]
    tokens, logprobs, finish = _expected(model, tokenizer, list(prompt), 5)
    (chunk,) = kept.chunks
    assert chunk.finish_reason == finish and list(chunk.tokens[: len(tokens)]) == tokens
    stats = backend.stats()
    assert (stats.queued_rows, stats.busy_slots, stats.cancelled_rows) == (0, 0, 2)
    assert stats.generated_tokens == len(chunk.tokens)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A sentencepiece BPE (dummy prefix: a word's leading space is dropped at the start of a decode; bytes for
    characters it has no piece for)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts()),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
        byte_fallback=True,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return load_tokenizer(path)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("seed", range(6))
def test_choice_builder_fed_in_pieces_equals_the_whole(tokenizer, sp_tokenizer, kind, seed):
    """Text, tokens and log-probs streamed in random pieces add up to the one-shot answer, and match the
    definition: decode without a final stop token, cut before the stop string, tokens that end before the cut.
    Seeds 4 and 5 have characters split over several byte tokens (a piece may end inside one)."""
    tokenizer = tokenizer if kind == "bpe" else sp_tokenizer
    rng = random.Random(seed)
    text = " ".join(_texts(40)[rng.randrange(40)] for _ in range(3)) if seed < 4 else "abc naïve 日本語 de 😀 fox " * 2
    tokens = tokenizer.encode(text)[:40]
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    start = rng.randrange(1, len(full) - 3)
    stop = full[start : start + rng.randint(1, 3)]
    finish = rng.choice(["stop", "length"])
    if finish == "stop":
        tokens = [*tokens, tokenizer.im_end_id]
    logprobs = [-0.1 * i for i in range(len(tokens))]
    for stops in [(), (stop,)]:
        builder = ChoiceBuilder(tokenizer, stops)
        pieces, i = [], 0
        while i < len(tokens):
            j = min(len(tokens), i + rng.randint(1, 4))
            pieces.append(builder.feed(tokens[i:j], logprobs[i:j], finish if j == len(tokens) else None))
            i = j
        streamed = "".join(p.text for p in pieces)
        whole = finish_choice(tokens, logprobs, finish, tokenizer=tokenizer, stop=stops)
        body = tokens[:-1] if finish == "stop" else tokens
        cut = full.find(stop) if stops else len(full)
        keep = max(k for k in range(len(body) + 1) if len(tokenizer.decode(body[:k], skip_special_tokens=True)) <= cut)
        assert streamed == whole.text == full[:cut]
        assert [t for p in pieces for t in p.token_ids] == list(whole.token_ids) == body[:keep]
        assert [x for p in pieces for x in p.logprobs] == list(whole.logprobs) == logprobs[:keep]
        assert builder.finish_reason == whole.finish_reason == ("stop" if stops else finish)


def test_continuous_backend_streams_per_burst_and_answers_as_the_static_engine(model, tokenizer):
    """The continuous engine (``qlx.rollout.continuous``) behind the server: a stream arrives in one event per
    burst, a client leaving mid-stream frees its slot, and every answer equals the static engine's greedy one."""
    from qlx.rollout import continuous

    config = continuous.EngineConfig(max_slots=8, page_size=16, num_pages=128, burst=4, max_len=512, prefill_chunk=64)
    backend = ContinuousBackend(continuous.ContinuousEngine(model, config), max_rows=8)
    limits = ServeLimits(max_model_len=512, max_rows=8)
    with serve_in_thread(model, tokenizer, model_name=NAME, limits=limits, backend=backend) as base_url:
        conn = _open_stream(base_url, {"model": NAME, "prompt": "abc", "max_tokens": 12, "temperature": 0,
                                       "stream": True})  # fmt: skip
        response = conn.getresponse()
        events = []
        while (event := _next_event(response)) != "[DONE]":
            events.append(event["choices"][0])
        conn.close()
        long = _open_stream(base_url, {"model": NAME, "prompt": "de", "max_tokens": 400, "stream": True})
        _next_event(long.getresponse())
        long.close()  # mid-stream: the engine cancels the row and frees its slot
        deadline = time.monotonic() + 60
        while backend.stats().cancelled_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = backend.stats()
        assert (stats.cancelled_rows, stats.busy_slots, stats.queued_rows) == (1, 0, 0)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        prompts = ["fox de", "the quick brown", "abc de fox"]
        out = client.completions.create(model=NAME, prompt=prompts, max_tokens=12, temperature=0, n=2)
        metrics = _metrics(base_url)
    tokens, _, finish = _expected(model, tokenizer, tokenizer.encode("abc"), 12)
    texts = [e["text"] for e in events if e["finish_reason"] is None]
    assert len(texts) == 3 and "".join(texts) == tokenizer.decode(tokens, skip_special_tokens=True)  # 12 / burst 4
    assert events[-1]["finish_reason"] == finish == "length"
    for i, prompt in enumerate(prompts):
        text = tokenizer.decode(_expected(model, tokenizer, tokenizer.encode(prompt), 12)[0], skip_special_tokens=True)
        assert out.choices[2 * i].text == out.choices[2 * i + 1].text == text
    assert metrics[("qlx_kv_pages_total", ())] == 127 and metrics[("qlx_cancelled_rows_total", ())] == 1

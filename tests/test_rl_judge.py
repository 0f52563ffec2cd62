"""The LLM judge against a local OpenAI-compatible stub server: verdicts, retries, timeouts and degradation."""

import http.server
import json
import logging
import threading
import time

import pytest

from qlx.rl import rewards as R


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers from the server's queue of actions: ("reply", text), ("status", code), ("sleep", s), ("garbage", b)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers, body))  # case-insensitive names
        kind, arg = self.server.actions.pop(0) if self.server.actions else ("reply", "[[NO]]")
        if kind == "sleep":  # the client times out first; nothing is sent
            time.sleep(arg)
            return
        if kind == "status":
            self.send_response(arg)
            self.end_headers()
            return
        data = arg if kind == "garbage" else json.dumps({"choices": [{"message": {"content": arg}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.actions, srv.requests = [], []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(srv, **kw):
    cfg = dict(base_url=f"http://127.0.0.1:{srv.server_port}/v1", model="judge-model", timeout=2.0, backoff=0.0)
    return R.Judge(R.JudgeConfig(**{**cfg, **kw}))


def test_yes_verdict_raises_a_failed_rule_to_one_and_sends_an_openai_request(server):
    server.actions = [("reply", "Both name the same city. [[YES]]")]
    response = "<think>...</think>Therefore, the answer is the French capital."
    got = R.reward("reading", response, "Paris", question="Where is the Louvre?", judge=_judge(server, api_key="k"))
    assert got == 1.0
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"][0]["role"] == "system"
    assert "Problem: Where is the Louvre?" in body["messages"][1]["content"]
    assert "Answer 1: the French capital." in body["messages"][1]["content"]
    assert "Answer 2: Paris" in body["messages"][1]["content"]


def test_no_verdict_keeps_the_rule_and_rule_success_skips_the_judge(server):
    server.actions = [("reply", "YES they look alike at first, but no. [[NO]]")]
    assert R.reward("numerical", "the answer is 12", "13", judge=_judge(server)) == 0.0
    assert R.reward("reading", "the answer is Paris", "Paris", judge=_judge(server)) == 1.0
    assert R.reward("mc", "The correct answer is (A)", "B", judge=_judge(server)) == 0.0  # mc is not judged
    assert len(server.requests) == 1


def test_verdict_parsing():
    assert R.parse_verdict("... [[NO]] wait, actually [[YES]]") is True
    assert R.parse_verdict("[[YES]] hmm [[NO]]") is False
    assert R.parse_verdict("YES") is True and R.parse_verdict("no idea") is False


def test_retries_after_errors_then_succeeds(server):
    server.actions = [("status", 500), ("garbage", b"{not json"), ("reply", "[[YES]]")]
    assert _judge(server, retries=2).equivalent("q", "a", "b") is True
    assert len(server.requests) == 3


def test_failures_degrade_to_the_rule_with_a_warning(server, caplog):
    server.actions = [("status", 503), ("status", 503)]
    with caplog.at_level(logging.WARNING, logger="qlx.rl.rewards.judge"):
        assert R.reward("multihop", "the answer is Lyon", "Paris", judge=_judge(server, retries=1)) == 0.0
    assert "failed 2 times" in caplog.text and len(server.requests) == 2


def test_timeout_degrades_within_the_time_budget(server, caplog):
    server.actions = [("sleep", 1.5), ("sleep", 1.5)]
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="qlx.rl.rewards.judge"):
        assert _judge(server, timeout=0.3, retries=1).equivalent("q", "a", "b") is None
    assert time.perf_counter() - start < 1.4
    assert "timed out" in caplog.text


def test_unreachable_endpoint_degrades(caplog):
    judge = R.Judge(R.JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout=0.5, retries=0))
    with caplog.at_level(logging.WARNING, logger="qlx.rl.rewards.judge"):
        assert R.reward("reading", "the answer is Lyon", "Paris", judge=judge) == 0.0
    assert "keeping the rule verdict" in caplog.text


def test_config_is_validated():
    with pytest.raises(ValueError, match="base_url"):
        R.JudgeConfig(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="timeout"):
        R.JudgeConfig(base_url="http://x", model="m", timeout=0)
